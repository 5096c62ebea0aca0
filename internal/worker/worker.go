// Package worker is one buildfleet replica. One replica at a time (the one the server pins to
// the request consumer) is the scheduler (schedule.go): it holds what waits and admits
// builds to the run stream in fair-share order, within the fleet's, each target's and each
// tenant's cap. Every replica pulls admitted builds from the shared run consumer and carries
// each delivery through
//
//	intake → validate → route (the scheduler's choice, checked) → claim (record, fenced) →
//	launch → track → conclude → settle
//
// (intake.go, session.go, conclude.go, settle.go), holding the run message un-acked for as
// long as the build runs so that the run consumer's MaxAckPending caps the fleet's running
// builds. The
// message decides who may be offered a build, never who owns it: the build record does,
// fenced by the owner's liveness key (record.Liveness) and the claim's lease (build.Lease),
// so no pause, consumer loss or redelivery can let two replicas run one build at once.
// Stop requests come from their own stream (stops.go) and reach whichever replica holds the
// build (held.go). A lost shared consumer is made again (consumer.go). Shutdown is staged
// (Run): stop intake, hand every held build over, then stop renewing liveness.
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
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/events"
	"github.com/buildfleet/buildfleet/internal/fair"
	"github.com/buildfleet/buildfleet/internal/logs"
	"github.com/buildfleet/buildfleet/internal/queue"
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
	// DefaultIntake is how many deliveries a replica takes in at once (validated, claimed,
	// launched) before their builds park: a handover of ten thousand builds arrives at once,
	// and each delivery being taken in costs a goroutine and its stack.
	DefaultIntake = 1024
	// maxLooks bounds the parked builds looked at at once (park.go); a look that ends its
	// build concludes it outside the bound, so that conclusions held up by a target that
	// cannot be reached hold up no other build's look.
	maxLooks        = 256
	settleTimeout   = 10 * time.Second
	deadLetterTries = 5 // deliveries that may fail to dead-letter before Term anyway
)

// Target is one place builds can run, as the worker sees it.
type Target struct {
	Executor       Executor
	DefaultTimeout time.Duration
	MaxTimeout     time.Duration
	// MaxRunning caps the builds admitted to the target that have not ended, fleet-wide
	// (0: no cap of its own). A full target takes no new builds: others go elsewhere,
	// pinned ones wait.
	MaxRunning int
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
	Intake          int           // deliveries taken in at once (0: DefaultIntake)
	// DuplicateWindow is the streams' Nats-Msg-Id window: a redelivery re-announces the
	// states its build reached within half of it, which the stream drops if already stored.
	DuplicateWindow time.Duration
	Routes          *routing.Table
	Targets         map[string]Target
	// Tenants derive each build's tenant and priority and give tenants their shares
	// (nil: one tenant, one FIFO).
	Tenants *fair.Policy
	// Services run beside the intake for as long as it runs: what the executors need
	// running (the Kubernetes informers). One that fails stops the replica.
	Services []func(context.Context) error
	// Reprovision provisions the JetStream layout again (idempotently). A replica whose
	// shared consumer was deleted under it calls it, with backoff, and goes on consuming;
	// it is not ready meanwhile. Without it the replica stops with an error instead.
	Reprovision func(context.Context) error
	// SecretPatterns name the build variables whose values are masked in everything the
	// replica publishes or logs (nil: build.DefaultSecretPatterns).
	SecretPatterns []string
	// Logs shape what is kept of each build's output.
	Logs logs.Limits
	// LogFollow says when a running build's output is followed live (empty:
	// logs.FollowWanted).
	LogFollow logs.Follow
	// KillDeadline, if set, is told the time by which the process must be dead unless its
	// liveness is renewed again (zero: no deadline), after every renewal: a replica process
	// arms its dead-man's switch with it (internal/deadman), so that a replica paused past
	// its liveness cannot outlive it. In-process replicas (tests) leave it nil.
	KillDeadline func(time.Time)
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
	if _, err := logs.ParseFollow(string(c.LogFollow)); c.LogFollow != "" && err != nil {
		errs = append(errs, fmt.Errorf("worker: LogFollow: %w", err))
	}
	if err := c.Logs.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("worker: %w", err))
	}
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
	errTimedOut = errors.New("build timeout reached")
)

