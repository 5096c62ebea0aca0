package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// standDownGrace bounds how long a replica that lost a build waits for its local workload to
// die before it kills it outright.
const standDownGrace = 500 * time.Millisecond

// transition makes a record.Step of a build transition: it writes when the transition
// allows it, and refuses with its error otherwise.
func transition(t func(r protocol.Record, exists bool) (protocol.Record, error)) record.Step {
	return func(r protocol.Record, exists bool) (protocol.Record, bool, error) {
		r, err := t(r, exists)
		return r, err == nil, err
	}
}

// conclude maps the first error of the pipeline (classified where it arose), or else the
// workload's outcome, to what happens to the build and to the one settlement of the
// delivery. No branch calls back into another: each ends the delivery.
func (s *session) conclude(ctx context.Context, o build.Outcome, err error) settlement {
	w := s.w
	cause := context.Cause(ctx)
	is := func(target error) bool { return errors.Is(err, target) || errors.Is(cause, target) }
	switch {
	case is(record.ErrIncarnationLost), errors.Is(err, build.ErrLost):
		return s.standDown(ctx, err)
	case errors.Is(err, build.ErrFinished):
		return s.ended(ctx, s.rec) // announce the recorded end again, clean up, settle
	case errors.Is(err, build.ErrDuplicate):
		s.log.Info("duplicate request message; the build is owned by another copy")
		return term("duplicate of a build already owned")
	case errors.Is(err, build.ErrOwned):
		// Its owner lives and works on it; this delivery is only an offer. Look again
		// later: by then the owner has finished it, given it back, or vanished.
		d := w.standbyDelay(s.inc)
		s.log.Info("a live replica owns this build; waiting", "owner", s.rec.Replica, "in", d)
		return nak(d)
	case is(errHandover):
		return s.handOver(ctx)
	case is(build.ErrAborted):
		if st, ok := s.kill(ctx); !ok {
			return st
		}
		reason := abortReason(err)
		if reason == "" {
			reason = abortReason(cause)
		}
		return s.finish(ctx, build.Outcome{State: protocol.StateAborted, Message: reason})
	case errors.Is(err, errTimedOut):
		if st, ok := s.kill(ctx); !ok {
			return st
		}
		return s.finish(ctx, build.Outcome{State: protocol.StateTimedOut,
			Message: fmt.Sprintf("build timeout of %s reached", s.job.Timeout)})
	case err != nil:
		if p, ok := build.AsPermanent(err); ok {
			s.log.Info("build cannot succeed", "state", p.Outcome.State, "reason", p.Outcome.Reason, "err", s.masked(p.Err))
			return s.finish(ctx, p.Outcome)
		}
		return s.retry(ctx, err)
	}
	return s.finish(ctx, o)
}

// standbyDelay is how long a delivery of a build another live replica owns waits before it
// is offered again: about half the liveness TTL, within the retry bounds.
func (w *Worker) standbyDelay(inc *record.Incarnation) time.Duration {
	return min(max(inc.TTL()/2, w.cfg.RetryMin), w.cfg.RetryMax)
}

// standDown lets go of a build this replica may no longer own: its liveness lapsed, or the
// record moved on. The local workload dies first (a pod is left to its owner), and the
// delivery is left unsettled: it may be a newer owner's message by now.
func (s *session) standDown(ctx context.Context, err error) settlement {
	s.closeLog(ctx, logLeave)
	s.onWorkload(ctx, standDownGrace, "releasing the workload failed", Executor.Release)
	s.log.Warn("this replica no longer owns the build; standing down", "err", s.masked(err))
	return leave()
}

// handOver gives the build to another replica at once, leaving its pod (a local process
// cannot outlive this replica and is killed by Release).
func (s *session) handOver(ctx context.Context) settlement {
	// Released first: a local process's output is complete once it is killed, and is read
	// to its end before the build goes. A pod's goes on: what was followed of it is stored,
	// and the adopter reads on from there (draining it here would cost a pods/log read per
	// build in the middle of a shutdown).
	s.releaseWorkload(ctx)
	if s.target != nil && !s.target.Executor.Reruns() {
		s.closeLog(ctx, logLeave)
	} else {
		s.closeLog(ctx, logDrain)
	}
	if s.own.Owner == "" {
		return nak(0) // not claimed here: nothing to give back
	}
	if _, st, ok := s.last(ctx, func(r protocol.Record) (protocol.Record, error) { return build.GiveBack(r, s.own) }); !ok {
		return st
	}
	s.w.handedOver.Add(1)
	s.log.Debug("handed over") // the replica sums them up when the handover ends
	return nak(0)
}

