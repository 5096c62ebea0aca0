// Package deploy_test checks the manifests under deploy/: every kustomization renders, the
// test control plane (kube-apiserver with RBAC and Pod Security admission, see
// internal/kubetest) accepts every object in a server-side dry run, the properties an
// operator relies on hold, and a worker holding only the shipped ServiceAccount's token runs
// a build with the shipped targets file.
package deploy_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	nodev1 "k8s.io/api/node/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/perf"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func TestMain(m *testing.M) { os.Exit(kubetest.RunMain(m)) }

// The kustomizations deploy/ ships, relative to this directory.
const (
	dirBase = "base"
	dirKEDA = "overlays/keda"
	dirHPA  = "overlays/hpa"
	dirNATS = "nats"
)

var kustomizations = []string{dirBase, dirKEDA, dirHPA, dirNATS}

// kedaCRD is the ScaledObject CRD, copied from KEDA's module (see test/crds/README.md).
const kedaCRD = "../test/crds/keda.sh_scaledobjects.yaml"

// Names the manifests give things.
const (
	nsWorker   = "buildfleet"
	nsBuilds   = "buildfleet-builds"
	workerName = "buildfleet-worker"
	fieldOwner = "buildfleet-deploy-test"
)

// render builds the kustomization in dir as `kubectl apply -k` would.
func render(t *testing.T, dir string) []*unstructured.Unstructured {
	t.Helper()
	res, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var out []*unstructured.Unstructured
	for _, r := range res.Resources() {
		// Through JSON, so that numbers are int64 as client-go's decoder makes them.
		data, err := r.MarshalJSON()
		if err != nil {
			t.Fatalf("kustomize build %s: %s: %v", dir, r.CurId(), err)
		}
		o := &unstructured.Unstructured{}
		if err := o.UnmarshalJSON(data); err != nil {
			t.Fatalf("kustomize build %s: %s: %v", dir, r.CurId(), err)
		}
		out = append(out, o)
	}
	return out
}

// find returns the one object of kind named name (any name when name is ""); it fails the
// test when there is none or more than one.
func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	var found []*unstructured.Unstructured
	for _, o := range objs {
		if o.GetKind() == kind && (name == "" || o.GetName() == name) {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d objects of kind %s named %q, want 1", len(found), kind, name)
	}
	return found[0]
}

// typed converts o into out (a pointer to an API type), refusing fields the type lacks.
func typed(t *testing.T, o *unstructured.Unstructured, out any) {
	t.Helper()
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, out, true); err != nil {
		t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
	}
}

func workerDeployment(t *testing.T, objs []*unstructured.Unstructured) (*appsv1.Deployment, *corev1.Container) {
	t.Helper()
	var d appsv1.Deployment
	typed(t, find(t, objs, "Deployment", workerName), &d)
	for i, c := range d.Spec.Template.Spec.Containers {
		if c.Name == "worker" {
			return &d, &d.Spec.Template.Spec.Containers[i]
		}
	}
	t.Fatalf("Deployment %s has no container named worker", d.Name)
	return nil, nil
}

func envValue(c *corev1.Container, name string) (string, bool) {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom == nil {
			return e.Value, true
		}
	}
	return "", false
}

// TestManifests checks, in every kustomization, the properties that would otherwise rot
// unnoticed: the drain fits the grace period, the probes, the security context, the spread,
// the PDB, Pod Security on the build namespace, the Role, the scaler's stream and consumer,
// the targets file and the NATS configuration.
func TestManifests(t *testing.T) {
	rendered := map[string][]*unstructured.Unstructured{}
	for _, dir := range kustomizations {
		rendered[dir] = render(t, dir)
	}
	for _, dir := range []string{dirBase, dirKEDA, dirHPA} {
		t.Run(dir, func(t *testing.T) {
			objs := rendered[dir]
			checkWorker(t, objs)
			checkPDB(t, objs)
			checkNamespaces(t, objs)
			checkRBAC(t, objs)
			checkTargets(t, objs)
		})
	}
	t.Run("replicas", func(t *testing.T) {
		d, _ := workerDeployment(t, rendered[dirBase])
		if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
			t.Errorf("base Deployment replicas = %v, want a fixed count of at least 2", d.Spec.Replicas)
		}
		for _, dir := range []string{dirKEDA, dirHPA} {
			if d, _ := workerDeployment(t, rendered[dir]); d.Spec.Replicas != nil {
				t.Errorf("%s: Deployment replicas = %d, want none: the autoscaler owns the count", dir, *d.Spec.Replicas)
			}
		}
	})
	t.Run("keda", func(t *testing.T) { checkScaledObject(t, rendered[dirKEDA]) })
	t.Run("hpa", func(t *testing.T) { checkHPA(t, rendered[dirHPA]) })
	t.Run("nats", func(t *testing.T) { checkNATS(t, rendered[dirNATS]) })
	t.Run("runtimeclass", func(t *testing.T) {
		var rc nodev1.RuntimeClass
		typed(t, find(t, rendered[dirBase], "RuntimeClass", kubetest.RuntimeClassKata), &rc)
		if rc.Handler != "kata" || rc.Overhead == nil || rc.Scheduling == nil ||
			rc.Scheduling.NodeSelector[kubetest.LabelKata] != "true" {
			t.Errorf("RuntimeClass kata: handler %q, overhead %v, scheduling %v; want handler kata with an overhead and the kata-deploy node selector",
				rc.Handler, rc.Overhead, rc.Scheduling)
		}
	})
}

