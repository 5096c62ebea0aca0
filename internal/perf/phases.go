package perf

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// AckWait is the replicas' BUILDFLEET_ACK_WAIT (the default): a SIGKILLed replica's builds
// must all be owned again within AckWait + 5 s.
const AckWait = 30 * time.Second

// sim is a request whose pod kwok drives by the given sim.buildfleet.io annotations.
func sim(id string, ann map[string]string) protocol.BuildRequest {
	a := map[string]string{}
	for k, v := range ann {
		a["sim.buildfleet.io/"+k] = v
	}
	return protocol.BuildRequest{ID: id, Image: "registry.example/ci/node:22", Command: []string{"make", "test"},
		Annotations: a, Pipeline: "org/app", Job: "pull request #12"}
}

// parked pods are scheduled but never start within a phase: nothing kwok does afterwards
// runs into the measurement.
var parked = map[string]string{"start-ms": "3600000"}

// submit publishes the builds named by ids, 32 at a time.
func (p *phase) submit(ctx context.Context, ids []string, ann map[string]string) error {
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(32)
	for _, id := range ids {
		g.Go(func() error {
			_, err := p.cl.Submit(ctx, sim(id, ann))
			return err
		})
	}
	return g.Wait()
}

func names(prefix string, n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%05d", prefix, i)
	}
	return ids
}

