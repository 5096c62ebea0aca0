// Package worker is one buildfleet replica: it pulls build requests from the shared durable
// consumer and carries each through
//
//	validate → claim (KV) → route → launch → track → finish → settle
//
// holding the request message un-acked for as long as the build runs: the message is the
// build's lease. It also applies stop requests, from their own stream, to whichever build they
// name, wherever it runs.
package worker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/events"
	bfjs "github.com/buildfleet/buildfleet/internal/jetstream"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/internal/telemetry"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Defaults for the knobs Config leaves at zero.
const (
	DefaultFetchWait   = 2 * time.Second
	DefaultMaxBatch    = 64
	DefaultStopWorkers = 64
	settleTimeout      = 10 * time.Second
	finishRetryFor     = 30 * time.Second // how long finish keeps the lease through a NATS fault
	deadLetterTries    = 5                // deliveries that may fail to dead-letter before Term anyway
)

// Target is one place builds can run, as the worker sees it.
type Target struct {
	Executor       Executor
	DefaultTimeout time.Duration
	MaxTimeout     time.Duration
}

// Config is everything one replica needs besides its NATS resources.
type Config struct {
	Layout       protocol.Layout
	Replica      string        // this replica's name, in records and event sources
	Concurrency  int           // builds this replica holds at once
	AckWait      time.Duration // the consumer's; heartbeats go out every third of it
	MaxDeliver   int           // failed deliveries (handovers excepted) before dispatch_exhausted
	RetryMin     time.Duration // backoff after the first transient failure
	RetryMax     time.Duration // backoff ceiling
	DrainTimeout time.Duration // how long shutdown waits for held builds to be handed over
	// BreakerFailures consecutive transient launch failures open a target's circuit
	// breaker for BreakerCooldown (0: the defaults).
	BreakerFailures int
	BreakerCooldown time.Duration
	FetchWait       time.Duration // how long one pull waits for messages (0: DefaultFetchWait)
	// DuplicateWindow is the streams' Nats-Msg-Id window: a redelivery re-announces the
	// states its build reached within half of it, which the stream drops if already stored.
	DuplicateWindow time.Duration
	Routes          *routing.Table
	Targets         map[string]Target
	// Services run beside the intake for as long as it runs: what the executors need
	// running (the Kubernetes informers). One that fails stops the replica.
	Services []func(context.Context) error
	// Reprovision provisions the JetStream layout again (idempotently). A replica whose
	// shared consumer was deleted under it calls it, with backoff, and goes on consuming;
	// it is not ready meanwhile. Without it the replica stops with an error instead.
	Reprovision func(context.Context) error
	// Metrics are counted into (nil: a set of metrics nobody serves).
	Metrics *telemetry.Metrics
	// TracerProvider starts each delivery's process span (nil: the global provider); every
	// span under it comes from the same provider.
	TracerProvider trace.TracerProvider
	Logger         *slog.Logger
}

// Validate checks the configuration; errors name the field.
func (c Config) Validate() error {
	var errs []error
	check := func(ok bool, format string, args ...any) {
		if !ok {
			errs = append(errs, fmt.Errorf(format, args...))
		}
	}
	check(c.Layout.Prefix != "", "worker: Layout: prefix is empty")
	check(c.Replica != "", "worker: Replica: is empty")
	check(c.Concurrency >= 1, "worker: Concurrency: must be at least 1 (got %d)", c.Concurrency)
	check(c.AckWait >= time.Second, "worker: AckWait: must be at least 1s (got %s)", c.AckWait)
	check(c.MaxDeliver >= 1, "worker: MaxDeliver: must be at least 1 (got %d)", c.MaxDeliver)
	check(c.RetryMin > 0 && c.RetryMin <= c.RetryMax, "worker: RetryMin/RetryMax: need 0 < %s <= %s", c.RetryMin, c.RetryMax)
	check(c.DrainTimeout > 0, "worker: DrainTimeout: must be positive")
	check(c.DuplicateWindow > 0, "worker: DuplicateWindow: must be positive")
	check(c.Routes != nil, "worker: Routes: no routing table")
	if c.Routes != nil {
		for _, t := range c.Routes.Targets() {
			tg, ok := c.Targets[t.Name]
			check(ok && tg.Executor != nil, "worker: Targets: no executor for target %q", t.Name)
			check(!ok || (tg.DefaultTimeout > 0 && tg.DefaultTimeout <= tg.MaxTimeout),
				"worker: Targets[%q]: need 0 < default timeout %s <= max %s", t.Name, tg.DefaultTimeout, tg.MaxTimeout)
		}
	}
	return errors.Join(errs...)
}

