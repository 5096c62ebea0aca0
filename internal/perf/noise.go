package perf

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// noise measures the paired round's own noise: two bare loops side by side, each a process
// of its own with as many creates at once, counted over the same window as a paired round
// counts the replica and the bare loop. Their ratio would be 1 on a control plane that
// served two equal clients equally; how far it strays is how far a paired round can stray
// with nothing of the replica in it.
func (r *rig) noise(ctx context.Context, rep *Report) error {
	worst := 1.0
	for i := range r.o.Rounds {
		ratio, err := r.noiseRound(ctx, rep, i)
		if err != nil {
			return err
		}
		if d := min(ratio, 1/ratio); d < worst {
			worst = d
		}
	}
	rep.add("B0/B0", "two bare loops side by side, worst round (the lower over the higher)", worst, "×")
	return nil
}

func (r *rig) noiseRound(ctx context.Context, rep *Report, i int) (float64, error) {
	p, err := r.phase(ctx, fmt.Sprintf("noise%d", i))
	if err != nil {
		return 0, err
	}
	spec := func(ns string) bareSpec {
		return bareSpec{Kubeconfig: r.cp.AdminKubeconfig, Namespace: ns, Prefix: "bare-", N: max(10*r.o.Dispatch, 5000),
			Creates: r.o.Creates, Conns: r.o.Conns, QPS: r.o.KubeQPS, Burst: r.o.KubeBurst}
	}
	a, err := r.startBare(spec(p.kns))
	if err != nil {
		return 0, err
	}
	b, err := r.startBare(spec(p.bare))
	if err != nil {
		a.stop()
		return 0, err
	}
	if err = a.run(); err == nil {
		err = b.run()
	}
	if err != nil {
		a.stop()
		b.stop()
		return 0, err
	}
	// About as long as a paired round of this size dispatches for.
	d := max(time.Duration(r.o.Dispatch)*10*time.Millisecond, 3*time.Second)
	select {
	case <-time.After(d):
	case <-ctx.Done():
		a.stop()
		b.stop()
		return 0, ctx.Err()
	}
	aAt, errA := a.end()
	bAt, errB := b.end()
	if errA != nil || errB != nil {
		return 0, fmt.Errorf("noise round %d: %v, %v", i, errA, errB)
	}
	if len(aAt) == 0 || len(bAt) == 0 {
		return 0, fmt.Errorf("noise round %d: the bare loops created %d and %d pods", i, len(aAt), len(bAt))
	}
	latA, latB := meanLatency(aAt, a.sent), meanLatency(bAt, b.sent)
	slices.SortFunc(aAt, time.Time.Compare)
	slices.SortFunc(bAt, time.Time.Compare)
	win := steady(aAt, bAt)
	ca, cb := win.count(aAt), win.count(bAt)
	if ca == 0 || cb == 0 {
		return 0, fmt.Errorf("noise round %d: the bare loops overlapped for %.1f s only (%d and %d pods)", i, win.seconds(), ca, cb)
	}
	w := win.seconds()
	ratio := float64(ca) / float64(cb)
	r.logf("noise round %d: bare loop A %.1f pods/s, B %.1f pods/s over the same %.1f s: %.2f; mean create A %v, B %v", i, float64(ca)/w, float64(cb)/w, w, ratio, latA, latB)
	rep.add("B0/B0", fmt.Sprintf("round %d: two bare loops, %.0f and %.0f pods/s over the same %.1f s", i+1, float64(ca)/w, float64(cb)/w, w), ratio, "×")
	if err := p.scheduled(ctx); err != nil {
		return 0, err
	}
	return ratio, p.end(ctx)
}

// meanLatency is the mean time from a create's sending to its return.
func meanLatency(at, sent []time.Time) time.Duration {
	if len(at) == 0 {
		return 0
	}
	var sum time.Duration
	for i := range at {
		sum += at[i].Sub(sent[i])
	}
	return sum / time.Duration(len(at))
}
