// Package kube runs builds as Kubernetes pods: a pod built from the target's options (pure,
// pod.go), created with a deterministic name, followed through one shared informer per
// cluster and namespace (cluster.go), classified from its real status into the build's
// states and reasons (classify.go), deleted on stop and after a retention window once done.
package kube

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/buildfleet/buildfleet/internal/config"
)

// Defaults of a kubernetes target.
const (
	DefaultNamespace           = "default"
	DefaultResourceClass       = "low"
	DefaultTerminationGrace    = 30 * time.Second
	DefaultMaxTerminationGrace = 2 * time.Minute
	DefaultImagePullTimeout    = 5 * time.Minute
	DefaultPendingTimeout      = 10 * time.Minute
	DefaultRetention           = 5 * time.Minute

	// SecurityRestricted meets the Pod Security "restricted" profile: non-root, no privilege
	// escalation, every capability dropped, seccomp RuntimeDefault.
	SecurityRestricted = "restricted"
	// SecurityBaseline is restricted without runAsNonRoot, for images that must start as root
	// (a Kata VM still isolates them from the node).
	SecurityBaseline = "baseline"
)

// Size is a CPU and memory amount; requests and limits of a build pod are both set to it, so
// build pods are Guaranteed and are the last to be evicted.
type Size struct {
	CPU    string `json:"cpu,omitempty"`
	Memory string `json:"memory,omitempty"`
}

// BuiltinClasses are the resource classes a build may ask for with the buildfleet.io/resources
// annotation, as Screwdriver sized them. A target may resize any of them.
var BuiltinClasses = map[string]Size{
	"micro": {CPU: "500m", Memory: "1Gi"},
	"low":   {CPU: "2", Memory: "2Gi"},
	"high":  {CPU: "6", Memory: "12Gi"},
	"turbo": {CPU: "12", Memory: "16Gi"},
}

// Resources says how big build pods are.
type Resources struct {
	// Default is the class of a build that does not ask for one.
	Default string `json:"default,omitempty"`
	// Classes resizes built-in classes or adds new ones.
	Classes map[string]Size `json:"classes,omitempty"`
	// Max caps an explicit size a build asks for ("cpu=4,memory=8Gi"); the largest class when
	// unset.
	Max Size `json:"max,omitzero"`
}

// Options are the `kubernetes:` options of one target in the targets file.
type Options struct {
	// Context names the kubeconfig context of the cluster. Empty means in-cluster config when
	// the replica runs in a pod, else the kubeconfig's current context. Targets naming the
	// same context share one client and one informer per namespace.
	Context string `json:"context,omitempty"`
	// Namespace holds the build pods.
	Namespace string `json:"namespace,omitempty"`
	// RuntimeClass is the pod's runtimeClassName ("kata" for VM isolation).
	RuntimeClass string `json:"runtime_class,omitempty"`
	// NodeSelector pins pods to nodes; each pair also becomes a toleration (key=value,
	// NoSchedule) and a required node-affinity term, so dedicated, tainted build nodes work
	// with one setting.
	NodeSelector map[string]string `json:"node_selector,omitempty"`
	// PreferredNodeSelector becomes one preferred node-affinity term.
	PreferredNodeSelector map[string]string `json:"preferred_node_selector,omitempty"`
	// Labels and Annotations are added to every pod. Keys under buildfleet.io/ are ours.
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// PassAnnotations lists prefixes of request annotation keys that are copied onto the
	// pod. None by default: pod annotations can change how a runtime treats the pod (Kata
	// reads hypervisor settings from them), so only the operator may open them up.
	PassAnnotations []string `json:"pass_annotations,omitempty"`
	// Secrets lists the Secrets (shell patterns over their names) whose keys a build may
	// set variables from (secret_refs); none by default, since any Secret of the namespace
	// could otherwise be read by whoever may submit a build.
	Secrets []string `json:"secrets,omitempty"`
	// ServiceAccount runs the pod; its token is mounted only when AutomountToken is set.
	ServiceAccount string `json:"service_account,omitempty"`
	AutomountToken bool   `json:"automount_token,omitempty"`
	// Privileged runs the build container privileged; off by default, and refused by a
	// namespace that enforces Pod Security "restricted" or "baseline".
	Privileged bool `json:"privileged,omitempty"`
	// Security is SecurityRestricted (default) or SecurityBaseline.
	Security string `json:"security,omitempty"`
	// RunAsUser sets the container's user, for images whose default user is root.
	RunAsUser *int64    `json:"run_as_user,omitempty"`
	Resources Resources `json:"resources,omitzero"`
	// ImagePullPolicy is Always, IfNotPresent (default) or Never.
	ImagePullPolicy  string   `json:"image_pull_policy,omitempty"`
	ImagePullSecrets []string `json:"image_pull_secrets,omitempty"`
	// TerminationGrace is how long a killed build has to stop; a build may ask for more with
	// the buildfleet.io/termination-grace annotation, up to MaxTerminationGrace.
	TerminationGrace    config.Duration `json:"termination_grace,omitempty"`
	MaxTerminationGrace config.Duration `json:"max_termination_grace,omitempty"`
	// ImagePullTimeout bounds how long the image may keep failing to pull →
	// failed/image_pull. PendingTimeout bounds how long the pod may stay unscheduled or
	// otherwise pending → failed/unschedulable (or container_error).
	ImagePullTimeout config.Duration `json:"image_pull_timeout,omitempty"`
	PendingTimeout   config.Duration `json:"pending_timeout,omitempty"`
	// Retention keeps a finished pod this long (for logs and debugging) before it is deleted;
	// 0s deletes it as soon as the build ends.
	Retention *config.Duration `json:"retention,omitempty"`
}

