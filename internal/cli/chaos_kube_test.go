package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"

	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// chaosKube is the Kubernetes side of the chaos suite: two control planes, each with kwok
// nodes of its own. "east" is started for the suite alone, and is the one whose apiserver
// the suite stops; "west" is the package's, which the workers reach only through a
// fault-injecting proxy. Each has a runc target, and west a Kata target too; a process
// target takes the builds pinned to it. A watch of every pod on both, made as the admin
// straight to each apiserver and resumed from its last resource version across the outage,
// records each build's pods.
type chaosKube struct {
	t          testing.TB
	east, west *kubetest.ControlPlane
	eastAdmin  kubernetes.Interface
	westAdmin  kubernetes.Interface
	proxy      *kubetest.FaultProxy
	ns         string
	targets    string // the targets file
	kubeconfig string // the workers': contexts east and west, as the plain worker user

	mu      sync.Mutex
	pods    map[string]*podTrail // by build id
	relists int                  // how often a watch had to start again from a list
}

// podTrail is what the watch saw of one build's pods.
type podTrail struct {
	uids    map[types.UID]string // each pod ever created for the build, and its cluster
	last    *corev1.Pod
	deleted bool
}

// chaosTargets is the suite's targets file. (A YAML merge key cannot share the pod options:
// the strict loader refuses a key set twice.)
const chaosTargets = `
default: east
targets:
  - name: east
    executor: kubernetes
    weight: 2
    kubernetes:
      context: east
      namespace: NAMESPACE
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
      image_pull_timeout: 2s
      pending_timeout: 2m
      retention: 30m
  - name: west
    executor: kubernetes
    weight: 2
    kubernetes:
      context: west
      namespace: NAMESPACE
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
      image_pull_timeout: 2s
      pending_timeout: 2m
      retention: 30m
  - name: kata
    executor: kubernetes
    weight: 1
    isolated: true
    kubernetes:
      context: west
      namespace: NAMESPACE
      runtime_class: kata
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
      image_pull_timeout: 2s
      pending_timeout: 2m
      retention: 30m
  - name: local
    executor: process
    weight: 0
`

func newChaosKube(t testing.TB, f *fleet, seed uint64) *chaosKube {
	t.Helper()
	k := &chaosKube{t: t, west: kubetest.Need(t), pods: map[string]*podTrail{}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	east, err := kubetest.Start(ctx, kubetest.Options{})
	if err != nil {
		t.Fatalf("start the east control plane: %v", err)
	}
	t.Cleanup(east.Stop)
	k.east = east
	k.eastAdmin, k.westAdmin = east.Client(), k.west.Client()
	k.proxy, err = kubetest.NewFaultProxy(k.west.URL, kubetest.FaultOptions{Rate: 0.1, Latency: 40 * time.Millisecond, Seed: seed})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.proxy.Close)

	kubeSeq++
	k.ns = fmt.Sprintf("chaos-%d-%d", os.Getpid()%10000, kubeSeq)
	for _, cp := range []*kubetest.ControlPlane{east, k.west} {
		cp.Namespace(t, k.ns, map[string]string{"pod-security.kubernetes.io/enforce": "restricted"})
		grantWorkerRole(t, cp.Client(), k.ns)
	}
	k.kubeconfig = filepath.Join(f.dir, "chaos.kubeconfig")
	if err := kubetest.WriteKubeconfig(k.kubeconfig,
		kubetest.Context{Name: "east", Server: east.URL, User: kubetest.UserWorker, Token: east.WorkerToken},
		kubetest.Context{Name: "west", Server: k.proxy.URL(), User: kubetest.UserWorker, Token: k.west.WorkerToken},
	); err != nil {
		t.Fatal(err)
	}
	k.targets = filepath.Join(f.dir, "chaos-targets.yaml")
	if err := os.WriteFile(k.targets, []byte(strings.ReplaceAll(chaosTargets, "NAMESPACE", k.ns)), 0o600); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(context.Background())
	t.Cleanup(stop)
	k.watch(wctx, "east", k.eastAdmin)
	k.watch(wctx, "west", k.westAdmin)
	return k
}

// env is what a worker binary needs to reach both clusters with the suite's targets.
func (k *chaosKube) env() []string {
	return []string{"BUILDFLEET_TARGETS_FILE=" + k.targets, "KUBECONFIG=" + k.kubeconfig}
}

