package config

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/buildfleet/buildfleet/internal/fair"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Targets is the routing table as the targets file states it:
//
//	default: local
//	targets:
//	  - name: local
//	    executor: process
//	    weight: 1
//	    exclude: ["rhel6"]
//	    timeout: {default: 30m, max: 2h}
//	    process: {keep_scratch: false}
type Targets struct {
	// Default names the target that takes builds no weighted target may run; "" means none.
	Default string `json:"default,omitempty"`
	// Targets are in the order the weighted choice walks them.
	Targets []TargetSpec `json:"targets"`
	// Policy says which builds may run where, before weights.
	Policy PolicySpec `json:"policy,omitzero"`
}

// PolicySpec is the routing policy of the targets file:
//
//	policy:
//	  isolate:
//	    - name: untrusted
//	      annotations: {buildfleet.io/trust: untrusted}
//	    - name: forks
//	      pipeline: "github.com/*/fork-*"
type PolicySpec struct {
	// Isolate lists rules; a build that matches one runs only on an isolated target.
	Isolate []IsolationRuleSpec `json:"isolate,omitempty"`
	// Tenants say whom each build counts against and each tenant's share.
	Tenants TenantsSpec `json:"tenants,omitzero"`
}

// TenantsSpec is the fair-share policy of the targets file:
//
//	policy:
//	  tenants:
//	    from: ["annotation:buildfleet.io/tenant", pipeline-owner]
//	    fallback: shared
//	    default: {weight: 1}
//	    limits:
//	      - {name: payments, weight: 3, cap: 150, max_priority: 10}
//
// Without it every build is in tenant "default": one queue, first come first served.
type TenantsSpec struct {
	// From lists where a build's tenant comes from, tried in order: "pipeline-owner" or
	// "annotation:<key>".
	From []string `json:"from,omitempty"`
	// Fallback is the tenant of a build none of From names ("default" if empty).
	Fallback string `json:"fallback,omitempty"`
	// Default are the limits of every tenant Limits does not name.
	Default TenantLimitsSpec `json:"default,omitzero"`
	// Limits name tenants and their limits.
	Limits []TenantLimitsSpec `json:"limits,omitempty"`
}

// TenantLimitsSpec is one tenant's share.
type TenantLimitsSpec struct {
	Name string `json:"name,omitempty"` // only in limits
	// Weight is the tenant's share relative to the others' (0 or unset: 1).
	Weight int `json:"weight,omitempty"`
	// Cap is the most builds of the tenant running at once (0: no cap of its own).
	Cap int `json:"cap,omitempty"`
	// MaxPriority is the highest buildfleet.io/priority its builds may ask for (0: none).
	MaxPriority int `json:"max_priority,omitempty"`
}

func (l TenantLimitsSpec) limits() fair.Limits {
	w := l.Weight
	if w == 0 {
		w = 1
	}
	return fair.Limits{Weight: w, Cap: l.Cap, MaxPriority: l.MaxPriority}
}

// FairPolicy is the tenant policy the targets file states (validated by Validate).
func (t Targets) FairPolicy() *fair.Policy {
	ts := t.Policy.Tenants
	p := &fair.Policy{Fallback: ts.Fallback, Default: ts.Default.limits()}
	for _, s := range ts.From {
		if src, err := fair.ParseSource(s); err == nil {
			p.From = append(p.From, src)
		}
	}
	if len(ts.Limits) > 0 {
		p.Tenants = make(map[string]fair.Limits, len(ts.Limits))
		for _, l := range ts.Limits {
			p.Tenants[fair.Token(l.Name)] = l.limits()
		}
	}
	return p
}

