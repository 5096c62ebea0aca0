package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/internal/build"
	bfjs "github.com/buildfleet/buildfleet/internal/jetstream"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// Sentinels of the per-build pipeline.
var (
	errFinished  = errors.New("build already finished")
	errDuplicate = errors.New("another copy of this request owns the build")
	errStale     = errors.New("a newer delivery of this request owns the build")
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
func (w *Worker) handle(ctx context.Context, msg jetstream.Msg, epoch int) {
	l, err := bfjs.NewLease(msg)
	if err != nil {
		w.log.Error("message without JetStream metadata; leaving it to AckWait", "err", err)
		return
	}
	w.leases.Add(l)
	defer w.leases.Remove(l)
	delivery := "first"
	if l.Delivered > 1 {
		delivery = "redelivery"
	}
	w.metrics.RequestsReceived.WithLabelValues(delivery).Inc()
	// The delivery is one span of the build's trace, continuing the producer's.
	ctx, span := tracing.StartProcess(ctx, w.tracer, msg, w.cfg.Layout.RequestSubject("{id}"), w.cfg.Layout.WorkerConsumer(),
		tracing.AttrBuildID.String(subjectID(msg.Subject())), tracing.AttrDelivery.Int64(int64(l.Delivered)))
	defer span.End()
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
	w.hold(req.ID, l, epoch, cancel)
	defer w.unhold(req.ID, l)
	defer w.records.Forget(req.ID) // done here, however it ended
	log := w.log.With("build", req.ID, "seq", l.Stream, "delivery", l.Delivered)
	if sc := span.SpanContext(); sc.IsValid() {
		log = log.With("trace_id", sc.TraceID().String())
	}
	s := &session{w: w, lease: l, req: req, log: log}
	s.run(bctx)
}

// decodeRequest validates a request against the schema and against the subject it came on.
func decodeRequest(msg jetstream.Msg) (protocol.BuildRequest, error) {
	req, err := protocol.DecodeBuildRequest(msg.Data())
	if err != nil {
		return req, err
	}
	return req, sameBuild(msg.Subject(), req.ID, "request")
}

// sameBuild checks that a message's body is for the build its subject names.
func sameBuild(subject, id, what string) error {
	if sid := subjectID(subject); sid != id {
		return fmt.Errorf("subject names build %q but the %s is for %q", sid, what, id)
	}
	return nil
}

// subjectID is the last token of a subject: the build id on every buildfleet subject.
func subjectID(subject string) string {
	return subject[strings.LastIndexByte(subject, '.')+1:]
}

func (s *session) run(ctx context.Context) {
	plan, planErr := s.route(ctx)
	rec, err := s.claim(ctx, plan)
	if err == nil {
		err = s.launch(ctx, rec, planErr)
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

// plan is a routing decision, made before the claim so that the claim's one write also
// records it: the target is in the record before anything is launched, and a redelivery or
// a stop always goes where the build went.
type plan struct {
	target  string
	timeout time.Duration
}

// route chooses a target for the build (pure: no I/O). It is used only when the record has
// none yet; an adoption keeps the recorded one.
func (s *session) route(ctx context.Context) (plan, error) {
	w := s.w
	_, span := tracing.Tracer(ctx).Start(ctx, "route")
	defer span.End()
	dec, err := w.cfg.Routes.Choose(routing.Request{
		BuildID: s.req.ID,
		Image:   s.req.Image,
		Pin:     s.req.Annotations[protocol.AnnotationTarget],
	}, w.breakers.open)
	var rej *routing.Rejection
	if errors.As(err, &rej) {
		span.SetAttributes(tracing.AttrState.String(string(protocol.StateRejected)), tracing.AttrReason.String(string(rej.Reason)))
		span.AddEvent("rejected", trace.WithAttributes(attribute.StringSlice("buildfleet.route.explanation", rej.Explanation)))
		return plan{}, build.Permanent(protocol.StateRejected, rej.Reason, rej)
	}
	if err != nil {
		tracing.Fail(span, err)
		return plan{}, err
	}
	span.SetAttributes(tracing.AttrTarget.String(dec.Target), attribute.String("buildfleet.route.rule", string(dec.Rule)))
	span.AddEvent("chosen", trace.WithAttributes(attribute.StringSlice("buildfleet.route.explanation", dec.Explanation)))
	t := w.cfg.Targets[dec.Target]
	timeout := t.DefaultTimeout
	if s.req.TimeoutSeconds > 0 {
		timeout = time.Duration(s.req.TimeoutSeconds) * time.Second
	}
	return plan{target: dec.Target, timeout: min(timeout, t.MaxTimeout)}, nil
}

// claim makes this delivery the owner of the build record, creating the record when the
// producer did not (a producer may publish without the client), and records p's target if
// the build has none yet.
func (s *session) claim(ctx context.Context, p plan) (protocol.Record, error) {
	w, l := s.w, s.lease
	created, crashed := false, false
	// Another delivery of this message held here is alive, not vanished: the server can
	// deliver a Nak'd message twice in quick succession.
	aliveHere := w.holdsOther(s.req.ID, l)
	rec, err := w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, exists bool) error {
		created, crashed = !exists, false
		if !exists {
			*r = protocol.Record{State: protocol.StateQueued, QueuedAt: now()}
		}
		if r.State.Terminal() {
			return errFinished
		}
		if r.Seq != 0 && r.Seq != l.Stream {
			return errDuplicate
		}
		if r.Seq == l.Stream && r.Delivery > l.Delivered && !r.Released {
			// A newer delivery owns the build. (One that was given back owns nothing: a
			// consumer made again after a loss counts its deliveries from 1 again.)
			return errStale
		}
		if r.Seq == l.Stream && r.Delivery != 0 && !r.Released && !aliveHere {
			// The previous delivery neither finished nor gave the message back: its
			// replica vanished (a crash, or a lease that lapsed). That costs one retry.
			r.Failures++
			crashed = true
		}
		r.Seq, r.Delivery, r.Released, r.Replica = l.Stream, l.Delivered, false, w.cfg.Replica
		r.Attempts++
		if r.Target == "" && p.target != "" {
			r.Target = p.target
			r.Workload = build.WorkloadName(s.req.ID)
			r.TimeoutSeconds = int((p.timeout + time.Second - 1) / time.Second) // never round down to 0
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, errFinished) {
			s.bind(rec) // clean up after an owner that could not
		}
		return rec, err
	}
	if crashed {
		s.log.Warn("adopting a build whose previous delivery vanished", "failures", rec.Failures)
	}
	if err := s.announce(ctx, rec, created); err != nil {
		return rec, err
	}
	if rec.Failures >= w.cfg.MaxDeliver {
		s.bind(rec)
		return rec, exhausted(rec.Failures)
	}
	if rec.Abort {
		s.bind(rec)
		return rec, errAborted
	}
	// A stop published before this claim wins even if the stop consumer has not got to it
	// yet (both queues are read at once): one direct read of the build's stop subject.
	if reason, ok := w.pendingStop(ctx, s.req.ID); ok {
		s.bind(rec)
		return rec, abortCause{reason: reason}
	}
	return rec, nil
}

// pendingStop reports a stored stop request for build id.
func (w *Worker) pendingStop(ctx context.Context, id string) (string, bool) {
	msg, err := w.res.StopStream.GetLastMsgForSubject(ctx, w.cfg.Layout.StopSubject(id))
	if err != nil {
		if !errors.Is(err, jetstream.ErrMsgNotFound) {
			w.log.Warn("looking for a stop failed; the stop consumer still applies it", "build", id, "err", err)
		}
		return "", false
	}
	stop, err := protocol.DecodeStopRequest(msg.Data)
	if err != nil || stop.ID != id {
		return "", false // the stop consumer dead-letters it
	}
	return stopReason(stop), true
}

// bind points the session at the workload an earlier delivery may have launched, so that
// ending the build here kills and cleans it up.
func (s *session) bind(rec protocol.Record) {
	t, ok := s.w.cfg.Targets[rec.Target]
	if rec.Target == "" || !ok {
		return
	}
	job := build.NewJob(s.req, rec)
	s.target, s.job, s.launched = &t, &job, true
}

// newJob is the job of this build as the record states it, with the W3C trace context of
// the span in ctx, so that the workload continues the build's trace under its launch.
func newJob(ctx context.Context, req protocol.BuildRequest, rec protocol.Record) build.Job {
	job := build.NewJob(req, rec)
	job.TraceParent, job.TraceState = tracing.W3C(ctx)
	return job
}

// announce publishes the queued event of a record this replica created and, on a
// redelivery, re-publishes every state the build reached recently: a publish that failed
// before is made good, and one that did not is dropped by the stream's dedupe window.
func (s *session) announce(ctx context.Context, rec protocol.Record, created bool) error {
	w := s.w
	var reached []protocol.State
	if created {
		reached = append(reached, protocol.StateQueued)
	}
	if s.lease.Delivered > 1 {
		recent := func(t *time.Time) bool { return t != nil && time.Since(*t) < w.cfg.DuplicateWindow/2 }
		if !created && recent(&rec.QueuedAt) {
			reached = append(reached, protocol.StateQueued)
		}
		if recent(rec.DispatchedAt) {
			reached = append(reached, protocol.StateDispatched)
		}
		if recent(rec.RunningAt) {
			reached = append(reached, protocol.StateRunning)
		}
	}
	for _, st := range reached {
		if err := w.events.PublishState(ctx, rec, st); err != nil {
			return err
		}
	}
	return nil
}

func exhausted(failures int) error {
	return build.Permanent(protocol.StateFailed, protocol.ReasonDispatchExhausted,
		fmt.Errorf("gave up after %d failed deliveries", failures))
}

// launch launches the workload on the recorded target and records the dispatch. A build
// with no recorded target could not be routed: planErr says why.
func (s *session) launch(ctx context.Context, rec protocol.Record, planErr error) error {
	w := s.w
	if rec.Target == "" {
		return planErr
	}
	t, ok := w.cfg.Targets[rec.Target]
	if !ok {
		return build.Permanent(protocol.StateRejected, protocol.ReasonTargetRemoved,
			fmt.Errorf("target %q recorded for this build is no longer configured", rec.Target))
	}
	s.target = &t
	lctx, span := tracing.Tracer(ctx).Start(ctx, "launch", trace.WithAttributes(tracing.AttrTarget.String(rec.Target)))
	job := newJob(lctx, s.req, rec)
	span.SetAttributes(attribute.Bool("buildfleet.adopt", job.Adopt), attribute.String("buildfleet.workload", job.Workload))
	s.job = &job
	s.launched = true // from here on a workload may exist, whatever Launch returns
	launch := func() error { return t.Executor.Launch(lctx, job) }
	var err error
	if job.Adopt {
		// Following a pod that already runs is not a launch: an open breaker must not
		// stop it.
		err = launch()
	} else {
		err = w.breakers.launch(lctx, rec.Target, launch)
	}
	if err != nil {
		tracing.Fail(span, err)
	}
	span.End()
	if err != nil {
		return err
	}
	// A stop may have come in while the launch was under way: the record says so.
	first := false
	rec, err = w.records.Mutate(ctx, s.req.ID, func(r *protocol.Record, _ bool) error {
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
		// Queued is when the stream stored the request: the server's clock, and the time
		// it waited in the queue, whoever published it.
		queued := rec.QueuedAt
		if md, err := s.lease.Msg().Metadata(); err == nil {
			queued = md.Timestamp
		}
		w.metrics.BuildsDispatched.WithLabelValues(rec.Target).Inc()
		w.metrics.QueueToDispatch.WithLabelValues(rec.Target).Observe(seconds(rec.DispatchedAt.Sub(queued)))
		return w.events.Publish(ctx, rec)
	}
	return nil
}

// stillOwned stops a write to a record that another writer finished or took over meanwhile.
func (s *session) stillOwned(r *protocol.Record) error {
	switch {
	case r.State.Terminal():
		return errFinished
	case r.Seq != s.lease.Stream:
		return errDuplicate
	case r.Delivery != s.lease.Delivered:
		return errStale
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
		first = false // fn may run twice: on a remembered record, then on the stored one
		if r.RunningAt != nil {
			return record.ErrNoChange
		}
		at := now()
		r.State, r.RunningAt, first = protocol.StateRunning, &at, true
		return nil
	})
	if err == nil && first {
		if rec.DispatchedAt != nil {
			w.metrics.DispatchToRunning.WithLabelValues(rec.Target).Observe(seconds(rec.RunningAt.Sub(*rec.DispatchedAt)))
		}
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
	case errors.Is(err, errStale):
		// Settling would settle the newer delivery's message too: leave it, and the
		// workload, to the delivery that owns them.
		s.log.Info("a newer delivery of this request owns the build; this one stands down")
	case errors.Is(err, errHandover) || errors.Is(cause, errHandover):
		s.handover(ctx)
	case errors.Is(err, errAborted) || errors.Is(cause, errAborted):
		s.kill(ctx)
		reason := abortReason(err)
		if reason == "" {
			reason = abortReason(cause)
		}
		s.finish(ctx, build.Outcome{State: protocol.StateAborted, Message: reason})
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

// retry gives a transiently failed delivery back with backoff, or ends the build once its
// failures use up MaxDeliver.
func (s *session) retry(ctx context.Context, err error) {
	w := s.w
	rec, merr := s.giveBack(ctx, func(r *protocol.Record) { r.Failures++ })
	switch {
	case errors.Is(merr, errStale), errors.Is(merr, errFinished), errors.Is(merr, errDuplicate):
		s.fail(ctx, merr)
		return
	case merr != nil:
		// Not counted here; the next claim finds the delivery unreleased and counts it.
		s.log.Warn("transient failure, and recording it failed too; retrying", "err", err, "record_err", merr)
		w.settleErr(s.lease.Nak(w.backoff(1)), "nak with delay")
		return
	case rec.Failures >= w.cfg.MaxDeliver:
		s.log.Warn("transient failures used up the delivery budget", "err", err, "failures", rec.Failures)
		s.finish(ctx, build.Failed(protocol.ReasonDispatchExhausted, "gave up after %d failed deliveries: %v", rec.Failures, err))
		return
	}
	d := w.backoff(rec.Failures)
	s.log.Warn("transient failure; retrying", "err", err, "failures", rec.Failures, "in", d)
	w.settleErr(s.lease.Nak(d), "nak with delay")
}

// handover gives the build to another replica at once, leaving its pod (a local process
// cannot outlive this replica and is killed by Release).
func (s *session) handover(ctx context.Context) {
	w := s.w
	_, err := s.giveBack(ctx, func(r *protocol.Record) { r.Handovers++ })
	if errors.Is(err, errStale) {
		s.fail(ctx, err)
		return
	}
	if err != nil {
		s.log.Warn("could not record the handover; the redelivery counts as a failure", "err", err)
	}
	s.log.Info("handed over")
	w.settleErr(s.lease.Nak(0), "nak on handover")
}

// giveBack releases the workload and records, as the owner, why this delivery hands the
// message back: count adds it to the failures or the handovers.
func (s *session) giveBack(ctx context.Context, count func(r *protocol.Record)) (protocol.Record, error) {
	if s.launched {
		s.releaseWorkload(ctx)
	}
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	return s.w.records.Mutate(sctx, s.req.ID, func(r *protocol.Record, _ bool) error {
		if err := s.stillOwned(r); err != nil {
			return err
		}
		count(r)
		r.Released = true
		return nil
	})
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
// An empty outcome only re-announces the recorded end. A passing NATS fault is retried
// while the lease is kept: giving the message back would run a finished process again.
func (s *session) finish(ctx context.Context, o build.Outcome) {
	w := s.w
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishRetryFor+settleTimeout)
	defer cancel()
	var rec, endedRec protocol.Record
	ended, endedHere := false, false // this Mutate's write ended the build; one of them did
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = 100*time.Millisecond, 2*time.Second, finishRetryFor
	err := backoff.Retry(func() error {
		var err error
		rec, err = w.records.Mutate(sctx, s.req.ID, func(r *protocol.Record, _ bool) error {
			ended = false // fn may run more than once
			if r.State.Terminal() || o.State == "" {
				return record.ErrNoChange
			}
			if err := s.stillOwned(r); err != nil {
				return err
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
			ended = true
			return nil
		})
		if err == nil && ended {
			endedHere, endedRec = true, rec // a retry of the publish finds it terminal already
		}
		switch {
		case errors.Is(err, errStale), errors.Is(err, errDuplicate):
			return backoff.Permanent(err)
		case err != nil:
			return err
		case !rec.State.Terminal():
			return backoff.Permanent(fmt.Errorf("record of %s is %s, not finished", s.req.ID, rec.State))
		}
		return w.events.Publish(sctx, rec)
	}, backoff.WithContext(b, sctx))
	if endedHere {
		w.countEnd(endedRec) // even if its event is still to go out: the next delivery sends it
	}
	if errors.Is(err, errStale) || errors.Is(err, errDuplicate) {
		s.fail(ctx, err)
		return
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
	trace.SpanFromContext(ctx).SetAttributes(tracing.AttrState.String(string(rec.State)), tracing.AttrReason.String(string(rec.Reason)))
	s.log.Info("build finished", "state", rec.State, "reason", rec.Reason)
	if rec.State == protocol.StateRejected ||
		(rec.State == protocol.StateFailed && rec.Reason == protocol.ReasonDispatchExhausted) {
		w.deadLetter(sctx, "request", s.lease, rec.Reason, rec.Message)
		return
	}
	w.settleErr(s.lease.Ack(sctx), "ack")
}

// deadLetter keeps a copy of a message that can never succeed, then terminates it. A dead
// letter that cannot be written is retried a few times, then the message is terminated
// anyway (and logged in full): a poison message must not circle for ever.
func (w *Worker) deadLetter(ctx context.Context, kind string, l *bfjs.Lease, reason protocol.Reason, message string) {
	err := bfjs.DeadLetter(ctx, w.js, w.cfg.Layout, kind, l, reason, message)
	if err != nil && l.Delivered < deadLetterTries {
		w.log.Warn("dead letter failed; retrying", "err", err)
		w.settleErr(l.Nak(w.backoff(int(l.Delivered))), "nak after failed dead letter")
		return
	}
	if err != nil {
		w.log.Error("dead letter failed for good; terminating the message, its body follows",
			"err", err, "subject", l.Msg().Subject(), "reason", reason, "body", string(l.Msg().Data()))
	}
	w.settleErr(l.Term(string(reason)), "term")
}

// rejectInvalid handles a request that fails validation: a rejected event when the build can
// be named, a dead letter always, and Term, never a redelivery.
func (w *Worker) rejectInvalid(ctx context.Context, l *bfjs.Lease, cause error) {
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	msg := cause.Error()
	w.log.Info("rejected invalid request", "subject", l.Msg().Subject(), "err", msg)
	if id := subjectID(l.Msg().Subject()); protocol.ValidID(id) {
		ended := false
		rec, err := w.records.Mutate(sctx, id, func(r *protocol.Record, exists bool) error {
			ended = false
			if exists && r.Seq != l.Stream {
				// An invalid copy never touches a build another message (or the client's
				// Submit, Seq 0) stands for: the dead letter keeps it.
				return errDuplicate
			}
			if exists && r.State.Terminal() {
				return record.ErrNoChange // a redelivery: announce again below
			}
			if !exists {
				*r = protocol.Record{QueuedAt: now()}
			}
			at := now()
			r.Seq, r.Delivery, r.Replica = l.Stream, l.Delivered, w.cfg.Replica
			r.State, r.Reason, r.Message, r.FinishedAt = protocol.StateRejected, protocol.ReasonInvalidRequest, msg, &at
			ended = true
			return nil
		})
		if err == nil && ended {
			w.countEnd(rec)
		}
		if err == nil && rec.State == protocol.StateRejected {
			err = w.events.Publish(sctx, rec)
		}
		if err != nil && !errors.Is(err, errDuplicate) {
			w.log.Warn("recording the rejection failed; retrying", "err", err)
			w.settleErr(l.Nak(w.backoff(int(l.Delivered))), "nak after failed rejection")
			return
		}
	}
	w.deadLetter(sctx, "request", l, protocol.ReasonInvalidRequest, msg)
}

// seconds is d in seconds, never below zero (clocks of different machines).
func seconds(d time.Duration) float64 { return max(d, 0).Seconds() }

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

func (w *Worker) settleErr(err error, what string) {
	if err != nil {
		w.log.Warn("settling a message failed; the server redelivers it after AckWait", "verb", what, "err", err)
	}
}
