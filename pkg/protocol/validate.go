package protocol

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"unicode"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"

	"github.com/buildfleet/buildfleet/schemas"
)

// MaxMessageBytes bounds every message buildfleet reads or writes: a larger one is rejected
// before it is parsed, so a single oversized publish cannot make a replica allocate without
// limit. It leaves room for headers under NATS's default 1 MiB max_payload, so a request
// that passes Validate can always be published.
const MaxMessageBytes = 1<<20 - 64<<10

// ValidationError says why a message breaks the contract. It is permanent: the same bytes
// never become valid, so a consumer rejects the message (ReasonInvalidRequest) instead of
// retrying it.
type ValidationError struct {
	// What names the message: "build request", "stop request", "event".
	What string
	// Problems are the violations, each "<JSON pointer>: <what is wrong>", sorted; a problem
	// that concerns the whole message (size, syntax) has no pointer.
	Problems []string
}

// maxShownProblems keeps Error short enough for a log line or a NATS header; Problems keeps
// them all.
const maxShownProblems = 10

// Error returns a single line: "invalid build request: /id: ...; /image: missing".
func (e *ValidationError) Error() string {
	what := e.What
	if what == "" {
		what = "message"
	}
	shown := e.Problems
	if len(shown) > maxShownProblems {
		shown = shown[:maxShownProblems]
	}
	msg := "invalid " + what + ": " + strings.Join(shown, "; ")
	if more := len(e.Problems) - len(shown); more > 0 {
		msg += fmt.Sprintf("; and %d more", more)
	}
	return msg
}

// DecodeBuildRequest parses and validates a build request as it arrives from the outside
// world. Any failure is a *ValidationError and the request is the zero value.
func DecodeBuildRequest(data []byte) (BuildRequest, error) {
	var r BuildRequest
	if err := decode(data, "build request", schemas.BuildRequest(), &r); err != nil {
		return BuildRequest{}, err
	}
	if err := r.checkEnv(); err != nil {
		return BuildRequest{}, err
	}
	return r, nil
}

// DecodeCheckedBuildRequest parses a request that DecodeBuildRequest accepted before (the
// fleet's own copy of it, HeaderChecked): without the schema, which is most of a decode's
// cost. What does not parse is a *ValidationError still.
func DecodeCheckedBuildRequest(data []byte) (BuildRequest, error) {
	var r BuildRequest
	if err := checkSize(data, "build request"); err != nil {
		return r, err
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return BuildRequest{}, &ValidationError{What: "build request", Problems: []string{unmarshalProblem(err)}}
	}
	if !ValidID(r.ID) {
		return BuildRequest{}, &ValidationError{What: "build request", Problems: []string{fmt.Sprintf("/id: %q is not a build id", r.ID)}}
	}
	return r, nil
}

