package kube

import (
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"math"
	"path"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Labels and annotations buildfleet puts on build pods.
const (
	labelDomain = "buildfleet.io"

	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "buildfleet"
	// LabelFleet holds the fleet's prefix, so that two fleets sharing a namespace never
	// follow or clean up each other's pods.
	LabelFleet    = labelDomain + "/fleet"
	LabelBuild    = labelDomain + "/build"
	LabelTarget   = labelDomain + "/target"
	LabelPipeline = labelDomain + "/pipeline"
	LabelJob      = labelDomain + "/job"

	// AnnotationPipeline and AnnotationJob keep the unsanitised names.
	AnnotationPipeline = labelDomain + "/pipeline"
	AnnotationJob      = labelDomain + "/job"
	// AnnotationFinishedAt marks a pod whose build has ended; the sweeper deletes it once
	// the target's retention has passed.
	AnnotationFinishedAt = labelDomain + "/finished-at"

	// ContainerName is the build container's name.
	ContainerName = "build"

	// Trace context variables, as the W3C/OpenTelemetry environment carrier names them.
	EnvTraceParent = build.EnvTraceParent
	EnvTraceState  = build.EnvTraceState
)

func ours(key string) bool { return strings.HasPrefix(key, labelDomain+"/") }

// LabelValue turns any string into a valid label value: at most 63 characters of letters,
// digits, '-', '_' and '.', starting and ending with a letter or digit. Other characters become
// '-'. A value that had to be shortened ends in a hash of the whole, so two long names that
// share a start still differ.
func LabelValue(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			b[i] = '-'
		}
	}
	v := string(b)
	if len(v) > 63 {
		h := fnv.New32a()
		h.Write([]byte(s))
		v = fmt.Sprintf("%s-%08x", v[:54], h.Sum32())
	}
	return strings.TrimFunc(v, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9')
	})
}

// FleetLabel is the value of LabelFleet for a fleet prefix: the prefix itself when it is a
// valid label value, else a sanitised one with a hash of the prefix, so that two prefixes
// never share a label (a_ and a would both sanitise to a).
func FleetLabel(prefix string) string {
	v := LabelValue(prefix)
	if v == prefix {
		return v
	}
	h := fnv.New32a()
	h.Write([]byte(prefix))
	return LabelValue(fmt.Sprintf("%s-%08x", v, h.Sum32()))
}

// Pod builds the pod of a job on a target: a pure function of its inputs, so every replica
// that launches (or relaunches) the build asks for the same pod. fleet is the fleet's prefix.
// A request the pod cannot be built from (a bad resources annotation, nothing to run) is a
// permanent rejection.
func Pod(job build.Job, fleet string, o Options) (*corev1.Pod, error) {
	args, err := job.Argv()
	if err != nil {
		return nil, invalid(err)
	}
	vars, err := env(job, o)
	if err != nil {
		return nil, err
	}
	res, err := o.resources(job.Annotations[protocol.AnnotationResources])
	if err != nil {
		return nil, invalid(fmt.Errorf("annotation %s: %w", protocol.AnnotationResources, err))
	}
	grace, err := o.grace(job.Annotations[protocol.AnnotationTerminationGrace])
	if err != nil {
		return nil, invalid(fmt.Errorf("annotation %s: %w", protocol.AnnotationTerminationGrace, err))
	}

	labels := maps.Clone(o.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	labels[LabelManagedBy] = ManagedBy
	labels[LabelFleet] = FleetLabel(fleet)
	labels[LabelBuild] = job.ID // the id's alphabet is already a valid label value
	labels[LabelTarget] = job.Target
	annotations := map[string]string{}
	for k, v := range job.Annotations {
		if slices.ContainsFunc(o.PassAnnotations, func(p string) bool { return strings.HasPrefix(k, p) }) {
			annotations[k] = v
		}
	}
	maps.Copy(annotations, o.Annotations) // the operator's win over the build's
	if job.Pipeline != "" {
		labels[LabelPipeline] = LabelValue(job.Pipeline)
		annotations[AnnotationPipeline] = job.Pipeline
	}
	if job.JobName != "" {
		labels[LabelJob] = LabelValue(job.JobName)
		annotations[AnnotationJob] = job.JobName
	}

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        job.Workload,
			Namespace:   o.Namespace,
			Labels:      labels,
			Annotations: annotations,
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			EnableServiceLinks:            new(false),
			AutomountServiceAccountToken:  new(o.AutomountToken),
			ServiceAccountName:            o.ServiceAccount,
			TerminationGracePeriodSeconds: new(int64(math.Ceil(grace.Seconds()))),
			Affinity:                      affinity(o),
			Tolerations:                   tolerations(o.NodeSelector),
			SecurityContext:               podSecurity(o),
			Containers: []corev1.Container{{
				Name:            ContainerName,
				Image:           job.Image,
				Command:         args,
				Env:             vars,
				Resources:       corev1.ResourceRequirements{Requests: res, Limits: res},
				ImagePullPolicy: corev1.PullPolicy(o.ImagePullPolicy),
				SecurityContext: containerSecurity(o),
				// A failed build's message carries the end of its log.
				TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
			}},
		},
	}
	if o.RuntimeClass != "" {
		pod.Spec.RuntimeClassName = new(o.RuntimeClass)
	}
	if job.Timeout > 0 {
		// Holds even when no replica is left to enforce the timeout.
		pod.Spec.ActiveDeadlineSeconds = new(int64(math.Ceil(job.Timeout.Seconds())))
	}
	for _, s := range o.ImagePullSecrets {
		pod.Spec.ImagePullSecrets = append(pod.Spec.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
	}
	return pod, nil
}

