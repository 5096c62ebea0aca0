package kube

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func mustOptions(t *testing.T, js string) Options {
	t.Helper()
	o, err := ParseOptions(json.RawMessage(js))
	if err != nil {
		t.Fatalf("ParseOptions(%s): %v", js, err)
	}
	return o
}

func testJob() build.Job {
	return build.Job{
		ID: "b-1", Image: "alpine:3", Command: []string{"make", "test"},
		Env:         map[string]string{"FOO": "bar", build.EnvBuildID: "forged"},
		Annotations: map[string]string{"sim.example/x": "1", "io.katacontainers.config.hypervisor.kernel": "/evil"},
		Pipeline:    "org/app", JobName: "PR #12", Target: "kata", Workload: build.WorkloadName("b-1"),
		Timeout: 90*time.Minute + 500*time.Millisecond, Attempt: 2,
		TraceParent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	}
}

// TestPodFromOptions checks every option of a target against the pod it produces.
func TestPodFromOptions(t *testing.T) {
	o := mustOptions(t, `{
		"namespace": "builds", "runtime_class": "kata",
		"node_selector": {"dedicated": "builds", "katacontainers.io/kata-runtime": "true"},
		"preferred_node_selector": {"disk": "ssd"},
		"labels": {"team": "ci"}, "annotations": {"io.kubernetes.cri.untrusted-workload": "true"},
		"pass_annotations": ["sim.example/"],
		"service_account": "builder", "image_pull_policy": "Always", "image_pull_secrets": ["regcred"],
		"termination_grace": "45s", "resources": {"default": "high"}
	}`)
	p, err := Pod(testJob(), "buildfleet", o)
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "build-b-1" || p.Namespace != "builds" {
		t.Errorf("pod %s/%s, want builds/build-b-1", p.Namespace, p.Name)
	}
	wantLabels := map[string]string{
		LabelManagedBy: ManagedBy, LabelFleet: "buildfleet", LabelBuild: "b-1", LabelTarget: "kata",
		LabelPipeline: "org-app", LabelJob: "PR--12", "team": "ci",
	}
	if d := cmp.Diff(wantLabels, p.Labels); d != "" {
		t.Errorf("labels (-want +got):\n%s", d)
	}
	wantAnn := map[string]string{
		"io.kubernetes.cri.untrusted-workload": "true", "sim.example/x": "1",
		AnnotationPipeline: "org/app", AnnotationJob: "PR #12",
	}
	if d := cmp.Diff(wantAnn, p.Annotations); d != "" {
		t.Errorf("annotations (-want +got); a request annotation outside pass_annotations must not pass:\n%s", d)
	}
	s := p.Spec
	if *s.RuntimeClassName != "kata" || s.ServiceAccountName != "builder" || *s.AutomountServiceAccountToken ||
		*s.EnableServiceLinks || s.RestartPolicy != corev1.RestartPolicyNever {
		t.Errorf("spec basics wrong: %+v", s)
	}
	if *s.ActiveDeadlineSeconds != 5401 {
		t.Errorf("activeDeadlineSeconds %d, want 5401 (the timeout, rounded up)", *s.ActiveDeadlineSeconds)
	}
	if *s.TerminationGracePeriodSeconds != 45 {
		t.Errorf("grace %d, want 45", *s.TerminationGracePeriodSeconds)
	}
	wantTol := []corev1.Toleration{
		{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "builds", Effect: corev1.TaintEffectNoSchedule},
		{Key: "katacontainers.io/kata-runtime", Operator: corev1.TolerationOpEqual, Value: "true", Effect: corev1.TaintEffectNoSchedule},
	}
	if d := cmp.Diff(wantTol, s.Tolerations); d != "" {
		t.Errorf("tolerations (-want +got):\n%s", d)
	}
	req := s.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms[0].MatchExpressions
	wantReq := []corev1.NodeSelectorRequirement{
		{Key: "dedicated", Operator: corev1.NodeSelectorOpIn, Values: []string{"builds"}},
		{Key: "katacontainers.io/kata-runtime", Operator: corev1.NodeSelectorOpIn, Values: []string{"true"}},
	}
	if d := cmp.Diff(wantReq, req); d != "" {
		t.Errorf("required affinity (-want +got):\n%s", d)
	}
	pref := s.Affinity.NodeAffinity.PreferredDuringSchedulingIgnoredDuringExecution
	if len(pref) != 1 || pref[0].Weight != 100 || pref[0].Preference.MatchExpressions[0].Key != "disk" {
		t.Errorf("preferred affinity %+v", pref)
	}
	if len(s.ImagePullSecrets) != 1 || s.ImagePullSecrets[0].Name != "regcred" {
		t.Errorf("pull secrets %+v", s.ImagePullSecrets)
	}
	c := s.Containers[0]
	if c.Name != ContainerName || c.Image != "alpine:3" || c.ImagePullPolicy != corev1.PullAlways ||
		!cmp.Equal(c.Command, []string{"make", "test"}) || c.TerminationMessagePolicy != corev1.TerminationMessageFallbackToLogsOnError {
		t.Errorf("container %+v", c)
	}
	six, twelve := resource.MustParse("6"), resource.MustParse("12Gi")
	if c.Resources.Limits.Cpu().Cmp(six) != 0 || c.Resources.Limits.Memory().Cmp(twelve) != 0 ||
		!cmp.Equal(c.Resources.Limits, c.Resources.Requests) {
		t.Errorf("resources %+v, want requests = limits = the high class (6, 12Gi)", c.Resources)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	wantEnv := map[string]string{"FOO": "bar", build.EnvBuildID: "b-1", build.EnvTarget: "kata", build.EnvAttempt: "2",
		EnvTraceParent: testJob().TraceParent}
	if d := cmp.Diff(wantEnv, env); d != "" {
		t.Errorf("env (-want +got):\n%s", d)
	}
	sc := c.SecurityContext
	if !*sc.RunAsNonRoot || *sc.AllowPrivilegeEscalation || sc.Capabilities.Drop[0] != "ALL" ||
		sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault || sc.Privileged != nil {
		t.Errorf("container security %+v, want restricted", sc)
	}
}

func TestPodSecurityChoices(t *testing.T) {
	priv, err := Pod(testJob(), "f", mustOptions(t, `{"privileged": true}`))
	if err != nil {
		t.Fatal(err)
	}
	if sc := priv.Spec.Containers[0].SecurityContext; !*sc.Privileged || sc.RunAsNonRoot != nil {
		t.Errorf("privileged: %+v", sc)
	}
	base, err := Pod(testJob(), "f", mustOptions(t, `{"security": "baseline", "run_as_user": 1000}`))
	if err != nil {
		t.Fatal(err)
	}
	if sc := base.Spec.Containers[0].SecurityContext; sc.RunAsNonRoot != nil || *sc.RunAsUser != 1000 || *sc.AllowPrivilegeEscalation {
		t.Errorf("baseline: %+v", sc)
	}
	plain, err := Pod(testJob(), "f", mustOptions(t, `{}`))
	if err != nil {
		t.Fatal(err)
	}
	if plain.Spec.Affinity != nil || plain.Spec.Tolerations != nil || plain.Spec.RuntimeClassName != nil || plain.Namespace != "default" {
		t.Errorf("defaults: %+v", plain.Spec)
	}
}

func TestPodResources(t *testing.T) {
	o := mustOptions(t, `{"resources": {"classes": {"micro": {"cpu": "1", "memory": "1Gi"}}, "max": {"cpu": "8", "memory": "16Gi"}}}`)
	cases := []struct {
		ask, cpu, mem, err string
	}{
		{"", "2", "2Gi", ""},
		{"MICRO", "1", "1Gi", ""},
		{"turbo", "12", "16Gi", ""}, // a class is not capped: the operator sized it
		{"cpu=4,memory=8Gi", "4", "8Gi", ""},
		{"cpu=64", "8", "2Gi", ""}, // capped; memory from the default class
		{"memory=64Gi", "2", "16Gi", ""},
		{"huge", "", "", "resource class"},
		{"cpu=-1", "", "", "not a positive quantity"},
		{"gpu=1", "", "", "unknown resource"},
		{"memory=1", "", "", "below the smallest size"},
	}
	for _, c := range cases {
		job := testJob()
		job.Annotations = map[string]string{protocol.AnnotationResources: c.ask}
		p, err := Pod(job, "f", o)
		if c.err != "" {
			pe, ok := build.AsPermanent(err)
			if !ok || pe.Outcome.State != protocol.StateRejected || !strings.Contains(err.Error(), c.err) {
				t.Errorf("resources %q: err %v, want a rejection mentioning %q", c.ask, err, c.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("resources %q: %v", c.ask, err)
			continue
		}
		l := p.Spec.Containers[0].Resources.Limits
		if l.Cpu().Cmp(resource.MustParse(c.cpu)) != 0 || l.Memory().Cmp(resource.MustParse(c.mem)) != 0 {
			t.Errorf("resources %q = cpu %s memory %s, want %s %s", c.ask, l.Cpu(), l.Memory(), c.cpu, c.mem)
		}
	}
}

func TestPodGraceCapped(t *testing.T) {
	o := mustOptions(t, `{"termination_grace": "10s", "max_termination_grace": "60s"}`)
	for ask, want := range map[string]int64{"": 10, "30s": 30, "10m": 60} {
		job := testJob()
		job.Annotations = map[string]string{protocol.AnnotationTerminationGrace: ask}
		p, err := Pod(job, "f", o)
		if err != nil {
			t.Fatal(err)
		}
		if got := *p.Spec.TerminationGracePeriodSeconds; got != want {
			t.Errorf("grace %q = %d, want %d", ask, got, want)
		}
	}
	job := testJob()
	job.Annotations = map[string]string{protocol.AnnotationTerminationGrace: "soon"}
	if _, err := Pod(job, "f", o); err == nil {
		t.Error("a bad grace annotation was accepted")
	}
}

func TestPodSteps(t *testing.T) {
	job := testJob()
	job.Command = nil
	job.Steps = []protocol.Step{{Name: "one", Run: "echo 1"}}
	p, err := Pod(job, "f", mustOptions(t, `{}`))
	if err != nil {
		t.Fatal(err)
	}
	if c := p.Spec.Containers[0].Command; c[0] != "/bin/sh" || c[len(c)-1] != "echo 1" {
		t.Errorf("steps command %q", c)
	}
	job.Steps = nil
	if _, err := Pod(job, "f", mustOptions(t, `{}`)); err == nil {
		t.Error("a job with nothing to run got a pod")
	}
}

func TestLabelValue(t *testing.T) {
	long := strings.Repeat("a", 70)
	cases := map[string]string{
		"org/app":       "org-app",
		"-x-":           "x",
		"PR #12":        "PR--12",
		"ünïcode":       "n--code",
		"":              "",
		"ok.name_1-2":   "ok.name_1-2",
		"/////":         "",
		"trailing.dot.": "trailing.dot",
	}
	for _, in := range []string{long, long + "b", strings.Repeat("x/", 40)} {
		got := LabelValue(in)
		if len(got) > 63 || got[0] != 'x' && got[0] != 'a' {
			t.Errorf("LabelValue(%q) = %q, want at most 63 characters starting as the input does", in, got)
		}
		if msgs := validation.IsValidLabelValue(got); len(msgs) > 0 {
			t.Errorf("LabelValue(%q) = %q is not a label value: %v", in, got, msgs)
		}
	}
	for in, want := range cases {
		got := LabelValue(in)
		if got != want {
			t.Errorf("LabelValue(%q) = %q, want %q", in, got, want)
		}
		if msgs := validation.IsValidLabelValue(got); len(msgs) > 0 {
			t.Errorf("LabelValue(%q) = %q is not a label value: %v", in, got, msgs)
		}
	}
	if LabelValue(long) == LabelValue(long+"b") {
		t.Error("two long values that differ only at the end got the same label")
	}
}

func TestFleetLabel(t *testing.T) {
	if got := FleetLabel("buildfleet"); got != "buildfleet" {
		t.Errorf("FleetLabel(buildfleet) = %q", got)
	}
	a, b := FleetLabel("a_"), FleetLabel("a")
	if a == b {
		t.Errorf("prefixes a_ and a share the fleet label %q", a)
	}
	if msgs := validation.IsValidLabelValue(a); len(msgs) > 0 {
		t.Errorf("FleetLabel(a_) = %q: %v", a, msgs)
	}
}

func TestParseOptionsErrors(t *testing.T) {
	cases := map[string]string{
		`{"namespace": "Bad_NS"}`:                                            "namespace:",
		`{"nodeselector": {}}`:                                               `unknown field "nodeselector"`,
		`{"node_selector": {"bad key!": "x"}}`:                               `node_selector["bad key!"]`,
		`{"labels": {"buildfleet.io/build": "x"}}`:                           "set by buildfleet",
		`{"security": "lax"}`:                                                "security: must be",
		`{"image_pull_policy": "Sometimes"}`:                                 "image_pull_policy",
		`{"resources": {"default": "mega"}}`:                                 `resources.default: "mega" is not a resource class`,
		`{"resources": {"max": {"cpu": "lots"}}}`:                            "resources.max",
		`{"termination_grace": "5m"}`:                                        "", // max follows the grace up
		`{"termination_grace": "5m", "max_termination_grace": "1m"}`:         "termination_grace: must not exceed",
		`{"pending_timeout": 30}`:                                            "pending_timeout",
		`{"pass_annotations": ["buildfleet.io/"]}`:                           "pass_annotations[0]",
		`{"run_as_user": -1}`:                                                "run_as_user",
		`{"run_as_user": 0}`:                                                 "run_as_user: 0 (root)",
		`{"resources": {"classes": {"Big": {"cpu": "1", "memory": "1Gi"}}}}`: "resources.classes.Big",
		`{"pending_timeout": "0s"}`:                                          "pending_timeout: must be positive",
		`{"retention": "-1s"}`:                                               "retention",
	}
	for in, want := range cases {
		_, err := ParseOptions(json.RawMessage(in))
		switch {
		case want == "" && err != nil:
			t.Errorf("ParseOptions(%s): %v, want no error", in, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("ParseOptions(%s) = %v, want an error mentioning %q", in, err, want)
		}
	}
	if g := mustOptions(t, `{"termination_grace": "0s"}`); g.TerminationGrace != 0 {
		t.Errorf("termination_grace 0s became %v", g.TerminationGrace)
	}
	o := mustOptions(t, `{"retention": "0s"}`)
	if o.retention() != 0 {
		t.Errorf("retention 0s became %v", o.retention())
	}
	if d := mustOptions(t, `{}`); d.retention() != DefaultRetention {
		t.Errorf("default retention %v", d.retention())
	}
}

// Variables from Secrets become secretKeyRefs, only for Secrets the target allows, and never
// in place of a variable the fleet sets itself.
func TestPodSecretRefs(t *testing.T) {
	o := mustOptions(t, `{"namespace": "builds", "secrets": ["npm-*"]}`)
	job := testJob()
	job.SecretRefs = map[string]protocol.SecretRef{"NPM_TOKEN": {Secret: "npm-creds", Key: "token"}}
	p, err := Pod(job, "buildfleet", o)
	if err != nil {
		t.Fatal(err)
	}
	want := corev1.EnvVar{Name: "NPM_TOKEN", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: "npm-creds"}, Key: "token"}}}
	env := p.Spec.Containers[0].Env
	if diff := cmp.Diff(want, env[len(env)-1]); diff != "" {
		t.Errorf("last env var (-want +got):\n%s", diff)
	}
	for name, tc := range map[string]struct {
		opts string
		refs map[string]protocol.SecretRef
	}{
		"no secrets allowed by default": {`{"namespace": "builds"}`, job.SecretRefs},
		"a Secret outside the patterns": {`{"namespace": "builds", "secrets": ["npm-*"]}`,
			map[string]protocol.SecretRef{"X": {Secret: "prod-db", Key: "password"}}},
		"a variable the fleet sets": {`{"namespace": "builds", "secrets": ["*"]}`,
			map[string]protocol.SecretRef{"BUILDFLEET_BUILD_ID": {Secret: "npm", Key: "k"}}},
	} {
		j := testJob()
		j.SecretRefs = tc.refs
		_, err := Pod(j, "buildfleet", mustOptions(t, tc.opts))
		if _, ok := build.AsPermanent(err); !ok {
			t.Errorf("%s: Pod = %v, want a permanent refusal", name, err)
		}
	}
	if _, err := ParseOptions([]byte(`{"namespace": "builds", "secrets": ["["]}`)); err == nil || !strings.Contains(err.Error(), "secrets[0]") {
		t.Errorf("a bad secrets pattern: %v, want an error naming secrets[0]", err)
	}
}
