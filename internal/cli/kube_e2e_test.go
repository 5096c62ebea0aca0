package cli

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// kubeFleet is a fleet whose targets run builds as pods on the test control plane, in a
// namespace of its own that enforces Pod Security "restricted", with the worker holding only
// the Role deploy/ ships (a plain user's token, real RBAC).
type kubeFleet struct {
	*fleet
	cp      *kubetest.ControlPlane
	admin   kubernetes.Interface
	ns      string
	targets string // the targets file
}

// kubeTargets is the test targets file: a Kata target and a runc target sharing weight
// 1:3, both on the dedicated build nodes; a target no node can take; and a privileged one.
const kubeTargets = `
default: runc
targets:
  - name: kata
    executor: kubernetes
    weight: 1
    isolated: true
    exclude: ["rhel6"]
    kubernetes:
      namespace: NAMESPACE
      runtime_class: kata
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
      image_pull_timeout: 2s
      pending_timeout: 10s
      retention: RETENTION
  - name: runc
    executor: kubernetes
    weight: 3
    kubernetes:
      namespace: NAMESPACE
      secrets: ["npm-*"]
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
      image_pull_timeout: 2s
      pending_timeout: 10s
      retention: RETENTION
  - name: nowhere
    executor: kubernetes
    weight: 0
    kubernetes:
      namespace: NAMESPACE
      node_selector: {buildfleet.test/pool: gpu}
      resources: {default: micro}
      pending_timeout: 2s
      retention: RETENTION
  - name: privileged
    executor: kubernetes
    weight: 0
    kubernetes:
      namespace: NAMESPACE
      privileged: true
`

var kubeSeq int

func newKubeFleet(t testing.TB, retention string) *kubeFleet {
	t.Helper()
	return newKubeFleetOn(t, kubetest.Need(t), retention)
}

