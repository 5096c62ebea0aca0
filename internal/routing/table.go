// Package routing decides which executor target runs a build: a pin if the request names one,
// otherwise a weighted choice that is deterministic per build id, otherwise the default target.
// It is pure — no NATS, no Kubernetes, no clock — so every decision can be replayed and
// explained (`buildfleet route`) from the same inputs.
package routing

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"regexp/syntax"
	"slices"
	"strings"
)

// Target is one place builds can run, as the router sees it.
type Target struct {
	Name string
	// Weight is relative to the other targets' weights (kata 10 + runc 90 sends ~10% to
	// kata). A target with weight 0 receives only builds pinned to it, or default traffic.
	Weight int
	// Exclude lists images this target must never run. Each pattern is matched, unanchored,
	// against the full image reference; see CompileExcludes.
	Exclude []*regexp.Regexp
	// Isolated marks a VM-isolated (Kata) target: builds that require isolation go only here.
	Isolated bool
}

// Table is a validated, immutable routing table. It is safe for concurrent use.
type Table struct {
	targets       []Target
	byName        map[string]int
	defaultTarget string
	isolate       []IsolationRule
}

// maxTotalWeight bounds the sum of the weights so that the weighted pick can never overflow.
// Weights are relative, so a table that needs more can divide them all.
const maxTotalWeight = math.MaxInt32

// NewTable validates targets and defaultTarget and returns the table they make. Target order
// matters: it is the order in which the weighted choice walks the cumulative weights, so a
// build id maps to the same target for as long as the table is unchanged.
//
// isolate is the isolation policy: builds that match one of its rules go only to isolated
// targets, pinned builds and default traffic included.
func NewTable(targets []Target, defaultTarget string, isolate ...IsolationRule) (*Table, error) {
	var errs []error
	if len(targets) == 0 {
		errs = append(errs, errors.New("routing table: at least one target is required"))
	}
	t := &Table{
		targets:       make([]Target, len(targets)),
		byName:        make(map[string]int, len(targets)),
		defaultTarget: defaultTarget,
		isolate:       slices.Clone(isolate),
	}
	anyIsolated := false
	for _, tg := range targets {
		anyIsolated = anyIsolated || tg.Isolated
	}
	for i, r := range isolate {
		switch {
		case r.Name == "":
			errs = append(errs, fmt.Errorf("routing table: isolation rule %d: name is empty", i))
		case r.empty():
			errs = append(errs, fmt.Errorf("routing table: isolation rule %q: sets no condition, so it would match every build", r.Name))
		case !anyIsolated:
			errs = append(errs, fmt.Errorf("routing table: isolation rule %q: no target is isolated, so every build it matches would be rejected", r.Name))
		}
	}
	var total int64
	for i, tg := range targets {
		switch {
		case tg.Name == "":
			errs = append(errs, fmt.Errorf("routing table: target %d: name is empty", i))
		case t.has(tg.Name):
			errs = append(errs, fmt.Errorf("routing table: target %q: name is used twice", tg.Name))
		default:
			t.byName[tg.Name] = i
		}
		if tg.Weight < 0 {
			errs = append(errs, fmt.Errorf("routing table: target %q: weight must be >= 0 (got %d)", tg.Name, tg.Weight))
		} else {
			total += int64(tg.Weight)
		}
		for j, re := range tg.Exclude {
			if re == nil {
				errs = append(errs, fmt.Errorf("routing table: target %q: exclude[%d] is nil", tg.Name, j))
			}
		}
		tg.Exclude = append([]*regexp.Regexp(nil), tg.Exclude...)
		t.targets[i] = tg
	}
	if total > maxTotalWeight {
		errs = append(errs, fmt.Errorf("routing table: weights add up to %d, more than %d; weights are relative, so divide them", total, maxTotalWeight))
	}
	if defaultTarget != "" && !t.has(defaultTarget) {
		errs = append(errs, fmt.Errorf("routing table: default target %q is not a target", defaultTarget))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return t, nil
}

func (t *Table) has(name string) bool {
	_, ok := t.byName[name]
	return ok
}

// Targets returns the table's targets in order. The slice is a copy; the compiled patterns
// are shared and must not be modified.
func (t *Table) Targets() []Target {
	out := make([]Target, len(t.targets))
	for i, tg := range t.targets {
		tg.Exclude = append([]*regexp.Regexp(nil), tg.Exclude...)
		out[i] = tg
	}
	return out
}

// Default returns the default target's name, or "" when the table has none.
func (t *Table) Default() string { return t.defaultTarget }

// caseInsensitive is the flag CompileExcludes puts in front of every pattern.
const caseInsensitive = "(?i)"

// CompileExcludes compiles exclusion patterns case-insensitively: image references are
// case-insensitive in practice (registries lowercase repository names), so "RHEL6" and "rhel6"
// must exclude the same images. Every bad pattern is reported, each by its text.
func CompileExcludes(patterns []string) ([]*regexp.Regexp, error) {
	out := make([]*regexp.Regexp, 0, len(patterns))
	var errs []error
	for _, p := range patterns {
		if p == "" {
			// An empty pattern matches every image, which is never what a typo meant.
			errs = append(errs, errors.New(`exclude pattern "": empty pattern would exclude every image`))
			continue
		}
		re, err := regexp.Compile(caseInsensitive + p)
		if err != nil {
			var se *syntax.Error
			if errors.As(err, &se) {
				se.Expr = strings.TrimPrefix(se.Expr, caseInsensitive) // show the pattern as written
			}
			errs = append(errs, fmt.Errorf("exclude pattern %q: %w", p, err))
			continue
		}
		out = append(out, re)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// patternText is how an exclusion pattern appears in explanations: as the operator wrote it.
func patternText(re *regexp.Regexp) string {
	return strings.TrimPrefix(re.String(), caseInsensitive)
}
