package kubetest_test

import (
	"context"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