func invalid(err error) error {
	return build.Permanent(protocol.StateRejected, protocol.ReasonInvalidRequest, err)
}

// env is the container's environment: the job's variables, then those it sets from Secrets
// the target allows (the kubelet reads them; neither NATS nor this replica ever sees them).
func env(job build.Job, o Options) ([]corev1.EnvVar, error) {
	vars := job.Environment()
	out := make([]corev1.EnvVar, 0, len(vars)+len(job.SecretRefs))
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		out = append(out, corev1.EnvVar{Name: k, Value: vars[k]})
	}
	for _, k := range slices.Sorted(maps.Keys(job.SecretRefs)) {
		ref := job.SecretRefs[k]
		if _, own := vars[k]; own {
			return nil, invalid(fmt.Errorf("secret_refs.%s: the variable is set by value too", k))
		}
		if !o.allowsSecret(ref.Secret) {
			return nil, build.Permanent(protocol.StateRejected, protocol.ReasonLaunchRefused,
				fmt.Errorf("secret_refs.%s: this target does not allow Secret %q (its secrets option lists what builds may read)", k, ref.Secret))
		}
		out = append(out, corev1.EnvVar{Name: k, ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: ref.Secret}, Key: ref.Key}}})
	}
	return out, nil
}

func (o Options) allowsSecret(name string) bool {
	for _, p := range o.Secrets {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// affinity makes each node selector pair a required term, and the preferred selectors one
// preferred term, as Screwdriver's seed did.
func affinity(o Options) *corev1.Affinity {
	if len(o.NodeSelector) == 0 && len(o.PreferredNodeSelector) == 0 {
		return nil
	}
	na := &corev1.NodeAffinity{}
	if len(o.NodeSelector) > 0 {
		na.RequiredDuringSchedulingIgnoredDuringExecution = &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: requirements(o.NodeSelector)}},
		}
	}
	if len(o.PreferredNodeSelector) > 0 {
		na.PreferredDuringSchedulingIgnoredDuringExecution = []corev1.PreferredSchedulingTerm{{
			Weight:     100,
			Preference: corev1.NodeSelectorTerm{MatchExpressions: requirements(o.PreferredNodeSelector)},
		}}
	}
	return &corev1.Affinity{NodeAffinity: na}
}

func requirements(sel map[string]string) []corev1.NodeSelectorRequirement {
	out := make([]corev1.NodeSelectorRequirement, 0, len(sel))
	for _, k := range slices.Sorted(maps.Keys(sel)) {
		out = append(out, corev1.NodeSelectorRequirement{Key: k, Operator: corev1.NodeSelectorOpIn, Values: []string{sel[k]}})
	}
	return out
}