// Causes with which a build's context is cancelled.
var (
	errHandover = errors.New("handed over: this replica is shutting down")
	errAborted  = errors.New("aborted by a stop request")
	errTimedOut = errors.New("build timeout reached")
)

// Worker is one replica.
type Worker struct {
	cfg      Config
	js       jetstream.JetStream
	res      bfjs.Provisioned
	records  *record.Store
	breakers breakers
	events   *events.Publisher
	leases   *bfjs.Leases
	metrics  *telemetry.Metrics
	tracer   trace.TracerProvider
	log      *slog.Logger
	active   atomic.Int64
	slotFree chan struct{}
	ackWait  atomic.Int64 // the shared consumer's AckWait, as last read from the server

	// held maps a build id to the cancel functions of the deliveries this replica holds for
	// it. A delivery is registered before it claims the build, and the claim reads the
	// build's stop subject: a stop stored before that read is found by it, and one stored
	// after reaches the holder through followStops.
	mu   sync.Mutex
	held map[string]map[*bfjs.Lease]context.CancelCauseFunc
	// lostAt counts the times the request consumer was found gone. A delivery fetched
	// before the last such time is from the old consumer: hold hands it over at once, since
	// handOverHeld may have missed it on its way in.
	lostAt int
}

// New returns a replica over provisioned resources. It starts nothing: call Run.
func New(cfg Config, js jetstream.JetStream, res bfjs.Provisioned) (*Worker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.FetchWait == 0 {
		cfg.FetchWait = DefaultFetchWait
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = telemetry.NewMetrics()
	}
	if cfg.TracerProvider == nil {
		cfg.TracerProvider = otel.GetTracerProvider()
	}
	return &Worker{
		metrics:  cfg.Metrics,
		tracer:   cfg.TracerProvider,
		cfg:      cfg,
		js:       js,
		res:      res,
		records:  record.NewStore(res.Records),
		breakers: newBreakers(cfg, cfg.Logger),
		events:   events.NewPublisher(js, cfg.Layout, "buildfleet/worker/"+cfg.Replica),
		leases:   bfjs.NewLeases(),
		log:      cfg.Logger.With("replica", cfg.Replica),
		slotFree: make(chan struct{}, 1),
		held:     make(map[string]map[*bfjs.Lease]context.CancelCauseFunc),
	}, nil
}

// Run pulls and runs builds until ctx ends, then hands every held build to another replica:
// stop fetching, release each workload (a pod stays, a local process is killed), Nak at
// once so another replica adopts it. It returns when every build has been handed over or
// DrainTimeout has passed.
func (w *Worker) Run(ctx context.Context) error {
	// Builds outlive ctx until they are handed over; their own context ends with errHandover
	// the moment ctx does, without waiting for the intake loops to wind down.
	buildsCtx, handover := context.WithCancelCause(context.WithoutCancel(ctx))
	defer handover(nil)
	stopHandover := context.AfterFunc(ctx, func() { handover(errHandover) })
	defer stopHandover()
	var builds errgroup.Group
	builds.SetLimit(w.cfg.Concurrency)

	w.ackWait.Store(int64(w.cfg.AckWait))
	if info := w.res.Requests.CachedInfo(); info != nil && info.Config.AckWait > 0 {
		w.ackWait.Store(int64(info.Config.AckWait))
	}
	hbCtx, stopHeartbeat := context.WithCancel(context.WithoutCancel(ctx))
	var heartbeat errgroup.Group
	heartbeat.Go(func() error { return w.leases.Heartbeat(hbCtx, w.heartbeatInterval) })
	heartbeat.Go(func() error { return w.watchConsumer(hbCtx) })

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return w.fetchRequests(gctx, buildsCtx, &builds) })
	g.Go(func() error { return w.applyStops(gctx) })
	g.Go(func() error { return w.followStops(gctx) })
	for _, svc := range w.cfg.Services {
		g.Go(func() error { return svc(gctx) })
	}
	err := g.Wait()

	w.log.Info("handing over held builds", "held", w.leases.Len())
	handover(errHandover) // when an intake loop failed rather than ctx ending
	drained := make(chan error, 1)
	var drain errgroup.Group
	drain.Go(func() error { drained <- builds.Wait(); return nil })
	select {
	case <-drained:
	case <-time.After(w.cfg.DrainTimeout):
		w.log.Warn("drain timeout: some builds were not handed over; they return after AckWait", "held", w.leases.Len())
	}
	stopHeartbeat()
	return errors.Join(err, heartbeat.Wait())
}