// checkEnv checks what the schema cannot say: a variable is set either by value or from a
// Secret, not both.
func (r BuildRequest) checkEnv() error {
	var problems []string
	for name := range r.SecretRefs {
		if _, ok := r.Env[name]; ok {
			problems = append(problems, fmt.Sprintf("/secret_refs/%s: %s is also set in /env", escapeToken(name), name))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	slices.Sort(problems)
	return &ValidationError{What: "build request", Problems: problems}
}

// DecodeStopRequest parses and validates a stop request. Any failure is a *ValidationError and
// the request is the zero value.
func DecodeStopRequest(data []byte) (StopRequest, error) {
	var s StopRequest
	if err := decode(data, "stop request", schemas.StopRequest(), &s); err != nil {
		return StopRequest{}, err
	}
	return s, nil
}

// DecodeEvent parses and validates a lifecycle event, including what the schema cannot say:
// subject equals data.build_id. Any failure is a *ValidationError and the event is the zero
// value.
func DecodeEvent(data []byte) (Event, error) {
	var e Event
	if err := decode(data, "event", schemas.BuildEvent(), &e); err != nil {
		return Event{}, err
	}
	if err := e.checkSubject(); err != nil {
		return Event{}, err
	}
	return e, nil
}

// DecodeLogChunk parses and validates one chunk of a build's output. Any failure is a
// *ValidationError and the chunk is the zero value.
func DecodeLogChunk(data []byte) (LogChunk, error) {
	var c LogChunk
	if err := decode(data, "log chunk", schemas.LogChunk(), &c); err != nil {
		return LogChunk{}, err
	}
	return c, nil
}

// Validate checks r against the build request schema, so a producer finds out before it
// publishes. The error is a *ValidationError.
func (r BuildRequest) Validate() error {
	if err := validate(Marshal(r), "build request", schemas.BuildRequest()); err != nil {
		return err
	}
	return r.checkEnv()
}

// Validate checks s against the stop request schema. The error is a *ValidationError.
func (s StopRequest) Validate() error {
	return validate(Marshal(s), "stop request", schemas.StopRequest())
}

// Validate checks e against the build event schema and that its subject names its build. The
// error is a *ValidationError.
func (e Event) Validate() error {
	if err := validate(Marshal(e), "event", schemas.BuildEvent()); err != nil {
		return err
	}
	return e.checkSubject()
}

func (e Event) checkSubject() error {
	if e.Subject != e.Data.BuildID {
		return &ValidationError{What: "event", Problems: []string{
			fmt.Sprintf("/subject: %s differs from /data/build_id %s", quote(e.Subject), quote(e.Data.BuildID)),
		}}
	}
	return nil
}

// decode is the ingress path: bound the size, check the syntax, validate against the schema,
// and only then unmarshal into v.
func decode(data []byte, what string, sch *jsonschema.Schema, v any) error {
	if err := validate(data, what, sch); err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		// The schema admits a few values Go cannot hold, such as 1.0 or 1e3 for an integer.
		return &ValidationError{What: what, Problems: []string{unmarshalProblem(err)}}
	}
	return nil
}

// checkSize refuses a message over MaxMessageBytes.
func checkSize(data []byte, what string) error {
	if len(data) > MaxMessageBytes {
		return &ValidationError{What: what, Problems: []string{
			fmt.Sprintf("message is %d bytes, the limit is %d", len(data), MaxMessageBytes),
		}}
	}
	return nil
}

func validate(data []byte, what string, sch *jsonschema.Schema) error {
	if err := checkSize(data, what); err != nil {
		return err
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return &ValidationError{What: what, Problems: []string{syntaxProblem(err)}}
	}
	err = sch.Validate(inst)
	if err == nil {
		return nil
	}
	var ve *jsonschema.ValidationError
	if !errors.As(err, &ve) {
		return &ValidationError{What: what, Problems: []string{err.Error()}}
	}
	return &ValidationError{What: what, Problems: problems(ve)}
}

func syntaxProblem(err error) string {
	var se *json.SyntaxError
	switch {
	case errors.Is(err, io.EOF):
		return "empty message"
	case errors.As(err, &se):
		return fmt.Sprintf("malformed JSON at byte %d: %v", se.Offset, err)
	default:
		return "malformed JSON: " + err.Error()
	}
}

func unmarshalProblem(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return fmt.Sprintf("/%s: cannot hold %s value", strings.ReplaceAll(te.Field, ".", "/"), te.Value)
	}
	return err.Error()
}

// problems flattens the schema error tree into one line per violation, named by the JSON
// pointer of the offending value. The library's own output nests every keyword that took
// part; a producer only needs to know which field to fix and how.
func problems(root *jsonschema.ValidationError) []string {
	type problem struct{ ptr, msg string }
	var found []problem
	enums := map[string][]any{}
	add := func(ptr, msg string) { found = append(found, problem{ptr, msg}) }
	var walk func(e *jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		loc := pointer(e.InstanceLocation)
		switch k := e.ErrorKind.(type) {
		case *kind.Required:
			for _, p := range k.Missing {
				add(loc+"/"+escapeToken(p), "missing")
			}
			return
		case *kind.AdditionalProperties:
			// A map (env, annotations) restricts its keys with patternProperties rather
			// than propertyNames, whose errors jsonschema v6.0.3 reports at a wrong
			// location (santhosh-tekuri/jsonschema#258, #269). A key it rejects is
			// malformed, not unknown.
			msg := "unknown field"
			if pattern := keyPattern(e.SchemaURL); pattern != "" {
				msg = "invalid key, must match " + pattern
			}
			for _, p := range k.Properties {
				add(loc+"/"+escapeToken(p), msg)
			}
			return
		case *kind.Enum:
			// A value can fail several enums at once (every reason, then the failure
			// reasons); what it must be is in all of them.
			if len(e.Causes) == 0 {
				if prev, ok := enums[loc]; ok {
					enums[loc] = slices.DeleteFunc(prev, func(v any) bool { return !slices.Contains(k.Want, v) })
				} else {
					enums[loc] = slices.Clone(k.Want)
				}
				return
			}
		case *kind.AnyOf, *kind.OneOf:
			// {"anyOf": [{"required": ["a"]}, {"required": ["b"]}]}: say so in one line.
			if alts, ok := missingAlternatives(e); ok {
				add(strings.Join(alts, " or "), "one of these is required")
				return
			}
		}
		if len(e.Causes) == 0 {
			add(loc, leafMessage(e))
			return
		}
		for _, c := range e.Causes {
			walk(c)
		}
	}
	walk(root)
	for loc, want := range enums {
		if len(want) == 0 {
			add(loc, "no value is allowed here")
			continue
		}
		add(loc, (&kind.Enum{Want: want}).LocalizedString(printer))
	}
	// Sorted by pointer: stable from run to run (the library walks objects in map order), and
	// a field's problems stay together.
	slices.SortFunc(found, func(a, b problem) int {
		return cmp.Or(strings.Compare(a.ptr, b.ptr), strings.Compare(a.msg, b.msg))
	})
	found = slices.Compact(found)
	out := make([]string, len(found))
	for i, p := range found {
		if p.ptr == "" {
			p.ptr = "(root)"
		}
		out[i] = p.ptr + ": " + p.msg
	}
	return out
}