// retry gives a transiently failed delivery back with backoff, counting the failure, or ends
// the build once its failures use up MaxDeliver. A target that could not be reached
// (build.Unavailable) is no failure of the build's: nothing is counted, and the build is
// offered again after the longest backoff of its budget, however long the outage lasts.
func (s *session) retry(ctx context.Context, cause error) settlement {
	w := s.w
	s.releaseWorkload(ctx)
	s.closeLog(ctx, logDrain)
	unavailable := build.IsUnavailable(cause)
	if s.own.Owner == "" {
		// The claim itself failed: nothing is owned, so nothing is counted.
		s.log.Warn("transient failure before the claim; retrying", "err", s.masked(cause))
		return nak(w.backoff(1))
	}
	rec, st, ok := s.last(ctx, func(r protocol.Record) (protocol.Record, error) {
		if unavailable {
			return build.Postpone(r, s.own)
		}
		r, _, err := build.Fail(r, s.own, w.cfg.MaxDeliver, s.masked(cause), now())
		return r, err
	})
	switch {
	case !ok:
		return st
	case rec.State.Terminal():
		s.log.Warn("transient failures used up the delivery budget", "err", s.masked(cause), "failures", rec.Failures)
		w.countEnd(rec)
		return s.ended(ctx, rec)
	case unavailable:
		d := w.backoff(w.cfg.MaxDeliver)
		s.log.Warn("the target is unavailable; waiting", "err", s.masked(cause), "in", d)
		return nak(d)
	}
	d := w.backoff(rec.Failures)
	s.log.Warn("transient failure; retrying", "err", s.masked(cause), "failures", rec.Failures, "in", d)
	return nak(d)
}

// finish moves the record to the terminal state of o, unless another writer already ended
// the build, then announces the end, cleans up and settles (ended).
func (s *session) finish(ctx context.Context, o build.Outcome) settlement {
	o.Message = s.mask.Mask(o.Message)
	if s.rerun != "" {
		o.Message = joinMessage(s.rerun, o.Message)
	}
	rec, st, ok := s.last(ctx, func(r protocol.Record) (protocol.Record, error) { return build.Finish(r, s.own, o, now()) })
	if !ok {
		return st
	}
	s.w.countEnd(rec) // even if its event is still to go out: the next delivery sends it
	return s.ended(ctx, rec)
}

// last writes the owner's last transition of this delivery, through NATS faults. When the
// transition is refused or cannot be written (ok false), st is how the delivery ends: the
// end another writer recorded, announced again, or a stand-down.
func (s *session) last(ctx context.Context, t func(protocol.Record) (protocol.Record, error)) (
	rec protocol.Record, st settlement, ok bool) {
	pctx, cancel := s.persistCtx(ctx)
	defer cancel()
	rec, _, err := s.persist(pctx, transition(func(r protocol.Record, _ bool) (protocol.Record, error) { return t(r) }))
	if rec.ID != "" {
		s.rec = rec
	}
	switch {
	case errors.Is(err, build.ErrFinished):
		return rec, s.ended(ctx, rec), false
	case err != nil:
		return rec, s.standDown(ctx, err), false
	}
	return rec, settlement{}, true
}

// masked is err's message with the build's secret values masked.
func (s *session) masked(err error) string {
	if err == nil {
		return ""
	}
	return s.mask.Mask(err.Error())
}

func joinMessage(note, msg string) string {
	if msg == "" {
		return note
	}
	return note + "; " + msg
}

