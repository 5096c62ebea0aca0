package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// session carries one delivery of one build request through the pipeline
//
//	route → claim → launch → track → conclude
//
// Each stage returns an error classified where it arose; conclude (conclude.go) maps the
// first one, or the workload's outcome, to the build's next record write and the delivery's
// one settlement.
type session struct {
	w     *Worker
	inc   *record.Incarnation // this replica's incarnation when the delivery arrived
	lease *queue.Lease
	req   protocol.BuildRequest
	log   *slog.Logger
	// mask hides the values of the build's secret variables in what the session records,
	// publishes and logs: a workload's output and its errors may print them.
	mask build.Masker

	own build.Lease     // what the claim granted: fences every later write
	rec protocol.Record // the record as this session last read or wrote it

	target   *Target    // set once the record names a target
	job      *build.Job // set with target: the workload may exist from then on
	launched bool
	rerun    string   // why a local process runs again, for the terminal event
	ship     shipping // the workload's output being followed into its log

	// A session outlives the goroutine that started it when it parks (park.go), so it keeps
	// its contexts: ctx ends with a stop, a handover or the end of the incarnation; delivery
	// is the delivery's own (its span), which settles it.
	ctx      context.Context
	delivery context.Context
	done     func() // releases what intake took for the session
}

// run carries the delivery from its route to its workload's launch, then follows the
// workload: parked in the lot when its executor can be followed without a goroutine, else
// here. Its end (end) concludes and settles the delivery.
func (s *session) run() {
	ctx := s.ctx
	plan, planErr := s.route(ctx)
	err := s.claim(ctx, plan)
	if err == nil {
		err = s.launch(ctx, planErr)
	}
	s.w.taken() // the intake is over: what follows waits on the workload, or concludes
	var outcome build.Outcome
	if err == nil {
		s.startShipping()
		if tr, ok := s.target.Executor.(Tracker); ok && s.w.lot.park(s, tr) {
			return
		}
		outcome, err = s.track(ctx)
	}
	s.end(outcome, err)
}

// end concludes the session from the workload's outcome or the pipeline's first error,
// settles every delivery of the build held here with the one verb, and frees its slot.
func (s *session) end(o build.Outcome, err error) {
	w := s.w
	st := s.conclude(s.ctx, o, err)
	s.closeLog(s.ctx, logLeave) // every way conclude ends has closed the log; this makes sure
	w.records.Forget(s.req.ID)  // done here, however it ended
	for _, dl := range w.held.drop(s.req.ID) {
		w.settle(s.delivery, dl, st)
	}
	s.done()
	w.release()
	w.lot.end()
}

// plan is a routing decision, made before the claim so that the claim's one write also
// records it: the target is in the record before anything is launched, and a redelivery or
// a stop always goes where the build went.
type plan struct {
	target  string
	timeout time.Duration
}

// route is the target the scheduler admitted the build to, checked against this replica's
// own table (a pin to it must be allowed: the image not excluded, isolation kept), or, when
// the scheduler named none or one this replica may not use, a target chosen here (pure: no
// I/O). It is used only when the record has none yet; an adoption keeps the recorded one.
func (s *session) route(ctx context.Context) (plan, error) {
	w := s.w
	_, span := tracing.Tracer(ctx).Start(ctx, "route")
	defer span.End()
	req := routeRequest(s.req)
	var dec routing.Decision
	err := errors.New("no target admitted")
	if target := s.lease.Msg().Headers().Get(protocol.HeaderTarget); target != "" {
		if req.Pin == "" || req.Pin == target {
			admitted := req
			admitted.Pin = target
			dec, err = w.cfg.Routes.Choose(admitted, nil)
		}
		if err == nil && req.Pin == "" {
			dec.Rule = routing.RuleAdmitted
		}
	}
	if err != nil {
		dec, err = w.cfg.Routes.Choose(req, w.breakers.unavailable)
	}
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
	if dec.Isolation != "" {
		span.SetAttributes(attribute.String("buildfleet.route.isolation", dec.Isolation))
	}
	span.AddEvent("chosen", trace.WithAttributes(attribute.StringSlice("buildfleet.route.explanation", dec.Explanation)))
	t := w.cfg.Targets[dec.Target]
	timeout := t.DefaultTimeout
	if s.req.TimeoutSeconds > 0 {
		timeout = time.Duration(s.req.TimeoutSeconds) * time.Second
	}
	return plan{target: dec.Target, timeout: min(timeout, t.MaxTimeout)}, nil
}

