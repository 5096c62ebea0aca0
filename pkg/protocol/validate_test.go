package protocol_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/schemas"
)

// Every State and Reason constant of protocol.go. TestConstantListsAreComplete keeps these
// lists honest; TestEnumsCoverConstants and the event round trips then hold the schemas to them.
var (
	allStates = []protocol.State{
		protocol.StateQueued, protocol.StateDispatched, protocol.StateRunning,
		protocol.StateSucceeded, protocol.StateFailed, protocol.StateAborted,
		protocol.StateTimedOut, protocol.StateRejected,
	}
	failureReasons = []protocol.Reason{
		protocol.ReasonImagePull, protocol.ReasonUnschedulable, protocol.ReasonOOMKilled,
		protocol.ReasonEvicted, protocol.ReasonExitCode, protocol.ReasonContainerError,
		protocol.ReasonPodLost, protocol.ReasonDispatchExhausted,
	}
	rejectionReasons = []protocol.Reason{
		protocol.ReasonInvalidRequest, protocol.ReasonNoEligible, protocol.ReasonUnknownTarget,
		protocol.ReasonExcludedImage, protocol.ReasonTargetRemoved, protocol.ReasonLaunchRefused,
	}
)

func ptr[T any](v T) *T { return &v }

var (
	at = time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)

	fullRequest = protocol.BuildRequest{
		ID:      "build-123-abc",
		Image:   "ghcr.io/buildfleet/builder:v1.2.3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		Command: []string{"make", "", "-j4"},
		Env:     map[string]string{"GOFLAGS": "-mod=readonly", "_EMPTY": ""},
		Annotations: map[string]string{
			protocol.AnnotationTarget:    "eu-west",
			protocol.AnnotationResources: "high",
		},
		Pipeline:       "core/main",
		Job:            "unit tests",
		TimeoutSeconds: 3600,
	}
	stepsRequest = protocol.BuildRequest{
		ID:    "pr-4711",
		Image: "localhost:5000/team/lint-er:latest",
		Steps: []protocol.Step{
			{Name: "deps", Run: "go mod download"},
			{Name: "lint", Run: "golangci-lint run ./...\necho done"},
		},
		TimeoutSeconds: 604800,
	}
	minimalRequest = protocol.BuildRequest{ID: "0", Image: "alpine", Command: []string{"true"}}
)

// decodeRecord stands in for a record decoder: the record schema has no ingress path of its own.
func decodeRecord(data []byte) (protocol.Record, error) {
	var r protocol.Record
	err := json.Unmarshal(data, &r)
	return r, err
}

// roundTrip encodes v as producers do, checks the bytes against sch, decodes them back and
// compares: the Go type and the schema must describe the same documents.
func roundTrip[T any](t *testing.T, v T, sch *jsonschema.Schema, decode func([]byte) (T, error)) {
	t.Helper()
	data := protocol.Marshal(v)
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if err := sch.Validate(inst); err != nil {
		t.Fatalf("schema rejects %s:\n%v", data, err)
	}
	got, err := decode(data)
	if err != nil {
		t.Fatalf("decode(%s): %v", data, err)
	}
	if diff := cmp.Diff(v, got); diff != "" {
		t.Errorf("decode(Marshal(v)) differs from v (-want +got):\n%s", diff)
	}
}

func TestBuildRequestRoundTrip(t *testing.T) {
	for name, r := range map[string]protocol.BuildRequest{
		"full":    fullRequest,
		"steps":   stepsRequest,
		"minimal": minimalRequest,
	} {
		t.Run(name, func(t *testing.T) {
			roundTrip(t, r, schemas.BuildRequest(), protocol.DecodeBuildRequest)
			if err := r.Validate(); err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
			// What the scheduler checked, the runner parses alike without the schema.
			checked, err := protocol.DecodeCheckedBuildRequest(protocol.Marshal(r))
			if err != nil {
				t.Fatalf("DecodeCheckedBuildRequest: %v", err)
			}
			if diff := cmp.Diff(r, checked); diff != "" {
				t.Errorf("DecodeCheckedBuildRequest differs from the request (-want +got):\n%s", diff)
			}
		})
	}
}