// watch records every event of the namespace's pods on cluster: a watch from the namespace's
// (empty) state on, resumed where it broke off whenever it breaks. An apiserver that comes
// back from an outage serves no watch from before it (410 Gone): the pods are listed again
// and the watch goes on from there; only a pod made and deleted between the two could be
// missed, and the suite deletes none on its own.
func (k *chaosKube) watch(ctx context.Context, cluster string, c kubernetes.Interface) {
	k.t.Helper()
	rv, err := k.list(ctx, cluster, c)
	if err != nil {
		k.t.Fatal(err)
	}
	lw := &cache.ListWatch{WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
		return c.CoreV1().Pods(k.ns).Watch(ctx, o)
	}}
	go func() {
		for ctx.Err() == nil {
			w, err := watchtools.NewRetryWatcherWithContext(ctx, rv, lw)
			if err != nil {
				k.t.Errorf("the pod watch of %s: %v", cluster, err)
				return
			}
			for ev := range w.ResultChan() {
				if ev.Type == watch.Error {
					break
				}
				if p, ok := ev.Object.(*corev1.Pod); ok {
					k.saw(cluster, p, ev.Type == watch.Deleted)
				}
			}
			w.Stop()
			for ctx.Err() == nil {
				if rv, err = k.list(ctx, cluster, c); err == nil {
					k.mu.Lock()
					k.relists++
					k.mu.Unlock()
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
		}
	}()
}

// list records the pods cluster has now, and returns the list's resource version.
func (k *chaosKube) list(ctx context.Context, cluster string, c kubernetes.Interface) (string, error) {
	list, err := c.CoreV1().Pods(k.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", err
	}
	for i := range list.Items {
		k.saw(cluster, &list.Items[i], false)
	}
	return list.ResourceVersion, nil
}

// saw records one state of pod p on cluster.
func (k *chaosKube) saw(cluster string, p *corev1.Pod, deleted bool) {
	id := p.Labels[kube.LabelBuild]
	k.mu.Lock()
	defer k.mu.Unlock()
	tr := k.pods[id]
	if tr == nil {
		tr = &podTrail{uids: map[types.UID]string{}}
		k.pods[id] = tr
	}
	tr.uids[p.UID] = cluster
	tr.last, tr.deleted = p, deleted
}

// trail is a copy of what the watch saw of build id's pods; ok is false when it saw none.
func (k *chaosKube) trail(id string) (podTrail, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	tr, ok := k.pods[id]
	if !ok {
		return podTrail{}, false
	}
	return *tr, true
}

// running lists the builds whose pods are neither finished nor gone.
func (k *chaosKube) running() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []string
	for id, tr := range k.pods {
		if !tr.deleted && tr.last.Status.Phase != corev1.PodSucceeded && tr.last.Status.Phase != corev1.PodFailed {
			out = append(out, id)
		}
	}
	return out
}

// podOutcome is how a pod really ended, from the last state the watch saw: "exit N",
// "image_pull" (it never started: its image would not pull), "deadline" (its
// activeDeadlineSeconds ended it), "deleted" (it went before it ended), or its phase when it
// has not ended.
func podOutcome(tr podTrail) string {
	p := tr.last
	if p.Status.Reason == "DeadlineExceeded" {
		return "deadline"
	}
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil && (w.Reason == "ErrImagePull" || w.Reason == "ImagePullBackOff") {
			return "image_pull"
		}
		if term := cs.State.Terminated; term != nil {
			return fmt.Sprintf("exit %d", term.ExitCode)
		}
	}
	if tr.deleted {
		return "deleted"
	}
	return string(p.Status.Phase)
}

// podAgrees reports whether a build's recorded end agrees with what its pod did (outcome
// "" when it had no pod): a build that succeeded or failed on an exit code had a pod that
// exited so; one that failed to pull had a pod whose image did not pull; one that timed out
// or was stopped had its pod stopped, or none, and never one that ran to its own end.
func podAgrees(rec protocol.Record, outcome string) bool {
	switch {
	case rec.State == protocol.StateSucceeded:
		return outcome == "exit 0"
	case rec.State == protocol.StateFailed && rec.Reason == protocol.ReasonExitCode:
		return rec.ExitCode != nil && outcome == fmt.Sprintf("exit %d", *rec.ExitCode)
	case rec.State == protocol.StateFailed && rec.Reason == protocol.ReasonImagePull:
		return outcome == "image_pull"
	case rec.State == protocol.StateTimedOut:
		return outcome == "deadline" || outcome == "deleted" || outcome == "exit 143"
	case rec.State == protocol.StateAborted:
		return outcome == "" || outcome == "deadline" || outcome == "deleted" || outcome == "exit 143"
	}
	return outcome != "exit 0"
}