// bareRate creates n pods with o.Creates creates at once and returns the rate.
func (p *phase) bareRate(ctx context.Context, n int) (float64, error) {
	start := time.Now()
	if _, err := p.bareLoop.loop(ctx, names("bare-", n), p.o.Creates); err != nil {
		return 0, err
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// dispatch measures B0 and P1: rounds of one replica turning o.Dispatch queued builds into
// pods, each round between two rounds of the bare loop creating as many pods; each
// replica round is compared with the mean of the two bare rounds around it (the control
// plane's speed drifts).
func (r *rig) dispatch(ctx context.Context, rep *Report) error {
	n := r.o.Dispatch
	bare := make([]float64, 0, r.o.Rounds+1)
	got := make([]float64, 0, r.o.Rounds)
	var cpu time.Duration // the replicas' CPU from ready to their last dispatch
	bareRound := func(i int) error {
		p, err := r.phase(ctx, fmt.Sprintf("b0r%d", i))
		if err != nil {
			return err
		}
		rate, err := p.bareRate(ctx, n)
		if err == nil {
			err = p.scheduled(ctx)
		}
		if err == nil {
			err = p.end(ctx)
		}
		r.logf("B0 round %d: %.1f pods/s", i, rate)
		bare = append(bare, rate)
		return err
	}
	if err := bareRound(0); err != nil {
		return err
	}
	for i := range r.o.Rounds {
		p, err := r.phase(ctx, fmt.Sprintf("p1r%d", i))
		if err != nil {
			return err
		}
		ids, err := p.queue(ctx, n)
		if err != nil {
			return err
		}
		a, err := p.dispatcher(ctx, n)
		if err != nil {
			return err
		}
		u0, err := ProcUsage(a.cmd.Process.Pid)
		if err != nil {
			return err
		}
		if dir := r.o.ProfileDir; dir != "" && i == 0 {
			// A CPU profile of the first round's dispatching, while it lasts.
			go func() {
				if err := a.profile(dir, "profile?seconds=5"); err != nil {
					r.logf("P1 CPU profile: %v", err)
				}
			}()
		}
		if err := p.dispatched(ctx, fmt.Sprintf("P1 round %d", i), n); err != nil {
			return err
		}
		u1, err := ProcUsage(a.cmd.Process.Pid)
		if err != nil {
			return err
		}
		cpu += u1.CPU - u0.CPU
		at := p.dispatchedAt(ids)
		rate := float64(n-1) / at[len(at)-1].Sub(at[0]).Seconds()
		r.logf("P1 round %d: %.1f pods/s", i, rate)
		got = append(got, rate)
		if err := p.scheduled(ctx); err != nil {
			return err
		}
		if err := p.end(ctx); err != nil {
			return err
		}
		if err := bareRound(i + 1); err != nil {
			return err
		}
	}
	rep.add("B0", "bare client-go create loop alone, mean of rounds", mean(bare), "pods/s")
	for i, g := range got {
		ratio := g / ((bare[i] + bare[i+1]) / 2)
		rep.add("P1", fmt.Sprintf("dispatch alone, round %d (/ B0 alone %.2f)", i+1, ratio), g, "pods/s")
	}
	rep.add("P1", "replica CPU per dispatched build, from ready to its last dispatch", ms(cpu)/float64(n*len(got)), "ms")
	r.p1 = mean(got)

	worst := 0.0
	for i := range r.o.Rounds {
		ratio, err := r.paired(ctx, rep, i)
		if err != nil {
			return err
		}
		if i == 0 || ratio < worst {
			worst = ratio
		}
	}
	rep.bound("P1/B0", "dispatch beside the bare loop, same window, worst round", worst, "×", "≥ 0.95", worst >= 0.95)
	return nil
}

// queue has n parked builds queued in p, for a replica to dispatch (dispatcher): the builds
// queue up first (a replica provisions the layout, then goes), so that what follows
// measures dispatching, not submitting.
func (p *phase) queue(ctx context.Context, n int) ([]string, error) {
	setup, err := p.start(ctx, "setup")
	if err != nil {
		return nil, err
	}
	// Stopped as a replica is, so that it hands the request consumer's pin on at once
	// (killed, the pin would hold the next replica's scheduler off for its TTL).
	if err := setup.signal(syscall.SIGTERM); err != nil {
		return nil, err
	}
	select {
	case <-setup.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	ids := names("d", n)
	return ids, p.submit(ctx, ids, parked)
}

// dispatcher starts the replica that dispatches the n queued builds.
func (p *phase) dispatcher(ctx context.Context, n int) (*replica, error) {
	return p.start(ctx, "a", "BUILDFLEET_CONCURRENCY="+fmt.Sprint(max(n, Shipped.Concurrency)))
}

// dispatched waits until n of p's builds are dispatched.
func (p *phase) dispatched(ctx context.Context, what string, n int) error {
	return p.seen.await(ctx, 10*time.Minute, fmt.Sprintf("%s: %d builds dispatched", what, n), func() bool {
		return p.seen.counts[protocol.StateDispatched] >= n
	})
}

// dispatchedAt is when each of the builds was seen dispatched, in order.
func (p *phase) dispatchedAt(ids []string) []time.Time {
	p.seen.mu.Lock()
	defer p.seen.mu.Unlock()
	at := make([]time.Time, 0, len(ids))
	for _, id := range ids {
		if t, ok := p.seen.events[id][protocol.StateDispatched]; ok {
			at = append(at, t)
		}
	}
	slices.SortFunc(at, time.Time.Compare)
	return at
}

// paired is one round of P1/B0 with both at once: the replica dispatching o.Dispatch queued
// builds while the bare loop, a process of its own as the replica is, creates pods with as
// many creates at once, in namespaces of the same control plane. The bare loop goes before
// the replica starts and stops after its last dispatch, so both are counted over the
// replica's whole dispatching (less its first tenth, its ramp) however small the round,
// and meet the same control plane: its speed drifts from one round to the next by more
// than the 5% measured, and the replica's and NATS's CPU, which the 2 cores share with it
// here and not in a cluster, slows both alike. The ratio is the replica's count over the
// bare loop's.
func (r *rig) paired(ctx context.Context, rep *Report, i int) (float64, error) {
	n := r.o.Dispatch
	p, err := r.phase(ctx, fmt.Sprintf("pair%d", i))
	if err != nil {
		return 0, err
	}
	ids, err := p.queue(ctx, n)
	if err != nil {
		return 0, err
	}
	// Room for the pods it makes while the replica starts: it rarely makes half.
	bp, err := r.startBare(bareSpec{Kubeconfig: r.cp.AdminKubeconfig, Namespace: p.bare, Prefix: "bare-", N: max(10*n, 5000),
		Creates: r.o.Creates, Conns: r.o.Conns, QPS: r.o.KubeQPS, Burst: r.o.KubeBurst})
	if err != nil {
		return 0, err
	}
	t0 := time.Now()
	err = bp.run()
	if err == nil {
		_, err = p.dispatcher(ctx, n)
	}
	if err == nil {
		err = p.dispatched(ctx, fmt.Sprintf("paired round %d", i), n)
	}
	if err != nil {
		bp.stop()
		return 0, err
	}
	bareAt, err := bp.end()
	if err != nil {
		return 0, err
	}
	repAt := p.dispatchedAt(ids)
	if len(bareAt) == 0 {
		return 0, fmt.Errorf("paired round %d: the bare loop created no pod while the replica dispatched", i)
	}
	slices.SortFunc(bareAt, time.Time.Compare)
	since := func(t time.Time) string { return t.Sub(t0).Round(time.Millisecond).String() }
	r.logf("paired round %d, from the bare loop's start: replica dispatched from %s to %s, bare loop created from %s to %s",
		i, since(repAt[0]), since(repAt[len(repAt)-1]), since(bareAt[0]), since(bareAt[len(bareAt)-1]))
	win := steady(repAt, bareAt)
	cr, cb := win.count(repAt), win.count(bareAt)
	w := win.seconds()
	ratio := float64(cr) / float64(cb)
	// The same, by the pods the control plane's watch shows created in each namespace.
	p.seen.mu.Lock()
	pods := float64(win.count(p.seen.addedIn[p.kns])) / float64(win.count(p.seen.addedIn[p.bare]))
	p.seen.mu.Unlock()
	r.logf("paired round %d: replica %.1f pods/s, bare loop %.1f pods/s over the same %.1f s: %.3f (by pods seen created: %.3f)", i, float64(cr)/w, float64(cb)/w, w, ratio, pods)
	rep.add("P1/B0", fmt.Sprintf("round %d beside the bare loop: replica %.0f, bare loop %.0f pods/s over the same %.1f s (pods seen created: %.2f)", i+1, float64(cr)/w, float64(cb)/w, w, pods), ratio, "×")
	if err := p.scheduled(ctx); err != nil {
		return 0, err
	}
	return ratio, p.end(ctx)
}

// window is a stretch of time two series of events are counted over.
type window struct{ lo, hi time.Time }

// steady is the middle of the time two sorted series of events share, where both go at
// their steady pace: a replica ramps up in the first tenth, and in the last the
// dispatches of its last creates all come at once.
func steady(a, b []time.Time) window {
	lo, hi := a[0], a[len(a)-1]
	if b[0].After(lo) {
		lo = b[0]
	}
	if last := b[len(b)-1]; last.Before(hi) {
		hi = last
	}
	return window{lo.Add(hi.Sub(lo) / 10), hi.Add(-hi.Sub(lo) / 10)}
}

// count is how many of at fall in w.
func (w window) count(at []time.Time) int {
	c := 0
	for _, t := range at {
		if !t.Before(w.lo) && !t.After(w.hi) {
			c++
		}
	}
	return c
}

func (w window) seconds() float64 { return w.hi.Sub(w.lo).Seconds() }

// latency measures P2 and then P5: builds submitted at half of P1's rate, each timed from
// its submission to its pod's creation (and the bare loop's creates at that rate, from the
// call to the pod), then the same builds finishing, each timed from its pod's end to its
// lifecycle event. Both are seen by this process: the pods by an informer, the events by
// a subscription.
func (r *rig) latency(ctx context.Context, rep *Report) error {
	p, err := r.phase(ctx, "latency")
	if err != nil {
		return err
	}
	if _, err := p.start(ctx, "a"); err != nil {
		return err
	}
	n := r.o.Latency
	rate := r.o.LatencyRate
	if rate == 0 {
		rate = r.p1 / 2
	}
	every := time.Duration(float64(time.Second) / rate)
	// paced calls f for each id at the rate, each in a goroutine of its own, noting when.
	paced := func(ids []string, f func(context.Context, string) error) (map[string]time.Time, error) {
		at := make(map[string]time.Time, len(ids))
		g, gctx := errgroup.WithContext(ctx)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for _, id := range ids {
			<-tick.C
			at[id] = time.Now()
			g.Go(func() error { return f(gctx, id) })
		}
		return at, g.Wait()
	}
	bareIDs := names("bare-", n)
	bareAt, err := paced(bareIDs, p.bareLoop.create)
	if err != nil {
		return err
	}
	ids := names("l", n)
	// The builds run 15 s, so they end at the rate they started, while later ones start.
	run := map[string]string{"start-ms": "50", "run-ms": "15000"}
	subAt, err := paced(ids, func(ctx context.Context, id string) error {
		_, err := p.cl.Submit(ctx, sim(id, run))
		return err
	})
	if err != nil {
		return err
	}
	s := p.seen
	err = s.await(ctx, 10*time.Minute, "every P2 pod seen", func() bool {
		for _, id := range bareIDs {
			if _, ok := s.added["build-"+id]; !ok {
				return false
			}
		}
		for _, id := range ids {
			if _, ok := s.added["build-"+id]; !ok {
				return false
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	lat := func(ids []string, from map[string]time.Time) []float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		out := make([]float64, 0, len(ids))
		for _, id := range ids {
			out = append(out, ms(s.added["build-"+id].Sub(from[id])))
		}
		return out
	}
	bareLat, subLat := lat(bareIDs, bareAt), lat(ids, subAt)
	rep.add("P2", fmt.Sprintf("submit → pod created at %.0f builds/s, p50", rate), pct(subLat, 50), "ms")
	rep.add("P2", "submit → pod created, p99", pct(subLat, 99), "ms")
	rep.add("P2", "bare create → pod seen, p50", pct(bareLat, 50), "ms")
	rep.add("P2", "bare create → pod seen, p99", pct(bareLat, 99), "ms")
	rep.add("P2", "buildfleet's own part, p50", pct(subLat, 50)-pct(bareLat, 50), "ms")
	rep.add("P2", "buildfleet's own part, p99", pct(subLat, 99)-pct(bareLat, 99), "ms")

	err = s.await(ctx, 10*time.Minute, "every P5 build succeeded", func() bool {
		return s.counts[protocol.StateSucceeded] >= n
	})
	if err != nil {
		return err
	}
	s.mu.Lock()
	fin := make([]float64, 0, n)
	for _, id := range ids {
		fin = append(fin, ms(s.events[id][protocol.StateSucceeded].Sub(s.ended["build-"+id])))
	}
	s.mu.Unlock()
	rep.add("P5", fmt.Sprintf("pod ended → succeeded event, %d builds ending, p50", n), pct(fin, 50), "ms")
	rep.add("P5", "pod ended → succeeded event, p99", pct(fin, 99), "ms")
	return p.end(ctx)
}

// hold has one replica hold n running builds; for the large size it measures P3 on it.
// Then P4: a second replica starts, the first is sent SIGTERM, and the time until the
// second owns every build is taken; then a third starts, the second is SIGKILLed, and
// again.
func (r *rig) hold(ctx context.Context, rep *Report, size string, n int, large bool) error {
	p, err := r.phase(ctx, "hold"+size)
	if err != nil {
		return err
	}
	ackWait := "BUILDFLEET_ACK_WAIT=" + AckWait.String()
	a, err := p.start(ctx, "a", ackWait)
	if err != nil {
		return err
	}
	idle, err := ProcUsage(a.cmd.Process.Pid)
	if err != nil {
		return err
	}
	ids := names("h", n)
	r.logf("P3/P4 %s: submitting %d builds", size, n)
	if err := p.submit(ctx, ids, map[string]string{"start-ms": "50", "run-ms": "36000000"}); err != nil {
		return err
	}
	s := p.seen
	err = s.await(ctx, 20*time.Minute, fmt.Sprintf("%d builds running", n), func() bool {
		return s.counts[protocol.StateRunning] >= n
	})
	if err != nil {
		return err
	}
	r.logf("P3/P4 %s: %d builds running", size, n)
	if large {
		if err := r.holding(ctx, rep, a, idle, n); err != nil {
			return err
		}
	}
	if err := p.watchOwners(ctx); err != nil {
		return err
	}
	// Counted as records change, not by scanning every build on each change: the
	// benchmark's own CPU must not fall in the measured takeover.
	owned := func(by string) func() bool {
		return func() bool { return s.owns[by] == n }
	}
	b, err := p.start(ctx, "b", ackWait)
	if err != nil {
		return err
	}
	// The takeovers' CPU profiles: the adopter's while it takes over, each waited for before
	// the adopter is killed.
	var profiling sync.WaitGroup
	profile := func(rep *replica, d time.Duration) {
		if dir := r.o.ProfileDir; dir != "" && large {
			profiling.Go(func() {
				if err := rep.profile(dir, fmt.Sprintf("profile?seconds=%d", int(d/time.Second))); err != nil {
					r.logf("P4 CPU profile of %s: %v", rep.name, err)
				}
			})
		}
	}
	profile(b, 5*time.Second)
	sent := time.Now()
	if err := a.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := s.await(ctx, 5*time.Minute, "SIGTERM: every build owned by b", owned("b")); err != nil {
		return err
	}
	took := time.Since(sent)
	<-a.done
	limit := time.Duration(max(2, n/1000)) * time.Second
	rep.bound("P4", fmt.Sprintf("SIGTERM: %d builds all owned by another replica", n), took.Seconds(), "s",
		fmt.Sprintf("≤ %s", limit), took <= limit)
	if large {
		if u, err := ProcUsage(b.cmd.Process.Pid); err == nil {
			rep.add("P4", "the adopter's RSS after", float64(u.RSS)/(1<<20), "MiB")
		}
	}
	c, err := p.start(ctx, "c", ackWait)
	if err != nil {
		return err
	}
	profiling.Wait()
	profile(c, AckWait+5*time.Second)
	sent = time.Now()
	if err := b.signal(syscall.SIGKILL); err != nil {
		return err
	}
	if err := s.await(ctx, 5*time.Minute, "SIGKILL: every build owned by c", owned("c")); err != nil {
		return err
	}
	took = time.Since(sent)
	profiling.Wait()
	rep.bound("P4", fmt.Sprintf("SIGKILL: %d builds all owned again", n), took.Seconds(), "s",
		fmt.Sprintf("≤ AckWait + 5 s = %s", AckWait+5*time.Second), took <= AckWait+5*time.Second)
	return p.end(ctx)
}

// holding measures P3 on replica a, holding n running builds: RSS over 20 s once settled,
// heap in use and goroutines from its metrics, its CPU over the 20 s.
func (r *rig) holding(ctx context.Context, rep *Report, a *replica, idle Usage, n int) error {
	pid := a.cmd.Process.Pid
	select { // let the last launches' garbage be collected
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(10 * time.Second):
	}
	u0, err := ProcUsage(pid)
	if err != nil {
		return err
	}
	peak := u0.RSS
	const window = 20 * time.Second
	start := time.Now()
	for time.Since(start) < window {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
		u, err := ProcUsage(pid)
		if err != nil {
			return err
		}
		peak = max(peak, u.RSS)
	}
	u1, err := ProcUsage(pid)
	if err != nil {
		return err
	}
	m, err := a.metrics()
	if err != nil {
		return err
	}
	mib := func(b int64) float64 { return float64(b) / (1 << 20) }
	limit := int64(256) << 20
	rep.bound("P3", fmt.Sprintf("RSS holding %d running builds, peak over %s", n, window), mib(peak), "MiB",
		"≤ 256 MiB", peak <= limit)
	rep.add("P3", "RSS per running build, above the idle replica's", float64(peak-idle.RSS)/float64(n)/1024, "KiB")
	rep.add("P3", "idle replica's RSS", mib(idle.RSS), "MiB")
	rep.add("P3", "heap in use", m["go_memstats_heap_inuse_bytes"]/(1<<20), "MiB")
	rep.add("P3", "goroutines", m["go_goroutines"], "")
	rep.add("P3", "CPU while holding", (u1.CPU-u0.CPU).Seconds()/time.Since(start).Seconds(), "cores")
	if dir := r.o.ProfileDir; dir != "" {
		for _, prof := range []string{"heap", "goroutine"} {
			if err := a.profile(dir, prof); err != nil {
				return err
			}
		}
	}
	return nil
}

func mean(xs []float64) float64 {
	t := 0.0
	for _, x := range xs {
		t += x
	}
	return t / float64(max(1, len(xs)))
}

// pct is the p-th percentile of xs (nearest rank).
func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}