func checkWorker(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	d, c := workerDeployment(t, objs)
	pod := d.Spec.Template.Spec

	drain, ok := envValue(c, "BUILDFLEET_DRAIN_TIMEOUT")
	if !ok {
		t.Fatal("the worker does not set BUILDFLEET_DRAIN_TIMEOUT")
	}
	dt, err := time.ParseDuration(drain)
	if err != nil {
		t.Fatalf("BUILDFLEET_DRAIN_TIMEOUT=%q: %v", drain, err)
	}
	if pod.TerminationGracePeriodSeconds == nil || time.Duration(*pod.TerminationGracePeriodSeconds)*time.Second <= dt {
		t.Errorf("terminationGracePeriodSeconds = %v, want more than BUILDFLEET_DRAIN_TIMEOUT (%v)", pod.TerminationGracePeriodSeconds, dt)
	}

	var httpPort int32
	for _, p := range c.Ports {
		if p.Name == "http" {
			httpPort = p.ContainerPort
		}
	}
	if httpPort == 0 {
		t.Error("the worker container has no port named http")
	}
	if addr, _ := envValue(c, "BUILDFLEET_HTTP_ADDR"); addr != fmt.Sprintf(":%d", httpPort) {
		t.Errorf("BUILDFLEET_HTTP_ADDR = %q, want :%d (the http port)", addr, httpPort)
	}
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe = %v, want GET %s", p.name, p.probe, p.path)
			continue
		}
		if g := p.probe.HTTPGet; g.Path != p.path || g.Port.String() != "http" {
			t.Errorf("%s probe = GET %s on port %s, want GET %s on port http", p.name, g.Path, g.Port.String(), p.path)
		}
	}

	psc, sc := pod.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Error("the worker pod does not set runAsNonRoot")
	}
	switch {
	case sc == nil:
		t.Error("the worker container has no securityContext")
	case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
		t.Error("the worker's root filesystem is not read-only")
	case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
		t.Error("the worker allows privilege escalation")
	case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
		t.Errorf("the worker's capabilities = %+v, want drop [ALL] and nothing added", sc.Capabilities)
	}
	if dir, _ := envValue(c, "BUILDFLEET_SCRATCH_DIR"); !mounted(c, dir) {
		t.Errorf("BUILDFLEET_SCRATCH_DIR=%q is on the read-only root filesystem, want it under a volume", dir)
	}

	if len(pod.TopologySpreadConstraints) == 0 {
		t.Error("the worker pods have no topologySpreadConstraints")
	}
	podLabels := labels.Set(d.Spec.Template.Labels)
	for _, tsc := range pod.TopologySpreadConstraints {
		if sel, err := metav1.LabelSelectorAsSelector(tsc.LabelSelector); err != nil || !sel.Matches(podLabels) {
			t.Errorf("topology spread on %s does not select the worker's own pods (%v)", tsc.TopologyKey, err)
		}
	}
	if pod.ServiceAccountName != workerName {
		t.Errorf("serviceAccountName = %q, want %q", pod.ServiceAccountName, workerName)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("worker resources = %v, want CPU and memory requests and a memory limit", c.Resources)
	}
}

// mounted says whether path lies under one of c's writable volume mounts.
func mounted(c *corev1.Container, path string) bool {
	for _, m := range c.VolumeMounts {
		if !m.ReadOnly && path != "" && (path == m.MountPath || strings.HasPrefix(path, m.MountPath+"/")) {
			return true
		}
	}
	return false
}

func checkPDB(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	d, _ := workerDeployment(t, objs)
	var pdb policyv1.PodDisruptionBudget
	typed(t, find(t, objs, "PodDisruptionBudget", ""), &pdb)
	sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) || pdb.Namespace != d.Namespace {
		t.Errorf("PodDisruptionBudget %s/%s (selector %v, err %v) does not select the worker's pods in %s", pdb.Namespace, pdb.Name, sel, err, d.Namespace)
	}
	// Every replica is unready while NATS or the apiserver is down: a drain must still go on.
	if p := pdb.Spec.UnhealthyPodEvictionPolicy; p == nil || *p != policyv1.AlwaysAllow {
		t.Errorf("PodDisruptionBudget unhealthyPodEvictionPolicy = %v, want AlwaysAllow", p)
	}
}