// problems checks the tenant policy.
func (ts TenantsSpec) problems(p *problems) {
	for i, s := range ts.From {
		if _, err := fair.ParseSource(s); err != nil {
			p.add(fmt.Sprintf("policy.tenants.from[%d]", i), "%v", err)
		}
	}
	if ts.Fallback != "" && fair.Token(ts.Fallback) != ts.Fallback {
		p.add("policy.tenants.fallback", "%q is not a tenant name: letters, digits, '_' and '-', starting with a letter or digit, at most %d", ts.Fallback, fair.MaxTenantLength)
	}
	check := func(at string, l TenantLimitsSpec) {
		if l.Weight < 0 || l.Weight > fair.MaxWeight {
			p.add(at+".weight", "must be between 1 and %d, or left out for 1 (got %d)", fair.MaxWeight, l.Weight)
		}
		if l.Cap < 0 {
			p.add(at+".cap", "must not be negative (got %d)", l.Cap)
		}
		if l.MaxPriority < 0 || l.MaxPriority > protocol.MaxPriority {
			p.add(at+".max_priority", "must be between 0 and %d (got %d)", protocol.MaxPriority, l.MaxPriority)
		}
	}
	if ts.Default.Name != "" {
		p.add("policy.tenants.default.name", "a default names no tenant")
	}
	check("policy.tenants.default", ts.Default)
	seen := map[string]int{}
	for i, l := range ts.Limits {
		at := fmt.Sprintf("policy.tenants.limits[%d]", i)
		switch j, dup := seen[l.Name]; {
		case l.Name == "":
			p.add(at+".name", "required")
		case fair.Token(l.Name) != l.Name:
			p.add(at+".name", "%q is not a tenant name: letters, digits, '_' and '-', starting with a letter or digit, at most %d", l.Name, fair.MaxTenantLength)
		case dup:
			p.add(at+".name", "%q is already the name of policy.tenants.limits[%d]", l.Name, j)
		default:
			seen[l.Name] = i
		}
		check(at, l)
	}
}

// IsolationRuleSpec is one isolation rule: it matches a build whose request matches every
// condition it sets. Values are shell-style patterns over the whole value (* matches any run
// of characters, slashes included; ? one character).
type IsolationRuleSpec struct {
	Name string `json:"name"`
	// Annotations maps an annotation key to a pattern of its value ("*": the annotation is
	// there).
	Annotations map[string]string `json:"annotations,omitempty"`
	Pipeline    string            `json:"pipeline,omitempty"`
	Job         string            `json:"job,omitempty"`
	Image       string            `json:"image,omitempty"`
}

// rule compiles the rule for the router; bad reports each condition that does not compile.
func (r IsolationRuleSpec) rule(bad func(field, format string, args ...any)) routing.IsolationRule {
	out := routing.IsolationRule{Name: r.Name}
	glob := func(field, pattern string) *regexp.Regexp {
		if pattern == "" {
			return nil
		}
		re, err := routing.CompileGlob(pattern)
		if err != nil {
			bad(field, "%v", err)
		}
		return re
	}
	for k, v := range r.Annotations {
		if out.Annotations == nil {
			out.Annotations = map[string]*regexp.Regexp{}
		}
		if v == "" {
			bad(fmt.Sprintf("annotations[%q]", k), `is empty; "*" matches any value`)
			continue
		}
		out.Annotations[k] = glob(fmt.Sprintf("annotations[%q]", k), v)
	}
	out.Pipeline, out.Job, out.Image = glob("pipeline", r.Pipeline), glob("job", r.Job), glob("image", r.Image)
	return out
}

// Executor kinds.
const (
	ExecutorProcess    = "process"
	ExecutorKubernetes = "kubernetes"
)

// TargetSpec is one target of the targets file.
type TargetSpec struct {
	Name string `json:"name"`
	// Executor is ExecutorProcess or ExecutorKubernetes.
	Executor string `json:"executor"`
	// Weight is relative to the other targets' weights; 0 means pinned or default traffic only.
	Weight int `json:"weight"`
	// Exclude lists regular expressions matched, unanchored and case-insensitively, against
	// the image reference; a matching image never runs on this target.
	Exclude []string `json:"exclude,omitempty"`
	// Isolated marks a VM-isolated (Kata) target.
	Isolated bool `json:"isolated,omitempty"`
	// MaxRunning caps the target's running builds across the whole fleet (0: no cap of its
	// own). A full target takes no new builds: others go elsewhere, pinned ones wait.
	MaxRunning int         `json:"max_running,omitempty"`
	Timeout    TimeoutSpec `json:"timeout,omitzero"`
	// Process holds the options of a process target.
	Process *ProcessSpec `json:"process,omitempty"`
	// Kubernetes holds the options of a kubernetes target, undecoded: the Kubernetes
	// executor owns their shape.
	Kubernetes json.RawMessage `json:"kubernetes,omitempty"`
}