// TestDecodeCheckedRefusesWhatDoesNotParse: a checked request that does not parse, or names
// no build, is still a validation error, and the zero request.
func TestDecodeCheckedRefusesWhatDoesNotParse(t *testing.T) {
	for name, data := range map[string]string{
		"not json":   `{"id": "a"`,
		"wrong type": `{"id": 7}`,
		"no id":      `{"image": "alpine"}`,
		"bad id":     `{"id": "a b"}`,
		"too big":    `{"id": "` + strings.Repeat("a", protocol.MaxMessageBytes) + `"}`,
	} {
		t.Run(name, func(t *testing.T) {
			r, err := protocol.DecodeCheckedBuildRequest([]byte(data))
			var ve *protocol.ValidationError
			if !errors.As(err, &ve) || r.ID != "" {
				t.Errorf("DecodeCheckedBuildRequest(%.40q) = %+v, %v; want the zero request and a *ValidationError", data, r, err)
			}
		})
	}
}

func TestStopRequestRoundTrip(t *testing.T) {
	for name, s := range map[string]protocol.StopRequest{
		"full":    {ID: "build-123", Reason: "cancelled by alice"},
		"minimal": {ID: "b"},
	} {
		t.Run(name, func(t *testing.T) {
			roundTrip(t, s, schemas.StopRequest(), protocol.DecodeStopRequest)
			if err := s.Validate(); err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
		})
	}
}

// events returns an event for every state and every reason, as protocol.NewEvent makes them,
// plus a fully populated and a minimal hand-made envelope.
func events() map[string]protocol.Event {
	evs := map[string]protocol.Event{}
	for _, s := range allStates {
		d := protocol.EventData{BuildID: "b1", State: s}
		switch s {
		case protocol.StateFailed:
			d.Reason = protocol.ReasonPodLost
		case protocol.StateRejected:
			d.Reason = protocol.ReasonInvalidRequest
		}
		evs["state/"+string(s)] = protocol.NewEvent("buildfleet/replica-0", at, d)
	}
	for _, r := range failureReasons {
		d := protocol.EventData{BuildID: "b1", State: protocol.StateFailed, Reason: r, Message: string(r)}
		if r == protocol.ReasonExitCode {
			d.ExitCode = ptr(137)
		}
		evs["failed/"+string(r)] = protocol.NewEvent("buildfleet/replica-0", at, d)
	}
	for _, r := range rejectionReasons {
		d := protocol.EventData{BuildID: "b1", State: protocol.StateRejected, Reason: r, Message: string(r)}
		evs["rejected/"+string(r)] = protocol.NewEvent("urn:buildfleet:client", at, d)
	}
	evs["full"] = protocol.NewEvent("buildfleet/replica-0", at.In(time.FixedZone("CET", 3600)), protocol.EventData{
		BuildID: "build-123", State: protocol.StateFailed, Reason: protocol.ReasonExitCode, ExitCode: ptr(0),
		Message: "exited with code 0 after the step failed", Target: "eu-west", Workload: "build-build-123", Attempt: 3,
	})
	evs["minimal"] = protocol.Event{
		SpecVersion: protocol.CloudEventsVersion, ID: "x", Source: "s",
		Type: protocol.EventTypePrefix + string(protocol.StateQueued), Subject: "b",
		Time: time.Time{}, DataContentType: "application/json",
		Data: protocol.EventData{BuildID: "b", State: protocol.StateQueued},
	}
	return evs
}

func TestEventRoundTrip(t *testing.T) {
	for name, e := range events() {
		t.Run(name, func(t *testing.T) {
			roundTrip(t, e, schemas.BuildEvent(), protocol.DecodeEvent)
			if err := e.Validate(); err != nil {
				t.Errorf("Validate() = %v, want nil", err)
			}
		})
	}
}

func TestRecordRoundTrip(t *testing.T) {
	queued := at.Add(-time.Hour)
	for name, r := range map[string]protocol.Record{
		"minimal": {ID: "b1", State: protocol.StateQueued, QueuedAt: queued},
		"full": {
			ID: "b1", State: protocol.StateFailed, Reason: protocol.ReasonExitCode, ExitCode: ptr(2),
			Message: "exited with code 2", Target: "eu-west", Workload: "build-b1", Cluster: "prod-1",
			Attempts: 2, Seq: 1<<64 - 1, Replica: "replica-0", Abort: true, AbortReason: "cancelled",
			TimeoutSeconds: 3600, QueuedAt: queued, DispatchedAt: ptr(queued.Add(time.Second)),
			RunningAt: ptr(queued.Add(5 * time.Second)), FinishedAt: ptr(at), Deadline: ptr(queued.Add(time.Hour)),
		},
		"rejected": {ID: "b1", State: protocol.StateRejected, Reason: protocol.ReasonNoEligible, Attempts: 1, QueuedAt: queued},
	} {
		t.Run(name, func(t *testing.T) {
			roundTrip(t, r, schemas.BuildRecord(), decodeRecord)
		})
	}
}