func checkNamespaces(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	var ns corev1.Namespace
	typed(t, find(t, objs, "Namespace", nsBuilds), &ns)
	for _, mode := range []string{"enforce", "audit", "warn"} {
		if got := ns.Labels["pod-security.kubernetes.io/"+mode]; got != "restricted" {
			t.Errorf("namespace %s: pod-security.kubernetes.io/%s = %q, want restricted", nsBuilds, mode, got)
		}
	}
	var worker corev1.Namespace
	typed(t, find(t, objs, "Namespace", nsWorker), &worker)
	// deploy/nats lets in only namespaces with this label: the worker's, never the builds'.
	if worker.Labels[natsClientLabel] != "true" || ns.Labels[natsClientLabel] != "" {
		t.Errorf("%s=%q on %s and %q on %s; want true on the worker's namespace only",
			natsClientLabel, worker.Labels[natsClientLabel], nsWorker, ns.Labels[natsClientLabel], nsBuilds)
	}
}

// natsAccount is the account deploy/nats/accounts.conf gives buildfleet's users.
const natsAccount = "BUILDFLEET"

// natsClientLabel marks the namespaces deploy/nats's NetworkPolicy lets reach NATS.
const natsClientLabel = "buildfleet.io/nats-client"

func checkRBAC(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	var role rbacv1.Role
	typed(t, find(t, objs, "Role", ""), &role)
	want := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"},
		Verbs: []string{"get", "list", "watch", "create", "patch", "delete"}},
		{APIGroups: []string{""}, Resources: []string{"pods/log"}, Verbs: []string{"get"}}}
	if role.Namespace != nsBuilds || fmt.Sprint(role.Rules) != fmt.Sprint(want) {
		t.Errorf("Role %s/%s grants %v, want exactly %v in %s", role.Namespace, role.Name, role.Rules, want, nsBuilds)
	}
	var rb rbacv1.RoleBinding
	typed(t, find(t, objs, "RoleBinding", ""), &rb)
	wantSubject := rbacv1.Subject{Kind: rbacv1.ServiceAccountKind, Name: workerName, Namespace: nsWorker}
	if rb.Namespace != role.Namespace || rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != role.Name ||
		!slices.Equal(rb.Subjects, []rbacv1.Subject{wantSubject}) {
		t.Errorf("RoleBinding %s/%s binds %v to %v, want Role %s to %v", rb.Namespace, rb.Name, rb.RoleRef, rb.Subjects, role.Name, wantSubject)
	}
	for _, kind := range []string{"ClusterRole", "ClusterRoleBinding"} {
		for _, o := range objs {
			if o.GetKind() == kind {
				t.Errorf("%s %s: the worker needs no cluster-wide access", kind, o.GetName())
			}
		}
	}
	find(t, objs, "ServiceAccount", workerName)
}

// targetsFile returns the targets file the worker reads: the ConfigMap its Deployment mounts,
// at the path BUILDFLEET_TARGETS_FILE names.
func targetsFile(t *testing.T, objs []*unstructured.Unstructured) []byte {
	t.Helper()
	d, c := workerDeployment(t, objs)
	path, ok := envValue(c, "BUILDFLEET_TARGETS_FILE")
	if !ok {
		t.Fatal("the worker does not set BUILDFLEET_TARGETS_FILE")
	}
	for _, m := range c.VolumeMounts {
		if filepath.Dir(path) != m.MountPath {
			continue
		}
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name != m.Name || v.ConfigMap == nil {
				continue
			}
			var cm corev1.ConfigMap
			typed(t, find(t, objs, "ConfigMap", v.ConfigMap.Name), &cm)
			data, ok := cm.Data[filepath.Base(path)]
			if !ok {
				t.Fatalf("ConfigMap %s has no key %s", cm.Name, filepath.Base(path))
			}
			return []byte(data)
		}
	}
	t.Fatalf("BUILDFLEET_TARGETS_FILE=%s is not on a ConfigMap volume of the worker", path)
	return nil
}

// checkTargets parses and validates the shipped targets file as `buildfleet worker` does.
func checkTargets(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	targets, err := config.ParseTargets(targetsFile(t, objs), "targets.yaml")
	if err != nil {
		t.Fatalf("the targets ConfigMap: %v", err)
	}
	if _, err := targets.Table(); err != nil {
		t.Fatalf("the targets ConfigMap: %v", err)
	}
	kinds := map[string]bool{}
	for i, ts := range targets.Targets {
		if ts.Executor != config.ExecutorKubernetes {
			t.Errorf("targets[%d] (%s): executor %q, want kubernetes: the worker's pod is no place for builds", i, ts.Name, ts.Executor)
			continue
		}
		o, err := kube.ParseOptions(ts.Kubernetes)
		if err != nil {
			t.Errorf("targets[%d].kubernetes: %v", i, err)
			continue
		}
		if o.Namespace != nsBuilds || o.Context != "" || o.Privileged || o.AutomountToken {
			t.Errorf("target %s: namespace %q, context %q, privileged %v, automount %v; want %s, in-cluster, unprivileged, no token",
				ts.Name, o.Namespace, o.Context, o.Privileged, o.AutomountToken, nsBuilds)
		}
		kinds[o.RuntimeClass] = true
	}
	if !kinds[kubetest.RuntimeClassKata] || !kinds[""] {
		t.Errorf("runtime classes of the targets: %v, want a kata target and a runc one", kinds)
	}
}

