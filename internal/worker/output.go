package worker

import (
	"context"
	"errors"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/logs"
)

// logDrainTimeout bounds the last read of a workload's output, when the build ends or is let
// go.
const logDrainTimeout = 30 * time.Second

// shipping is the build's output being appended to its log while the session follows the
// workload.
type shipping struct {
	sh     *logs.Shipper
	cancel context.CancelFunc
	g      errgroup.Group
}

// readLogs reads the workload's output through its executor.
func (s *session) readLogs(ctx context.Context, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
	return s.target.Executor.ReadLogs(ctx, *s.job, from, follow, emit)
}

func (s *session) newShipper() *logs.Shipper {
	return s.w.logs.NewShipper(s.req.ID, s.req.Steps, s.mask, s.rerun, s.rec.Attempts)
}

// shipOutput follows the launched workload's output into the build's log until the output
// is complete or closeLog stops it.
func (s *session) shipOutput(ctx context.Context) {
	sctx, cancel := context.WithCancel(ctx)
	sp := &shipping{sh: s.newShipper(), cancel: cancel}
	s.ship = sp
	sp.g.Go(func() error {
		// A read or an append that fails is tried again from where the log stands, backing
		// off to a try every half minute (a cluster that refuses pods/log); only the end of
		// the session's interest stops it.
		b := backoff.NewExponentialBackOff()
		b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = time.Second, 30*time.Second, 0
		return backoff.RetryNotify(func() error {
			err := sp.sh.Ship(sctx, s.readLogs, true)
			if err == nil || errors.Is(err, logs.ErrEnded) || errors.Is(err, logs.ErrSuperseded) || sctx.Err() != nil {
				return nil
			}
			return err
		}, backoff.WithContext(b, sctx), func(err error, d time.Duration) {
			s.log.Warn("shipping the build's output failed; retrying", "err", s.masked(err), "in", d)
		})
	})
}

// How closeLog leaves the log.
type logClose int

const (
	logLeave  logClose = iota // this replica may no longer own the build: append nothing more
	logDrain                  // the build goes to another delivery: append what there is now
	logFinish                 // the workload has ended: append the rest and close the log
)

// closeLog stops following the workload's output and leaves the log as how says. A build
// whose output this session did not follow (Config.LogsAtEnd, or a later delivery of a build
// another one finished) has its output read from where its log stands too, so that a
// replica that died before it closed the log leaves no log open.
func (s *session) closeLog(ctx context.Context, how logClose) {
	sp := s.ship
	if sp != nil {
		sp.cancel()
		_ = sp.g.Wait()
		s.ship = nil
	}
	if how == logLeave || !s.launched || s.target == nil || s.job == nil {
		return
	}
	var sh *logs.Shipper
	if sp != nil {
		sh = sp.sh
	} else {
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