// TimeoutSpec bounds the builds of one target; a zero field falls back to the Settings.
type TimeoutSpec struct {
	// Default is the timeout of a build that does not ask for one.
	Default Duration `json:"default,omitempty"`
	// Max is the longest timeout a build may ask for.
	Max Duration `json:"max,omitempty"`
}

// ProcessSpec holds the options of a process target.
type ProcessSpec struct {
	// KeepScratch keeps a build's working directory after it ends, for debugging.
	KeepScratch bool `json:"keep_scratch,omitempty"`
}

// Duration is a time.Duration written in the targets file as a Go duration string ("30m").
type Duration time.Duration

// String formats d like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON reads a duration string. A bare number is refused: its unit would be a guess.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("must be a duration such as 30m or 2h (got %s)", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("must be a duration such as 30m or 2h (got %q)", s)
	}
	*d = Duration(v)
	return nil
}

// DefaultTargets is the table used when no targets file is given: every build runs as a local
// process, which is what `buildfleet dev` wants.
func DefaultTargets() Targets {
	return Targets{
		Default: "local",
		Targets: []TargetSpec{{Name: "local", Executor: ExecutorProcess, Weight: 1}},
	}
}

// LoadTargets reads, parses and validates the targets file at path. Errors name the file and
// the field.
func LoadTargets(path string) (Targets, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Targets{}, fmt.Errorf("targets file: %w", err)
	}
	return ParseTargets(data, path)
}

// ParseTargets parses and validates a targets file; name is the file's name for errors.
// Unknown fields are errors: a misspelt option must not be silently ignored.
func ParseTargets(data []byte, name string) (Targets, error) {
	var t Targets
	if err := yaml.UnmarshalStrict(data, &t); err != nil {
		return Targets{}, fmt.Errorf("%s: %w", name, locate(data, err))
	}
	if err := t.Validate(); err != nil {
		return Targets{}, prefixEach(name, err)
	}
	return t, nil
}

// prefixEach puts name in front of every error err joins, so that each line of a multi-line
// report names the file.
func prefixEach(name string, err error) error {
	return MapJoined(err, func(e error) error { return fmt.Errorf("%s: %w", name, e) })
}

// MapJoined applies wrap to each error err joins (or to err itself) and joins the results, so
// that every line of a multi-line report can be given its context.
func MapJoined(err error, wrap func(error) error) error {
	var errs []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	} else {
		errs = []error{err}
	}
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = wrap(e)
	}
	return errors.Join(out...)
}

