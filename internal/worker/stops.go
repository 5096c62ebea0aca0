package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// applyStops takes stop requests from the shared durable consumer: every stop is applied
// exactly once by some replica, even if none was running when it was published. A consumer
// deleted under the replica is provisioned again.
func (w *Worker) applyStops(ctx context.Context) error {
	failures := 0
	for {
		start := time.Now()
		err := w.consumeStops(ctx)
		if err == nil || ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > w.cfg.RetryMax {
			failures = 0 // it ran well for a while: start the backoff afresh
		}
		failures++
		if errors.Is(err, errConsumerGone) {
			if err := w.reprovision(ctx, "stop", err, failures); err != nil {
				return err
			}
			continue
		}
		// NATS away or slow: consume again after a backoff, never stop silently.
		d := w.backoff(failures)
		w.log.Warn("consuming stops failed; retrying", "err", err, "in", d)
		if !pause(ctx, d) {
			return nil
		}
	}
}

// errConsumerGone marks the loss of a shared consumer.
var errConsumerGone = errors.New("the consumer is gone")

func (w *Worker) consumeStops(ctx context.Context) error {
	it, err := w.res.Stops.Messages(jetstream.PullMaxMessages(DefaultStopWorkers))
	if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted) {
		return fmt.Errorf("%w: %w", errConsumerGone, err)
	}
	if err != nil {
		return fmt.Errorf("stop consumer: %w", err)
	}
	stopIt := context.AfterFunc(ctx, it.Stop)
	defer stopIt()
	var g errgroup.Group
	g.SetLimit(DefaultStopWorkers)
	defer func() { _ = g.Wait() }()
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			if ctx.Err() != nil {
				return nil
			}
			return errors.New("stop consumer: the message iterator closed by itself")
		}
		if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
			return fmt.Errorf("%w: %w", errConsumerGone, err)
		}
		if err != nil {
			w.log.Warn("reading stops failed; retrying", "err", err)
			continue
		}
		g.Go(func() error {
			w.applyStop(ctx, msg)
			return nil
		})
	}
}

// applyStop sets the abort flag in the record and kills the workload on its recorded target.
// A build that was never routed is ended as aborted right here, so a stop gets through at
// once even when the request queue is full. The stop's delivery is settled once, at the end.
func (w *Worker) applyStop(ctx context.Context, msg jetstream.Msg) {
	l, err := queue.NewLease(msg)
	if err != nil {
		w.log.Error("stop without JetStream metadata", "err", err)
		return
	}
	w.leases.Add(l)
	ctx, span := tracing.StartProcess(ctx, w.tracer, msg, w.cfg.Layout.StopSubject("{id}"), w.cfg.Layout.StopConsumer(),
		tracing.AttrBuildID.String(subjectID(msg.Subject())))
	defer span.End()
	w.settleAs(ctx, "stop", l, w.stop(ctx, l))
}

func (w *Worker) stop(ctx context.Context, l *queue.Lease) settlement {
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	msg := l.Msg()
	stop, err := protocol.DecodeStopRequest(msg.Data())
	if err == nil {
		err = sameBuild(msg.Subject(), stop.ID, "stop")
	}
	if err != nil {
		w.log.Info("rejected invalid stop", "subject", msg.Subject(), "err", err)
		return deadLetter(protocol.ReasonInvalidRequest, err.Error())
	}
	reason := stopReason(stop)
	retry := nak(w.backoff(int(l.Delivered)))
	defer w.records.Forget(stop.ID) // the holder, here or elsewhere, carries on from the store
	rec, changed, err := w.records.Mutate(sctx, stop.ID, transition(func(r protocol.Record, exists bool) (protocol.Record, error) {
		r, _, err := build.Abort(r, exists, reason, now())
		return r, err
	}))
	ended := changed && rec.State == protocol.StateAborted
	if ended {
		w.countEnd(rec)
	}
	switch {
	case errors.Is(err, build.ErrFinished) && rec.State == protocol.StateAborted && rec.Target == "":
		// Ended by an earlier delivery of this stop, whose event may not have got out.
		if err := w.events.Publish(sctx, rec); err != nil {
			return retry
		}
	case errors.Is(err, build.ErrFinished):
		// Nothing to stop: the build already ended.
	case err != nil:
		w.log.Warn("applying stop failed; retrying", "build", stop.ID, "err", err)
		return retry
	case ended:
		if err := w.events.Publish(sctx, rec); err != nil {
			return retry
		}
	default:
		held := w.held.abort(stop.ID, reason)
		if t, ok := w.cfg.Targets[rec.Target]; ok && !held {
			job := build.Job{ID: rec.ID, Target: rec.Target, Workload: rec.Workload, Attempt: rec.Attempts}
			if err := t.Executor.Kill(sctx, job); err != nil {
				// Nobody here holds it to kill it later: try again.
				w.log.Warn("killing the workload of a stopped build failed; retrying", "build", stop.ID, "err", err)
				return retry
			}
		}
	}
	w.log.Info("stop applied", "build", stop.ID, "state", rec.State)
	return ack()
}

// followStops reads every new stop on this replica, so that the replica holding the build
// ends it at once, whichever replica applies the stop to the record.
func (w *Worker) followStops(ctx context.Context) error {
	// Start at an explicit sequence rather than "new": an ordered consumer that resets
	// before its first message would otherwise start at "new" again and skip the gap. A
	// follower that cannot be set up (NATS is away) is set up again from where it was, so
	// that no stop published meanwhile is missed.
	var next uint64
	for failures := 0; ; failures++ {
		if failures > 0 && !pause(ctx, w.backoff(failures)) {
			return nil
		}
		if next == 0 {
			stream, err := w.js.Stream(ctx, w.cfg.Layout.StopStream())
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				w.log.Warn("setting up the stop follower failed; retrying", "err", err)
				continue
			}
			next = stream.CachedInfo().State.LastSeq + 1
		}
		start := time.Now()
		err := w.followStopsFrom(ctx, &next)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > w.cfg.RetryMax {
			failures = 0 // it ran well for a while: start the backoff afresh
		}
		w.log.Warn("following stops failed; setting the follower up again", "err", err, "from", next)
	}
}

// followStopsFrom follows the stop stream from sequence *next, advancing it, until ctx ends
// or the follower fails.
func (w *Worker) followStopsFrom(ctx context.Context, next *uint64) error {
	cons, err := w.js.OrderedConsumer(ctx, w.cfg.Layout.StopStream(), jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{w.cfg.Layout.StopSubject("*")},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    *next,
	})
	if err != nil {
		return fmt.Errorf("stop follower: %w", err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("stop follower: %w", err)
	}
	stopIt := context.AfterFunc(ctx, it.Stop)
	defer stopIt()
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			if ctx.Err() != nil {
				return nil
			}
			return errors.New("stop follower: the message iterator closed by itself")
		}
		if err != nil {
			w.log.Warn("following stops failed; retrying", "err", err)
			continue
		}
		if md, err := msg.Metadata(); err == nil {
			*next = md.Sequence.Stream + 1
		}
		id := subjectID(msg.Subject())
		stop, err := protocol.DecodeStopRequest(msg.Data())
		if err != nil || stop.ID != id {
			continue // the durable consumer dead-letters it
		}
		w.sched.stopped(id)
		if w.held.abort(id, stopReason(stop)) {
			w.log.Info("stop reached the replica holding the build", "build", id)
		}
	}
}

// stopReason is what the aborted event says.
func stopReason(s protocol.StopRequest) string {
	if s.Reason == "" {
		return "stopped by request"
	}
	return s.Reason
}