// heartbeatInterval is a third of the shared consumer's AckWait: two chances in hand.
func (w *Worker) heartbeatInterval() time.Duration {
	return time.Duration(w.ackWait.Load()) / 3
}

// watchConsumer re-reads the request consumer every third of AckWait. A newer replica may
// have lowered AckWait (a rolling update), and heartbeats at the old pace would let leases
// lapse. And the consumer may be gone: a replica too busy to fetch would not otherwise find
// out, and must hand its builds over before anyone makes the consumer again (see
// reprovision).
func (w *Worker) watchConsumer(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(w.heartbeatInterval()):
		}
		info, err := w.res.Requests.Info(ctx)
		switch {
		case err == nil && info.Config.AckWait > 0:
			w.ackWait.Store(int64(info.Config.AckWait))
		case errors.Is(err, jetstream.ErrConsumerNotFound) && w.stillGone(ctx):
			w.handOverHeld(ctx, err)
		}
	}
}

// stillGone asks again, a second later, whether the request consumer is gone: handing every
// build over is not done on one answer.
func (w *Worker) stillGone(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Second):
	}
	_, err := w.res.Requests.Info(ctx)
	return errors.Is(err, jetstream.ErrConsumerNotFound)
}

// fetchRequests pulls no more requests than there are free build slots, so no message waits
// in a client buffer ageing toward AckWait while nobody looks at it.
func (w *Worker) fetchRequests(ctx, buildsCtx context.Context, builds *errgroup.Group) error {
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
		epoch := w.consumerEpoch()
		batch, err := w.res.Requests.Fetch(min(free, DefaultMaxBatch), jetstream.FetchMaxWait(w.cfg.FetchWait))
		if err == nil {
			for msg := range batch.Messages() {
				w.active.Add(1)
				builds.Go(func() error {
					defer w.release()
					w.handle(buildsCtx, msg, epoch)
					return nil
				})
			}
			err = batch.Error()
		}
		if err == nil || errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
			failures = 0
			continue
		}
		failures++
		if w.consumerGone(ctx, err) {
			// Never stop consuming silently: provision the consumer again (not ready
			// meanwhile), or, when this replica cannot, exit so its supervisor restarts it.
			if err := w.reprovision(ctx, "request", err, failures); err != nil {
				return err
			}
			continue
		}
		d := w.backoff(failures)
		w.log.Warn("fetching requests failed; retrying", "err", err, "in", d)
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	return nil
}

// consumerGone tells a deleted consumer from a passing fault. A pull on a deleted consumer
// gets no responders, which is also what a NATS restart looks like, so ask the server.
func (w *Worker) consumerGone(ctx context.Context, err error) bool {
	if errors.Is(err, jetstream.ErrConsumerDeleted) || errors.Is(err, jetstream.ErrConsumerNotFound) {
		return true
	}
	if !errors.Is(err, nats.ErrNoResponders) {
		return false
	}
	info := w.res.Requests.CachedInfo()
	_, cerr := w.js.Consumer(ctx, info.Stream, info.Name)
	return errors.Is(cerr, jetstream.ErrConsumerNotFound)
}

