package kube_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func TestMain(m *testing.M) { os.Exit(kubetest.RunMain(m)) }

// executor runs a kube executor for target "t" in a fresh namespace of the test control
// plane, with its cluster's informers running until the test ends.
func executor(t *testing.T, options string) (*kube.Executor, kubernetes.Interface, string) {
	t.Helper()
	cp := kubetest.Need(t)
	ns := cp.Namespace(t, "exec-"+time.Now().Format("150405.000000")[7:], nil)
	if options != "" {
		options = ", " + options
	}
	o, err := kube.ParseOptions([]byte(`{"namespace": "` + ns + `", "node_selector": {"dedicated": "builds"}, "pass_annotations": ["sim.buildfleet.io/"]` + options + `}`))
	if err != nil {
		t.Fatal(err)
	}
	client := cp.Client()
	c := kube.NewCluster("test", client, "fleet", nil)
	e := kube.New(c, "t", o)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("cluster Run: %v", err)
		}
	})
	return e, client, ns
}

func job(id string, ann map[string]string) build.Job {
	return build.Job{ID: id, Image: "registry.example/app:1", Command: []string{"true"}, Annotations: ann,
		Target: "t", Workload: build.WorkloadName(id), Timeout: time.Hour}
}

// TestLaunchIsIdempotentAndWaitFollows: launching twice makes one pod; Wait reports running
// once and the outcome; Kill and Cleanup of a pod that is gone are not errors.
func TestLaunchIsIdempotentAndWaitFollows(t *testing.T) {
	e, client, ns := executor(t, `"retention": "0s"`)
	ctx := context.Background()
	j := job("twice", map[string]string{"sim.buildfleet.io/run-ms": "300", "sim.buildfleet.io/exit-code": "7"})
	if err := e.Launch(ctx, j); err != nil {
		t.Fatal(err)
	}
	first, err := client.CoreV1().Pods(ns).Get(ctx, j.Workload, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Launch(ctx, j); err != nil {
		t.Fatalf("second Launch: %v, want nil (AlreadyExists is the same build)", err)
	}
	var ran atomic.Int32
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := e.Wait(wctx, j, func() { ran.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	if out.State != protocol.StateFailed || out.Reason != protocol.ReasonExitCode || out.ExitCode == nil || *out.ExitCode != 7 {
		t.Errorf("outcome %+v, want failed/exit_code 7", out)
	}
	if ran.Load() != 1 {
		t.Errorf("running reported %d times, want 1", ran.Load())
	}
	p, err := client.CoreV1().Pods(ns).Get(ctx, j.Workload, metav1.GetOptions{})
	if err != nil || p.UID != first.UID {
		t.Errorf("pod after two launches: %v (uid %v, first %v)", err, p.UID, first.UID)
	}
	// Retention 0: Cleanup deletes at once.
	if err := e.Cleanup(ctx, j); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := client.CoreV1().Pods(ns).Get(ctx, j.Workload, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("pod still there after Cleanup with retention 0s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := e.Kill(ctx, j); err != nil {
		t.Errorf("Kill of a gone pod: %v", err)
	}
	if err := e.Cleanup(ctx, j); err != nil {
		t.Errorf("Cleanup of a gone pod: %v", err)
	}
}

func TestLaunchErrorsAreClassified(t *testing.T) {
	e, _, _ := executor(t, "")
	ctx := context.Background()
	adopt := job("gone", nil)
	adopt.Adopt = true
	err := e.Launch(ctx, adopt)
	if p, ok := build.AsPermanent(err); !ok || p.Outcome.Reason != protocol.ReasonPodLost {
		t.Errorf("adopting a build whose pod does not exist: %v, want permanent pod_lost", err)
	}

	// A namespace that does not exist is the target's trouble, not the build's: transient,
	// so the target's breaker opens if it persists.
	o, err := kube.ParseOptions([]byte(`{"namespace": "no-such-namespace"}`))
	if err != nil {
		t.Fatal(err)
	}
	cp := kubetest.Need(t)
	missing := kube.New(kube.NewCluster("test", cp.Client(), "fleet", nil), "t", o)
	err = missing.Launch(ctx, job("nons", nil))
	if _, ok := build.AsPermanent(err); ok || !apierrors.IsNotFound(err) {
		t.Errorf("launch into a missing namespace: %v, want a transient NotFound", err)
	}

	// An apiserver that cannot be reached is transient.
	down := kube.New(kube.NewCluster("down", kubernetes.NewForConfigOrDie(kubetest.Unreachable()), "fleet", nil), "t", o)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err = down.Launch(cctx, job("down", nil))
	if _, ok := build.AsPermanent(err); ok || err == nil {
		t.Errorf("launch against an unreachable apiserver: %v, want a transient error", err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Log("(the connection attempt ran into the test's deadline)")
	}
}

// TestSweeperDeletesAfterRetention: a finished pod is deleted once the target's retention has
// passed, not before.
func TestSweeperDeletesAfterRetention(t *testing.T) {
	e, client, ns := executor(t, `"retention": "2s"`)
	ctx := context.Background()
	j := job("kept", nil)
	if err := e.Launch(ctx, j); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if out, err := e.Wait(wctx, j, func() {}); err != nil || out.State != protocol.StateSucceeded {
		t.Fatalf("Wait = %+v, %v", out, err)
	}
	marked := time.Now()
	if err := e.Cleanup(ctx, j); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := client.CoreV1().Pods(ns).Get(ctx, j.Workload, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Since(marked) > 30*time.Second {
			t.Fatal("finished pod still there 30s after a 2s retention")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if kept := time.Since(marked); kept < 2*time.Second {
		t.Errorf("pod deleted %v after it was marked finished, before its 2s retention", kept)
	}
}

// TestCreatesGoOverConnectionsOfTheirOwn: a cluster connected from a kubeconfig sends its
// pod creates over kube.DefaultCreateConns connections, each carrying its equal share (an
// apiserver serves each connection's requests through one goroutine: a busy one gives each
// connection a share, not each request). A proxy before the real apiserver tells which
// connection each create came over.
func TestCreatesGoOverConnectionsOfTheirOwn(t *testing.T) {
	cp := kubetest.Need(t)
	proxy, err := kubetest.NewFaultProxy(cp.URL, kubetest.FaultOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := kubetest.WriteKubeconfig(kc, kubetest.Context{Name: "proxied", Server: proxy.URL(), User: "admin", Token: cp.Admin.BearerToken}); err != nil {
		t.Fatal(err)
	}
	ns := cp.Namespace(t, "conns-"+time.Now().Format("150405.000000")[7:], nil)
	o, err := kube.ParseOptions([]byte(`{"namespace": "` + ns + `", "node_selector": {"dedicated": "builds"}}`))
	if err != nil {
		t.Fatal(err)
	}
	c, err := kube.NewClusters("fleet", kube.ClientOptions{QPS: 100, Burst: 200, Kubeconfig: kc}, slog.Default()).Get("")
	if err != nil {
		t.Fatal(err)
	}
	e := kube.New(c, "t", o)
	ctx := t.Context()
	// One at a time: each create takes the slot that has waited longest, so 3 rounds of the
	// connections give each connection 3 creates, whatever the timing.
	const rounds = 3
	for i := range rounds * kube.DefaultCreateConns {
		if err := e.Launch(ctx, job(fmt.Sprintf("conn-%02d", i), nil)); err != nil {
			t.Fatal(err)
		}
	}
	posts := proxy.PostsByConn()
	if len(posts) != kube.DefaultCreateConns {
		t.Fatalf("creates came over %d connections, want %d: %v", len(posts), kube.DefaultCreateConns, posts)
	}
	for conn, n := range posts {
		if n != rounds {
			t.Errorf("connection %s carried %d creates, want %d: %v", conn, n, rounds, posts)
		}
	}
	pods, err := cp.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pods.Items) != rounds*kube.DefaultCreateConns {
		t.Errorf("%d pods, want %d", len(pods.Items), rounds*kube.DefaultCreateConns)
	}
}
