package cli

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
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
// creating the same pods with 16 concurrent creates, in the same run and with the same client
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
	cs := kubernetes.NewForConfigOrDie(rc)
	opts, err := kube.ParseOptions([]byte(`{"namespace": "` + f.ns + `", "node_selector": {"dedicated": "builds"}, "resources": {"default": "micro"}, "pass_annotations": ["sim.buildfleet.io/"]}`))
	if err != nil {
		b.Fatal(err)
	}
	jobs := make(chan int)
	var g errgroup.Group
	start := time.Now()
	for range 16 {
		g.Go(func() error {
			for i := range jobs {
				req := sim(fmt.Sprintf("bare-%05d", i), hold)
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
	bare := float64(b.N) / time.Since(start).Seconds()

	s := f.settings("a")
	s.KubeQPS, s.KubeBurst = qps, burst
	s.Concurrency = max(256, b.N)
	s.MaxAckPending = max(1000, b.N)
	f.start(f.settings("setup"), nil).stop(b) // provisions the layout; the builds queue up
	var dispatched atomic.Int64
	all := make(chan struct{})
	sub, err := f.nc.Subscribe("buildfleet.events.>", func(m *nats.Msg) {
		if strings.HasSuffix(m.Header.Get(nats.MsgIdHdr), "."+string(protocol.StateDispatched)) && dispatched.Add(1) == int64(b.N) {
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
	b.ResetTimer()
	start = time.Now()
	r := f.start(s, nil)
	select {
	case <-all:
	case <-time.After(5 * time.Minute):
		b.Fatalf("%d of %d builds dispatched after 5m", dispatched.Load(), b.N)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	r.stop(b)
	got := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(bare, "bare-pods/s")
	b.ReportMetric(got, "pods/s")
	b.ReportMetric(got/bare, "ratio")
}