// Worker is one replica.
type Worker struct {
	cfg        Config
	js         jetstream.JetStream
	res        queue.Provisioned
	records    *record.Store
	live       *record.Liveness
	breakers   breakers
	events     *events.Publisher
	logs       *logs.Store
	leases     *queue.Leases
	held       *held
	lot        *lot
	targets    map[string]*Target // cfg.Targets, each shared by every session on it
	sched      *scheduler
	metrics    *telemetry.Metrics
	tracer     trace.TracerProvider
	log        *slog.Logger
	active     atomic.Int64 // deliveries held: taken in, or their builds parked
	intaking   atomic.Int64 // deliveries being taken in
	slotFree   chan struct{}
	ackWait    atomic.Int64 // the shared consumer's AckWait, as last read from the server
	takeovers  takeovers    // builds taken from other replicas, for the log
	handedOver atomic.Int64 // builds given back to the fleet by this replica's shutdown
}

// New returns a replica over provisioned resources. It starts nothing: call Run.
func New(cfg Config, js jetstream.JetStream, res queue.Provisioned) (*Worker, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if res.Replicas == nil {
		return nil, errors.New("worker: no liveness bucket provisioned")
	}
	if res.LogStream == nil {
		return nil, errors.New("worker: no log stream provisioned")
	}
	if cfg.SecretPatterns == nil {
		cfg.SecretPatterns = build.DefaultSecretPatterns
	}
	if cfg.LogFollow == "" {
		cfg.LogFollow = logs.FollowWanted
	}
	if cfg.FetchWait == 0 {
		cfg.FetchWait = DefaultFetchWait
	}
	if cfg.Intake == 0 {
		cfg.Intake = DefaultIntake
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
	log := cfg.Logger.With("replica", cfg.Replica)
	live := record.NewLiveness(res.Replicas, cfg.Replica, log)
	live.OnValid = cfg.KillDeadline
	w := &Worker{
		metrics:  cfg.Metrics,
		tracer:   cfg.TracerProvider,
		cfg:      cfg,
		js:       js,
		res:      res,
		records:  record.NewStore(res.Records),
		live:     live,
		breakers: newBreakers(cfg, cfg.Logger),
		events:   events.NewPublisher(js, cfg.Layout, "buildfleet/worker/"+cfg.Replica),
		logs:     &logs.Store{JS: js, Stream: res.LogStream, Layout: cfg.Layout, Limits: cfg.Logs, Log: log},
		leases:   queue.NewLeases(),
		held:     newHeld(),
		lot:      newLot(),
		log:      log,
		slotFree: make(chan struct{}, 1),
	}
	w.targets = make(map[string]*Target, len(cfg.Targets))
	for name, t := range cfg.Targets {
		w.targets[name] = &t
	}
	w.sched = newScheduler(w)
	return w, nil
}

// Run registers the replica's liveness, then pulls and runs builds until ctx ends. Shutdown
// is staged: stop fetching; hand every held build to another replica (release each workload:
// a pod stays, a local process is killed; give the record back; Nak at once so another
// replica adopts it); once nothing is held, delete the liveness key. It returns when every
// build has been handed over or DrainTimeout has passed (then the key is left to expire, and
// the builds still held are recovered by others after it has).
func (w *Worker) Run(ctx context.Context) error {
	if err := w.live.Establish(ctx); err != nil {
		return nil // stopped while starting
	}
	// Builds outlive ctx until they are handed over; their own context ends with errHandover
	// the moment ctx does, without waiting for the intake loops to wind down.
	buildsCtx, cancelBuilds := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancelBuilds(nil)
	var handingOver sync.Once
	handover := func() {
		handingOver.Do(func() {
			w.log.Info("handing over held builds", "held", w.held.len())
			cancelBuilds(errHandover)
		})
	}
	stopHandover := context.AfterFunc(ctx, handover)
	defer stopHandover()
	// Every goroutine of a build is in builds: its intake and launch, a look at a parked
	// one, its conclusion. No limit: fetchRuns holds no more deliveries than Concurrency, and
	// a parked build has at most one look running.
	var builds errgroup.Group
	builds.Go(func() error { return w.lot.run(buildsCtx, &builds) })

	w.ackWait.Store(int64(w.cfg.AckWait))
	if info := w.res.Requests.CachedInfo(); info != nil && info.Config.AckWait > 0 {
		w.ackWait.Store(int64(info.Config.AckWait))
	}
	// Heartbeats and liveness go on while held builds are handed over.
	hbCtx, stopHeartbeat := context.WithCancel(context.WithoutCancel(ctx))
	var heartbeat errgroup.Group
	heartbeat.Go(func() error { return w.leases.Heartbeat(hbCtx, w.heartbeatInterval) })
	heartbeat.Go(func() error { return w.live.Run(hbCtx, w.standDown) })

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return w.fetchRuns(gctx, buildsCtx, &builds) })
	g.Go(func() error { return w.sched.run(gctx) })
	g.Go(func() error { return w.answerQueueStatus(gctx) })
	g.Go(func() error { return w.takeLogWants(gctx) })
	g.Go(func() error { return w.watchConsumer(gctx) })
	g.Go(func() error { return w.applyStops(gctx) })
	g.Go(func() error { return w.followStops(gctx) })
	g.Go(func() error { return w.reportTakeovers(gctx) })
	for _, svc := range w.cfg.Services {
		g.Go(func() error { return svc(gctx) })
	}
	err := g.Wait()

	handover() // when an intake loop failed rather than ctx ending
	drained := make(chan struct{})
	var drain errgroup.Group
	drain.Go(func() error { defer close(drained); return builds.Wait() })
	select {
	case <-drained:
	case <-time.After(w.cfg.DrainTimeout):
		w.log.Warn("drain timeout: some builds were not handed over; others recover them once this replica's liveness key expires",
			"held", w.held.len())
	}
	w.log.Info("handed over builds", "builds", w.handedOver.Load())
	stopHeartbeat()
	heartbeatErr := heartbeat.Wait()
	dctx, cancel := settleCtx(ctx)
	defer cancel()
	if cerr := w.live.Close(dctx, w.held.len() == 0); cerr != nil {
		w.log.Warn("deleting the liveness key failed; it expires by itself", "err", cerr)
	}
	return errors.Join(err, heartbeatErr)
}

// standDown is called when this replica's incarnation lapsed: every build it holds has been
// cancelled with record.ErrIncarnationLost, and each session kills its local workload and
// lets go. It returns once none is held.
func (w *Worker) standDown() {
	<-w.held.idle()
}

// heartbeatInterval is a third of the shared consumer's AckWait: two chances in hand.
func (w *Worker) heartbeatInterval() time.Duration {
	return time.Duration(w.ackWait.Load()) / 3
}

// InFlight is how many build deliveries the replica holds now, for metrics.
func (w *Worker) InFlight() int { return int(w.active.Load()) }

func (w *Worker) release() {
	w.active.Add(-1)
	w.sched.poke() // a place is free: look at the queue now
	w.freed()
}

// taken ends a delivery's intake: its build is followed now, or it ended.
func (w *Worker) taken() {
	w.intaking.Add(-1)
	w.freed()
}

func (w *Worker) freed() {
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

// pause waits d, or less if ctx ends first: then it reports false.
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// settleCtx is for the I/O that settles a build after its own context has ended.
func settleCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
}

func now() time.Time { return time.Now().UTC() }
