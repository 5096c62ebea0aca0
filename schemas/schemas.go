// Package schemas holds the JSON Schemas of buildfleet's wire contract — the build request, the
// stop request, the build event, the build record and the log chunk — and compiles them once for validation.
//
// The *.json files in this folder are the source of truth. The Go types in pkg/protocol mirror
// them, and its tests fail when the two drift apart.
package schemas

import (
	"bytes"
	"embed"
	"fmt"
	"io/fs"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// The $id of each schema. A schema's file name is the last element of its $id.
const (
	BuildRequestID = "https://buildfleet.io/schemas/build-request.v1.json"
	StopRequestID  = "https://buildfleet.io/schemas/stop-request.v1.json"
	BuildEventID   = "https://buildfleet.io/schemas/build-event.v1.json"
	BuildRecordID  = "https://buildfleet.io/schemas/build-record.v1.json"
	LogChunkID     = "https://buildfleet.io/schemas/log-chunk.v1.json"
)

// baseURL is what every $id starts with; what follows it is the file name.
const baseURL = "https://buildfleet.io/schemas/"

// Files holds the schema documents, one per file named after its $id (build-request.v1.json, …),
// for tools that publish or serve them.
//
//go:embed *.json
var Files embed.FS

// BuildRequest returns the compiled schema of protocol.BuildRequest.
func BuildRequest() *jsonschema.Schema { return compiled().byID[BuildRequestID] }

// StopRequest returns the compiled schema of protocol.StopRequest.
func StopRequest() *jsonschema.Schema { return compiled().byID[StopRequestID] }

// BuildEvent returns the compiled schema of protocol.Event, the CloudEvents envelope of a
// lifecycle event.
func BuildEvent() *jsonschema.Schema { return compiled().byID[BuildEventID] }

// BuildRecord returns the compiled schema of protocol.Record, the KV build record.
func BuildRecord() *jsonschema.Schema { return compiled().byID[BuildRecordID] }

// LogChunk returns the compiled schema of protocol.LogChunk, one piece of a build's output.
func LogChunk() *jsonschema.Schema { return compiled().byID[LogChunkID] }

// Subschema returns the raw JSON object of the subschema at schemaURL — an $id with a JSON
// pointer fragment, as in a validation error's SchemaURL — or nil when there is none. Error
// messages read its "title" to say what a value should have been instead of quoting a long
// pattern. The map is shared: do not modify it.
func Subschema(schemaURL string) map[string]any {
	id, ptr, _ := strings.Cut(schemaURL, "#")
	node := compiled().docs[id]
	for tok := range strings.SplitSeq(ptr, "/") {
		if tok == "" {
			continue
		}
		switch n := node.(type) {
		case map[string]any:
			node = n[unescapePointer(tok)]
		case []any: // allOf/0, prefixItems/0, …
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || i >= len(n) {
				return nil
			}
			node = n[i]
		default:
			return nil
		}
	}
	obj, _ := node.(map[string]any)
	return obj
}

// unescapePointer decodes one JSON pointer token as it appears in a schema URL fragment.
func unescapePointer(tok string) string {
	if t, err := url.PathUnescape(tok); err == nil { // the compiler path-escapes "$defs"
		tok = t
	}
	tok = strings.ReplaceAll(tok, "~1", "/")
	return strings.ReplaceAll(tok, "~0", "~")
}

type compiledSet struct {
	byID map[string]*jsonschema.Schema
	docs map[string]any // parsed documents by $id, for Title
}

// compiled compiles every embedded schema the first time a schema is asked for. The documents
// are part of the binary, so a schema that does not compile is a bug the tests catch: it
// panics rather than making every caller handle an error that cannot happen in a release.
var compiled = sync.OnceValue(func() compiledSet {
	set, err := compile(Files)
	if err != nil {
		panic("schemas: " + err.Error())
	}
	return set
})

func compile(files fs.FS) (compiledSet, error) {
	set := compiledSet{byID: map[string]*jsonschema.Schema{}, docs: map[string]any{}}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	// Formats (date-time, uri, …) are annotations only in 2020-12 unless asserted; the
	// contract relies on them, so assert.
	c.AssertFormat()
	// Resolve nothing over the network: every $ref is local to its document.
	c.UseLoader(jsonschema.SchemeURLLoader{})

	names, err := fs.Glob(files, "*.json")
	if err != nil {
		return set, err
	}
	for _, name := range names {
		raw, err := fs.ReadFile(files, name)
		if err != nil {
			return set, err
		}
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(raw))
		if err != nil {
			return set, fmt.Errorf("%s: %w", name, err)
		}
		id, _ := doc.(map[string]any)["$id"].(string)
		if id != baseURL+name {
			return set, fmt.Errorf("%s: $id is %q, want %q", name, id, baseURL+name)
		}
		if err := c.AddResource(id, doc); err != nil {
			return set, fmt.Errorf("%s: %w", name, err)
		}
		set.docs[id] = doc
	}
	for id := range set.docs {
		sch, err := c.Compile(id)
		if err != nil {
			return set, err
		}
		set.byID[id] = sch
	}
	for _, id := range []string{BuildRequestID, StopRequestID, BuildEventID, BuildRecordID, LogChunkID} {
		if set.byID[id] == nil {
			return set, fmt.Errorf("no schema with $id %s", id)
		}
	}
	return set, nil
}
