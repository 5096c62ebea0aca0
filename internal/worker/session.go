package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/build"
	bfjs "github.com/buildfleet/buildfleet/internal/jetstream"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Sentinels of the per-build pipeline.
var (
	errFinished  = errors.New("build already finished")
	errDuplicate = errors.New("another copy of this request owns the build")
)

// session carries one delivery of one build request through the pipeline. Every path out of
// run settles the lease with exactly one verb.
type session struct {
	w     *Worker
	lease *bfjs.Lease
	req   protocol.BuildRequest
	log   *slog.Logger

	target   *Target    // set once routed
	job      *build.Job // set once launched: the workload may exist
	launched bool
}

// handle is the whole life of one delivered request message on this replica.
func (w *Worker) handle(ctx context.Context, msg jetstream.Msg) {
	l, err := bfjs.NewLease(msg)
	if err != nil {
		w.log.Error("message without JetStream metadata; leaving it to AckWait", "err", err)
		return
	}
	w.leases.Add(l)
	defer w.leases.Remove(l)
	if ctx.Err() != nil { // arrived while shutting down: give it straight back
		w.settleErr(l.Nak(0), "nak on shutdown")
		return
	}
	req, err := decodeRequest(msg)
	if err != nil {
		w.rejectInvalid(ctx, l, err)
		return
	}
	bctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	w.hold(req.ID, l, cancel)
	defer w.unhold(req.ID, l)
	s := &session{w: w, lease: l, req: req,
		log: w.log.With("build", req.ID, "seq", l.Stream, "delivery", l.Delivered)}
	s.run(bctx)
}

// decodeRequest validates a request against the schema and against the subject it came on.
func decodeRequest(msg jetstream.Msg) (protocol.BuildRequest, error) {
	req, err := protocol.DecodeBuildRequest(msg.Data())
	if err != nil {
		return req, err
	}
	if id := subjectID(msg.Subject()); id != req.ID {
		return req, fmt.Errorf("subject names build %q but the request is for %q", id, req.ID)
	}
	return req, nil
}

// subjectID is the last token of a subject: the build id on every buildfleet subject.
func subjectID(subject string) string {
	return subject[strings.LastIndexByte(subject, '.')+1:]
}

func (s *session) run(ctx context.Context) {
	rec, err := s.claim(ctx)
	if err == nil {
		err = s.routeAndLaunch(ctx, rec)
	}
	var outcome build.Outcome
	if err == nil {
		outcome, err = s.track(ctx)
	}
	if err != nil {
		s.fail(ctx, err)
		return
	}
	s.finish(ctx, outcome)
}

// claim makes this delivery the owner of the build record, creating the record when the
// producer did not (a producer may publish without the client).
func (s *session) claim(ctx context.Context) (protocol.Record, error) {
	w := s.w
	created := false
	rec, err := w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, exists bool) error {
		created = !exists
		if !exists {
			*r = protocol.Record{State: protocol.StateQueued, QueuedAt: now()}
		}
		if r.State.Terminal() {
			return errFinished
		}
		if r.Seq != 0 && r.Seq != s.lease.Stream {
			return errDuplicate
		}
		r.Seq = s.lease.Stream
		r.Replica = w.cfg.Replica
		r.Attempts++
		return nil
	})
	if err != nil {
		return rec, err
	}
	if created {
		if err := w.events.Publish(ctx, rec); err != nil {
			return rec, err
		}
	}
	// Deliveries before this one that ended in neither success nor a handover were failures
	// (a transient error, or a crash that let AckWait run out).
	if failures := int(s.lease.Delivered) - 1 - rec.Handovers; failures >= w.cfg.MaxDeliver {
		return rec, exhausted(failures)
	}
	if rec.Abort {
		return rec, errAborted
	}
	return rec, nil
}

func exhausted(failures int) error {
	return build.Permanent(protocol.StateFailed, protocol.ReasonDispatchExhausted,
		fmt.Errorf("gave up after %d failed deliveries", failures))
}