// missingAlternatives reports whether every branch of a failed anyOf/oneOf failed only because
// one property was missing, and returns the pointers of those properties.
func missingAlternatives(e *jsonschema.ValidationError) ([]string, bool) {
	if len(e.Causes) == 0 {
		return nil, false
	}
	var alts []string
	for _, c := range e.Causes {
		if _, ok := c.ErrorKind.(*kind.Reference); ok && len(c.Causes) == 1 {
			c = c.Causes[0]
		}
		r, ok := c.ErrorKind.(*kind.Required)
		if !ok || len(c.Causes) > 0 || len(r.Missing) != 1 {
			return nil, false
		}
		alts = append(alts, pointer(c.InstanceLocation)+"/"+escapeToken(r.Missing[0]))
	}
	return alts, true
}

var printer = message.NewPrinter(language.English)

// leafMessage words one violation. The common ones are rephrased for whoever wrote the
// message; the rest keep the library's wording.
func leafMessage(e *jsonschema.ValidationError) string {
	// An env value may be a secret: it is never repeated in a message, which is published
	// in the rejected event and logged.
	shown := quote
	if len(e.InstanceLocation) > 0 && e.InstanceLocation[0] == "env" {
		shown = func(string) string { return "the value" }
	}
	switch k := e.ErrorKind.(type) {
	case *kind.Pattern:
		if title, _ := schemas.Subschema(e.SchemaURL)["title"].(string); title != "" {
			return fmt.Sprintf("%s is not a valid %s", shown(k.Got), title)
		}
		return fmt.Sprintf("%s does not match pattern %s", shown(k.Got), k.Want)
	case *kind.Format:
		if s, ok := k.Got.(string); ok {
			return fmt.Sprintf("%s is not a valid %s", shown(s), k.Want)
		}
	case *kind.FalseSchema:
		// {"dependentSchemas": {"a": {"properties": {"b": false}}}} forbids b next to a.
		if _, frag, ok := strings.Cut(e.SchemaURL, "/dependentSchemas/"); ok {
			other, _, _ := strings.Cut(frag, "/")
			if o, err := url.PathUnescape(other); err == nil {
				other = o
			}
			parent := pointer(e.InstanceLocation[:max(len(e.InstanceLocation)-1, 0)])
			return "not allowed together with " + parent + "/" + other
		}
		return "not allowed"
	case *kind.MinLength:
		if k.Want == 1 {
			return "must not be empty"
		}
		return fmt.Sprintf("must be at least %d characters long, got %d", k.Want, k.Got)
	case *kind.MaxLength:
		return fmt.Sprintf("must be at most %d characters long, got %d", k.Want, k.Got)
	case *kind.MinItems:
		if k.Want == 1 {
			return "must not be empty"
		}
		return fmt.Sprintf("must have at least %d items, got %d", k.Want, k.Got)
	case *kind.MaxItems:
		return fmt.Sprintf("must have at most %d items, got %d", k.Want, k.Got)
	case *kind.Minimum:
		return fmt.Sprintf("must be at least %s, got %s", number(k.Want), number(k.Got))
	case *kind.Maximum:
		return fmt.Sprintf("must be at most %s, got %s", number(k.Want), number(k.Got))
	}
	return e.ErrorKind.LocalizedString(printer)
}

// keyPattern returns the key pattern of the map schema at schemaURL, or "" if it is not a map
// (a schema with exactly one patternProperties entry).
func keyPattern(schemaURL string) string {
	pp, _ := schemas.Subschema(schemaURL)["patternProperties"].(map[string]any)
	if len(pp) != 1 {
		return ""
	}
	for p := range pp {
		return p
	}
	return ""
}

// number renders a schema number without the thousands separators of the library's printer,
// cut short like a quoted value.
func number(r *big.Rat) string {
	s := r.RatString()
	if len(s) > 32 {
		s = s[:32] + "…"
	}
	return s
}

// pointer renders an instance location as a JSON pointer (RFC 6901).
func pointer(tokens []string) string {
	var b strings.Builder
	for _, t := range tokens {
		b.WriteByte('/')
		b.WriteString(escapeToken(t))
	}
	return b.String()
}

// escapeToken escapes one pointer token. A token is often a key the sender chose, so an
// unprintable or very long one is quoted and cut short like a value.
func escapeToken(t string) string {
	t = strings.ReplaceAll(strings.ReplaceAll(t, "~", "~0"), "/", "~1")
	if len(t) > 64 || strings.ContainsFunc(t, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return quote(t)
	}
	return t
}

// quote quotes a value for a message, cut short so that a megabyte of input does not become a
// megabyte of error. %q also escapes newlines, which a NATS header cannot carry.
func quote(s string) string {
	const limit = 64
	if r := []rune(s); len(r) > limit {
		return fmt.Sprintf("%q…", string(r[:limit]))
	}
	return fmt.Sprintf("%q", s)
}
