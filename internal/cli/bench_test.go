package cli

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// BenchmarkBuildRoundTrip measures one build of `true` through a real nats-server and one
// replica with the process executor: Submit → queued → dispatched → running → succeeded.
func BenchmarkBuildRoundTrip(b *testing.B) {
	f := newFleet(b)
	f.start(f.settings("a"), nil)
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("bench-%d", i)
		f.submit(id, "true")
		evs := f.await(id, 30*time.Second)
		if evs[len(evs)-1].Data.State != protocol.StateSucceeded {
			b.Fatalf("%s: %v", id, states(evs))
		}
	}
}

// BenchmarkThroughput submits b.N builds of `true` at once and waits for all of them.
func BenchmarkThroughput(b *testing.B) {
	f := newFleet(b)
	f.start(f.settings("a"), nil)
	b.ResetTimer()
	for i := range b.N {
		f.submit(fmt.Sprintf("tp-%d", i), "true")
	}
	waitFor(b, 5*time.Minute, "every build finished", func() bool {
		return f.pending("BUILDFLEET_REQUESTS") == 0
	})
}

// BenchmarkKubeDispatch measures how fast one replica turns b.N queued builds into pods on the
// test control plane (queued → pod created → dispatched event), against a bare client-go loop
// creating the same pods with 64 concurrent creates, in the same run and with the same client
// rate limits. Run it with a fixed count: -bench KubeDispatch -benchtime 500x.
func BenchmarkKubeDispatch(b *testing.B) {
	f := newKubeFleet(b, "10m")
	const qps, burst = 5000, 10000
	// Pods wait (start-ms) once scheduled, so kwok's work does not run into the measurement.
	hold := map[string]string{"start-ms": "600000"}

	rc, err := clientcmd.BuildConfigFromFlags("", f.cp.WorkerKubeconfig)
	if err != nil {
		b.Fatal(err)
	}
	rc.QPS, rc.Burst = qps, burst
	rc.ContentType = "application/vnd.kubernetes.protobuf" // as the worker's clients do
	cs := kubernetes.NewForConfigOrDie(rc)
	opts, err := kube.ParseOptions([]byte(`{"namespace": "` + f.ns + `", "node_selector": {"dedicated": "builds"}, "resources": {"default": "micro"}, "pass_annotations": ["sim.buildfleet.io/"]}`))
	if err != nil {
		b.Fatal(err)
	}
	bareLoop := func(round string) float64 {
		jobs := make(chan int)
		var g errgroup.Group
		start := time.Now()
		for range 64 {
			g.Go(func() error {
				for i := range jobs {
					req := sim(fmt.Sprintf("bare%s-%05d", round, i), hold)
					job := build.NewJob(req, protocol.Record{Target: "runc", TimeoutSeconds: 3600})
					pod, err := kube.Pod(job, "bare", opts)
					if err != nil {
						return err
					}
					if _, err := cs.CoreV1().Pods(f.ns).Create(context.Background(), pod, metav1.CreateOptions{}); err != nil {
						return err
					}
				}
				return nil
			})
		}
		for i := range b.N {
			jobs <- i
		}
		close(jobs)
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
		rate := float64(b.N) / time.Since(start).Seconds()
		f.awaitScheduled(b)
		return rate
	}
	// The bare loop runs before and after buildfleet, and the two are averaged: the control
	// plane's speed drifts as it fills up.
	bare := bareLoop("a")

	s := f.settings("a")
	s.KubeQPS, s.KubeBurst = qps, burst
	s.AckWait = 30 * time.Second // the default: heartbeats at the test's 2s would be most of the work
	s.Concurrency = max(256, b.N)
	s.MaxAckPending = max(1000, b.N)
	f.start(f.settings("setup"), nil).stop(b) // provisions the layout; the builds queue up
	var dispatched atomic.Int64
	var first, last atomic.Int64 // unix nanos of the first and last dispatched event
	all := make(chan struct{})
	sub, err := f.nc.Subscribe("buildfleet.events.>", func(m *nats.Msg) {
		if !strings.HasSuffix(m.Header.Get(nats.MsgIdHdr), "."+string(protocol.StateDispatched)) {
			return
		}
		n := dispatched.Add(1)
		now := time.Now().UnixNano()
		first.CompareAndSwap(0, now)
		if n == int64(b.N) {
			last.Store(now)
			close(all)
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	for i := range b.N {
		f.submitReq(sim(fmt.Sprintf("d%05d", i), hold))
	}
	heapBefore := heapInUse()
	b.ResetTimer()
	start := time.Now()
	r := f.start(s, nil)
	select {
	case <-all:
	case <-time.After(5 * time.Minute):
		b.Fatalf("%d of %d builds dispatched after 5m", dispatched.Load(), b.N)
	}
	b.StopTimer()
	// Memory held while every build is in flight (the replica, and the in-process
	// nats-server's share of it): what 10,000 running builds per replica would cost.
	heldPerBuild := float64(heapInUse()-heapBefore) / float64(b.N) / 1024
	r.stop(b)
	// The rate is measured from the first pod to the last: the replica's start (connecting,
	// provisioning, binding the consumer) is reported on its own.
	startup := time.Duration(first.Load() - start.UnixNano())
	got := float64(b.N) / time.Duration(last.Load()-start.UnixNano()).Seconds()
	if b.N > 1 {
		got = float64(b.N-1) / time.Duration(last.Load()-first.Load()).Seconds()
	}
	f.awaitScheduled(b)
	bare = (bare + bareLoop("b")) / 2
	b.ReportMetric(bare, "bare-pods/s")
	b.ReportMetric(got, "pods/s")
	b.ReportMetric(got/bare, "ratio")
	b.ReportMetric(float64(startup.Milliseconds()), "startup-ms")
	b.ReportMetric(heldPerBuild, "heap-KiB/build")
}

func heapInUse() int64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapInuse)
}

// awaitScheduled waits until the scheduler has bound every pod of the namespace, so that one
// round's backlog does not slow the next.
func (f *kubeFleet) awaitScheduled(b testing.TB) {
	waitFor(b, 2*time.Minute, "every pod scheduled", func() bool {
		pods, err := f.admin.CoreV1().Pods(f.ns).List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName="})
		return err == nil && len(pods.Items) == 0
	})
}

// BenchmarkTracingCost measures what tracing costs a build: b.N builds of `true` through one
// replica, untraced (no tracer provider, as when no OTEL_* variable is set) and traced (the
// SDK sampling every span into a batch processor, whose exporter drops them), alternating
// twice in the same run. It reports ms/build of each and their ratio (traced/untraced).
func BenchmarkTracingCost(b *testing.B) {
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	b.Cleanup(func() { otel.SetTextMapPropagator(prev) })
	run := func(tp trace.TracerProvider) time.Duration {
		f := newFleet(b)
		r := f.start(f.settings("a"), func(c *worker.Config) { c.TracerProvider = tp })
		defer r.stop(b)
		cl, err := client.New(f.nc, client.WithTracerProvider(tp))
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		for i := range b.N {
			if _, err := cl.Submit(context.Background(), protocol.BuildRequest{ID: fmt.Sprintf("tc-%d", i), Image: "busybox", Command: []string{"true"}}); err != nil {
				b.Fatal(err)
			}
		}
		waitFor(b, 5*time.Minute, "every build finished", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
		return time.Since(start)
	}
	sdk := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
	defer func() { _ = sdk.Shutdown(context.Background()) }()
	var untraced, traced time.Duration
	b.ResetTimer()
	for range 2 {
		untraced += run(noop.NewTracerProvider())
		traced += run(sdk)
	}
	per := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(2*b.N) }
	b.ReportMetric(per(untraced), "untraced-ms/build")
	b.ReportMetric(per(traced), "traced-ms/build")
	b.ReportMetric(per(traced)/per(untraced), "ratio")
}