// claim makes this replica's incarnation the owner of the build record (build.Claim),
// creating the record when the producer did not (a producer may publish without the client),
// and records p's target if the build has none yet. A record owned by another incarnation
// is taken only when that owner gave it back or its liveness key is gone: read here, after
// the record and inside the same compare-and-set step.
func (s *session) claim(ctx context.Context, p plan) error {
	w, l := s.w, s.lease
	c := build.Claimant{Owner: s.inc.Token, Replica: w.cfg.Replica, Seq: l.Stream, Delivery: l.Delivered,
		Target: p.target, TimeoutSeconds: int((p.timeout + time.Second - 1) / time.Second), // never round down to 0
		Outlives: func(target string) bool {
			t, ok := w.cfg.Targets[target]
			return ok && !t.Executor.Reruns()
		}}
	var claimed build.Claimed
	var prior protocol.Record // the record as the claim found it: whom a takeover took from
	rec, _, err := w.records.Mutate(ctx, s.req.ID, func(r protocol.Record, exists bool) (protocol.Record, bool, error) {
		prior = r
		alive := false
		if exists && r.Owner != "" && r.Owner != c.Owner && !r.Released && !r.State.Terminal() {
			var err error
			if alive, err = w.live.Alive(ctx, r.Owner); err != nil {
				return r, false, err
			}
		}
		cl, err := build.Claim(r, exists, c, alive, now())
		if err != nil {
			return r, false, err
		}
		claimed = cl
		return cl.Record, true, nil
	})
	s.rec = rec
	if errors.Is(err, build.ErrFinished) {
		s.bind(rec) // clean up after an owner that could not
	}
	if err != nil {
		return err
	}
	s.own = claimed.Lease
	// Bound before anything else can fail: a stop that cuts the announcement short must
	// still find the workload to kill.
	s.bind(rec)
	if how := takeoverHow(claimed.How); how != "" {
		s.tookOver(how, prior.Owner, prior.Replica, rec.Failures)
	}
	if err := s.announce(ctx, rec, claimed); err != nil {
		return err
	}
	if s.target != nil && rec.DispatchedAt != nil && s.target.Executor.Reruns() {
		switch claimed.How {
		case build.Recovered:
			s.rerun = "run again: the replica that ran it first vanished, and a local process cannot be adopted"
		case build.Adopted:
			s.rerun = "run again: it was handed over, and a local process cannot be adopted"
		}
	}
	if rec.Failures >= w.cfg.MaxDeliver {
		return build.Permanent(protocol.StateFailed, protocol.ReasonDispatchExhausted,
			errors.New(build.Exhausted(rec.Failures, "").Message))
	}
	if rec.Abort {
		return abortCause{reason: rec.AbortReason}
	}
	// A stop published before this claim wins even if the stop consumer has not got to it
	// yet (both queues are read at once): one direct read of the build's stop subject.
	if reason, ok := w.pendingStop(ctx, s.req.ID); ok {
		return abortCause{reason: reason}
	}
	return nil
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

// bind points the session at the workload the record names, which an earlier delivery may
// have launched, so that ending the build here kills and cleans it up.
func (s *session) bind(rec protocol.Record) {
	t, ok := s.w.targets[rec.Target]
	if rec.Target == "" || !ok {
		return
	}
	job := build.NewJob(s.req, rec)
	s.target, s.job, s.launched = t, &job, true
}

// announce publishes the queued event of a record this claim created and, on a redelivery,
// re-publishes every state the build reached recently: a publish that failed before is made
// good, and one that did not is dropped by the stream's dedupe window.
func (s *session) announce(ctx context.Context, rec protocol.Record, c build.Claimed) error {
	w := s.w
	var reached []protocol.State
	if c.Created {
		reached = append(reached, protocol.StateQueued)
	}
	if s.lease.Delivered > 1 || c.How != build.Fresh {
		recent := func(t *time.Time) bool { return t != nil && time.Since(*t) < w.cfg.DuplicateWindow/2 }
		if !c.Created && recent(&rec.QueuedAt) {
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

// launch launches the workload on the recorded target and records the dispatch. A build
// with no recorded target could not be routed: planErr says why.
func (s *session) launch(ctx context.Context, planErr error) error {
	w, rec := s.w, s.rec
	if rec.Target == "" {
		return planErr
	}
	t, ok := w.targets[rec.Target]
	if !ok {
		return build.Permanent(protocol.StateRejected, protocol.ReasonTargetRemoved,
			fmt.Errorf("target %q recorded for this build is no longer configured", rec.Target))
	}
	s.target = t
	lctx, span := tracing.Tracer(ctx).Start(ctx, "launch", trace.WithAttributes(tracing.AttrTarget.String(rec.Target)))
	job := newJob(lctx, s.req, rec)
	span.SetAttributes(attribute.Bool("buildfleet.adopt", job.Adopt), attribute.String("buildfleet.workload", job.Workload))
	s.job = &job
	s.launched = true // from here on a workload may exist, whatever Launch returns
	var err error
	switch {
	case !s.inc.Valid():
		// The last look before the side effect: a replica whose liveness may have lapsed
		// starts nothing, since another may own the build by now.
		err = record.ErrIncarnationLost
	case job.Adopt:
		// Following a pod that already runs is not a launch: an open breaker must not
		// stop it.
		err = t.Executor.Launch(lctx, job)
		// An overdue build's pod is gone: the owner that timed it out killed it, and went
		// before it could record so.
		if p, ok := build.AsPermanent(err); ok && p.Outcome.Reason == protocol.ReasonPodLost && rec.Deadline != nil && now().After(*rec.Deadline) {
			err = errTimedOut
		}
	default:
		err = w.breakers.launch(lctx, rec.Target, func() error { return t.Executor.Launch(lctx, job) })
	}
	if err != nil {
		tracing.Fail(span, err)
	}
	span.End()
	if err != nil {
		return err
	}
	// The record says whether a stop came in while the launch was under way, and whether
	// this claim still owns the build. The workload runs now: a passing NATS fault is
	// waited out (until a stop, a handover or the end of this incarnation), not answered by
	// throwing the launched workload away.
	rec, first, err := s.persist(ctx, func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		return build.Dispatch(r, s.own, now())
	})
	if rec.ID != "" {
		s.rec = rec
	}
	if err != nil {
		return err
	}
	s.job.Deadline = *rec.Deadline
	if !first {
		return nil
	}
	// Queued is when the stream stored the request: the server's clock, and the time it
	// waited in the queue, whoever published it.
	queued := rec.QueuedAt
	if md, err := s.lease.Msg().Metadata(); err == nil {
		queued = md.Timestamp
	}
	w.metrics.BuildsDispatched.WithLabelValues(rec.Target).Inc()
	w.metrics.QueueToDispatch.WithLabelValues(rec.Target).Observe(seconds(rec.DispatchedAt.Sub(queued)))
	return s.retrying(ctx, "publishing the dispatched event", func() error { return w.events.Publish(ctx, rec) })
}

// newJob is the job of this build as the record states it, with the W3C trace context of
// the span in ctx, so that the workload continues the build's trace under its launch.
func newJob(ctx context.Context, req protocol.BuildRequest, rec protocol.Record) build.Job {
	job := build.NewJob(req, rec)
	job.TraceParent, job.TraceState = tracing.W3C(ctx)
	return job
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
	rec, changed, err := w.records.Mutate(ctx, s.req.ID, func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		return build.Running(r, s.own, now())
	})
	if err == nil && changed {
		if rec.DispatchedAt != nil {
			w.metrics.DispatchToRunning.WithLabelValues(rec.Target).Observe(seconds(rec.RunningAt.Sub(*rec.DispatchedAt)))
		}
		err = w.events.Publish(ctx, rec)
	}
	if err != nil && ctx.Err() == nil {
		s.log.Warn("recording running failed", "err", err)
	}
}

// seconds is d in seconds, never below zero (clocks of different machines).
func seconds(d time.Duration) float64 { return max(d, 0).Seconds() }
