package worker

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A shared consumer can be deleted under a running fleet (by an operator, by a stream
// restored from backup). A consumer made again delivers every request anew, builds still
// running among them. That is safe at any moment: ownership lives in the build records, so
// a new delivery of a build whose owner lives only waits (session.go, ErrOwned), and the
// owner carries on. So a replica that finds a consumer gone provisions it again at once,
// and hands nothing over.

// watchConsumer re-reads the request consumer every third of AckWait. A newer replica may
// have lowered AckWait (a rolling update), and heartbeats at the old pace would let leases
// lapse. And a replica too busy to fetch would not otherwise learn that the consumer is gone.
func (w *Worker) watchConsumer(ctx context.Context) error {
	failures := 0
	for pause(ctx, w.heartbeatInterval()) {
		info, err := w.res.Requests.Info(ctx)
		switch {
		case err == nil && info.Config.AckWait > 0:
			w.ackWait.Store(int64(info.Config.AckWait))
			failures = 0
		case errors.Is(err, jetstream.ErrConsumerNotFound):
			failures++
			if err := w.reprovision(ctx, "request", err, failures); err != nil {
				return err
			}
		}
	}
	return nil
}

// consumerGone tells a deleted consumer from a passing fault. A pull on a deleted consumer
// gets no responders, which is also what a NATS restart looks like, so ask the server.
func (w *Worker) consumerGone(ctx context.Context, c jetstream.Consumer, err error) bool {
	if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
		return true
	}
	if !errors.Is(err, nats.ErrNoResponders) {
		return false
	}
	info := c.CachedInfo()
	_, cerr := w.js.Consumer(ctx, info.Stream, info.Name)
	return errors.Is(cerr, jetstream.ErrConsumerNotFound)
}

// reprovision brings back a shared consumer that was deleted under the replica, after a
// backoff, and fails only when the replica has no way to (then the caller stops the
// replica: never consume silently nothing).
func (w *Worker) reprovision(ctx context.Context, which string, cause error, attempt int) error {
	if w.cfg.Reprovision == nil {
		return fmt.Errorf("%s consumer is gone: %w", which, cause)
	}
	d := w.backoff(attempt)
	w.log.Error("a shared consumer is gone; provisioning the JetStream layout again", "consumer", which, "err", cause, "in", d)
	if !pause(ctx, d) {
		return nil
	}
	// Another loop of this replica, or another replica, may have made it meanwhile: a late
	// provisioning would re-make a consumer an operator has deleted since, unseen.
	c := w.res.Requests
	switch which {
	case "stop":
		c = w.res.Stops
	case "run":
		c = w.res.Runs
	}
	if _, err := c.Info(ctx); err == nil {
		w.log.Info("shared consumer is back already", "consumer", which)
		return nil
	}
	if err := w.cfg.Reprovision(ctx); err != nil {
		if ctx.Err() == nil {
			w.log.Error("provisioning the JetStream layout again failed; retrying", "err", err)
		}
		return nil
	}
	w.log.Info("shared consumer provisioned again", "consumer", which)
	return nil
}

// CheckConsumers reports whether the shared consumers, requests, runs and stops, exist on the
// server: readiness. A replica whose consumer is gone takes no builds until it is back.
func (w *Worker) CheckConsumers(ctx context.Context) error {
	if !w.js.Conn().IsConnected() {
		return errors.New("waiting for NATS") // asking would only wait out the probe
	}
	var errs []error
	for _, c := range []jetstream.Consumer{w.res.Requests, w.res.Runs, w.res.Stops} {
		info := c.CachedInfo()
		if _, err := c.Info(ctx); err != nil {
			errs = append(errs, fmt.Errorf("consumer %s on stream %s: %w", info.Name, info.Stream, err))
		}
	}
	return errors.Join(errs...)
}