// tolerations let the pods onto nodes that are tainted with the same pairs they select,
// the usual way of dedicating nodes to builds.
func tolerations(sel map[string]string) []corev1.Toleration {
	out := make([]corev1.Toleration, 0, len(sel))
	for _, k := range slices.Sorted(maps.Keys(sel)) {
		out = append(out, corev1.Toleration{Key: k, Operator: corev1.TolerationOpEqual, Value: sel[k], Effect: corev1.TaintEffectNoSchedule})
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

func podSecurity(o Options) *corev1.PodSecurityContext {
	sc := &corev1.PodSecurityContext{
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	if o.Privileged {
		return sc
	}
	if o.Security == SecurityRestricted {
		sc.RunAsNonRoot = new(true)
	}
	return sc
}

func containerSecurity(o Options) *corev1.SecurityContext {
	if o.Privileged {
		return &corev1.SecurityContext{Privileged: new(true), AllowPrivilegeEscalation: new(true)}
	}
	sc := &corev1.SecurityContext{
		AllowPrivilegeEscalation: new(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		RunAsUser:                o.RunAsUser,
	}
	if o.Security == SecurityRestricted {
		sc.RunAsNonRoot = new(true)
	}
	return sc
}

// resources turns the build's resources annotation into a size: a class name (any case), or
// "cpu=4,memory=8Gi" with either part optional (the default class fills the other), capped at
// the target's maximum.
func (o Options) resources(ask string) (corev1.ResourceList, error) {
	def := o.Resources.Classes[o.Resources.Default]
	size := def
	if ask != "" {
		if c, ok := o.Resources.Classes[strings.ToLower(strings.TrimSpace(ask))]; ok {
			size = c
		} else {
			s, err := parseSize(ask, def)
			if err != nil {
				return nil, err
			}
			size = s.capped(o.Resources.Max)
		}
	}
	cpu, err := resource.ParseQuantity(size.CPU)
	if err != nil {
		return nil, err
	}
	mem, err := resource.ParseQuantity(size.Memory)
	if err != nil {
		return nil, err
	}
	return corev1.ResourceList{corev1.ResourceCPU: cpu, corev1.ResourceMemory: mem}, nil
}

// The smallest explicit size a build may ask for: a container below them does not start.
var (
	minCPU    = resource.MustParse("10m")
	minMemory = resource.MustParse("16Mi")
)

var errSize = errors.New(`must be a resource class (micro, low, high, turbo) or a size such as "cpu=4,memory=8Gi"`)

func parseSize(ask string, def Size) (Size, error) {
	s := def
	for part := range strings.SplitSeq(ask, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return Size{}, fmt.Errorf("%w (got %q)", errSize, ask)
		}
		q, err := resource.ParseQuantity(strings.TrimSpace(v))
		if err != nil || q.Sign() <= 0 {
			return Size{}, fmt.Errorf("%s: %q is not a positive quantity", k, v)
		}
		switch strings.TrimSpace(k) {
		case "cpu":
			if q.Cmp(minCPU) < 0 {
				return Size{}, fmt.Errorf("cpu: %s is below the smallest size a build can run with (%s)", v, minCPU.String())
			}
			s.CPU = q.String()
		case "memory":
			if q.Cmp(minMemory) < 0 {
				return Size{}, fmt.Errorf("memory: %s is below the smallest size a build can run with (%s)", v, minMemory.String())
			}
			s.Memory = q.String()
		default:
			return Size{}, fmt.Errorf("%w (unknown resource %q)", errSize, k)
		}
	}
	return s, nil
}

// capped returns s with each amount lowered to at most max's.
func (s Size) capped(max Size) Size {
	lower := func(v, m string) string {
		q, m2 := resource.MustParse(v), resource.MustParse(m)
		if q.Cmp(m2) > 0 {
			return m
		}
		return v
	}
	return Size{CPU: lower(s.CPU, max.CPU), Memory: lower(s.Memory, max.Memory)}
}

// grace is the pod's termination grace period: the target's, or what the build asks for,
// capped at the target's maximum.
func (o Options) grace(ask string) (time.Duration, error) {
	if ask == "" {
		return time.Duration(o.TerminationGrace), nil
	}
	d, err := time.ParseDuration(ask)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("must be a duration such as 90s (got %q)", ask)
	}
	return min(d, time.Duration(o.MaxTerminationGrace)), nil
}