// ParseOptions decodes and validates a target's kubernetes options, filling in defaults.
// Errors name the field (resources.max.cpu); unknown fields are errors.
func ParseOptions(raw json.RawMessage) (Options, error) {
	var o Options
	if len(raw) > 0 && string(raw) != "null" {
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&o); err != nil {
			var te *json.UnmarshalTypeError
			if errors.As(err, &te) && te.Field != "" {
				return Options{}, fmt.Errorf("%s: must be a %s (got a %s)", te.Field, te.Type, te.Value)
			}
			return Options{}, locateField(raw, err)
		}
	}
	var given map[string]json.RawMessage
	_ = json.Unmarshal(raw, &given) // it decoded above, or is empty
	var errs []error
	for _, f := range []struct {
		key string
		d   config.Duration
	}{{"image_pull_timeout", o.ImagePullTimeout}, {"pending_timeout", o.PendingTimeout}} {
		if _, ok := given[f.key]; ok && f.d == 0 {
			errs = append(errs, fmt.Errorf("%s: must be positive; leave it out for the default", f.key))
		}
	}
	if len(errs) > 0 {
		return Options{}, errors.Join(errs...)
	}
	_, graceGiven := given["termination_grace"]
	o.defaults(graceGiven)
	if err := o.validate(); err != nil {
		return Options{}, err
	}
	return o, nil
}

// locateField names the top-level field a decoding error comes from: encoding/json passes a
// field's own UnmarshalJSON error (a bad duration) on without saying which field it was.
func locateField(raw json.RawMessage, err error) error {
	var fields map[string]json.RawMessage
	if json.Unmarshal(raw, &fields) == nil {
		for _, k := range slices.Sorted(maps.Keys(fields)) {
			one, _ := json.Marshal(map[string]json.RawMessage{k: fields[k]})
			dec := json.NewDecoder(bytes.NewReader(one))
			dec.DisallowUnknownFields()
			var probe Options
			if ferr := dec.Decode(&probe); ferr != nil {
				if strings.Contains(ferr.Error(), "unknown field") {
					return errors.New(strings.TrimPrefix(ferr.Error(), "json: "))
				}
				return fmt.Errorf("%s: %s", k, strings.TrimPrefix(ferr.Error(), "json: "))
			}
		}
	}
	return errors.New(strings.TrimPrefix(err.Error(), "json: "))
}

// defaults fills what the file left out. A termination grace given as 0s stays 0: the build
// is killed at once.
func (o *Options) defaults(graceGiven bool) {
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.Security == "" {
		o.Security = SecurityRestricted
	}
	if o.ImagePullPolicy == "" {
		o.ImagePullPolicy = string(corev1.PullIfNotPresent)
	}
	if o.Resources.Default == "" {
		o.Resources.Default = DefaultResourceClass
	}
	classes := maps.Clone(BuiltinClasses)
	maps.Copy(classes, o.Resources.Classes)
	o.Resources.Classes = classes
	if o.Resources.Max == (Size{}) {
		o.Resources.Max = largest(classes)
	}
	if !graceGiven {
		setDuration(&o.TerminationGrace, DefaultTerminationGrace)
	}
	setDuration(&o.MaxTerminationGrace, max(DefaultMaxTerminationGrace, time.Duration(o.TerminationGrace)))
	setDuration(&o.ImagePullTimeout, DefaultImagePullTimeout)
	setDuration(&o.PendingTimeout, DefaultPendingTimeout)
	if o.Retention == nil {
		o.Retention = new(config.Duration(DefaultRetention))
	}
}

func setDuration(d *config.Duration, def time.Duration) {
	if *d == 0 {
		*d = config.Duration(def)
	}
}

// largest is the class with the most CPU, and its memory the most of any class.
func largest(classes map[string]Size) Size {
	var cpu, mem resource.Quantity
	for _, s := range classes {
		if q, err := resource.ParseQuantity(s.CPU); err == nil && q.Cmp(cpu) > 0 {
			cpu = q
		}
		if q, err := resource.ParseQuantity(s.Memory); err == nil && q.Cmp(mem) > 0 {
			mem = q
		}
	}
	return Size{CPU: cpu.String(), Memory: mem.String()}
}

