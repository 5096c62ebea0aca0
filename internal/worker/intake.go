package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// fetchRuns pulls no more admitted builds than there are free build slots, so no message
// waits in a client buffer ageing toward AckWait while nobody looks at it.
func (w *Worker) fetchRuns(ctx, buildsCtx context.Context, builds *errgroup.Group) error {
	failures := 0
	for ctx.Err() == nil {
		free := min(w.cfg.Concurrency-int(w.active.Load()), w.cfg.Intake-int(w.intaking.Load()))
		if free <= 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-w.slotFree:
			}
			continue
		}
		batch, err := w.res.Runs.Fetch(min(free, DefaultMaxBatch), jetstream.FetchMaxWait(w.cfg.FetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				w.active.Add(1)
				w.intaking.Add(1)
				builds.Go(func() error {
					w.handle(buildsCtx, msg)
					return nil
				})
			}
			err = batch.Error()
		}
		if err := w.fetched(ctx, w.res.Runs, "run", err, &failures); err != nil {
			return err
		}
	}
	return nil
}

// fetched deals with how one pull from a shared consumer ("request" or "run") ended: a pull
// that found nothing is no failure; a consumer that is gone is provisioned again; anything
// else is waited out with backoff. It fails only when the consumer cannot be brought back.
func (w *Worker) fetched(ctx context.Context, c jetstream.Consumer, which string, err error, failures *int) error {
	if err == nil || errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, jetstream.ErrPinIDMismatch) { // another replica was pinned: wait for the pin
		*failures = 0
		return nil
	}
	*failures++
	if w.consumerGone(ctx, c, err) {
		return w.reprovision(ctx, which, err, *failures)
	}
	d := w.backoff(*failures)
	w.log.Warn("fetching from a shared consumer failed; retrying", "consumer", which, "err", err, "in", d)
	pause(ctx, d)
	return nil
}

// handle is the whole life of one admitted build's message on this replica: it is
// validated, joins the session of its build if this replica already holds one, or starts
// the build's session here; then it is settled, once, with the verb its session concluded.
// The delivery holds its build slot until then: a session that parks (park.go) holds it on
// after handle returns, and its end gives it back.
func (w *Worker) handle(ctx context.Context, msg jetstream.Msg) {
	s := w.intake(ctx, msg)
	if s == nil {
		w.taken()
		w.release()
		return
	}
	w.lot.begin()
	s.run()
}

// intake takes one delivery in: the session that is to carry it, or nil when it was settled
// here or joined the session of its build that this replica already holds.
func (w *Worker) intake(ctx context.Context, msg jetstream.Msg) *session {
	l, err := queue.NewLease(msg)
	if err != nil {
		w.log.Error("message without JetStream metadata; leaving it to AckWait", "err", err)
		return nil
	}
	w.leases.Add(l)
	delivery := "first"
	if l.Delivered > 1 {
		delivery = "redelivery"
	}
	w.metrics.RequestsReceived.WithLabelValues(delivery).Inc()
	// The delivery is one span of the build's trace, continuing the producer's.
	ctx, span := tracing.StartProcess(ctx, w.tracer, msg, w.cfg.Layout.RunSubject("{target}", "{tenant}"), w.cfg.Layout.RunConsumer(),
		tracing.AttrBuildID.String(msgBuildID(msg)), tracing.AttrDelivery.Int64(int64(l.Delivered)),
		tracing.AttrTenant.String(msg.Headers().Get(protocol.HeaderTenant)))
	settled := func(st settlement) *session {
		w.settle(ctx, l, st)
		span.End()
		return nil
	}
	if ctx.Err() != nil { // arrived while shutting down: give it straight back
		return settled(nak(0))
	}
	req, err := decodeRequest(msg, true)
	if err != nil {
		return settled(w.rejectInvalid(ctx, l, err))
	}
	inc := w.live.Current()
	if !inc.Valid() {
		// This replica's liveness is lapsing or being made anew: it may claim nothing now.
		return settled(nak(w.cfg.RetryMin))
	}
	log := w.log.With("build", req.ID, "seq", l.Stream, "delivery", l.Delivered)
	if sc := span.SpanContext(); sc.IsValid() {
		log = log.With("trace_id", sc.TraceID().String())
	}
	// The session ends with the replica's handover (ctx), a stop (held.abort), or the end of
	// this incarnation: a replica whose liveness lapsed holds nothing.
	bctx, cancel := context.WithCancelCause(ctx)
	stopLost := context.AfterFunc(inc.Context(), func() { cancel(record.ErrIncarnationLost) })
	s := &session{w: w, inc: inc, lease: l, req: req, log: log,
		mask: build.NewMasker(req.Env, req.SecretEnv, w.cfg.SecretPatterns),
		ctx:  bctx, delivery: ctx,
		done: func() {
			stopLost()
			cancel(nil)
			span.End()
		}}
	s.ship.s = s
	if w.held.hold(req.ID, l, cancel, s) {
		log.Info("another delivery of this build is held here; this one is settled with it")
		s.done()
		return nil
	}
	return s
}

// decodeRequest validates a request against the schema, and against the build its message
// names. A run message the scheduler marked checked (protocol.HeaderChecked) is only
// parsed: run subjects are the replicas' own; a request's header is never trusted.
func decodeRequest(msg jetstream.Msg, run bool) (protocol.BuildRequest, error) {
	decode := protocol.DecodeBuildRequest
	if run && msg.Headers().Get(protocol.HeaderChecked) != "" {
		decode = protocol.DecodeCheckedBuildRequest
	}
	req, err := decode(msg.Data())
	if err != nil {
		return req, err
	}
	if id := msgBuildID(msg); id != req.ID {
		return req, fmt.Errorf("message names build %q but the request is for %q", id, req.ID)
	}
	return req, nil
}

// msgBuildID is the build a request or run message names: a run message in a header (its
// subject names its target and tenant), a request by its subject's last token.
func msgBuildID(msg jetstream.Msg) string {
	if h := msg.Headers(); h != nil {
		if id := h.Get(protocol.HeaderBuild); id != "" {
			return id
		}
	}
	return subjectID(msg.Subject())
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
