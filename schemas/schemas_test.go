package schemas_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/schemas"
)

// A testdata folder per schema, with how to check a file against it and how many files each
// folder must hold at least, so that a misplaced folder cannot make the test pass vacuously.
var testdataSets = []struct {
	dir                  string
	schema               func() *jsonschema.Schema
	decode               func([]byte) error // the ingress path; nil when there is none
	minValid, minInvalid int
}{
	{"build-request", schemas.BuildRequest, func(b []byte) error { _, err := protocol.DecodeBuildRequest(b); return err }, 5, 10},
	{"stop-request", schemas.StopRequest, func(b []byte) error { _, err := protocol.DecodeStopRequest(b); return err }, 2, 4},
	{"build-event", schemas.BuildEvent, func(b []byte) error { _, err := protocol.DecodeEvent(b); return err }, 4, 5},
	{"build-record", schemas.BuildRecord, nil, 2, 4},
	{"log-chunk", schemas.LogChunk, func(b []byte) error { _, err := protocol.DecodeLogChunk(b); return err }, 3, 4},
}

func TestTestdata(t *testing.T) {
	for _, set := range testdataSets {
		for _, want := range []string{"valid", "invalid"} {
			files, err := filepath.Glob(filepath.Join("testdata", set.dir, want, "*.json"))
			if err != nil {
				t.Fatal(err)
			}
			atLeast := set.minValid
			if want == "invalid" {
				atLeast = set.minInvalid
			}
			if len(files) < atLeast {
				t.Errorf("testdata/%s/%s holds %d files, want at least %d", set.dir, want, len(files), atLeast)
			}
			for _, file := range files {
				t.Run(filepath.ToSlash(file), func(t *testing.T) {
					data, err := os.ReadFile(file)
					if err != nil {
						t.Fatal(err)
					}
					schemaErr := validateRaw(set.schema(), data)
					var decodeErr error
					if set.decode != nil {
						decodeErr = set.decode(data)
					}
					if want == "valid" {
						if schemaErr != nil {
							t.Errorf("schema rejects a valid document: %v", schemaErr)
						}
						if decodeErr != nil {
							t.Errorf("decode rejects a valid document: %v", decodeErr)
						}
						return
					}
					if set.decode == nil {
						if schemaErr == nil {
							t.Errorf("schema accepts an invalid document")
						}
						return
					}
					checkNamesField(t, data, decodeErr)
				})
			}
		}
	}
}

// checkNamesField checks that an invalid document was rejected with a *ValidationError whose
// every problem names the offending field — unless the document is not even a JSON object,
// in which case there is no field to name.
func checkNamesField(t *testing.T, data []byte, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("decode accepts an invalid document")
	}
	var ve *protocol.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("decode error is %T (%v), want *protocol.ValidationError", err, err)
	}
	if len(ve.Problems) == 0 {
		t.Fatalf("ValidationError has no problems: %v", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("Error() = %q, want a single line", err)
	}
	var obj map[string]any
	if json.Unmarshal(data, &obj) != nil || obj == nil {
		return
	}
	for _, p := range ve.Problems {
		if !strings.HasPrefix(p, "/") {
			t.Errorf("problem %q does not start with the JSON pointer of a field", p)
		}
	}
}

func validateRaw(sch *jsonschema.Schema, data []byte) error {
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return err
	}
	return sch.Validate(inst)
}

// readSchema parses one schema document as plain JSON.
func readSchema(t *testing.T, name string) map[string]any {
	t.Helper()
	raw, err := fs.ReadFile(schemas.Files, name)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return doc
}

// at follows a path of object keys through a parsed document.
func at(t *testing.T, doc map[string]any, path ...string) any {
	t.Helper()
	var node any = doc
	for _, key := range path {
		obj, ok := node.(map[string]any)
		if !ok {
			t.Fatalf("%s is not an object", strings.Join(path, "/"))
		}
		node = obj[key]
	}
	return node
}

