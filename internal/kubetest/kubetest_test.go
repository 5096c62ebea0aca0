package kubetest_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/buildfleet/buildfleet/internal/kubetest"
)

func TestMain(m *testing.M) { os.Exit(kubetest.RunMain(m)) }

// TestControlPlane starts the control plane and runs a pod through kwok's stages on a Kata
// node: the RuntimeClass's scheduling and overhead are applied by the real admission chain.
func TestControlPlane(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp := kubetest.Need(t)
	c := cp.Client()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "default",
			Annotations: map[string]string{"sim.buildfleet.io/run-ms": "300", "sim.buildfleet.io/exit-code": "3"}},
		Spec: corev1.PodSpec{
			RuntimeClassName: new("kata"),
			RestartPolicy:    corev1.RestartPolicyNever,
			Tolerations:      []corev1.Toleration{{Key: kubetest.LabelDedicated, Value: kubetest.Dedicated, Operator: corev1.TolerationOpEqual, Effect: corev1.TaintEffectNoSchedule}},
			Containers:       []corev1.Container{{Name: "build", Image: "alpine"}},
		},
	}
	got, err := c.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Spec.Overhead.Cpu().String() != "250m" {
		t.Errorf("overhead = %v, want the RuntimeClass's 250m", got.Spec.Overhead)
	}
	for {
		p, err := c.CoreV1().Pods("default").Get(ctx, "p", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase == corev1.PodFailed {
			if p.Spec.NodeName != "kata-0" && p.Spec.NodeName != "kata-1" {
				t.Errorf("ran on %q, want a kata node", p.Spec.NodeName)
			}
			if code := p.Status.ContainerStatuses[0].State.Terminated.ExitCode; code != 3 {
				t.Errorf("exit code %d, want 3", code)
			}
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod never failed: %+v", p.Status)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestDeletedPodStopsFirst: a running pod that is deleted turns Failed (exit 143) before it
// goes, as the kubelet makes it.
func TestDeletedPodStopsFirst(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cp := kubetest.Need(t)
	c := cp.Client()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "del", Namespace: "default", Annotations: map[string]string{"sim.buildfleet.io/run-ms": "600000"}},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			Tolerations:   []corev1.Toleration{{Key: kubetest.LabelDedicated, Value: kubetest.Dedicated, Operator: corev1.TolerationOpEqual, Effect: corev1.TaintEffectNoSchedule}},
			Containers:    []corev1.Container{{Name: "build", Image: "alpine"}},
		},
	}
	if _, err := c.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w, err := c.CoreV1().Pods("default").Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=del"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	deleted, stopped := false, false
	for ev := range w.ResultChan() {
		p, ok := ev.Object.(*corev1.Pod)
		if !ok {
			t.Fatalf("watch: %v", ev.Object)
		}
		switch {
		case ev.Type == "DELETED":
			if !stopped {
				t.Error("the pod went without turning Failed first")
			}
			return
		case p.Status.Phase == corev1.PodRunning && !deleted:
			deleted = true
			if err := c.CoreV1().Pods("default").Delete(ctx, "del", metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
		case p.Status.Phase == corev1.PodFailed && p.DeletionTimestamp != nil:
			if code := p.Status.ContainerStatuses[0].State.Terminated.ExitCode; code != 143 {
				t.Errorf("stopped with exit code %d, want 143", code)
			}
			stopped = true
		}
	}
	t.Fatal("watch ended before the pod was deleted")
}

// TestFaultProxy: through the proxy, a share of requests fails with the faults it counts (a
// lost answer after the apiserver acted), the rest pass; the counts add up.
func TestFaultProxy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cp := kubetest.Need(t)
	fp, err := kubetest.NewFaultProxy(cp.URL, kubetest.FaultOptions{Rate: 0.5, Latency: 5 * time.Millisecond, Seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	defer fp.Close()
	rc := rest.CopyConfig(cp.Admin)
	rc.Host = fp.URL()
	c := kubernetes.NewForConfigOrDie(rc)
	const n = 60
	failed := 0
	for i := range n {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("fp-%d", i), Namespace: "default"}}
		if _, err := c.CoreV1().ConfigMaps("default").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			if !apierrors.IsInternalError(err) && !apierrors.IsServiceUnavailable(err) && !apierrors.IsTooManyRequests(err) {
				t.Fatalf("create %d: %v, want an injected 500, 503 or 429", i, err)
			}
			failed++
		}
	}
	counts := fp.Counts()
	injected := counts[kubetest.FaultThrottled] + counts[kubetest.FaultUnavailable] + counts[kubetest.FaultLostResponse]
	if counts["requests"] < n || injected == 0 || failed == 0 || failed > injected {
		t.Errorf("%d of %d creates failed; proxy counts %v", failed, n, counts)
	}
	// A lost answer is a create that happened: the apiserver holds more than succeeded.
	list, err := cp.Client().CoreV1().ConfigMaps("default").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	made := 0
	for _, cm := range list.Items {
		if strings.HasPrefix(cm.Name, "fp-") {
			made++
		}
	}
	if lost := counts[kubetest.FaultLostResponse]; made != n-failed+lost {
		t.Errorf("%d config maps exist; want the %d that succeeded and the %d whose answer was lost", made, n-failed, lost)
	}
}

// TestAPIServerOutage: a stopped apiserver's port resets every connection (held, so no
// other server takes it); started again on the same address, it serves what it held.
func TestAPIServerOutage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cp, err := kubetest.Start(ctx, kubetest.Options{KataNodes: 1, RuncNodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	c := cp.Client()
	if err := cp.StopAPIServer(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err == nil || !strings.Contains(err.Error(), "connection reset by peer") {
		t.Fatalf("a stopped apiserver answered: %v", err)
	}
	if _, err := net.Listen("tcp", strings.TrimPrefix(cp.URL, "https://")); err == nil {
		t.Fatal("a stopped apiserver's port was free for another server to take")
	}
	if err := cp.StartAPIServer(ctx); err != nil {
		t.Fatal(err)
	}
	nodes, err := c.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil || len(nodes.Items) != 2 {
		t.Fatalf("after the restart: %d nodes, %v; want the 2 it held", len(nodes.Items), err)
	}
}