// ended announces the end the record holds, cleans the workload up, and settles: Ack, or a
// dead letter for a build that was rejected or ran out of deliveries. An event that cannot
// be published while this incarnation lives leaves the delivery for the next one, which
// finds the record finished and announces it again.
func (s *session) ended(ctx context.Context, rec protocol.Record) settlement {
	w := s.w
	pctx, cancel := s.persistCtx(ctx)
	defer cancel()
	if err := s.retrying(pctx, "publishing the terminal event", func() error { return w.events.Publish(pctx, rec) }); err != nil {
		s.closeLog(ctx, logLeave)
		return leave() // this incarnation lapsed; whoever has the message next announces it
	}
	// The end is announced first, at once (nothing waits on output for it); then the rest
	// of the output is stored and the log closed, before the workload is cleaned up. A
	// follower reads on after the end until the log is closed.
	s.closeLog(ctx, logFinish)
	// A workload that has not ended (a pod whose image never pulled) must go before the
	// delivery is settled: while its cluster cannot be reached this is retried, here and then
	// on a later delivery, which finds the build finished and cleans up.
	switch err := s.durably(ctx, pctx, "cleaning the workload up", Executor.Cleanup); {
	case err == nil:
	case pctx.Err() != nil:
		return leave()
	case build.IsUnavailable(err), errors.Is(context.Cause(ctx), errHandover):
		// Tried again on a later delivery, which finds the build finished.
		d := w.backoff(w.cfg.MaxDeliver)
		s.log.Warn("workload cleanup failed; trying again", "err", err, "in", d)
		return nak(d)
	default:
		s.log.Warn("workload cleanup failed", "err", err)
	}
	trace.SpanFromContext(ctx).SetAttributes(tracing.AttrState.String(string(rec.State)), tracing.AttrReason.String(string(rec.Reason)))
	s.log.Info("build finished", "state", rec.State, "reason", rec.Reason)
	if rec.State == protocol.StateRejected ||
		(rec.State == protocol.StateFailed && rec.Reason == protocol.ReasonDispatchExhausted) {
		return deadLetter(rec.Reason, rec.Message)
	}
	return ack()
}

// persistCtx is the context of the writes that conclude a build: they outlive the
// session's own context (a stop, a timeout or a handover ends it), but not this replica's
// incarnation, nor the settle budget of a shutdown.
func (s *session) persistCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	pctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(s.inc.Context(), func() { cancel(record.ErrIncarnationLost) })
	return pctx, func() { stop(); cancel(nil) }
}

// persist applies step to the build's record, retrying what NATS may answer later (a
// passing fault must not cost a finished build its result), until ctx ends. A refusal of
// the transition (build.Err*) is returned at once.
func (s *session) persist(ctx context.Context, step record.Step) (protocol.Record, bool, error) {
	var rec protocol.Record
	var changed bool
	err := s.retrying(ctx, "recording the build", func() error {
		var err error
		if rec, changed, err = s.w.records.Mutate(ctx, s.req.ID, step); build.Refused(err) {
			return backoff.Permanent(err)
		}
		return err
	})
	if err != nil && ctx.Err() != nil {
		err = errors.Join(context.Cause(ctx), err)
	}
	return rec, changed, err
}

// retrying runs op with backoff until it succeeds, fails for good, or ctx ends.
func (s *session) retrying(ctx context.Context, what string, op func() error) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = 100*time.Millisecond, 2*time.Second, 0
	return backoff.RetryNotify(op, backoff.WithContext(b, ctx), func(err error, d time.Duration) {
		s.log.Warn(what+" failed; retrying", "err", err, "in", d)
	})
}

// releaseWorkload lets the workload go: a pod stays for the next owner, a local process is
// killed.
func (s *session) releaseWorkload(ctx context.Context) {
	s.onWorkload(ctx, settleTimeout, "releasing the workload failed", Executor.Release)
}

// kill kills the workload of a stopped or timed-out build before its end is recorded, so
// that no stopped build's workload runs on. A kill its cluster cannot take yet is retried in
// place for a while (unavailableHold); then, or when it is refused, the build is given back
// and the next delivery kills it (a target that cannot be reached costs no failure, a
// refusal does). When the incarnation ends first the build is left to its next owner, and a
// shutdown hands it over: each finds the stop flag or the deadline and kills it then.
func (s *session) kill(ctx context.Context) (st settlement, ok bool) {
	// Everything printed before the kill is stored first: a pod's output goes with the pod.
	s.closeLog(ctx, logDrain)
	pctx, cancel := s.persistCtx(ctx)
	defer cancel()
	err := s.durably(ctx, pctx, "killing the workload", Executor.Kill)
	switch {
	case err == nil:
		return settlement{}, true
	case pctx.Err() != nil:
		return s.standDown(ctx, context.Cause(pctx)), false
	case errors.Is(context.Cause(ctx), errHandover):
		return s.handOver(ctx), false
	}
	return s.retry(ctx, fmt.Errorf("killing the workload: %w", err)), false
}