func TestLogChunkRoundTrip(t *testing.T) {
	for name, c := range map[string]protocol.LogChunk{
		"minimal": {BuildID: "b1", Offset: 0, Line: 1, Time: at},
		"full": {BuildID: "b1", Offset: 1 << 40, Line: 12, Step: "compile", Text: "ok\n\u00e9\n",
			Note: "the build runs again", Time: at,
			End: &protocol.LogEnd{Bytes: 1<<40 + 8, Lines: 14, CutBytes: 1 << 20, CutLines: 3}},
		"end of nothing": {BuildID: "b1", Line: 1, Time: at, End: &protocol.LogEnd{}},
	} {
		t.Run(name, func(t *testing.T) {
			roundTrip(t, c, schemas.LogChunk(), protocol.DecodeLogChunk)
		})
	}
}

// TestConstantListsAreComplete reads protocol.go so that a State or Reason constant added
// there without being added to the lists above (and so to the schemas) fails.
func TestConstantListsAreComplete(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "protocol.go", nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	declared := map[string][]string{}
	ast.Inspect(f, func(n ast.Node) bool {
		vs, ok := n.(*ast.ValueSpec)
		if !ok {
			return true
		}
		if typ, ok := vs.Type.(*ast.Ident); ok && (typ.Name == "State" || typ.Name == "Reason") {
			for _, v := range vs.Values {
				if lit, ok := v.(*ast.BasicLit); ok {
					declared[typ.Name] = append(declared[typ.Name], strings.Trim(lit.Value, `"`))
				}
			}
		}
		return true
	})
	if diff := cmp.Diff(asStrings(allStates), declared["State"]); diff != "" {
		t.Errorf("allStates differs from the State constants in protocol.go (-list +protocol.go):\n%s", diff)
	}
	reasons := slices.Concat(asStrings(failureReasons), asStrings(rejectionReasons))
	if diff := cmp.Diff(reasons, declared["Reason"]); diff != "" {
		t.Errorf("failureReasons+rejectionReasons differ from the Reason constants in protocol.go (-list +protocol.go):\n%s", diff)
	}
}

func TestEnumsCoverConstants(t *testing.T) {
	failures, rejections := asStrings(failureReasons), asStrings(rejectionReasons)
	for _, name := range []string{"build-event.v1.json", "build-record.v1.json"} {
		raw, err := fs.ReadFile(schemas.Files, name)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Defs map[string]struct {
				Enum []string `json:"enum"`
			} `json:"$defs"`
		}
		if err := json.Unmarshal(raw, &doc); err != nil {
			t.Fatal(err)
		}
		for def, want := range map[string][]string{
			"state":           asStrings(allStates),
			"reason":          slices.Concat(failures, rejections),
			"failureReason":   failures,
			"rejectionReason": rejections,
		} {
			if diff := cmp.Diff(want, doc.Defs[def].Enum); diff != "" {
				t.Errorf("%s $defs/%s/enum differs from the protocol constants (-protocol +schema):\n%s", name, def, diff)
			}
		}
	}
}

func asStrings[T ~string](vs []T) []string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = string(v)
	}
	return out
}

