package worker

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
)

// lot holds the sessions parked while their workloads run: what a running build costs the
// replica is its session's state, not a goroutine. A session parks after its launch (track,
// when its executor is a Tracker); each wake (its workload changed, the time its last look
// asked for came, its context ended: a stop, its deadline, a handover, the end of this
// incarnation) queues it, and the lot's one loop starts a goroutine in the builds' group for
// its next look, one at a time per session and maxLooks at once. The look that finds the build over concludes it
// on that goroutine, as a session that never parked would.
type lot struct {
	mu     sync.Mutex
	ready  []*parked
	live   int  // sessions begun and not yet ended: the loop outlives every one of them
	closed bool // the loop has returned: a session that comes after does not park
	signal chan struct{}
}

func newLot() *lot { return &lot{signal: make(chan struct{}, 1)} }

// parked is one session parked in the lot.
type parked struct {
	s      *session
	tr     build.Tracking
	unhook func() bool // the wake on the session context's end
	timer  *time.Timer // the next look: the one the last look asked for, or the deadline
	ran    bool        // running has been called

	// Under lot.mu.
	queued  bool // in ready
	looking bool // a look runs now
	again   bool // woken while a look ran: look once more after it
	over    bool // concluded: wakes are ignored
}

// begin counts a session that may park.
func (l *lot) begin() {
	l.mu.Lock()
	l.live++
	l.mu.Unlock()
}

// end counts a session that has ended.
func (l *lot) end() {
	l.mu.Lock()
	l.live--
	l.mu.Unlock()
	l.poke()
}

func (l *lot) poke() {
	select {
	case l.signal <- struct{}{}:
	default:
	}
}

// park parks s, whose workload was launched on tr's executor, until the build is over. false:
// the lot no longer runs (the replica is winding down), and s follows its workload on its own
// goroutine instead.
func (l *lot) park(s *session, tr Tracker) bool {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return false
	}
	// The deadline is a look like any other (no context of its own): a parked build costs
	// one timer. p counts as looking until it is set up: the informer may wake it before
	// Track returns (a change of the pod meanwhile), and a look then would read p.tr, and
	// the Tracking's own fields, while they are being written (a wake meanwhile only marks
	// p woken again).
	p := &parked{s: s, looking: true}
	p.tr = tr.Track(*s.job, func() { l.wake(p) })
	p.unhook = context.AfterFunc(s.ctx, func() { l.wake(p) })
	l.mu.Lock()
	p.looking, p.again = false, false // whole now: the first look serves any wake meanwhile too
	l.mu.Unlock()
	l.wake(p)
	return true
}

// wake queues p's next look. It never blocks: the informer's handlers call it.
func (l *lot) wake(p *parked) {
	l.mu.Lock()
	switch {
	case p.over:
	case p.looking:
		p.again = true
	case !p.queued:
		p.queued = true
		l.ready = append(l.ready, p)
	}
	l.mu.Unlock()
	l.poke()
}

// looked ends a look that left p parked.
func (l *lot) looked(p *parked) {
	l.mu.Lock()
	p.looking = false
	again := p.again
	p.again = false
	l.mu.Unlock()
	if again {
		l.wake(p)
	}
}

// leave takes p out of the lot for good.
func (l *lot) leave(p *parked) {
	l.mu.Lock()
	p.over = true
	l.mu.Unlock()
	p.tr.Stop()
	p.unhook()
	if p.timer != nil {
		p.timer.Stop()
	}
}

// run starts a goroutine in builds for each look that is due, until ctx has ended and every
// session begun has ended too.
func (l *lot) run(ctx context.Context, builds *errgroup.Group) error {
	done := ctx.Done()
	looks := make(chan struct{}, maxLooks)
	for {
		l.mu.Lock()
		ready := l.ready
		l.ready = nil
		for _, p := range ready {
			p.queued, p.looking = false, true
		}
		if done == nil && l.live == 0 && len(ready) == 0 {
			l.closed = true
			l.mu.Unlock()
			return nil
		}
		l.mu.Unlock()
		for _, p := range ready {
			looks <- struct{}{} // waits while maxLooks run; wakes queue up meanwhile
			builds.Go(func() error {
				l.look(p, func() { <-looks })
				return nil
			})
		}
		select {
		case <-l.signal:
		case <-done:
			done = nil
		}
	}
}

// look looks at p's workload once: the build is concluded if it is over (the workload ended,
// the session's context did, or the build's deadline passed), else p stays parked until its
// next wake. free gives the look's place back: before a conclusion, which may take long.
func (l *lot) look(p *parked, free func()) {
	s := p.s
	ctx, deadline := s.ctx, s.job.Deadline
	var lk build.Look
	err := context.Cause(ctx)
	if ctx.Err() == nil {
		// Looked at first: a workload that ended by itself (its own deadline, say) ends the
		// build with its own outcome, even when the build's deadline has passed too.
		if lk, err = p.tr.Look(ctx); err != nil && ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		if err == nil && !lk.Done && !time.Now().Before(deadline) {
			err = errTimedOut
		}
	}
	if err == nil && lk.Running && !p.ran {
		p.ran = true
		s.running(ctx)
	}
	if err != nil || lk.Done {
		l.leave(p)
		free()
		s.end(lk.Outcome, err)
		return
	}
	defer free()
	next := deadline
	if !lk.Next.IsZero() && lk.Next.Before(next) {
		next = lk.Next
	}
	if p.timer == nil {
		p.timer = time.AfterFunc(time.Until(next), func() { l.wake(p) })
	} else {
		p.timer.Reset(time.Until(next))
	}
	l.looked(p)
}