// routeAndLaunch records the target before launching, so that a redelivery or a stop always
// goes where the build went, then launches the workload and records the dispatch.
func (s *session) routeAndLaunch(ctx context.Context, rec protocol.Record) error {
	w := s.w
	if rec.Target == "" {
		dec, err := w.cfg.Routes.Choose(routing.Request{
			BuildID: s.req.ID,
			Image:   s.req.Image,
			Pin:     s.req.Annotations[protocol.AnnotationTarget],
		}, nil)
		var rej *routing.Rejection
		if errors.As(err, &rej) {
			return build.Permanent(protocol.StateRejected, rej.Reason, rej)
		}
		if err != nil {
			return err
		}
		t := w.cfg.Targets[dec.Target]
		timeout := t.DefaultTimeout
		if s.req.TimeoutSeconds > 0 {
			timeout = time.Duration(s.req.TimeoutSeconds) * time.Second
		}
		timeout = min(timeout, t.MaxTimeout)
		rec, err = w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, _ bool) error {
			if err := s.stillOwned(r); err != nil {
				return err
			}
			if r.Target == "" {
				r.Target = dec.Target
				r.Workload = build.WorkloadName(s.req.ID)
				r.TimeoutSeconds = int(timeout / time.Second)
			}
			return nil
		})
		if err != nil {
			return err
		}
		s.log.Debug("routed", "target", rec.Target, "rule", dec.Rule)
	}
	t, ok := w.cfg.Targets[rec.Target]
	if !ok {
		return build.Permanent(protocol.StateRejected, protocol.ReasonTargetRemoved,
			fmt.Errorf("target %q recorded for this build is no longer configured", rec.Target))
	}
	s.target = &t
	job := build.NewJob(s.req, rec)
	s.job = &job
	s.launched = true // from here on a workload may exist, whatever Launch returns
	if err := t.Executor.Launch(ctx, job); err != nil {
		return err
	}
	// A stop may have come in while the launch was under way: the record says so.
	first := false
	rec, err := w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, _ bool) error {
		if err := s.stillOwned(r); err != nil {
			return err
		}
		if r.Abort {
			return errAborted
		}
		first = r.DispatchedAt == nil
		if first {
			at := now()
			deadline := at.Add(time.Duration(r.TimeoutSeconds) * time.Second)
			r.State, r.DispatchedAt, r.Deadline = protocol.StateDispatched, &at, &deadline
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.job.Deadline = *rec.Deadline
	if first {
		return w.events.Publish(ctx, rec)
	}
	return nil
}

// stillOwned stops a write to a record that another writer finished or took over meanwhile.
func (s *session) stillOwned(r *protocol.Record) error {
	if r.State.Terminal() {
		return errFinished
	}
	if r.Seq != s.lease.Stream {
		return errDuplicate
	}
	return nil
}

// track follows the workload until it ends, the build times out, a stop arrives or this
// replica hands the build over.
func (s *session) track(ctx context.Context) (build.Outcome, error) {
	wctx, cancel := context.WithDeadlineCause(ctx, s.job.Deadline, errTimedOut)
	defer cancel()
	outcome, err := s.target.Executor.Wait(wctx, *s.job, func() { s.running(wctx) })
	if err != nil {
		if cause := context.Cause(wctx); cause != nil && wctx.Err() != nil {
			return outcome, cause
		}
		return outcome, err
	}
	return outcome, nil
}

// running records and announces that the workload runs. A failure here costs only the
// event: the terminal event still follows.
func (s *session) running(ctx context.Context) {
	w := s.w
	first := false
	rec, err := w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, _ bool) error {
		if err := s.stillOwned(r); err != nil {
			return err
		}
		if r.RunningAt != nil {
			return record.ErrNoChange
		}
		at := now()
		r.State, r.RunningAt, first = protocol.StateRunning, &at, true
		return nil
	})
	if err == nil && first {
		err = w.events.Publish(ctx, rec)
	}
	if err != nil && ctx.Err() == nil {
		s.log.Warn("recording running failed", "err", err)
	}
}