// unavailableHold bounds how long a kill or a cleanup is retried in place while its target
// cannot be reached: past it the delivery is given back and tried again later, so that an
// outage holds no concurrency slot for long.
const unavailableHold = 30 * time.Second

// durably applies op to the workload, if one may exist, each attempt within settleTimeout,
// again and again while its target cannot be reached (build.Unavailable), until pctx ends,
// unavailableHold has passed, or the session is handed over (a shutdown). It returns op's
// last error.
func (s *session) durably(ctx, pctx context.Context, what string, op func(Executor, context.Context, build.Job) error) error {
	if !s.launched {
		return nil
	}
	hctx, cancel := context.WithTimeout(pctx, unavailableHold)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		if errors.Is(context.Cause(ctx), errHandover) {
			cancel()
		}
	})
	defer stop()
	// The last attempt's error says how it went (retrying runs op at least once).
	var last error
	_ = s.retrying(hctx, what, func() error {
		octx, cancel := context.WithTimeout(hctx, settleTimeout)
		defer cancel()
		last = op(s.target.Executor, octx, *s.job)
		if last != nil && !build.IsUnavailable(last) && !errors.Is(last, context.DeadlineExceeded) {
			return backoff.Permanent(last)
		}
		return last
	})
	return last
}

// onWorkload applies op to the workload, if one may exist, within timeout, even after the
// session's own context has ended.
func (s *session) onWorkload(ctx context.Context, timeout time.Duration, failed string, op func(Executor, context.Context, build.Job) error) {
	if !s.launched {
		return
	}
	octx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	if err := op(s.target.Executor, octx, *s.job); err != nil {
		s.log.Warn(failed, "err", err)
	}
}

// rejectInvalid concludes a request that fails validation: a rejected event when the build
// can be named, and a dead letter always, never a redelivery.
func (w *Worker) rejectInvalid(ctx context.Context, l *queue.Lease, cause error) settlement {
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	msg := cause.Error()
	w.log.Info("rejected invalid request", "subject", l.Msg().Subject(), "err", msg)
	if id := msgBuildID(l.Msg()); protocol.ValidID(id) {
		c := build.Claimant{Replica: w.cfg.Replica, Seq: l.Stream, Delivery: l.Delivered}
		rec, ended, err := w.records.Mutate(sctx, id, transition(func(r protocol.Record, exists bool) (protocol.Record, error) {
			return build.Reject(r, exists, c, msg, now())
		}))
		if ended {
			w.countEnd(rec)
		}
		if (err == nil || errors.Is(err, build.ErrFinished)) && rec.State == protocol.StateRejected {
			err = w.events.Publish(sctx, rec) // a redelivery announces it again
		}
		if err != nil && !errors.Is(err, build.ErrDuplicate) && !errors.Is(err, build.ErrFinished) {
			// An invalid copy never touches a build another message stands for, but a
			// rejection it could not record is tried again.
			w.log.Warn("recording the rejection failed; retrying", "err", err)
			return nak(w.backoff(int(l.Delivered)))
		}
	}
	return deadLetter(protocol.ReasonInvalidRequest, msg)
}

// countEnd counts a build this replica ended: once across the fleet, since only one write
// moves a record to a terminal state.
func (w *Worker) countEnd(rec protocol.Record) {
	target := rec.Target
	if target == "" {
		target = "none" // rejected before it was routed
	}
	w.metrics.BuildsFinished.WithLabelValues(target, string(rec.State), string(rec.Reason)).Inc()
	if rec.State == protocol.StateRejected {
		w.metrics.BuildsRejected.WithLabelValues(string(rec.Reason)).Inc()
	}
}
