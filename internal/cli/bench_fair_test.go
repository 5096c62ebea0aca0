package cli

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// fairBench sizes BenchmarkKubeFairShare; FAIR_A, FAIR_B, FAIR_CAP, FAIR_RUN_MS and
// FAIR_LATE_MS override the figures.
type fairBench struct {
	a, b     int           // builds of tenant A, then of tenant B
	cap      int           // the fleet's cap on running builds
	run      time.Duration // how long each build runs
	late     time.Duration // B submits this long after A has
	tenanted bool          // fair share on (tenants from an annotation), or one FIFO
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// fairRun is what one run measured.
type fairRun struct {
	waitB      []time.Duration // each of B's builds: queued → dispatched
	admittedA  []uint64        // the run stream sequence of each of A's builds: the admission order
	admittedB  []uint64
	throughput float64 // builds dispatched per second, first dispatch to last
	elapsed    time.Duration
}

// BenchmarkKubeFairShare is issue 12's benchmark on the test control plane: tenant A submits
// 5,000 builds, tenant B 50 a few seconds later, the fleet is capped at 200 running builds,
// each build runs for a few seconds in kwok. It measures when B's builds start (queued →
// dispatched, p50 and p99) with fair share and with one FIFO queue, against B's 50 alone on
// an empty fleet, and the dispatch throughput of the fair and the FIFO runs. Each run gets a
// fresh NATS and namespace. Run it once: -bench KubeFairShare -benchtime 1x.
func BenchmarkKubeFairShare(b *testing.B) {
	cfg := fairBench{a: envInt("FAIR_A", 5000), b: envInt("FAIR_B", 50), cap: envInt("FAIR_CAP", 200),
		run: time.Duration(envInt("FAIR_RUN_MS", 3000)) * time.Millisecond, late: time.Duration(envInt("FAIR_LATE_MS", 3000)) * time.Millisecond}
	// FAIR_ARMS=fifo runs only the FIFO arm (to measure a commit from before fair share).
	arms := os.Getenv("FAIR_ARMS")
	if arms == "" {
		arms = "empty,fifo,fair"
	}
	arm := func(name string, c fairBench) fairRun {
		if !strings.Contains(arms, name) {
			return fairRun{throughput: 1}
		}
		return runFair(b, c)
	}
	for b.Loop() {
		alone := cfg
		alone.a = 0
		empty := arm("empty", alone)
		fifo := arm("fifo", cfg)
		cfg.tenanted = true
		fair := arm("fair", cfg)
		b.ReportMetric(pct(empty.waitB, 50).Seconds(), "empty-p50-s")
		b.ReportMetric(pct(empty.waitB, 99).Seconds(), "empty-p99-s")
		b.ReportMetric(pct(fifo.waitB, 50).Seconds(), "fifo-B-p50-s")
		b.ReportMetric(pct(fifo.waitB, 99).Seconds(), "fifo-B-p99-s")
		b.ReportMetric(pct(fair.waitB, 50).Seconds(), "fair-B-p50-s")
		b.ReportMetric(pct(fair.waitB, 99).Seconds(), "fair-B-p99-s")
		b.ReportMetric(fifo.throughput, "fifo-builds/s")
		b.ReportMetric(fair.throughput, "fair-builds/s")
		b.ReportMetric(fair.throughput/fifo.throughput, "fair/fifo")
		b.Logf("A %d, B %d (%s later), cap %d, builds of %s: B waits p50/p99 alone %s/%s, FIFO %s/%s, fair %s/%s; dispatch %.1f builds/s FIFO, %.1f fair (%.3f); runs took %s and %s",
			cfg.a, cfg.b, cfg.late, cfg.cap, cfg.run, pct(empty.waitB, 50), pct(empty.waitB, 99), pct(fifo.waitB, 50), pct(fifo.waitB, 99),
			pct(fair.waitB, 50), pct(fair.waitB, 99), fifo.throughput, fair.throughput, fair.throughput/fifo.throughput,
			fifo.elapsed.Round(time.Second), fair.elapsed.Round(time.Second))
	}
}

// pct is the p-th percentile of ds (nearest rank).
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(i-1, 0)]
}