func checkScaledObject(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	d, _ := workerDeployment(t, objs)
	so := find(t, objs, "ScaledObject", "")
	layout, err := protocol.NewLayout(protocol.DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if so.GetNamespace() != d.Namespace {
		t.Errorf("ScaledObject in %q, want the Deployment's namespace %q", so.GetNamespace(), d.Namespace)
	}
	ref, _, _ := unstructured.NestedStringMap(so.Object, "spec", "scaleTargetRef")
	if ref["name"] != d.Name || (ref["kind"] != "" && ref["kind"] != "Deployment") {
		t.Errorf("ScaledObject scales %v, want Deployment %s", ref, d.Name)
	}
	if n, _, _ := unstructured.NestedInt64(so.Object, "spec", "minReplicaCount"); n < 2 {
		t.Errorf("ScaledObject minReplicaCount = %d, want at least 2", n)
	}
	if _, ok, _ := unstructured.NestedMap(so.Object, "spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown"); !ok {
		t.Error("ScaledObject sets no scale-down behaviour")
	}
	// One trigger on what runs (the run consumer), one on what waits (the queue), one on CPU.
	triggers, _, _ := unstructured.NestedSlice(so.Object, "spec", "triggers")
	want := map[string]string{layout.RunStream(): layout.RunConsumer(), layout.RequestStream(): layout.WorkerConsumer()}
	if len(triggers) != len(want)+1 {
		t.Fatalf("ScaledObject has %d triggers, want %d", len(triggers), len(want)+1)
	}
	cpu := false
	for i, raw := range triggers {
		tr, _ := raw.(map[string]any)
		md, _, _ := unstructured.NestedStringMap(tr, "metadata")
		if tr["type"] == "cpu" {
			cpu = tr["metricType"] == "Utilization" && md["value"] != ""
			continue
		}
		if tr["type"] != "nats-jetstream" || want[md["stream"]] != md["consumer"] {
			t.Errorf("ScaledObject trigger %d: %v on %s/%s, want nats-jetstream on one of %v", i, tr["type"], md["stream"], md["consumer"], want)
		}
		delete(want, md["stream"])
		for _, k := range []string{"natsServerMonitoringEndpoint", "account", "lagThreshold"} {
			if md[k] == "" {
				t.Errorf("ScaledObject trigger %d sets no %s", i, k)
			}
		}
		if md["account"] != natsAccount {
			t.Errorf("ScaledObject trigger %d reads account %q, want deploy/nats's %q", i, md["account"], natsAccount)
		}
	}
	if !cpu {
		t.Error("ScaledObject has no cpu trigger of metricType Utilization with a value")
	}
	checkSizing(t, objs, so)
}

// checkSizing holds the replica's sizing to internal/perf.Shipped (what `make bench`
// measures) and its numbers to each other: GOMEMLIMIT a little under the memory limit, the
// running-builds trigger at most one replica's concurrency, and the largest fleet able to
// hold every build the fleet may run.
func checkSizing(t *testing.T, objs []*unstructured.Unstructured, so *unstructured.Unstructured) {
	t.Helper()
	_, c := workerDeployment(t, objs)
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	num := func(name string) int {
		n, err := strconv.Atoi(env[name])
		if err != nil {
			t.Errorf("worker %s = %q: %v", name, env[name], err)
		}
		return n
	}
	s := perf.Shipped
	concurrency, maxAckPending := num("BUILDFLEET_CONCURRENCY"), num("BUILDFLEET_MAX_ACK_PENDING")
	if concurrency != s.Concurrency || maxAckPending != s.MaxAckPending || env["GOMEMLIMIT"] != s.GoMemLimit ||
		c.Resources.Limits.Memory().String() != s.MemoryLimit {
		t.Errorf("worker sizing: concurrency %d, max ack pending %d, GOMEMLIMIT %s, memory limit %s; internal/perf.Shipped (what make bench measures) says %+v",
			concurrency, maxAckPending, env["GOMEMLIMIT"], c.Resources.Limits.Memory(), s)
	}
	mib, ok := strings.CutSuffix(env["GOMEMLIMIT"], "MiB")
	limit, err := strconv.Atoi(mib)
	if !ok || err != nil {
		t.Fatalf("GOMEMLIMIT = %q, want a number of MiB", env["GOMEMLIMIT"])
	}
	if share := float64(limit<<20) / float64(c.Resources.Limits.Memory().Value()); share < 0.75 || share > 0.95 {
		t.Errorf("GOMEMLIMIT is %.0f%% of the memory limit, want 75–95%%", share*100)
	}
	maxReplicas, _, _ := unstructured.NestedInt64(so.Object, "spec", "maxReplicaCount")
	if int(maxReplicas)*concurrency < maxAckPending {
		t.Errorf("maxReplicaCount %d × BUILDFLEET_CONCURRENCY %d < BUILDFLEET_MAX_ACK_PENDING %d: the largest fleet cannot hold what it may run",
			maxReplicas, concurrency, maxAckPending)
	}
	triggers, _, _ := unstructured.NestedSlice(so.Object, "spec", "triggers")
	for _, raw := range triggers {
		md, _, _ := unstructured.NestedStringMap(raw.(map[string]any), "metadata")
		if md["consumer"] != (protocol.Layout{Prefix: protocol.DefaultPrefix}).RunConsumer() {
			continue
		}
		if lag, err := strconv.Atoi(md["lagThreshold"]); err != nil || lag > concurrency || lag < concurrency/2 {
			t.Errorf("runners trigger lagThreshold %q: want between half of BUILDFLEET_CONCURRENCY (%d) and all of it", md["lagThreshold"], concurrency)
		}
	}
}

func checkHPA(t *testing.T, objs []*unstructured.Unstructured) {
	t.Helper()
	d, _ := workerDeployment(t, objs)
	var hpa autoscalingv2.HorizontalPodAutoscaler
	typed(t, find(t, objs, "HorizontalPodAutoscaler", ""), &hpa)
	ref := hpa.Spec.ScaleTargetRef
	if ref.Kind != "Deployment" || ref.Name != d.Name || hpa.Namespace != d.Namespace {
		t.Errorf("HPA scales %v in %s, want Deployment %s in %s", ref, hpa.Namespace, d.Name, d.Namespace)
	}
	if hpa.Spec.MinReplicas == nil || *hpa.Spec.MinReplicas < 2 {
		t.Errorf("HPA minReplicas = %v, want at least 2", hpa.Spec.MinReplicas)
	}
	if hpa.Spec.Behavior == nil || hpa.Spec.Behavior.ScaleDown == nil {
		t.Error("HPA sets no scale-down behaviour")
	}
}

// checkNATS checks the NATS cluster's objects and parses its nats.conf with the nats-server
// the project tests against.
func checkNATS(t *testing.T, objs []*unstructured.Unstructured) {
	var sts appsv1.StatefulSet
	typed(t, find(t, objs, "StatefulSet", "nats"), &sts)
	if sts.Spec.Replicas == nil || *sts.Spec.Replicas != 3 {
		t.Errorf("NATS replicas = %v, want 3", sts.Spec.Replicas)
	}
	if len(sts.Spec.VolumeClaimTemplates) == 0 {
		t.Error("NATS has no volumeClaimTemplates: JetStream would store on the pod's disk")
	}
	var pdb policyv1.PodDisruptionBudget
	typed(t, find(t, objs, "PodDisruptionBudget", ""), &pdb)
	if sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector); err != nil || !sel.Matches(labels.Set(sts.Spec.Template.Labels)) ||
		pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() != 1 {
		t.Errorf("NATS PDB (selector %v, maxUnavailable %v) must select the servers and allow 1 down", pdb.Spec.Selector, pdb.Spec.MaxUnavailable)
	}
	pod := sts.Spec.Template.Spec
	if pod.SecurityContext == nil || pod.SecurityContext.RunAsNonRoot == nil || !*pod.SecurityContext.RunAsNonRoot {
		t.Error("the NATS pods do not set runAsNonRoot")
	}
	c := pod.Containers[0]
	for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz?js-enabled-only=true" {
			t.Errorf("NATS %s probe = %v, want GET /healthz?js-enabled-only=true", name, p)
		}
	}

	var cm corev1.ConfigMap
	for _, v := range pod.Volumes {
		if v.ConfigMap != nil {
			typed(t, find(t, objs, "ConfigMap", v.ConfigMap.Name), &cm)
		}
	}
	confDir := t.TempDir()
	for name, data := range cm.Data { // nats.conf and the accounts.conf it includes
		if err := os.WriteFile(filepath.Join(confDir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	conf := filepath.Join(confDir, "nats.conf")
	t.Setenv("POD_NAME", "nats-0") // as the StatefulSet sets it
	// The users' passwords come from the Secret nats-users, one key per role.
	secretKeys := map[string]bool{}
	for _, e := range pod.Containers[0].Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Name == "nats-users" {
			secretKeys[e.ValueFrom.SecretKeyRef.Key] = true
			t.Setenv(e.Name, "pw-"+e.ValueFrom.SecretKeyRef.Key)
		}
	}
	opts, err := natsserver.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("nats.conf (with every password variable the StatefulSet sets): %v", err)
	}
	users := map[string]string{}
	for _, u := range opts.Users {
		if u.Account != nil {
			users[u.Username] = u.Account.Name
		}
		if !secretKeys[u.Username] {
			t.Errorf("nats.conf: user %s's password is not set from the Secret nats-users", u.Username)
		}
	}
	for _, role := range []string{"worker", "producer", "subscriber"} {
		if users[role] != natsAccount {
			t.Errorf("nats.conf: user %s in account %q, want %q", role, users[role], natsAccount)
		}
	}
	if !opts.JetStream || opts.StoreDir == "" || opts.JetStreamMaxStore <= 0 || opts.ServerName != "nats-0" {
		t.Errorf("nats.conf: jetstream %v, store_dir %q, max_file_store %d, server_name %q; want JetStream on a store with a limit, named after the pod",
			opts.JetStream, opts.StoreDir, opts.JetStreamMaxStore, opts.ServerName)
	}
	if len(opts.Routes) != int(*sts.Spec.Replicas) || opts.Cluster.Name == "" {
		t.Errorf("nats.conf: cluster %q with %d routes, want one route per server (%d)", opts.Cluster.Name, len(opts.Routes), *sts.Spec.Replicas)
	}
	for _, r := range opts.Routes {
		if !strings.HasSuffix(r.Hostname(), "."+sts.Spec.ServiceName+"."+sts.Namespace+".svc") {
			t.Errorf("nats.conf: route %s is not a server of the StatefulSet's headless Service %s", r, sts.Spec.ServiceName)
		}
	}
	if opts.LameDuckDuration <= 0 || time.Duration(*pod.TerminationGracePeriodSeconds)*time.Second <= opts.LameDuckDuration+opts.LameDuckGracePeriod {
		t.Errorf("NATS terminationGracePeriodSeconds = %d, want more than lame duck (%v + %v)",
			*pod.TerminationGracePeriodSeconds, opts.LameDuckGracePeriod, opts.LameDuckDuration)
	}
	if opts.SyncInterval <= 0 && !opts.SyncAlways {
		t.Error("nats.conf sets no JetStream sync_interval")
	}

	// Build pods run untrusted code: only labelled namespaces reach the client port.
	var np networkingv1.NetworkPolicy
	typed(t, find(t, objs, "NetworkPolicy", ""), &np)
	if sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector); err != nil || sel.Empty() || !sel.Matches(labels.Set(sts.Spec.Template.Labels)) {
		t.Errorf("NATS NetworkPolicy selects %v, want the NATS servers", np.Spec.PodSelector)
	}
	for _, rule := range np.Spec.Ingress {
		for _, port := range rule.Ports {
			if port.Port == nil || port.Port.IntValue() != 4222 {
				continue
			}
			if len(rule.From) != 1 || rule.From[0].NamespaceSelector == nil || rule.From[0].PodSelector != nil ||
				rule.From[0].NamespaceSelector.MatchLabels[natsClientLabel] != "true" {
				t.Errorf("NATS client port is open to %v, want only namespaces labelled %s=true", rule.From, natsClientLabel)
			}
		}
	}
}