// targetNameRE keeps target names valid as label values and DNS labels, which they become.
var targetNameRE = regexp.MustCompile(`^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Validate reports every problem of the table, each led by the field's path
// (targets[1].weight).
func (t Targets) Validate() error {
	if errs := t.problems(); len(errs) > 0 {
		return errors.Join(errs...)
	}
	// What is left to check (total weight, for one) is the router's to say.
	_, err := t.table()
	return err
}

func (t Targets) problems() problems {
	var p problems
	if len(t.Targets) == 0 {
		p.add("targets", "at least one target is required")
	}
	first := map[string]int{}
	anyWeight := false
	for i, ts := range t.Targets {
		at := func(field string) string { return fmt.Sprintf("targets[%d].%s", i, field) }
		switch j, dup := first[ts.Name]; {
		case ts.Name == "":
			p.add(at("name"), "required")
		case !targetNameRE.MatchString(ts.Name):
			p.add(at("name"), "must match %s (got %q)", targetNameRE, ts.Name)
		case dup:
			p.add(at("name"), "%q is already the name of targets[%d]", ts.Name, j)
		default:
			first[ts.Name] = i
		}
		switch ts.Executor {
		case ExecutorProcess, ExecutorKubernetes:
		case "":
			p.add(at("executor"), "required: %s or %s", ExecutorProcess, ExecutorKubernetes)
		default:
			p.add(at("executor"), "must be %s or %s (got %q)", ExecutorProcess, ExecutorKubernetes, ts.Executor)
		}
		if ts.Weight < 0 {
			p.add(at("weight"), "must be >= 0 (got %d)", ts.Weight)
		}
		if ts.MaxRunning < 0 {
			p.add(at("max_running"), "must be >= 0 (got %d)", ts.MaxRunning)
		}
		anyWeight = anyWeight || ts.Weight > 0
		for j, pat := range ts.Exclude {
			if _, err := routing.CompileExcludes([]string{pat}); err != nil {
				p.add(at(fmt.Sprintf("exclude[%d]", j)), "%v", err)
			}
		}
		def, max := ts.Timeout.Default, ts.Timeout.Max
		if def < 0 {
			p.add(at("timeout.default"), "must not be negative (got %v)", def)
		}
		if max < 0 {
			p.add(at("timeout.max"), "must not be negative (got %v)", max)
		}
		if def > 0 && max > 0 && def > max {
			p.add(at("timeout.default"), "must not exceed timeout.max (got %v, max %v)", def, max)
		}
		if ts.Process != nil && ts.Executor != ExecutorProcess {
			p.add(at("process"), "only valid with executor %s", ExecutorProcess)
		}
		if ts.hasKubernetes() && ts.Executor != ExecutorKubernetes {
			p.add(at("kubernetes"), "only valid with executor %s", ExecutorKubernetes)
		}
	}
	anyIsolated := false
	for _, ts := range t.Targets {
		anyIsolated = anyIsolated || ts.Isolated
	}
	rules := map[string]int{}
	for i, r := range t.Policy.Isolate {
		at := func(field string) string { return fmt.Sprintf("policy.isolate[%d].%s", i, field) }
		switch j, dup := rules[r.Name]; {
		case r.Name == "":
			p.add(at("name"), "required")
		case dup:
			p.add(at("name"), "%q is already the name of policy.isolate[%d]", r.Name, j)
		default:
			rules[r.Name] = i
		}
		if len(r.Annotations) == 0 && r.Pipeline == "" && r.Job == "" && r.Image == "" {
			p.add(fmt.Sprintf("policy.isolate[%d]", i), "sets no condition (annotations, pipeline, job, image), so it would match every build")
		}
		r.rule(func(field, format string, args ...any) { p.add(at(field), format, args...) })
		if !anyIsolated {
			p.add(fmt.Sprintf("policy.isolate[%d]", i), "no target is isolated, so every build this rule matches would be rejected")
		}
	}
	t.Policy.Tenants.problems(&p)
	if t.Default != "" {
		if _, ok := first[t.Default]; !ok {
			p.add("default", "%q is not the name of a target", t.Default)
		}
	} else if len(t.Targets) > 0 && !anyWeight {
		p.add("targets", "every target has weight 0 and there is no default: only pinned builds could run")
	}
	return p
}

func (ts TargetSpec) hasKubernetes() bool {
	return len(ts.Kubernetes) > 0 && string(ts.Kubernetes) != "null"
}

// Table returns the routing table the targets make, after validating them.
func (t Targets) Table() (*routing.Table, error) {
	if errs := t.problems(); len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return t.table()
}

func (t Targets) table() (*routing.Table, error) {
	rts := make([]routing.Target, len(t.Targets))
	for i, ts := range t.Targets {
		excl, err := routing.CompileExcludes(ts.Exclude)
		if err != nil {
			return nil, fmt.Errorf("targets[%d].exclude: %w", i, err)
		}
		rts[i] = routing.Target{Name: ts.Name, Weight: ts.Weight, Exclude: excl, Isolated: ts.Isolated}
	}
	rules := make([]routing.IsolationRule, len(t.Policy.Isolate))
	for i, r := range t.Policy.Isolate {
		var bad error
		rules[i] = r.rule(func(field, format string, args ...any) {
			bad = fmt.Errorf("policy.isolate[%d].%s: %s", i, field, fmt.Sprintf(format, args...))
		})
		if bad != nil {
			return nil, bad
		}
	}
	return routing.NewTable(rts, t.Default, rules...)
}

// Find returns the target called name.
func (t Targets) Find(name string) (TargetSpec, bool) {
	for _, ts := range t.Targets {
		if ts.Name == name {
			return ts, true
		}
	}
	return TargetSpec{}, false
}

// Timeouts returns the target's default and maximum build timeouts, each falling back to the
// Settings when the target does not set it. def never exceeds max: a target that lowers only
// its maximum lowers the default with it.
func (ts TargetSpec) Timeouts(s Settings) (def, max time.Duration) {
	def, max = s.BuildTimeout, s.MaxBuildTimeout
	if ts.Timeout.Default > 0 {
		def = time.Duration(ts.Timeout.Default)
	}
	if ts.Timeout.Max > 0 {
		max = time.Duration(ts.Timeout.Max)
	}
	return min(def, max), max
}