func runFair(b testing.TB, cfg fairBench) fairRun {
	f := newKubeFleet(b, "1s")
	if cfg.tenanted {
		policy := "policy:\n  tenants:\n    from: [\"annotation:buildfleet.io/tenant\"]\n"
		body, err := os.ReadFile(f.targets)
		if err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(f.targets, append(body, policy...), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	s := f.settings("a")
	s.KubeQPS, s.KubeBurst = 5000, 10000
	s.AckWait = 30 * time.Second
	s.Concurrency = cfg.cap + 64
	s.MaxAckPending = cfg.cap
	s.LogLive = "never" // output is not what this measures
	total := cfg.a + cfg.b
	var dispatched, ended atomic.Int64
	var first, last atomic.Int64
	done := make(chan struct{})
	sub, err := f.nc.Subscribe("buildfleet.events.>", func(m *nats.Msg) {
		id := m.Header.Get(nats.MsgIdHdr)
		switch {
		case strings.HasSuffix(id, "."+string(protocol.StateDispatched)):
			dispatched.Add(1)
			now := time.Now().UnixNano()
			first.CompareAndSwap(0, now)
			last.Store(now)
		case strings.HasSuffix(id, "."+string(protocol.StateSucceeded)), strings.HasSuffix(id, "."+string(protocol.StateFailed)),
			strings.HasSuffix(id, "."+string(protocol.StateTimedOut)), strings.HasSuffix(id, "."+string(protocol.StateRejected)):
			if ended.Add(1) == int64(total) {
				close(done)
			}
		}
	})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	r := f.start(s, nil)
	submit := func(prefix, tenant string, n int) {
		var g errgroup.Group
		g.SetLimit(32)
		for i := range n {
			g.Go(func() error {
				req := sim(fmt.Sprintf("%s%05d", prefix, i), map[string]string{"run-ms": strconv.Itoa(int(cfg.run.Milliseconds()))})
				req.Annotations[protocol.AnnotationTenant] = tenant
				req.Annotations[protocol.AnnotationTarget] = "runc"
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				_, err := f.cl.Submit(ctx, req)
				return err
			})
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
	}
	start := time.Now()
	submit("a", "a", cfg.a)
	if cfg.a > 0 {
		time.Sleep(cfg.late) // the scenario: B comes a few seconds after A (0: at once)
	}
	submit("b", "b", cfg.b)
	select {
	case <-done:
	case <-time.After(30 * time.Minute):
		b.Fatalf("%d of %d builds ended after 30m (%d dispatched)", ended.Load(), total, dispatched.Load())
	}
	elapsed := time.Since(start)
	r.stop(b)
	out := fairRun{elapsed: elapsed}
	if n := dispatched.Load(); n > 1 {
		out.throughput = float64(n-1) / time.Duration(last.Load()-first.Load()).Seconds()
	}
	for i := range cfg.b {
		rec := f.status(fmt.Sprintf("b%05d", i))
		if rec.DispatchedAt == nil {
			b.Fatalf("b%05d: never dispatched (%s)", i, rec.State)
		}
		out.waitB = append(out.waitB, rec.DispatchedAt.Sub(rec.QueuedAt))
		out.admittedB = append(out.admittedB, rec.Seq)
	}
	for i := range cfg.a {
		out.admittedA = append(out.admittedA, f.status(fmt.Sprintf("a%05d", i)).Seq)
	}
	return out
}

// TestKubeFairShareSmall runs BenchmarkKubeFairShare's scenario small, so that it cannot rot,
// and checks the order it is about, as the run stream's sequence (the admission order) says
// it: with one FIFO queue every build of the late tenant B is admitted after the last of A's
// backlog; with fair share all of B's go ahead of some of A's. (The A backlog takes five
// rounds of 1s builds to drain; B comes at once.)
func TestKubeFairShareSmall(t *testing.T) {
	cfg := fairBench{a: 60, b: 5, cap: 10, run: time.Second}
	for _, tenanted := range []bool{false, true} {
		cfg.tenanted = tenanted
		got := runFair(t, cfg)
		lastB, overtaken := slices.Max(got.admittedB), 0
		for _, seq := range got.admittedA {
			if seq > lastB {
				overtaken++
			}
		}
		switch {
		case !tenanted && overtaken != 0:
			t.Errorf("one FIFO queue: %d of A's builds were admitted after B's last; want none", overtaken)
		case tenanted && overtaken == 0:
			t.Errorf("fair share: every build of A was admitted before B's last; want B ahead of A's backlog")
		}
		t.Logf("tenanted %v: B waits p50 %s p99 %s; %d of A's builds admitted after B's last; %.1f builds/s",
			tenanted, pct(got.waitB, 50), pct(got.waitB, 99), overtaken, got.throughput)
	}
}