// cluster is the test control plane with a dynamic client that collects the apiserver's
// warnings (Pod Security "would violate", deprecations).
type cluster struct {
	cp     *kubetest.ControlPlane
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper

	mu       sync.Mutex
	warnings []string
}

func (c *cluster) HandleWarningHeader(_ int, _ string, text string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.warnings = append(c.warnings, text)
}

func (c *cluster) takeWarnings() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.warnings
	c.warnings = nil
	return w
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	cp := kubetest.Need(t)
	c := &cluster{cp: cp}
	cfg := rest.CopyConfig(cp.Admin)
	cfg.WarningHandler = c
	var err error
	if c.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	return c
}

// apply applies o server-side as fieldOwner, for real or as a dry run.
func (c *cluster) apply(ctx context.Context, o *unstructured.Unstructured, dryRun bool) error {
	gvk := o.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		if o.GetNamespace() == "" {
			// kubectl would put it in the context's namespace, wherever that is.
			return errors.New("a namespaced object that names no namespace")
		}
		ri = c.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: fieldOwner}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	_, err = ri.Apply(ctx, o.GetName(), o, opts)
	return err
}

// applyKinds applies, for real, the objects of objs whose kind is among kinds.
func (c *cluster) applyKinds(t *testing.T, objs []*unstructured.Unstructured, kinds ...string) {
	t.Helper()
	for _, o := range objs {
		if slices.Contains(kinds, o.GetKind()) {
			if err := c.apply(t.Context(), o, false); err != nil {
				t.Fatalf("apply %s %s/%s: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
			}
		}
	}
}

// installCRD creates the CRD in path and waits until the apiserver serves it.
func (c *cluster) installCRD(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	crd := &unstructured.Unstructured{}
	if err := yaml.Unmarshal(data, &crd.Object); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	ctx := t.Context()
	if _, err := c.dyn.Resource(gvr).Apply(ctx, crd.GetName(), crd, metav1.ApplyOptions{FieldManager: fieldOwner}); err != nil {
		t.Fatalf("install %s: %v", path, err)
	}
	for {
		got, err := c.dyn.Resource(gvr).Get(ctx, crd.GetName(), metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get CRD %s: %v", crd.GetName(), err)
		}
		conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
		for _, cond := range conds {
			if m, _ := cond.(map[string]any); m["type"] == "Established" && m["status"] == "True" {
				c.mapper.Reset() // discovery now knows the new kind
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("CRD %s never became Established: %v", crd.GetName(), conds)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestServerSideDryRun applies every object of every kustomization to the test apiserver as a
// server-side dry run: its schema validation, defaulting, RBAC escalation checks, Pod
// Security admission (warnings for workloads) and the KEDA CRD's schema all see them.
// Namespaces are created for real first, since a dry-run namespace admits nothing into it.
func TestServerSideDryRun(t *testing.T) {
	c := newCluster(t)
	c.installCRD(t, kedaCRD)
	for _, dir := range kustomizations {
		objs := render(t, dir)
		c.applyKinds(t, objs, "Namespace")
		c.takeWarnings()
		t.Run(dir, func(t *testing.T) {
			for _, o := range objs {
				if err := c.apply(t.Context(), o, true); err != nil {
					t.Errorf("%s %s/%s: %v", o.GetKind(), o.GetNamespace(), o.GetName(), err)
				}
				for _, w := range c.takeWarnings() {
					t.Errorf("%s %s/%s: the apiserver warns: %s", o.GetKind(), o.GetNamespace(), o.GetName(), w)
				}
			}
		})
	}
}

// serviceAccountKubeconfig writes a kubeconfig that reaches the control plane with a token
// of the ServiceAccount ns/name, as the in-cluster config would in a pod.
func serviceAccountKubeconfig(t *testing.T, cp *kubetest.ControlPlane, ns, name string) string {
	t.Helper()
	tr, err := cp.Client().CoreV1().ServiceAccounts(ns).CreateToken(t.Context(), name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: new(int64(3600))},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, name, err)
	}
	// The apiserver's self-signed serving certificate, with its CA, from its --cert-dir.
	ca, err := os.ReadFile(filepath.Join(cp.Dir, "certs", "apiserver.crt"))
	if err != nil {
		t.Fatal(err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: cp.URL, CertificateAuthorityData: ca}
	kc.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: name}
	kc.CurrentContext = "test"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// buildBinary builds the buildfleet binary the worker image runs.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "buildfleet")
	out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "../cmd/buildfleet").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ../cmd/buildfleet: %v\n%s", err, out)
	}
	return bin
}

// TestWorkerWithServiceAccount runs `buildfleet worker` as the base Deployment configures it —
// its args, its environment, the targets ConfigMap — holding only a token of the shipped
// ServiceAccount, bound by the shipped Role and RoleBinding. The Deployment's probe and scrape
// paths answer 200; a build on each target succeeds and its pod is marked finished (get,
// list, watch, create, patch); a stopped build's pod is deleted (delete). So the Role is all
// the worker needs, and the shipped targets schedule on Kata and runc nodes.
// What cannot be the Deployment's here is overridden: the NATS URL (an in-process server,
// so one stream replica), the listen address, the scratch directory and the targets path.
func TestWorkerWithServiceAccount(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	c := newCluster(t)
	objs := render(t, dirBase)
	c.applyKinds(t, objs, "Namespace")
	c.applyKinds(t, objs, "ServiceAccount", "Role", "RoleBinding")
	kubeconfig := serviceAccountKubeconfig(t, c.cp, nsWorker, workerName)

	dir := t.TempDir()
	targets := filepath.Join(dir, "targets.yaml")
	if err := os.WriteFile(targets, targetsFile(t, objs), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := natstest.Start(t)
	bin := buildBinary(t)

	deployment, container := workerDeployment(t, objs)
	env := []string{"HOME=" + dir, "PATH=" + os.Getenv("PATH")}
	for _, e := range container.Env {
		if e.ValueFrom == nil {
			env = append(env, e.Name+"="+e.Value)
		}
	}
	// Later entries win: exec keeps the last value of a name.
	env = append(env,
		"KUBECONFIG="+kubeconfig,
		"BUILDFLEET_REPLICA=deploy-test",
		"BUILDFLEET_NATS_URL="+srv.ClientURL(),
		"BUILDFLEET_STREAM_REPLICAS=1",
		"BUILDFLEET_HTTP_ADDR=127.0.0.1:0",
		"BUILDFLEET_SCRATCH_DIR="+filepath.Join(dir, "scratch"),
		"BUILDFLEET_TARGETS_FILE="+targets,
	)
	args := append(slices.Clone(container.Command), container.Args...)
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	// The worker's output goes to a file: the test reads it while the worker writes.
	logFile, err := os.Create(filepath.Join(t.TempDir(), "worker.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the child has its own descriptor
	cmd.Stdout, cmd.Stderr = logFile, logFile
	output := func() string { b, _ := os.ReadFile(logFile.Name()); return string(b) }
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// The worker stops as Kubernetes stops it: SIGTERM, then its drain.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("worker exited: %v", err)
			}
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
			t.Errorf("worker did not stop within a minute of SIGTERM")
		}
		if t.Failed() {
			t.Logf("worker output:\n%s", output())
		}
	})

	// Ready as the kubelet would see it: the Deployment's probes and scrape path, on the
	// address the worker reports it bound (BUILDFLEET_HTTP_ADDR=127.0.0.1:0).
	var addr string
	awaitWorker(ctx, t, exited, "report the address it serves on", func() bool {
		addr = servedAddr(output())
		return addr != ""
	})
	get := func(path string) int {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	awaitWorker(ctx, t, exited, "become ready", func() bool { return get(container.ReadinessProbe.HTTPGet.Path) == http.StatusOK })
	for _, path := range []string{container.LivenessProbe.HTTPGet.Path, container.StartupProbe.HTTPGet.Path, deployment.Spec.Template.Annotations["prometheus.io/path"]} {
		if code := get(path); code != http.StatusOK {
			t.Errorf("GET %s = %d, want 200", path, code)
		}
	}

	nc := natstest.Connect(t, srv)
	cl, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	admin := c.cp.Client()
	// One build on each target: created, followed and, once done, marked finished.
	for _, target := range []string{"kata", "runc"} {
		id := "deploy-" + target
		last := runBuild(ctx, t, cl, build(id, target, "registry.example/ci/node:22"), nil)
		if last.Data.State != protocol.StateSucceeded || last.Data.Target != target {
			t.Fatalf("build %s ended %q (%s %s) on target %q, want succeeded on %s",
				id, last.Data.State, last.Data.Reason, last.Data.Message, last.Data.Target, target)
		}
		pod := awaitPod(ctx, t, admin, "build-"+id, "marked finished", func(p *corev1.Pod) bool {
			_, ok := p.Annotations[kube.AnnotationFinishedAt]
			return ok
		})
		if rc := pod.Spec.RuntimeClassName; (target == kubetest.RuntimeClassKata) != (rc != nil && *rc == kubetest.RuntimeClassKata) {
			t.Errorf("pod of %s: runtime class %v", id, rc)
		}
	}
	// A build stopped while its pod waits for an image that never pulls: the pod is deleted.
	id := "deploy-stop"
	stop := func(ev protocol.Event) {
		if ev.Data.State == protocol.StateDispatched {
			if err := cl.Stop(ctx, id, "deploy test"); err != nil {
				t.Fatalf("Stop(%s): %v", id, err)
			}
		}
	}
	if last := runBuild(ctx, t, cl, build(id, "runc", "registry.example/does-not-exist:1"), stop); last.Data.State != protocol.StateAborted {
		t.Fatalf("build %s ended %q (%s %s), want aborted", id, last.Data.State, last.Data.Reason, last.Data.Message)
	}
	awaitPod(ctx, t, admin, "build-"+id, "deleted", nil)
}

// awaitWorker waits until done says so, failing the test if the worker exits first.
func awaitWorker(ctx context.Context, t *testing.T, exited chan error, what string, done func() bool) {
	t.Helper()
	for !done() {
		select {
		case err := <-exited:
			exited <- err // for the clean-up
			t.Fatalf("the worker exited (%v) before it would %s", err, what)
		case <-ctx.Done():
			t.Fatalf("the worker did not %s: %v", what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// servedAddr finds, in the worker's JSON log, the address its HTTP server bound.
func servedAddr(log string) string {
	for line := range strings.Lines(log) {
		var rec struct{ Msg, Addr string }
		if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "serving metrics and health" {
			return rec.Addr
		}
	}
	return ""
}

func build(id, target, image string) protocol.BuildRequest {
	return protocol.BuildRequest{ID: id, Image: image, Command: []string{"make", "test"},
		Annotations: map[string]string{protocol.AnnotationTarget: target}}
}

// runBuild submits req and follows its events, passing each to each (if given), until the
// terminal one, which it returns.
func runBuild(ctx context.Context, t *testing.T, cl *client.Client, req protocol.BuildRequest, each func(protocol.Event)) protocol.Event {
	t.Helper()
	if _, err := cl.Submit(ctx, req); err != nil {
		t.Fatalf("Submit(%s): %v", req.ID, err)
	}
	var last protocol.Event
	for ev, err := range cl.Watch(ctx, req.ID) {
		if err != nil {
			t.Fatalf("watching %s: %v (last state %q)", req.ID, err, last.Data.State)
		}
		if each != nil {
			each(ev)
		}
		last = ev
	}
	return last
}

// awaitPod waits until pod name in the build namespace satisfies ok, or is gone if ok is nil,
// and returns it.
func awaitPod(ctx context.Context, t *testing.T, c kubernetes.Interface, name, what string, ok func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	for {
		p, err := c.CoreV1().Pods(nsBuilds).Get(ctx, name, metav1.GetOptions{})
		switch {
		case ok == nil && apierrors.IsNotFound(err):
			return nil
		case err == nil && ok != nil && ok(p):
			return p
		case err != nil && !apierrors.IsNotFound(err):
			t.Fatalf("pod %s: %v", name, err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod %s was never %s: %v", name, what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