func TestIDPatternIsProtocolIDPattern(t *testing.T) {
	for _, name := range []string{"build-request.v1.json", "stop-request.v1.json", "build-event.v1.json", "build-record.v1.json"} {
		got, _ := at(t, readSchema(t, name), "$defs", "buildId", "pattern").(string)
		if got != protocol.IDPattern {
			t.Errorf("%s $defs/buildId/pattern = %s, want protocol.IDPattern %s", name, got, protocol.IDPattern)
		}
	}
}

func TestSchemaDocuments(t *testing.T) {
	names, err := fs.Glob(schemas.Files, "*.json")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"build-event.v1.json", "build-record.v1.json", "build-request.v1.json", "log-chunk.v1.json", "stop-request.v1.json"}, names); diff != "" {
		t.Errorf("embedded schemas (-want +got):\n%s", diff)
	}
	for _, name := range names {
		doc := readSchema(t, name)
		if got, want := doc["$schema"], "https://json-schema.org/draft/2020-12/schema"; got != want {
			t.Errorf("%s: $schema = %v, want %s", name, got, want)
		}
		if got, want := doc["$id"], "https://buildfleet.io/schemas/"+name; got != want {
			t.Errorf("%s: $id = %v, want %s", name, got, want)
		}
		checkStrict(t, name, "", doc, false)
	}
	if got, want := protocol.EventDataSchema, schemas.BuildEventID+"#/$defs/data"; got != want {
		t.Errorf("protocol.EventDataSchema = %s, want %s", got, want)
	}
}

// checkStrict walks a schema: every object schema closes itself with additionalProperties:
// false, and every property it declares has a description. Subschemas under if, then, else
// and dependentSchemas only narrow properties declared elsewhere, so they are exempt.
func checkStrict(t *testing.T, name, path string, node any, narrowing bool) {
	t.Helper()
	switch n := node.(type) {
	case []any:
		for _, v := range n {
			checkStrict(t, name, path+"/*", v, narrowing)
		}
	case map[string]any:
		if n["type"] == "object" && n["additionalProperties"] != false {
			t.Errorf("%s#%s: object schema without additionalProperties: false", name, path)
		}
		if props, ok := n["properties"].(map[string]any); ok && !narrowing {
			for prop, sch := range props {
				if d, _ := sch.(map[string]any)["description"].(string); d == "" {
					t.Errorf("%s#%s/properties/%s: no description", name, path, prop)
				}
			}
		}
		for k, v := range n {
			switch k {
			case "if", "then", "else", "dependentSchemas":
				checkStrict(t, name, path+"/"+k, v, true)
			case "enum", "const", "required", "examples":
			default:
				checkStrict(t, name, path+"/"+k, v, narrowing)
			}
		}
	}
}

func TestSubschema(t *testing.T) {
	for _, tc := range []struct {
		url, want string
	}{
		{schemas.BuildRequestID + "#/$defs/buildId", "build id (lowercase letters, digits and inner dashes, 1 to 56 characters)"},
		{schemas.BuildRequestID + "#/%24defs/buildId", "build id (lowercase letters, digits and inner dashes, 1 to 56 characters)"},
		{schemas.BuildEventID + "#/properties/type", "event type (io.buildfleet.build.<state>)"},
		{schemas.BuildRequestID + "#", "buildfleet build request"},
		{schemas.BuildRequestID + "#/properties/nope", ""},
		{schemas.BuildRequestID + "#/required/0", ""},
		{schemas.BuildRequestID + "#/properties/command/prefixItems/0", "string without NUL bytes"},
		{schemas.BuildRequestID + "#/properties/command/prefixItems/9", ""},
		{schemas.BuildEventID + "#/allOf/0/if/properties/type", ""},
		{schemas.BuildEventID + "#/allOf/0/description", ""},
		{"https://example.com/other.json#/title", ""},
	} {
		got, _ := schemas.Subschema(tc.url)["title"].(string)
		if got != tc.want {
			t.Errorf("Subschema(%q)[title] = %q, want %q", tc.url, got, tc.want)
		}
	}
}

func TestSubschemaStepsIntoArrays(t *testing.T) {
	url := schemas.BuildEventID + "#/allOf/2/if/properties/type"
	if got, want := schemas.Subschema(url)["const"], "io.buildfleet.build.running"; got != want {
		t.Errorf("Subschema(%q)[const] = %v, want %s", url, got, want)
	}
}