// fail maps a pipeline error, classified where it arose, to exactly one settlement.
func (s *session) fail(ctx context.Context, err error) {
	w := s.w
	cause := context.Cause(ctx)
	switch {
	case errors.Is(err, errFinished):
		s.finish(ctx, build.Outcome{}) // publishes the recorded terminal event again and acks
	case errors.Is(err, errDuplicate):
		s.log.Info("duplicate request message; the build is owned by another copy")
		w.settleErr(s.lease.Term("duplicate of a build already owned"), "term duplicate")
	case errors.Is(err, errHandover) || errors.Is(cause, errHandover):
		s.handover(ctx)
	case errors.Is(err, errAborted) || errors.Is(cause, errAborted):
		s.kill(ctx)
		s.finish(ctx, build.Outcome{State: protocol.StateAborted, Message: abortReason(cause)})
	case errors.Is(err, errTimedOut):
		s.kill(ctx)
		s.finish(ctx, build.Outcome{State: protocol.StateTimedOut,
			Message: fmt.Sprintf("build timeout of %s reached", s.job.Timeout)})
	default:
		if p, ok := build.AsPermanent(err); ok {
			s.log.Info("build cannot succeed", "state", p.Outcome.State, "reason", p.Outcome.Reason, "err", p.Err)
			s.finish(ctx, p.Outcome)
			return
		}
		s.retry(ctx, err)
	}
}

// retry gives a transiently failed delivery back with backoff, or ends the build once the
// failures use up MaxDeliver.
func (s *session) retry(ctx context.Context, err error) {
	w := s.w
	if s.launched {
		s.releaseWorkload(ctx)
	}
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	rec, _, gerr := w.records.Get(sctx, s.req.ID)
	failures := int(s.lease.Delivered) - rec.Handovers
	if gerr == nil && failures >= w.cfg.MaxDeliver {
		s.log.Warn("transient failures used up the delivery budget", "err", err, "failures", failures)
		s.finish(ctx, build.Failed(protocol.ReasonDispatchExhausted, "gave up after %d failed deliveries: %v", failures, err))
		return
	}
	d := w.backoff(max(failures, 1))
	s.log.Warn("transient failure; retrying", "err", err, "in", d)
	w.settleErr(s.lease.Nak(d), "nak with delay")
}

// handover gives the build to another replica at once, leaving its pod (a local process
// cannot outlive this replica and is killed by Release).
func (s *session) handover(ctx context.Context) {
	w := s.w
	if s.launched {
		s.releaseWorkload(ctx)
	}
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	_, err := w.records.Mutate(sctx, s.req.ID, func(r *protocol.Record, _ bool) error {
		if err := s.stillOwned(r); err != nil {
			return err
		}
		r.Handovers++
		return nil
	})
	if err != nil {
		s.log.Warn("could not record the handover; the redelivery counts as a failure", "err", err)
	}
	s.log.Info("handed over")
	w.settleErr(s.lease.Nak(0), "nak on handover")
}

func (s *session) releaseWorkload(ctx context.Context) {
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	if err := s.target.Executor.Release(sctx, *s.job); err != nil {
		s.log.Warn("releasing the workload failed", "err", err)
	}
}

func (s *session) kill(ctx context.Context) {
	if !s.launched {
		return
	}
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	if err := s.target.Executor.Kill(sctx, *s.job); err != nil {
		s.log.Warn("killing the workload failed; its own deadline still holds", "err", err)
	}
}