// reprovision brings back a shared consumer that was deleted under the replica, and fails
// only when the replica has no way to (then the caller stops the replica).
//
// A new request consumer delivers again every request the old one had out, builds still
// held by replicas among them, so before it is made every replica must have let go of what
// it holds: otherwise a held build would be claimed a second time and run twice. Each
// replica hands its builds over the moment it finds the consumer gone (here, or in
// watchConsumer, which looks every third of AckWait even when the replica is too busy to
// fetch), and provisioning makes a lost request consumer only once AckWait has passed
// (jetstream.Provision): by then every replica has found out and handed over, and the
// redelivered builds are adopted, as after a rolling update.
func (w *Worker) reprovision(ctx context.Context, which string, cause error, attempt int) error {
	if w.cfg.Reprovision == nil {
		return fmt.Errorf("%s consumer is gone: %w", which, cause)
	}
	if which == "request" {
		w.handOverHeld(ctx, cause)
	}
	d := w.backoff(attempt)
	w.log.Error("a shared consumer is gone; provisioning the JetStream layout again", "consumer", which, "err", cause, "in", d)
	select {
	case <-ctx.Done():
		return nil
	case <-time.After(d):
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

// handOverHeld hands over every build this replica holds, because the consumer that
// delivered them is gone, and waits (up to DrainTimeout) until each has been given back:
// its record says released, so the next delivery adopts it without counting a failure.
func (w *Worker) handOverHeld(ctx context.Context, cause error) {
	w.mu.Lock()
	w.lostAt++
	n := len(w.held)
	for _, cancels := range w.held {
		for _, cancel := range cancels {
			cancel(errHandover)
		}
	}
	w.mu.Unlock()
	if n == 0 {
		return
	}
	w.log.Warn("handing over held builds: their consumer is gone", "held", n, "err", cause)
	deadline := time.Now().Add(w.cfg.DrainTimeout)
	for ctx.Err() == nil && time.Now().Before(deadline) {
		w.mu.Lock()
		n = len(w.held)
		w.mu.Unlock()
		if n == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// CheckConsumers reports whether both shared consumers, requests and stops, exist on the
// server: readiness. A replica whose consumer is gone takes no builds until it is back.
func (w *Worker) CheckConsumers(ctx context.Context) error {
	if !w.js.Conn().IsConnected() {
		return errors.New("waiting for NATS") // asking would only wait out the probe
	}
	var errs []error
	for _, c := range []jetstream.Consumer{w.res.Requests, w.res.Stops} {
		info := c.CachedInfo()
		if _, err := c.Info(ctx); err != nil {
			errs = append(errs, fmt.Errorf("consumer %s on stream %s: %w", info.Name, info.Stream, err))
		}
	}
	return errors.Join(errs...)
}

// InFlight is how many build deliveries the replica holds now, for metrics.
func (w *Worker) InFlight() int { return int(w.active.Load()) }

func (w *Worker) release() {
	w.active.Add(-1)
	select {
	case w.slotFree <- struct{}{}:
	default:
	}
}

// backoff is the redelivery delay after the n-th failure (n >= 1).
func (w *Worker) backoff(n int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = w.cfg.RetryMin
	b.MaxInterval = w.cfg.RetryMax
	b.RandomizationFactor = 0.2 // spread retries without ever dropping far below RetryMin
	b.MaxElapsedTime = 0
	b.Reset()
	d := b.NextBackOff()
	for i := 1; i < n && d < w.cfg.RetryMax; i++ {
		d = b.NextBackOff()
	}
	return min(max(d, w.cfg.RetryMin), w.cfg.RetryMax)
}

// consumerEpoch is how many times the request consumer has been found gone so far.
func (w *Worker) consumerEpoch() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lostAt
}

// hold makes a build cancellable by a stop that reaches this replica. A delivery fetched in
// an earlier consumer epoch than now is handed over at once.
func (w *Worker) hold(id string, l *bfjs.Lease, epoch int, cancel context.CancelCauseFunc) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if epoch != w.lostAt {
		cancel(errHandover)
	}
	m := w.held[id]
	if m == nil {
		m = make(map[*bfjs.Lease]context.CancelCauseFunc, 1)
		w.held[id] = m
	}
	m[l] = cancel
}

func (w *Worker) unhold(id string, l *bfjs.Lease) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.held[id], l)
	if len(w.held[id]) == 0 {
		delete(w.held, id)
	}
}

// holdsOther reports whether this replica holds build id under another lease than l.
func (w *Worker) holdsOther(id string, l *bfjs.Lease) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for other := range w.held[id] {
		if other != l {
			return true
		}
	}
	return false
}

// abortCause cancels a build for a stop; it carries the stop's reason to the aborted event.
type abortCause struct{ reason string }

func (a abortCause) Error() string        { return errAborted.Error() + ": " + a.reason }
func (a abortCause) Is(target error) bool { return target == errAborted }

// abortReason is the stop's reason carried by err, if any.
func abortReason(err error) string {
	var a abortCause
	if errors.As(err, &a) {
		return a.reason
	}
	return ""
}

// abortHeld cancels the build id if this replica holds it.
func (w *Worker) abortHeld(id, reason string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cancel := range w.held[id] {
		cancel(abortCause{reason: reason})
	}
	return len(w.held[id]) > 0
}

// settleCtx is for the I/O that settles a build after its own context has ended.
func settleCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
}

func now() time.Time { return time.Now().UTC() }