func TestValidationErrorMessages(t *testing.T) {
	oversized := append([]byte(`{"id":"b1","image":"alpine","command":["true"]}`), bytes.Repeat([]byte(" "), protocol.MaxMessageBytes)...)
	manyKeys := `{"id":"b1","image":"alpine","command":["true"],"env":{` +
		`"1":"","2":"","3":"","4":"","5":"","6":"","7":"","8":"","9":"","10":"","11":"","12":""}}`
	for _, tc := range []struct {
		name   string
		decode func([]byte) error
		in     string
		want   string
	}{
		{"empty object", decodeRequest, `{}`,
			"invalid build request: /command or /steps: one of these is required; /id: missing; /image: missing"},
		{"several fields", decodeRequest, `{"id":"Build.1","image":"alpine linux","command":["true"],"timeout_seconds":-5,"extra":true}`,
			`invalid build request: /extra: unknown field; ` +
				`/id: "Build.1" is not a valid build id (lowercase letters, digits and inner dashes, 1 to 56 characters); ` +
				`/image: "alpine linux" is not a valid image reference ([registry[:port]/]repository[:tag][@sha256:digest], lowercase repository); ` +
				`/timeout_seconds: must be at least 0, got -5`},
		{"command and steps", decodeRequest, `{"id":"b1","image":"alpine","command":["true"],"steps":[{"name":"a","run":"b"}]}`,
			"invalid build request: /steps: not allowed together with /command"},
		{"integer written as a float", decodeRequest, `{"id":"b1","image":"alpine","command":["true"],"timeout_seconds":60.0}`,
			"invalid build request: /timeout_seconds: cannot hold number 60.0 value"},
		{"syntax", decodeRequest, `{"id":"b1",}`,
			"invalid build request: malformed JSON at byte 12: invalid character '}' looking for beginning of object key string"},
		{"empty", decodeRequest, ``, "invalid build request: empty message"},
		{"oversized", decodeRequest, string(oversized),
			fmt.Sprintf("invalid build request: message is %d bytes, the limit is %d", len(oversized), protocol.MaxMessageBytes)},
		{"too many problems", decodeRequest, manyKeys,
			"invalid build request: /env/1: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; /env/10: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; " +
				"/env/11: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; /env/12: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; " +
				"/env/2: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; /env/3: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; " +
				"/env/4: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; /env/5: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; " +
				"/env/6: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; /env/7: invalid key, must match ^[A-Za-z_][A-Za-z0-9_]*$; and 2 more"},
		{"unprintable key and long value", decodeRequest,
			`{"id":"` + strings.Repeat("x", 100) + `","image":"alpine","command":["true"],"a\nb/c":1}`,
			`invalid build request: /"a\nb~1c": unknown field; /id: "` + strings.Repeat("x", 64) + `"… is not a valid build id (lowercase letters, digits and inner dashes, 1 to 56 characters)`},
		{"stop", decodeStop, `{"id":"B1","reason":7}`,
			`invalid stop request: /id: "B1" is not a valid build id (lowercase letters, digits and inner dashes, 1 to 56 characters); /reason: got number, want string`},
		{"event subject", decodeEvent, string(protocol.Marshal(withSubject(events()["state/queued"], "b2"))),
			`invalid event: /subject: "b2" differs from /data/build_id "b1"`},
		{"event reason", decodeEvent, strings.Replace(string(protocol.Marshal(events()["state/failed"])), `"pod_lost"`, `"bad_luck"`, 1),
			`invalid event: /data/reason: value must be one of 'image_pull', 'unschedulable', 'oom_killed', 'evicted', 'exit_code', 'container_error', 'pod_lost', 'dispatch_exhausted'`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.decode([]byte(tc.in))
			var ve *protocol.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("decode error = %v (%T), want a *protocol.ValidationError", err, err)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("decode error:\n got %s\nwant %s", got, tc.want)
			}
		})
	}
}

func decodeRequest(b []byte) error { _, err := protocol.DecodeBuildRequest(b); return err }
func decodeStop(b []byte) error    { _, err := protocol.DecodeStopRequest(b); return err }
func decodeEvent(b []byte) error   { _, err := protocol.DecodeEvent(b); return err }

func withSubject(e protocol.Event, subject string) protocol.Event {
	e.Subject = subject
	return e
}

func TestDecodeReturnsZeroOnError(t *testing.T) {
	r, err := protocol.DecodeBuildRequest([]byte(`{"id":"b1","image":"alpine"}`))
	if err == nil {
		t.Fatal("DecodeBuildRequest accepted a request without command or steps")
	}
	if diff := cmp.Diff(protocol.BuildRequest{}, r); diff != "" {
		t.Errorf("DecodeBuildRequest returned a partial request with its error (-want +got):\n%s", diff)
	}
}

func TestMaxMessageBytesBoundary(t *testing.T) {
	msg := []byte(`{"id":"b1","image":"alpine","command":["true"]}`)
	padded := append(msg, bytes.Repeat([]byte(" "), protocol.MaxMessageBytes-len(msg))...)
	if _, err := protocol.DecodeBuildRequest(padded); err != nil {
		t.Errorf("DecodeBuildRequest(%d bytes) = %v, want nil", len(padded), err)
	}
	if _, err := protocol.DecodeStopRequest(append(padded, ' ')); err == nil {
		t.Errorf("DecodeStopRequest(%d bytes) = nil, want an error", len(padded)+1)
	}
}