func (o *Options) validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	for _, m := range validation.IsDNS1123Label(o.Namespace) {
		bad("namespace", "%s (got %q)", m, o.Namespace)
	}
	if o.RuntimeClass != "" {
		for _, m := range validation.IsDNS1123Subdomain(o.RuntimeClass) {
			bad("runtime_class", "%s (got %q)", m, o.RuntimeClass)
		}
	}
	if o.ServiceAccount != "" {
		for _, m := range validation.IsDNS1123Subdomain(o.ServiceAccount) {
			bad("service_account", "%s (got %q)", m, o.ServiceAccount)
		}
	}
	labelMap := func(field string, m map[string]string) {
		for _, k := range slices.Sorted(maps.Keys(m)) {
			for _, msg := range validation.IsQualifiedName(k) {
				bad(fmt.Sprintf("%s[%q]", field, k), "%s", msg)
			}
			for _, msg := range validation.IsValidLabelValue(m[k]) {
				bad(fmt.Sprintf("%s[%q]", field, k), "%s", msg)
			}
			if ours(k) {
				bad(fmt.Sprintf("%s[%q]", field, k), "keys under %s are set by buildfleet", labelDomain)
			}
		}
	}
	labelMap("node_selector", o.NodeSelector)
	labelMap("preferred_node_selector", o.PreferredNodeSelector)
	labelMap("labels", o.Labels)
	for _, k := range slices.Sorted(maps.Keys(o.Annotations)) {
		for _, msg := range validation.IsQualifiedName(k) {
			bad(fmt.Sprintf("annotations[%q]", k), "%s", msg)
		}
		if ours(k) {
			bad(fmt.Sprintf("annotations[%q]", k), "keys under %s are set by buildfleet", labelDomain)
		}
	}
	for i, p := range o.Secrets {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			bad(fmt.Sprintf("secrets[%d]", i), "must be a shell pattern over Secret names, such as npm-* (got %q)", p)
		}
	}
	for i, p := range o.PassAnnotations {
		if p == "" || ours(p) || strings.HasPrefix(labelDomain, p) {
			bad(fmt.Sprintf("pass_annotations[%d]", i), "must be a non-empty prefix outside %s (got %q)", labelDomain, p)
		}
	}
	switch o.Security {
	case SecurityRestricted, SecurityBaseline:
	default:
		bad("security", "must be %s or %s (got %q)", SecurityRestricted, SecurityBaseline, o.Security)
	}
	if o.RunAsUser != nil && *o.RunAsUser < 0 {
		bad("run_as_user", "must be >= 0 (got %d)", *o.RunAsUser)
	}
	if o.RunAsUser != nil && *o.RunAsUser == 0 && o.Security == SecurityRestricted && !o.Privileged {
		bad("run_as_user", "0 (root) cannot run under security: %s; use security: %s", SecurityRestricted, SecurityBaseline)
	}
	switch corev1.PullPolicy(o.ImagePullPolicy) {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		bad("image_pull_policy", "must be Always, IfNotPresent or Never (got %q)", o.ImagePullPolicy)
	}
	for i, s := range o.ImagePullSecrets {
		for _, m := range validation.IsDNS1123Subdomain(s) {
			bad(fmt.Sprintf("image_pull_secrets[%d]", i), "%s (got %q)", m, s)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(o.Resources.Classes)) {
		for _, m := range validation.IsDNS1123Label(name) {
			bad(fmt.Sprintf("resources.classes.%s", name), "class names are asked for in lower case: %s", m)
		}
		if err := o.Resources.Classes[name].check(); err != nil {
			bad(fmt.Sprintf("resources.classes.%s", name), "%v", err)
		}
	}
	if _, ok := o.Resources.Classes[o.Resources.Default]; !ok {
		bad("resources.default", "%q is not a resource class (%s)", o.Resources.Default,
			strings.Join(slices.Sorted(maps.Keys(o.Resources.Classes)), ", "))
	}
	if err := o.Resources.Max.check(); err != nil {
		bad("resources.max", "%v", err)
	}
	durations := []struct {
		field string
		d     config.Duration
	}{
		{"termination_grace", o.TerminationGrace}, {"max_termination_grace", o.MaxTerminationGrace},
		{"image_pull_timeout", o.ImagePullTimeout}, {"pending_timeout", o.PendingTimeout},
		{"retention", *o.Retention},
	}
	for _, d := range durations {
		if d.d < 0 {
			bad(d.field, "must not be negative (got %v)", d.d)
		}
	}
	if o.TerminationGrace > o.MaxTerminationGrace {
		bad("termination_grace", "must not exceed max_termination_grace (got %v, max %v)", o.TerminationGrace, o.MaxTerminationGrace)
	}
	return errors.Join(errs...)
}

func (s Size) check() error {
	var errs []error
	for _, f := range []struct{ name, v string }{{"cpu", s.CPU}, {"memory", s.Memory}} {
		if f.v == "" {
			errs = append(errs, fmt.Errorf("%s: required", f.name))
			continue
		}
		q, err := resource.ParseQuantity(f.v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %q is not a quantity such as 500m, 2 or 4Gi", f.name, f.v))
			continue
		}
		if q.Sign() <= 0 {
			errs = append(errs, fmt.Errorf("%s: must be positive (got %s)", f.name, f.v))
		}
	}
	return errors.Join(errs...)
}

// retention is how long a finished pod is kept.
func (o Options) retention() time.Duration { return time.Duration(*o.Retention) }