// finish moves the record to a terminal state by compare-and-set (unless another writer
// already did), publishes the terminal event, cleans the workload up and settles the lease.
// An empty outcome only re-announces the recorded end.
func (s *session) finish(ctx context.Context, o build.Outcome) {
	w := s.w
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	rec, err := w.records.Mutate(sctx, s.req.ID, func(r *protocol.Record, exists bool) error {
		if r.State.Terminal() || o.State == "" {
			return record.ErrNoChange
		}
		if !exists {
			*r = protocol.Record{QueuedAt: now()}
		}
		state, reason, code, msg := o.State, o.Reason, o.ExitCode, o.Message
		if r.Abort && state != protocol.StateSucceeded && state != protocol.StateRejected {
			// The stop killed it: whatever the workload said on its way out.
			state, reason, code, msg = protocol.StateAborted, "", nil, r.AbortReason
		}
		if state == protocol.StateAborted && msg == "" {
			msg = r.AbortReason
		}
		at := now()
		r.State, r.Reason, r.ExitCode, r.Message, r.FinishedAt = state, reason, code, msg, &at
		r.Replica = w.cfg.Replica
		return nil
	})
	if err == nil && !rec.State.Terminal() {
		err = fmt.Errorf("record of %s is %s, not finished", s.req.ID, rec.State)
	}
	if err == nil {
		err = w.events.Publish(sctx, rec)
	}
	if err != nil {
		// The outcome is not safely recorded: hand the message back; the next delivery
		// finds the record and finishes (or re-announces) it.
		s.log.Warn("finishing failed; retrying", "err", err)
		w.settleErr(s.lease.Nak(w.backoff(1)), "nak after failed finish")
		return
	}
	if s.launched {
		if err := s.target.Executor.Cleanup(sctx, *s.job); err != nil {
			s.log.Warn("workload cleanup failed", "err", err)
		}
	}
	s.log.Info("build finished", "state", rec.State, "reason", rec.Reason)
	if rec.State == protocol.StateRejected ||
		(rec.State == protocol.StateFailed && rec.Reason == protocol.ReasonDispatchExhausted) {
		if err := bfjs.DeadLetter(sctx, w.js, w.cfg.Layout, "request", s.lease, rec.Reason, rec.Message); err != nil {
			s.log.Warn("dead letter failed; retrying", "err", err)
			w.settleErr(s.lease.Nak(w.backoff(1)), "nak after failed dead letter")
			return
		}
		w.settleErr(s.lease.Term(string(rec.Reason)), "term")
		return
	}
	w.settleErr(s.lease.Ack(sctx), "ack")
}

// rejectInvalid handles a request that fails validation: a rejected event when the build can
// be named, a dead letter always, and Term, never a redelivery.
func (w *Worker) rejectInvalid(ctx context.Context, l *bfjs.Lease, cause error) {
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	msg := cause.Error()
	w.log.Info("rejected invalid request", "subject", l.Msg().Subject(), "err", msg)
	if id := subjectID(l.Msg().Subject()); protocol.ValidID(id) {
		rec, err := w.records.Mutate(sctx, id, func(r *protocol.Record, exists bool) error {
			if exists && (r.State.Terminal() || (r.Seq != 0 && r.Seq != l.Stream)) {
				return errDuplicate // an invalid copy never touches a build another message owns
			}
			if !exists {
				*r = protocol.Record{QueuedAt: now()}
			}
			at := now()
			r.Seq, r.Replica = l.Stream, w.cfg.Replica
			r.State, r.Reason, r.Message, r.FinishedAt = protocol.StateRejected, protocol.ReasonInvalidRequest, msg, &at
			return nil
		})
		if err == nil {
			err = w.events.Publish(sctx, rec)
		}
		if err != nil && !errors.Is(err, errDuplicate) {
			w.log.Warn("recording the rejection failed; retrying", "err", err)
			w.settleErr(l.Nak(w.backoff(1)), "nak after failed rejection")
			return
		}
	}
	if err := bfjs.DeadLetter(sctx, w.js, w.cfg.Layout, "request", l, protocol.ReasonInvalidRequest, msg); err != nil {
		w.log.Warn("dead letter failed; retrying", "err", err)
		w.settleErr(l.Nak(w.backoff(1)), "nak after failed dead letter")
		return
	}
	w.settleErr(l.Term(string(protocol.ReasonInvalidRequest)), "term invalid")
}

func (w *Worker) settleErr(err error, what string) {
	if err != nil {
		w.log.Warn("settling a message failed; the server redelivers it after AckWait", "verb", what, "err", err)
	}
}