func TestValidateMethods(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"zero build request", protocol.BuildRequest{}.Validate(),
			`invalid build request: /command or /steps: one of these is required; ` +
				`/id: "" is not a valid build id (lowercase letters, digits and inner dashes, 1 to 56 characters); ` +
				`/image: "" is not a valid image reference ([registry[:port]/]repository[:tag][@sha256:digest], lowercase repository)`},
		{"empty step", protocol.BuildRequest{ID: "b", Image: "alpine", Steps: []protocol.Step{{}}}.Validate(),
			`invalid build request: /steps/0/name: must not be empty; /steps/0/run: must not be empty`},
		{"zero stop request", protocol.StopRequest{}.Validate(),
			`invalid stop request: /id: "" is not a valid build id (lowercase letters, digits and inner dashes, 1 to 56 characters)`},
		{"failed event without reason", protocol.NewEvent("r", at, protocol.EventData{BuildID: "b", State: protocol.StateFailed}).Validate(),
			`invalid event: /data/reason: missing`},
		{"exit code reason without code", protocol.NewEvent("r", at, protocol.EventData{BuildID: "b", State: protocol.StateFailed, Reason: protocol.ReasonExitCode}).Validate(),
			`invalid event: /data/exit_code: missing`},
	} {
		var ve *protocol.ValidationError
		if !errors.As(tc.err, &ve) {
			t.Errorf("%s: Validate() = %v (%T), want a *protocol.ValidationError", tc.name, tc.err, tc.err)
			continue
		}
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("%s: Validate():\n got %s\nwant %s", tc.name, got, tc.want)
		}
	}
}

func TestValidationErrorWithoutWhat(t *testing.T) {
	err := &protocol.ValidationError{Problems: []string{"/a: missing"}}
	if got, want := err.Error(), "invalid message: /a: missing"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// addSeeds adds every schema example of one contract (valid and invalid) to f's corpus.
func addSeeds(f *testing.F, contract string) {
	f.Helper()
	seeds, err := filepath.Glob("../../schemas/testdata/" + contract + "/*/*.json")
	if err != nil || len(seeds) == 0 {
		f.Fatalf("no seeds in ../../schemas/testdata/%s (err %v)", contract, err)
	}
	for _, seed := range seeds {
		data, err := os.ReadFile(seed)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
}

func FuzzDecodeBuildRequest(f *testing.F) {
	addSeeds(f, "build-request")
	f.Add(protocol.Marshal(fullRequest))
	f.Add(protocol.Marshal(stepsRequest))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := protocol.DecodeBuildRequest(data)
		if err != nil {
			var ve *protocol.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("DecodeBuildRequest(%q) error is %T, want *protocol.ValidationError: %v", data, err, err)
			}
			if msg := err.Error(); strings.ContainsAny(msg, "\r\n") {
				t.Fatalf("DecodeBuildRequest(%q) error spans lines: %q", data, msg)
			}
			return
		}
		// What the fleet accepted, a producer must be able to send again unchanged.
		if err := r.Validate(); err != nil {
			t.Fatalf("DecodeBuildRequest(%q) accepted a request whose re-encoding is invalid: %v", data, err)
		}
		again, err := protocol.DecodeBuildRequest(protocol.Marshal(r))
		if err != nil {
			t.Fatalf("re-decoding the re-encoding of %q: %v", data, err)
		}
		if diff := cmp.Diff(r, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("re-encoding of %q decodes differently (-first +second):\n%s", data, diff)
		}
	})
}

func BenchmarkDecodeBuildRequest(b *testing.B) {
	data := protocol.Marshal(fullRequest)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := protocol.DecodeBuildRequest(data); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzDecodeStopRequest(f *testing.F) {
	addSeeds(f, "stop-request")
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := protocol.DecodeStopRequest(data)
		if err != nil {
			var ve *protocol.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("DecodeStopRequest(%q) error is %T, want *protocol.ValidationError: %v", data, err, err)
			}
			if msg := err.Error(); strings.ContainsAny(msg, "\r\n") {
				t.Fatalf("DecodeStopRequest(%q) error spans lines: %q", data, msg)
			}
			return
		}
		if !protocol.ValidID(s.ID) {
			t.Fatalf("DecodeStopRequest(%q) accepted the build id %q", data, s.ID)
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("DecodeStopRequest(%q) accepted a stop whose re-encoding is invalid: %v", data, err)
		}
	})
}

func TestSecretRefsAndEnvDoNotOverlap(t *testing.T) {
	r := protocol.BuildRequest{ID: "b", Image: "busybox", Command: []string{"true"}, Env: map[string]string{"NPM_TOKEN": "x"},
		SecretRefs: map[string]protocol.SecretRef{"NPM_TOKEN": {Secret: "npm", Key: "token"}}}
	want := "invalid build request: /secret_refs/NPM_TOKEN: NPM_TOKEN is also set in /env"
	if err := r.Validate(); err == nil || err.Error() != want {
		t.Errorf("Validate() = %v, want %q", err, want)
	}
	if _, err := protocol.DecodeBuildRequest(protocol.Marshal(r)); err == nil || err.Error() != want {
		t.Errorf("DecodeBuildRequest = %v, want %q", err, want)
	}
}
