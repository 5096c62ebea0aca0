package worker

import (
	"context"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
)

// wakingTracker wakes its follower from inside Track, before Track returns: what the
// informer does when the pod changes while Track is still setting itself up.
type wakingTracker struct {
	t *testing.T
	l *lot
}

type wakingTracking struct {
	whole bool // set by Track after its wake: a look that sees it false began too soon
	seen  chan bool
}

func (w *wakingTracker) Track(_ build.Job, wake func()) build.Tracking {
	tr := &wakingTracking{seen: make(chan bool, 1)}
	wake()
	w.l.mu.Lock()
	queued := len(w.l.ready)
	w.l.mu.Unlock()
	if queued != 0 {
		w.t.Errorf("a wake during Track queued a look (%d ready) before Track returned", queued)
	}
	tr.whole = true
	return tr
}

func (tr *wakingTracking) Look(context.Context) (build.Look, error) {
	select {
	case tr.seen <- tr.whole:
	default:
	}
	return build.Look{Next: time.Now().Add(time.Hour)}, nil
}

func (tr *wakingTracking) Stop() {}

// TestAWakeDuringTrackWaitsForTheTrackingToBeWhole: the informer may wake a parked build
// before Track has returned its Tracking; the look that wake asks for comes only after park
// has set the build up (the CI's race detector once caught a look reading both as they were
// written). The lot's loop is not running while park runs, so a look queued too soon is seen
// in the lot itself, whatever the timing.
func TestAWakeDuringTrackWaitsForTheTrackingToBeWhole(t *testing.T) {
	l := newLot()
	tracker := &wakingTracker{t: t, l: l}
	ctx, cancel := context.WithCancel(t.Context())
	s := &session{ctx: t.Context(), job: &build.Job{Deadline: time.Now().Add(time.Hour)}}
	if !l.park(s, tracker) {
		t.Fatal("the lot refused to park a build before its loop ended")
	}
	l.mu.Lock()
	ready := l.ready
	l.mu.Unlock()
	if len(ready) != 1 {
		t.Fatalf("after park, %d looks are queued, want the first look alone", len(ready))
	}
	p := ready[0]

	var g errgroup.Group
	g.Go(func() error { return l.run(ctx, &g) })
	select {
	case whole := <-p.tr.(*wakingTracking).seen:
		if !whole {
			t.Error("the first look began before Track had returned")
		}
	case <-time.After(time.Minute):
		t.Fatal("no look came after park")
	}
	l.leave(p)
	cancel()
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}
