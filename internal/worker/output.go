package worker

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/logs"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// logDrainTimeout bounds the last read of a workload's output, when the build ends or is let
// go.
const logDrainTimeout = 30 * time.Second

// shipping is the build's output being appended to its log while the workload runs: followed
// from the launch (logs.FollowAlways), or while wanted. It is made with the session, and
// started once the workload is launched; a want may arrive from another goroutine at any time.
type shipping struct {
	mu      sync.Mutex
	s       *session
	started bool               // the workload is launched: its output may be followed
	note    string             // the shipper's note and epoch (newShipper), as at the launch
	epoch   int                //
	sh      *logs.Shipper      // made when first followed
	closed  bool               // closeLog has begun: nothing follows any more
	cancel  context.CancelFunc // of the follow running now; nil when none runs
	forever bool               // followed until the output is complete, wanted or not
	until   time.Time          // wanted until then
	lapse   *time.Timer        // ends a follow once its want has lapsed
	g       errgroup.Group
}

// readLogs reads the workload's output through its executor.
func (s *session) readLogs(ctx context.Context, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
	return s.target.Executor.ReadLogs(ctx, *s.job, from, follow, emit)
}

func (s *session) newShipper() *logs.Shipper {
	return s.w.logs.NewShipper(s.req.ID, s.req.Steps, s.mask, s.rerun, s.rec.Attempts)
}

// startShipping is called once the workload is launched: from now on its output may be
// followed into the log, from the start (logs.FollowAlways) or when wanted.
func (s *session) startShipping() {
	sp := &s.ship
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed || s.w.cfg.LogFollow == logs.FollowNever {
		return
	}
	sp.started, sp.note, sp.epoch = true, s.rerun, s.rec.Attempts
	if s.w.cfg.LogFollow == logs.FollowAlways {
		sp.forever = true
	}
	if sp.forever || time.Now().Before(sp.until) { // wanted before the launch
		sp.followLocked()
	}
}

// want is a follower's want of the build's output (protocol.LogWantSubject): it is followed
// until protocol.LogWantFor from now, from where the log stands.
func (s *session) want() {
	sp := &s.ship
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed || s.w.cfg.LogFollow != logs.FollowWanted {
		return
	}
	sp.until = time.Now().Add(protocol.LogWantFor)
	if !sp.started {
		return // not launched yet: startShipping follows it then
	}
	sp.followLocked()
}

// lapsed ends the follow once nobody has wanted it for LogWantFor.
func (sp *shipping) lapsed() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.closed || sp.forever {
		return
	}
	if left := time.Until(sp.until); left > 0 {
		sp.lapse.Reset(left)
		return
	}
	if sp.cancel != nil {
		sp.cancel()
		sp.cancel = nil
	}
}

// followLocked starts following the output, unless a follow runs, until the want lapses
// (unless forever). sp.mu is held.
func (sp *shipping) followLocked() {
	if !sp.forever {
		if sp.lapse == nil {
			sp.lapse = time.AfterFunc(time.Until(sp.until), sp.lapsed)
		} else {
			sp.lapse.Reset(time.Until(sp.until))
		}
	}
	if sp.cancel != nil {
		return
	}
	s := sp.s
	if sp.sh == nil {
		sp.sh = s.w.logs.NewShipper(s.req.ID, s.req.Steps, s.mask, sp.note, sp.epoch)
	}
	sh := sp.sh
	sctx, cancel := context.WithCancel(s.ctx)
	sp.cancel = cancel
	sp.g.Go(func() error {
		defer func() {
			sp.mu.Lock()
			if sp.cancel != nil && sctx.Err() == nil { // ended by itself: a later want starts anew
				sp.cancel = nil
			}
			sp.mu.Unlock()
			cancel()
		}()
		// A read or an append that fails is tried again from where the log stands, backing
		// off to a try every half minute (a cluster that refuses pods/log); only the end of
		// the interest stops it.
		b := backoff.NewExponentialBackOff()
		b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = time.Second, 30*time.Second, 0
		return backoff.RetryNotify(func() error {
			err := sh.Ship(sctx, s.readLogs, true)
			if err == nil || errors.Is(err, logs.ErrEnded) || errors.Is(err, logs.ErrSuperseded) || sctx.Err() != nil {
				return nil
			}
			return err
		}, backoff.WithContext(b, sctx), func(err error, d time.Duration) {
			s.log.Warn("shipping the build's output failed; retrying", "err", s.masked(err), "in", d)
		})
	})
}

// close stops following for good, once the follow has returned, and hands over the shipper
// that followed (nil: none did, or an earlier close took it). s.mask and s.req are read
// without the lock: they are set before the session starts and never change.
func (sp *shipping) close() *logs.Shipper {
	sp.mu.Lock()
	sp.closed = true
	if sp.cancel != nil {
		sp.cancel()
		sp.cancel = nil
	}
	if sp.lapse != nil {
		sp.lapse.Stop()
	}
	sh := sp.sh
	sp.sh = nil
	sp.mu.Unlock()
	_ = sp.g.Wait()
	return sh
}

// How closeLog leaves the log.
type logClose int

const (
	logLeave  logClose = iota // this replica may no longer own the build: append nothing more
	logDrain                  // the build goes to another delivery: append what there is now
	logFinish                 // the workload has ended: append the rest and close the log
)

// closeLog stops following the workload's output and leaves the log as how says. A build
// whose output this session did not follow (nobody wanted it, logs.FollowNever, or a later
// delivery of a build another one finished) has its output read from where its log stands
// too, so that a replica that died before it closed the log leaves no log open.
func (s *session) closeLog(ctx context.Context, how logClose) {
	sh := s.ship.close()
	if how == logLeave || !s.launched || s.target == nil || s.job == nil {
		return
	}
	if sh == nil {
		sh = s.newShipper()
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), logDrainTimeout)
	defer cancel()
	stop := context.AfterFunc(s.inc.Context(), cancel) // the incarnation lapsed: stand down
	defer stop()
	var err error
	if how == logFinish {
		err = sh.Finish(dctx, s.readLogs)
	} else {
		err = sh.Ship(dctx, s.readLogs, false)
	}
	if err != nil && !errors.Is(err, logs.ErrEnded) && !errors.Is(err, logs.ErrSuperseded) {
		s.log.Warn("the build's output could not all be stored", "err", s.masked(err))
	}
}

// takeLogWants passes each follower's want of a build's output (protocol.LogWantSubject) to
// the build's session, if it is held here (logs.FollowWanted).
func (w *Worker) takeLogWants(ctx context.Context) error {
	if w.cfg.LogFollow != logs.FollowWanted {
		return nil
	}
	sub, err := w.js.Conn().Subscribe(w.cfg.Layout.AllLogWants(), func(m *nats.Msg) {
		if s := w.held.session(subjectID(m.Subject)); s != nil {
			s.want()
		}
	})
	if err != nil {
		// Followers then see the output when the build ends; the replica runs on.
		w.log.Warn("taking followers' wants of live output is not possible", "err", err)
		<-ctx.Done()
		return nil
	}
	<-ctx.Done()
	_ = sub.Unsubscribe()
	return nil
}
