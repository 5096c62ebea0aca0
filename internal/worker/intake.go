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
		free := w.cfg.Concurrency - int(w.active.Load())
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
				builds.Go(func() error {
					defer w.release()
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
func (w *Worker) handle(ctx context.Context, msg jetstream.Msg) {
	l, err := queue.NewLease(msg)
	if err != nil {
		w.log.Error("message without JetStream metadata; leaving it to AckWait", "err", err)
		return
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
	defer span.End()
	if ctx.Err() != nil { // arrived while shutting down: give it straight back
		w.settle(ctx, l, nak(0))
		return
	}
	req, err := decodeRequest(msg)
	if err != nil {
		w.settle(ctx, l, w.rejectInvalid(ctx, l, err))
		return
	}
	inc := w.live.Current()
	if !inc.Valid() {
		// This replica's liveness is lapsing or being made anew: it may claim nothing now.
		w.settle(ctx, l, nak(w.cfg.RetryMin))
		return
	}
	log := w.log.With("build", req.ID, "seq", l.Stream, "delivery", l.Delivered)
	if sc := span.SpanContext(); sc.IsValid() {
		log = log.With("trace_id", sc.TraceID().String())
	}
	// The session ends with the replica's handover (ctx), a stop (held.abort), or the end of
	// this incarnation: a replica whose liveness lapsed holds nothing.
	bctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopLost := context.AfterFunc(inc.Context(), func() { cancel(record.ErrIncarnationLost) })
	defer stopLost()
	if w.held.hold(req.ID, l, cancel) {
		log.Info("another delivery of this build is held here; this one is settled with it")
		return
	}
	s := &session{w: w, inc: inc, lease: l, req: req, log: log,
		mask: build.NewMasker(req.Env, req.SecretEnv, w.cfg.SecretPatterns)}
	out := s.run(bctx)
	w.records.Forget(req.ID) // done here, however it ended
	for _, dl := range w.held.drop(req.ID) {
		w.settle(ctx, dl, out)
	}
}

// decodeRequest validates a request against the schema, and against the build its message
// names.
func decodeRequest(msg jetstream.Msg) (protocol.BuildRequest, error) {
	req, err := protocol.DecodeBuildRequest(msg.Data())
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
