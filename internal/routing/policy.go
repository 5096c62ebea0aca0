package routing

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"
)

// IsolationRule says which builds require an isolated target: those whose request matches
// every condition it sets (Annotations, Pipeline, Job, Image; at least one). Rules only ever
// add the requirement: a build that matches none is routed by its other rules, and nothing a
// producer leaves out of a request can lift a rule on its pipeline, job or image.
type IsolationRule struct {
	// Name says which rule decided, in explanations and rejections.
	Name string
	// Annotations maps an annotation key to a pattern its value must match ("*": present).
	Annotations map[string]*regexp.Regexp
	// Pipeline, Job and Image are patterns the request's pipeline, job and image reference
	// must match; nil sets no condition.
	Pipeline, Job, Image *regexp.Regexp
}

// CompileGlob compiles a shell-style pattern, matched against the whole value: * matches any
// run of characters (slashes included), ? one character; everything else is literal.
func CompileGlob(pattern string) (*regexp.Regexp, error) {
	if pattern == "" {
		return nil, fmt.Errorf("pattern is empty")
	}
	var b strings.Builder
	b.WriteString(`^`)
	for _, r := range pattern {
		switch r {
		case '*':
			b.WriteString(`.*`)
		case '?':
			b.WriteString(`.`)
		default:
			b.WriteString(regexp.QuoteMeta(string(r)))
		}
	}
	b.WriteString(`$`)
	return regexp.Compile(b.String())
}

// matches reports whether req matches every condition of the rule, and says how.
func (r IsolationRule) matches(req Request) (bool, []string) {
	var how []string
	for _, k := range slices.Sorted(maps.Keys(r.Annotations)) {
		v, ok := req.Annotations[k]
		if !ok || !r.Annotations[k].MatchString(v) {
			return false, nil
		}
		how = append(how, fmt.Sprintf("annotation %s=%q", k, v))
	}
	for _, c := range []struct {
		what  string
		re    *regexp.Regexp
		value string
	}{{"pipeline", r.Pipeline, req.Pipeline}, {"job", r.Job, req.Job}, {"image", r.Image, req.Image}} {
		if c.re == nil {
			continue
		}
		if !c.re.MatchString(c.value) {
			return false, nil
		}
		how = append(how, fmt.Sprintf("%s %q", c.what, c.value))
	}
	return len(how) > 0, how
}

// empty reports a rule that sets no condition, which would match every build.
func (r IsolationRule) empty() bool {
	return len(r.Annotations) == 0 && r.Pipeline == nil && r.Job == nil && r.Image == nil
}

// isolation applies the table's policy: the build requires isolation when the request says so
// or a rule matches it; the first rule that matches is named in the explanation.
func (c *chooser) isolation() {
	if c.req.RequireIsolation {
		c.explain("the build requires an isolated target")
		return
	}
	for _, r := range c.t.isolate {
		if ok, how := r.matches(c.req); ok {
			c.req.RequireIsolation = true
			c.rule = r.Name
			c.explain("policy %q requires an isolated target (%s)", r.Name, strings.Join(how, ", "))
			return
		}
	}
	if len(c.t.isolate) > 0 {
		c.explain("no isolation policy matches")
	}
}