// newKubeFleetOn is newKubeFleet on control plane cp.
func newKubeFleetOn(t testing.TB, cp *kubetest.ControlPlane, retention string) *kubeFleet {
	t.Helper()
	kubeSeq++
	ns := fmt.Sprintf("builds-%d-%d", os.Getpid()%10000, kubeSeq)
	cp.Namespace(t, ns, map[string]string{
		"pod-security.kubernetes.io/enforce": "restricted",
		"pod-security.kubernetes.io/warn":    "restricted",
	})
	admin := cp.Client()
	grantWorkerRole(t, admin, ns)
	f := &kubeFleet{fleet: newFleet(t), cp: cp, admin: admin, ns: ns}
	body := strings.NewReplacer("NAMESPACE", ns, "RETENTION", retention).Replace(kubeTargets)
	f.targets = filepath.Join(f.dir, "targets.yaml")
	if err := os.WriteFile(f.targets, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	// The worker reaches the cluster as the plain user the Role is bound to.
	t.Setenv("KUBECONFIG", cp.WorkerKubeconfig)
	return f
}

// grantWorkerRole applies deploy/base/role.yaml in ns and binds it to the worker's user.
func grantWorkerRole(t testing.TB, c kubernetes.Interface, ns string) {
	t.Helper()
	data, err := os.ReadFile("../../deploy/base/role.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var role rbacv1.Role
	if err := yaml.UnmarshalStrict(data, &role); err != nil {
		t.Fatalf("deploy/base/role.yaml: %v", err)
	}
	role.Namespace = ns
	ctx := context.Background()
	if _, err := c.RbacV1().Roles(ns).Create(ctx, &role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = c.RbacV1().RoleBindings(ns).Create(ctx, &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "buildfleet-worker", Namespace: ns},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: "rbac.authorization.k8s.io", Name: kubetest.UserWorker}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func (f *kubeFleet) settings(replica string) config.Settings {
	s := f.fleet.settings(replica)
	s.TargetsFile = f.targets
	s.Concurrency = 256
	return s
}

// sim builds a request whose pod kwok drives with the given sim.buildfleet.io annotations.
func sim(id string, ann map[string]string) protocol.BuildRequest {
	a := map[string]string{}
	for k, v := range ann {
		if strings.Contains(k, "/") {
			a[k] = v
		} else {
			a["sim.buildfleet.io/"+k] = v
		}
	}
	return protocol.BuildRequest{ID: id, Image: "registry.example/ci/node:22", Command: []string{"make", "test"}, Annotations: a,
		Pipeline: "org/app", Job: "pull request #12"}
}

func (f *kubeFleet) pod(id string) (*corev1.Pod, error) {
	return f.admin.CoreV1().Pods(f.ns).Get(context.Background(), "build-"+id, metav1.GetOptions{})
}

// awaitNoPod waits until build id's pod is gone.
func (f *kubeFleet) awaitNoPod(id string, within time.Duration) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for {
		_, err := f.pod(id)
		if apierrors.IsNotFound(err) {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("pod of %s still exists after %s (err %v)", id, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestKubeRoutingAndPlacement routes a few hundred builds between a Kata target and a runc
// target by weight 1:3: each pod lands on its target's nodes with its target's runtime
// class, with the restricted security context, the sanitised labels and the deadline; an
// excluded image never goes to Kata.
func TestKubeRoutingAndPlacement(t *testing.T) {
	f := newKubeFleet(t, "10m")
	f.start(f.settings("a"), nil)
	const n, rhel = 240, 20
	for i := range n {
		f.submitReq(sim(fmt.Sprintf("w%03d", i), map[string]string{"run-ms": "20"}))
	}
	for i := range rhel {
		req := sim(fmt.Sprintf("rhel%02d", i), nil)
		req.Image = "registry.example/legacy/rhel6-builder:1"
		f.submitReq(req)
	}
	pinned := sim("pinned-rhel", nil)
	pinned.Image = "registry.example/legacy/rhel6-builder:1"
	pinned.Annotations[protocol.AnnotationTarget] = "kata"
	f.submitReq(pinned)

	perTarget := map[string]int{}
	for i := range n {
		id := fmt.Sprintf("w%03d", i)
		evs := f.await(id, 2*time.Minute)
		if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
			t.Fatalf("%s ended %s (%s), want succeeded", id, got, evs[len(evs)-1].Data.Message)
		}
		rec := f.status(id)
		perTarget[rec.Target]++
		f.checkPod(id, rec.Target)
	}
	// Deterministic per id, so this cannot flake; the bound is 4.5σ of a 1-in-4 draw.
	mean, sigma := float64(n)/4, math.Sqrt(float64(n)*0.25*0.75)
	if k := float64(perTarget["kata"]); k < mean-4.5*sigma || k > mean+4.5*sigma || perTarget["kata"]+perTarget["runc"] != n {
		t.Errorf("per target %v: want about %v on kata out of %d", perTarget, mean, n)
	}
	for i := range rhel {
		id := fmt.Sprintf("rhel%02d", i)
		f.await(id, time.Minute)
		if rec := f.status(id); rec.Target != "runc" || rec.State != protocol.StateSucceeded {
			t.Errorf("%s: target %q state %s; an excluded image must run on runc", id, rec.Target, rec.State)
		}
		f.checkPod(id, "runc")
	}
	evs := f.await("pinned-rhel", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateRejected || last.Reason != protocol.ReasonExcludedImage {
		t.Errorf("rhel6 pinned to kata: %s/%s, want rejected/excluded_image", last.State, last.Reason)
	}
	if _, err := f.pod("pinned-rhel"); !apierrors.IsNotFound(err) {
		t.Errorf("a rejected build has a pod (err %v)", err)
	}
	t.Logf("placement over %d builds: %v", n, perTarget)
}

// checkPod checks that build id's pod ran where its target says, as its target says.
func (f *kubeFleet) checkPod(id, target string) {
	f.t.Helper()
	p, err := f.pod(id)
	if err != nil {
		f.t.Fatalf("pod of %s: %v", id, err)
	}
	node, err := f.admin.CoreV1().Nodes().Get(context.Background(), p.Spec.NodeName, metav1.GetOptions{})
	if err != nil {
		f.t.Fatalf("node of %s: %v", id, err)
	}
	pool := node.Labels[kubetest.LabelPool]
	rc := ""
	if p.Spec.RuntimeClassName != nil {
		rc = *p.Spec.RuntimeClassName
	}
	switch target {
	case "kata":
		if pool != kubetest.PoolKata || rc != kubetest.RuntimeClassKata || p.Spec.Overhead == nil {
			f.t.Errorf("%s on kata: node pool %q, runtime class %q, overhead %v", id, pool, rc, p.Spec.Overhead)
		}
	case "runc":
		if pool != kubetest.PoolRunc || rc != "" {
			f.t.Errorf("%s on runc: node pool %q, runtime class %q", id, pool, rc)
		}
	}
	want := map[string]string{kube.LabelBuild: id, kube.LabelTarget: target, kube.LabelPipeline: "org-app", kube.LabelJob: "pull-request--12"}
	for k, v := range want {
		if p.Labels[k] != v {
			f.t.Errorf("%s: label %s = %q, want %q", id, k, p.Labels[k], v)
		}
	}
	c := p.Spec.Containers[0]
	if sc := c.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || *sc.AllowPrivilegeEscalation {
		f.t.Errorf("%s: container security context %+v, want restricted", id, sc)
	}
	if p.Spec.ActiveDeadlineSeconds == nil || *p.Spec.ActiveDeadlineSeconds != 3600 {
		f.t.Errorf("%s: activeDeadlineSeconds %v, want the 1h default timeout", id, p.Spec.ActiveDeadlineSeconds)
	}
	// The mark follows the terminal event.
	waitFor(f.t, 10*time.Second, id+" pod marked finished", func() bool {
		p, err := f.pod(id)
		return err == nil && p.Annotations[kube.AnnotationFinishedAt] != ""
	})
}

// TestKubeOutcomes drives every way a pod can end and checks the state and reason each
// build ends with.
func TestKubeOutcomes(t *testing.T) {
	f := newKubeFleet(t, "1s")
	f.start(f.settings("a"), nil)
	code3 := 3
	cases := []struct {
		req    protocol.BuildRequest
		state  protocol.State
		reason protocol.Reason
		code   *int
		msg    string
	}{
		{req: sim("ok", map[string]string{"run-ms": "500"}), state: protocol.StateSucceeded},
		{req: sim("exit3", map[string]string{"exit-code": "3"}), state: protocol.StateFailed, reason: protocol.ReasonExitCode, code: &code3, msg: "simulated build log"},
		{req: func() protocol.BuildRequest {
			r := sim("nopull", nil)
			r.Image = "registry.example/does-not-exist:1"
			return r
		}(), state: protocol.StateFailed, reason: protocol.ReasonImagePull, msg: "could not be pulled"},
		{req: sim("oom", map[string]string{"outcome": "oom"}), state: protocol.StateFailed, reason: protocol.ReasonOOMKilled},
		{req: sim("evict", map[string]string{"outcome": "evict"}), state: protocol.StateFailed, reason: protocol.ReasonEvicted, msg: "low on resource"},
		{req: sim("unsched", map[string]string{protocol.AnnotationTarget: "nowhere"}), state: protocol.StateFailed, reason: protocol.ReasonUnschedulable, msg: "not scheduled within 2s"},
		{req: func() protocol.BuildRequest {
			r := sim("slow", map[string]string{"run-ms": "60000"})
			r.TimeoutSeconds = 2
			return r
		}(), state: protocol.StateTimedOut},
		{req: sim("priv", map[string]string{protocol.AnnotationTarget: "privileged"}), state: protocol.StateRejected, reason: protocol.ReasonLaunchRefused, msg: "PodSecurity"},
		{req: sim("huge", map[string]string{protocol.AnnotationResources: "gigantic"}), state: protocol.StateRejected, reason: protocol.ReasonInvalidRequest, msg: "resource class"},
		{req: sim("capped", map[string]string{protocol.AnnotationResources: "cpu=64,memory=1Gi", "run-ms": "300000"}), state: protocol.StateFailed, reason: protocol.ReasonPodLost},
		{req: sim("apievict", map[string]string{"run-ms": "300000"}), state: protocol.StateFailed, reason: protocol.ReasonEvicted, msg: "EvictionByEvictionAPI"},
		{req: sim("foreign", nil), state: protocol.StateRejected, reason: protocol.ReasonLaunchRefused, msg: "belongs to build"},
	}
	// Another fleet in the same namespace already has a pod named like build "foreign".
	opts, err := kube.ParseOptions([]byte(`{"namespace": "` + f.ns + `", "node_selector": {"dedicated": "builds"}, "pass_annotations": ["sim.buildfleet.io/"]}`))
	if err != nil {
		t.Fatal(err)
	}
	other, err := kube.Pod(build.NewJob(sim("foreign", map[string]string{"run-ms": "600000"}), protocol.Record{Target: "runc"}), "otherfleet", opts)
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := f.admin.CoreV1().Pods(f.ns).Create(context.Background(), other, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		f.submitReq(c.req)
	}
	// The pod of "capped" is deleted behind the worker's back while it runs.
	f.awaitState("capped", protocol.StateRunning, time.Minute)
	p, err := f.pod("capped")
	if err != nil {
		t.Fatal(err)
	}
	if cpu := p.Spec.Containers[0].Resources.Limits.Cpu().String(); cpu != "12" {
		t.Errorf("capped: cpu limit %s, want the target's maximum 12", cpu)
	}
	if err := f.admin.CoreV1().Pods(f.ns).Delete(context.Background(), p.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// The pod of "apievict" is evicted through the API (a drain does this), which marks it
	// DisruptionTarget before deleting it.
	f.awaitState("apievict", protocol.StateRunning, time.Minute)
	err = f.admin.CoreV1().Pods(f.ns).EvictV1(context.Background(), &policyv1.Eviction{
		ObjectMeta: metav1.ObjectMeta{Name: "build-apievict", Namespace: f.ns},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		evs := f.await(c.req.ID, time.Minute)
		last := evs[len(evs)-1].Data
		if last.State != c.state || last.Reason != c.reason {
			t.Errorf("%s: ended %s/%s (%s), want %s/%s", c.req.ID, last.State, last.Reason, last.Message, c.state, c.reason)
			continue
		}
		if c.code != nil && (last.ExitCode == nil || *last.ExitCode != *c.code) {
			t.Errorf("%s: exit code %v, want %d", c.req.ID, last.ExitCode, *c.code)
		}
		if !strings.Contains(last.Message, c.msg) {
			t.Errorf("%s: message %q, want it to mention %q", c.req.ID, last.Message, c.msg)
		}
		if got := terminalCount(f.storedEvents(c.req.ID)); got != 1 {
			t.Errorf("%s: %d terminal events, want 1", c.req.ID, got)
		}
	}
	// Finished pods go once the 1s retention has passed; the other fleet's pod stays.
	for _, c := range cases {
		if c.req.ID != "foreign" {
			f.awaitNoPod(c.req.ID, 30*time.Second)
		}
	}
	if p, err := f.pod("foreign"); err != nil || p.UID != theirs.UID {
		t.Errorf("the other fleet's pod: %v (err %v), want it untouched", p, err)
	}
}

// TestKubeStops stops builds before their pod exists, while it is pending, and while it
// runs: each ends aborted exactly once and leaves no pod behind.
func TestKubeStops(t *testing.T) {
	f := newKubeFleet(t, "10m")
	ctx := context.Background()
	// Before: stored while no replica runs, so the claim finds the stop first. (A first
	// replica provisions the layout and goes.)
	f.start(f.settings("setup"), nil).stop(t)
	f.submitReq(sim("before", nil))
	if err := f.cl.Stop(ctx, "before", "changed my mind"); err != nil {
		t.Fatal(err)
	}
	f.start(f.settings("a"), nil)
	f.submitReq(sim("pending", map[string]string{"start-ms": "60000"}))
	f.submitReq(sim("running", map[string]string{"run-ms": "60000"}))
	f.awaitState("pending", protocol.StateDispatched, time.Minute)
	f.awaitState("running", protocol.StateRunning, time.Minute)
	for _, id := range []string{"pending", "running"} {
		if err := f.cl.Stop(ctx, id, "stop "+id); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"before", "pending", "running"} {
		evs := f.await(id, time.Minute)
		if last := evs[len(evs)-1].Data; last.State != protocol.StateAborted {
			t.Errorf("%s: ended %s (%s), want aborted", id, last.State, last.Message)
		}
		if got := f.storedEvents(id)[protocol.StateAborted]; got != 1 {
			t.Errorf("%s: %d aborted events, want 1", id, got)
		}
		f.awaitNoPod(id, 30*time.Second)
	}
	// After the end: nothing to stop, nothing changes.
	f.submitReq(sim("done", nil))
	f.await("done", time.Minute)
	if err := f.cl.Stop(ctx, "done", "too late"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the stop consumer has applied every stop", func() bool {
		c, err := f.js.Consumer(ctx, "BUILDFLEET_STOPS", "stoppers")
		if err != nil {
			return false
		}
		info, err := c.Info(ctx)
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0 && info.Delivered.Stream >= 4
	})
	if rec := f.status("done"); rec.State != protocol.StateSucceeded {
		t.Errorf("a stop after the end changed the build to %s", rec.State)
	}
}

// TestKubeAdoption kills a replica (SIGKILL) while its builds run: another adopts them, with
// no second pod (the pods keep their UIDs). With every replica gone, the pod's own
// activeDeadlineSeconds still ends an overdue build, and the adopter reports it timed out.
// A pod deleted while no replica watched ends its build as failed/pod_lost.
func TestKubeAdoption(t *testing.T) {
	f := newKubeFleet(t, "10m")
	env := []string{"BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_TARGETS_FILE=" + f.targets, "KUBECONFIG=" + f.cp.WorkerKubeconfig}
	a := f.startBinary("a", env...)
	ids := []string{"adopt-0", "adopt-1", "adopt-2", "adopt-3"}
	for _, id := range ids {
		f.submitReq(sim(id, map[string]string{"run-ms": "10000"}))
	}
	f.submitReq(sim("vanish", map[string]string{"run-ms": "60000"}))
	uids := map[string]string{}
	for _, id := range append(ids, "vanish") {
		f.awaitState(id, protocol.StateRunning, time.Minute)
		p, err := f.pod(id)
		if err != nil {
			t.Fatal(err)
		}
		uids[id] = string(p.UID)
	}
	// Submitted last and killed right after it runs, so that its 8s timeout runs out while
	// no replica is alive (the replica's own deadline would otherwise come first).
	overdue := sim("overdue", map[string]string{"run-ms": "600000"})
	overdue.TimeoutSeconds = 8
	f.submitReq(overdue)
	f.awaitState("overdue", protocol.StateRunning, time.Minute)
	if err := a.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-a.done
	a.done <- nil // for the cleanup
	if err := f.admin.CoreV1().Pods(f.ns).Delete(context.Background(), "build-vanish", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// The overdue pod fails by its own deadline while no replica is alive.
	deadline := time.Now().Add(time.Minute)
	for {
		p, err := f.pod("overdue")
		if err == nil && p.Status.Reason == "DeadlineExceeded" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("overdue pod never hit its activeDeadlineSeconds (err %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	f.startBinary("b", env...)
	for _, id := range ids {
		evs := f.await(id, time.Minute)
		if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded {
			t.Errorf("%s: ended %s (%s), want succeeded", id, last.State, last.Message)
		}
		if got := f.status(id).Replica; got != "b" {
			t.Errorf("%s finished on %q, want the adopter b", id, got)
		}
		p, err := f.pod(id)
		if err != nil {
			t.Fatal(err)
		}
		if string(p.UID) != uids[id] {
			t.Errorf("%s: pod UID changed from %s to %s: a second pod was made", id, uids[id], p.UID)
		}
	}
	evs := f.await("overdue", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateTimedOut || !strings.Contains(last.Message, "activeDeadlineSeconds") {
		t.Errorf("overdue: ended %s (%s), want timed_out by activeDeadlineSeconds", last.State, last.Message)
	}
	evs = f.await("vanish", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateFailed || last.Reason != protocol.ReasonPodLost {
		t.Errorf("vanish: ended %s/%s (%s), want failed/pod_lost", last.State, last.Reason, last.Message)
	}
	if _, err := f.pod("vanish"); !apierrors.IsNotFound(err) {
		t.Errorf("the adopter made a new pod for a build whose pod vanished (err %v)", err)
	}
}

// TestKubeHandover sends SIGTERM to a replica whose builds run as pods: it hands them over at
// once and leaves the pods running, and the next replica follows the same pods to their end.
func TestKubeHandover(t *testing.T) {
	f := newKubeFleet(t, "10m")
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=60s", "BUILDFLEET_TARGETS_FILE="+f.targets, "KUBECONFIG="+f.cp.WorkerKubeconfig)
	ids := []string{"hand-0", "hand-1", "hand-2"}
	uids := map[string]string{}
	for _, id := range ids {
		f.submitReq(sim(id, map[string]string{"run-ms": "6000"}))
	}
	for _, id := range ids {
		f.awaitState(id, protocol.StateRunning, time.Minute)
		p, err := f.pod(id)
		if err != nil {
			t.Fatal(err)
		}
		uids[id] = string(p.UID)
	}
	f.start(f.settings("b"), nil)
	a.terminate(t, 30*time.Second)
	// AckWait is 60s: finishing within it can only come from the handover.
	for _, id := range ids {
		evs := f.await(id, 40*time.Second)
		rec := f.status(id)
		if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded || rec.Replica != "b" || rec.Handovers < 1 {
			t.Errorf("%s: %s on %q after %d handovers, want succeeded on b after a handover", id, last.State, rec.Replica, rec.Handovers)
		}
		p, err := f.pod(id)
		if err != nil || string(p.UID) != uids[id] {
			t.Errorf("%s: pod %v (err %v), want the same pod %s", id, p.UID, err, uids[id])
		}
	}
}

// TestKubeSecretRefs runs a build that sets a variable from a Kubernetes Secret the target
// allows: the pod reads it through secretKeyRef, so the value never travels through NATS.
// A Secret the target does not allow, and a process target, refuse the build.
func TestKubeSecretRefs(t *testing.T) {
	f := newKubeFleet(t, "10m")
	f.start(f.settings("a"), nil)
	ok := sim("ref-ok", map[string]string{"run-ms": "20"})
	ok.Annotations[protocol.AnnotationTarget] = "runc"
	ok.SecretRefs = map[string]protocol.SecretRef{"NPM_TOKEN": {Secret: "npm-creds", Key: "token"}}
	f.submitReq(ok)
	if evs := f.await("ref-ok", time.Minute); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
		t.Fatalf("ref-ok: %v (%s)", states(evs), evs[len(evs)-1].Data.Message)
	}
	p, err := f.pod("ref-ok")
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, e := range p.Spec.Containers[0].Env {
		if e.Name == "NPM_TOKEN" {
			found = e.Value == "" && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil &&
				e.ValueFrom.SecretKeyRef.Name == "npm-creds" && e.ValueFrom.SecretKeyRef.Key == "token"
		}
	}
	if !found {
		t.Errorf("the pod does not read NPM_TOKEN from Secret npm-creds/token: %+v", p.Spec.Containers[0].Env)
	}
	denied := sim("ref-denied", nil)
	denied.Annotations[protocol.AnnotationTarget] = "kata" // allows no Secret
	denied.SecretRefs = map[string]protocol.SecretRef{"NPM_TOKEN": {Secret: "npm-creds", Key: "token"}}
	f.submitReq(denied)
	evs := f.await("ref-denied", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateRejected || last.Reason != protocol.ReasonLaunchRefused ||
		!strings.Contains(last.Message, "does not allow Secret") {
		t.Errorf("ref-denied: %s/%s %q; want rejected/launch_refused naming the Secret", last.State, last.Reason, last.Message)
	}
	if _, err := f.pod("ref-denied"); !apierrors.IsNotFound(err) {
		t.Errorf("a refused build has a pod (err %v)", err)
	}
}

// TestKubeOutage stops the apiserver while builds run on it: a build stopped meanwhile, and
// one whose timeout passes meanwhile, each by an owner that loses its liveness and takes the
// build back as a new incarnation. Neither is reported ended before its pod could be killed
// (after the apiserver is back), neither fails for the outage, and a build submitted meanwhile
// waits for the cluster instead of failing, then runs.
func TestKubeOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane of its own")
	}
	ctx := context.Background()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	cp, err := kubetest.Start(cctx, kubetest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	f := newKubeFleetOn(t, cp, "10m")
	// A scheduler that reconnects after a long outage may take its reflectors' backoff (up to
	// a minute) to place a pod made then: runc's pending budget leaves it that. kata's (the
	// first target) is 15s, for the build whose budget runs out during the outage.
	body, err := os.ReadFile(f.targets)
	if err != nil {
		t.Fatal(err)
	}
	targets := strings.Replace(string(body), "pending_timeout: 10s", "pending_timeout: 15s", 1)
	targets = strings.Replace(targets, "pending_timeout: 10s", "pending_timeout: 2m", 1)
	if err := os.WriteFile(f.targets, []byte(targets), 0o600); err != nil {
		t.Fatal(err)
	}
	s := f.settings("a")
	s.BreakerCooldown = time.Second
	f.start(s, nil)
	f.submitReq(sim("stopped", map[string]string{"run-ms": "600000"}))
	slow := sim("overdue", map[string]string{"run-ms": "600000"})
	slow.TimeoutSeconds = 3
	f.submitReq(slow)
	// Scheduled, but its container would take 10 minutes to start: its 15s pending budget
	// runs out while the apiserver is away, on what a stale cache shows.
	f.submitReq(sim("pending", map[string]string{"start-ms": "600000", protocol.AnnotationTarget: "kata"}))
	f.awaitState("stopped", protocol.StateRunning, time.Minute)
	f.awaitState("overdue", protocol.StateRunning, time.Minute)
	var scheduled time.Time
	waitFor(t, time.Minute, "the pending build's pod scheduled", func() bool {
		p, err := f.pod("pending")
		if err != nil {
			return false
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionTrue {
				scheduled = c.LastTransitionTime.Time
			}
		}
		return !scheduled.IsZero()
	})
	owner := f.status("stopped").Owner

	if err := cp.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	if err := f.cl.Stop(ctx, "stopped", "stopped during the outage"); err != nil {
		t.Fatal(err)
	}
	f.submitReq(sim("meanwhile", map[string]string{"run-ms": "100", protocol.AnnotationTarget: "runc"}))
	// The owner's liveness lapses (its key goes, as an expiry would): it stands down and
	// takes its builds back as a new incarnation, still while the apiserver is away.
	kv, err := f.js.KeyValue(ctx, "BUILDFLEET_REPLICAS")
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, owner); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the builds taken back by a new incarnation", func() bool {
		a, b := f.status("stopped"), f.status("overdue")
		return (a.Owner != owner || a.State.Terminal()) && (b.Owner != owner || b.State.Terminal())
	})
	waitFor(t, time.Minute, "the meanwhile build to wait for the cluster", func() bool { return f.logged("the target is unavailable; waiting") })
	waitFor(t, time.Minute, "the pending build's budget to pass (15s from its scheduling)", func() bool {
		return time.Now().After(scheduled.Add(17 * time.Second))
	})
	back := time.Now() // from here on the apiserver may answer
	if err := cp.StartAPIServer(cctx); err != nil {
		t.Fatal(err)
	}

	// The pending build's budget counts again from the apiserver's return: it ends then,
	// as its pod really is (still not started).
	evs := f.await("pending", 2*time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateFailed || last.Reason != protocol.ReasonContainerError {
		t.Errorf("pending: ended %s/%s (%s), want failed/container_error", last.State, last.Reason, last.Message)
	}
	if rec := f.status("pending"); rec.FinishedAt.Before(back) {
		t.Errorf("pending: ended at %s, before the apiserver was started again (%s)", rec.FinishedAt, back)
	}
	for id, want := range map[string]protocol.State{"stopped": protocol.StateAborted, "overdue": protocol.StateTimedOut, "meanwhile": protocol.StateSucceeded} {
		evs := f.await(id, 2*time.Minute)
		rec := f.status(id)
		if last := evs[len(evs)-1].Data; last.State != want {
			t.Errorf("%s: ended %s/%s (%s), want %s", id, last.State, last.Reason, last.Message, want)
		}
		if id != "meanwhile" && rec.FinishedAt.Before(back) {
			t.Errorf("%s: recorded ended at %s, before its pod could be killed (the apiserver was started again at %s)", id, rec.FinishedAt, back)
		}
		if id != "meanwhile" {
			p, err := f.pod(id)
			if err == nil && p.DeletionTimestamp == nil && p.Status.Reason != "DeadlineExceeded" {
				t.Errorf("%s: its pod was neither deleted nor ended by its deadline: %s", id, p.Status.Phase)
			}
		}
		if got := terminalCount(f.storedEvents(id)); got != 1 {
			t.Errorf("%s: %d terminal events, want 1", id, got)
		}
		// Only the lapsed liveness counts against the budget: the outage does not.
		if rec.Failures > 1 {
			t.Errorf("%s: %d failures counted, want at most the lapse's 1", id, rec.Failures)
		}
	}
}
