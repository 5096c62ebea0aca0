package build

import (
	"context"
	"time"
)

// Tracking is one workload being followed without a goroutine of its own: whoever follows it
// looks when told the workload may have changed (the wake the executor was given), or at the
// time the last look asked for.
type Tracking interface {
	// Look looks at the workload once, from what the executor already knows (an informer's
	// cache) and, rarely, by asking its cluster. It must not wait for the workload.
	Look(ctx context.Context) (Look, error)
	// Stop ends the following: no wake comes after it returns.
	Stop()
}

// Look is what one look at a workload found.
type Look struct {
	// Done is set once the workload has ended, with how in Outcome.
	Done    bool
	Outcome Outcome
	// Running is set while the workload runs (and once it has run).
	Running bool
	// Next is when to look again if no wake comes first (zero: only on a wake).
	Next time.Time
}

// Follow follows t until the workload ends or ctx does, looking on every nudge and at each
// look's Next; running, if not nil, is called once, when the workload is first seen running.
// It is the blocking form of what a session parked on t does.
func Follow(ctx context.Context, t Tracking, nudge <-chan struct{}, running func()) (Outcome, error) {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	ran := false
	for {
		l, err := t.Look(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return Outcome{}, context.Cause(ctx)
			}
			return Outcome{}, err
		}
		if l.Running && !ran && running != nil {
			ran = true
			running()
		}
		if l.Done {
			return l.Outcome, nil
		}
		var alarm <-chan time.Time
		if !l.Next.IsZero() {
			timer.Reset(time.Until(l.Next))
			alarm = timer.C
		}
		select {
		case <-ctx.Done():
			return Outcome{}, context.Cause(ctx)
		case <-nudge:
		case <-alarm:
		}
		timer.Stop()
	}
}
