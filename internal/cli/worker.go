package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/deadman"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/executor/process"
	"github.com/buildfleet/buildfleet/internal/logs"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/telemetry"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func runWorker(ctx context.Context, args []string, stdio Stdio) error {
	s, err := config.Load()
	if err != nil {
		return err
	}
	fs := flagSet("worker", "[flags]", stdio)
	fs.StringVar(&s.NATSURL, "nats", s.NATSURL, "NATS server URL (BUILDFLEET_NATS_URL)")
	fs.StringVar(&s.TargetsFile, "targets", s.TargetsFile, "targets file (BUILDFLEET_TARGETS_FILE); empty: one local process target")
	fs.StringVar(&s.Replica, "name", s.Replica, "replica name (BUILDFLEET_REPLICA)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := s.Validate(); err != nil {
		return err
	}
	log := slog.New(telemetry.TraceLogs(slog.NewJSONHandler(stdio.Err, &slog.HandlerOptions{Level: s.SlogLevel()})))
	cfg, flush, err := prepareReplica(ctx, s, "buildfleet-worker", log)
	if err != nil {
		return err
	}
	defer flush()
	// A replica process paused past its liveness must not outlive it (internal/deadman).
	var dms deadman.Switch
	cfg.KillDeadline = func(at time.Time) {
		if err := dms.Set(at); err != nil {
			log.Warn("no dead-man's switch: a paused replica's build processes could outlive its liveness", "err", err)
		}
	}
	return runReplica(ctx, s, func(ctx context.Context) (*nats.Conn, error) { return connectWorker(ctx, s, log) }, cfg)
}

// prepareReplica does what comes before a replica (worker or dev) touches NATS: client-go's
// logs into log, the targets and clusters checked (a configuration mistake stops it at once,
// naming the field, rather than after a connection retry), and tracing set up for service.
// flush sends the spans still buffered; call it on the way out.
func prepareReplica(ctx context.Context, s config.Settings, service string, log *slog.Logger) (cfg replicaConfig, flush func(), err error) {
	routeKlog(log)
	if cfg, err = workerConfig(s, log); err != nil {
		return replicaConfig{}, nil, err
	}
	if flush, err = startTracing(ctx, service, log); err != nil {
		return replicaConfig{}, nil, err
	}
	return cfg, flush, nil
}

// startTracing sets tracing up from the OTEL_* variables for the process named service, and
// returns what flushes the spans still buffered, within a few seconds, on the way out.
func startTracing(ctx context.Context, service string, log *slog.Logger) (flush func(), err error) {
	shutdown, err := telemetry.SetupTracing(ctx, service, Version)
	if err != nil {
		return nil, err
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := shutdown(ctx); err != nil {
			log.Warn("flushing traces failed", "err", err)
		}
	}, nil
}

// connectWorker connects with retries: a replica may start before NATS does. Once connected
// the client reconnects by itself for ever.
func connectWorker(ctx context.Context, s config.Settings, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name("buildfleet-worker-" + s.Replica),
		nats.MaxReconnects(-1),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("NATS disconnected", "err", err) }),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("NATS reconnected", "url", nc.ConnectedUrlRedacted()) }),
	}
	security, err := natsSecurity(s)
	if err != nil {
		return nil, err
	}
	opts = append(opts, security...)
	b := backoff.NewExponentialBackOff()
	b.MaxElapsedTime = time.Minute
	return backoff.RetryNotifyWithData(func() (*nats.Conn, error) {
		return nats.Connect(s.NATSURL, opts...)
	}, backoff.WithContext(b, ctx), func(err error, d time.Duration) {
		log.Warn("cannot reach NATS yet", "url", s.NATSURL, "err", err, "retry_in", d)
	})
}

var klogOnce sync.Once

// routeKlog sends client-go's klog output to the process's structured log. klog's logger is
// process-wide, and setting it races with informers already running, so it is set once,
// before any starts.
func routeKlog(log *slog.Logger) {
	klogOnce.Do(func() { klog.SetSlogLogger(log.With("component", "client-go")) })
}

// replicaConfig is a worker's configuration and the clusters its targets use, whose
// reachability is part of the replica's readiness.
type replicaConfig struct {
	worker.Config
	clusters []*kube.Cluster
}

// workerConfig builds the routing table and one executor per target.
func workerConfig(s config.Settings, log *slog.Logger) (replicaConfig, error) {
	layout, err := protocol.NewLayout(s.Prefix)
	if err != nil {
		return replicaConfig{}, fmt.Errorf("BUILDFLEET_PREFIX: %w", err)
	}
	targets, kopts, err := loadTargets(s)
	if err != nil {
		return replicaConfig{}, err
	}
	table, err := targets.Table()
	if err != nil {
		return replicaConfig{}, err
	}
	execs := make(map[string]worker.Target, len(targets.Targets))
	clusters := kube.NewClusters(s.Prefix, kube.ClientOptions{QPS: s.KubeQPS, Burst: s.KubeBurst}, log)
	for _, ts := range targets.Targets {
		var ex worker.Executor
		switch ts.Executor {
		case config.ExecutorKubernetes:
			opts := kopts[ts.Name]
			c, err := clusters.Get(opts.Context)
			if err != nil {
				return replicaConfig{}, fmt.Errorf("target %q: %w", ts.Name, err)
			}
			ex = kube.New(c, ts.Name, opts)
		case config.ExecutorProcess:
			opts := process.Options{ScratchDir: s.ScratchDir, Logger: log}
			if ts.Process != nil {
				opts.KeepScratch = ts.Process.KeepScratch
			}
			if ex, err = process.New(opts); err != nil {
				return replicaConfig{}, fmt.Errorf("target %q: %w", ts.Name, err)
			}
		default:
			return replicaConfig{}, fmt.Errorf("target %q: executor %q is not supported by this build", ts.Name, ts.Executor)
		}
		def, maxT := ts.Timeouts(s)
		execs[ts.Name] = worker.Target{Executor: ex, DefaultTimeout: def, MaxTimeout: maxT, MaxRunning: ts.MaxRunning}
	}
	var services []func(context.Context) error
	if clusters.Len() > 0 {
		services = append(services, clusters.Run)
	}
	return replicaConfig{clusters: clusters.Each(), Config: worker.Config{
		Services:     services,
		Layout:       layout,
		Replica:      s.Replica,
		Concurrency:  s.Concurrency,
		AckWait:      s.AckWait,
		MaxDeliver:   s.MaxDeliver,
		RetryMin:     s.RetryMin,
		RetryMax:     s.RetryMax,
		DrainTimeout: s.DrainTimeout,
		// Breakers sit around each target's launches.
		BreakerFailures: s.BreakerFailures,
		BreakerCooldown: s.BreakerCooldown,
		Routes:          table,
		Tenants:         targets.FairPolicy(),
		// The streams' dedupe window bounds how far back a redelivery re-announces.
		DuplicateWindow: s.DuplicateWindow,
		Targets:         execs,
		SecretPatterns:  s.SecretEnvPatterns,
		Logs:            logs.Limits{MaxBytes: s.LogMaxBytes, Flush: s.LogFlush},
		LogFollow:       logs.Follow(s.LogLive),
		Logger:          log,
	}}, nil
}

// loadTargets reads the targets file (or the default table) and checks each kubernetes
// target's options, so that `route` and `worker` refuse the same mistakes.
func loadTargets(s config.Settings) (config.Targets, map[string]kube.Options, error) {
	targets := config.DefaultTargets()
	if s.TargetsFile != "" {
		var err error
		if targets, err = config.LoadTargets(s.TargetsFile); err != nil {
			return config.Targets{}, nil, err
		}
	}
	kopts := map[string]kube.Options{}
	var errs []error
	for i, ts := range targets.Targets {
		if ts.Executor != config.ExecutorKubernetes {
			continue
		}
		o, err := kube.ParseOptions(ts.Kubernetes)
		if err != nil {
			errs = append(errs, prefixLines(fmt.Sprintf("%s: targets[%d].kubernetes", s.TargetsFile, i), err))
			continue
		}
		kopts[ts.Name] = o
	}
	return targets, kopts, errors.Join(errs...)
}

var fieldLed = regexp.MustCompile(`^[a-z_][a-z0-9_.\[\]"]*: `)

// prefixLines puts prefix in front of every error err joins, so that each line names its
// field in full (targets[1].kubernetes.namespace: …).
func prefixLines(prefix string, err error) error {
	return config.MapJoined(err, func(e error) error {
		if fieldLed.MatchString(e.Error()) {
			return fmt.Errorf("%s.%w", prefix, e)
		}
		return fmt.Errorf("%s: %w", prefix, e)
	})
}

// provisionTransient says whether JetStream may answer a provisioning call later: a timeout,
// no responders, or a 503/504/408 (a leader election, "temporarily unavailable").
func provisionTransient(err error) bool {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		switch api.Code {
		case 503, 504, 408:
			return true
		}
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders)
}

// runReplica connects to NATS, provisions the JetStream layout (idempotently) and runs the
// replica. It serves metrics and health on BUILDFLEET_HTTP_ADDR from the start, before NATS
// answers: /healthz while the process lives, /readyz once NATS, the consumers and every
// cluster are usable. The connection is closed on the way out.
func runReplica(ctx context.Context, s config.Settings, connect func(context.Context) (*nats.Conn, error), cfg replicaConfig) error {
	if cfg.Metrics == nil {
		cfg.Metrics = telemetry.NewMetrics()
	}
	var conn atomic.Pointer[nats.Conn]
	var running atomic.Pointer[worker.Worker]
	cfg.Metrics.ObserveNATS(conn.Load)
	checks := readiness(ctx, conn.Load, &running, cfg.clusters)

	// The server outlives the intake: it keeps serving /metrics while held builds are
	// handed over, and stops once the worker has returned. A server that cannot serve (its
	// port taken) stops the replica.
	serveCtx, stopServing := context.WithCancel(context.WithoutCancel(ctx))
	defer stopServing()
	g, gctx := errgroup.WithContext(ctx)
	if s.HTTPAddr != "" {
		srv := telemetry.NewServer(s.HTTPAddr, cfg.Metrics, checks, cfg.Logger)
		srv.Profiling = s.Profiling
		g.Go(func() error { return srv.Run(serveCtx) })
	}
	g.Go(func() error {
		defer stopServing()
		nc, err := connect(gctx)
		if err != nil {
			if gctx.Err() != nil {
				return nil // stopped while connecting
			}
			return err
		}
		defer nc.Close()
		conn.Store(nc)
		js, err := jetstream.New(nc)
		if err != nil {
			return err
		}
		return runWorkerLoop(gctx, s, js, cfg, &running)
	})
	return g.Wait()
}

// runWorkerLoop provisions the layout, retrying what JetStream may answer later, and runs
// the worker until ctx ends.
func runWorkerLoop(ctx context.Context, s config.Settings, js jetstream.JetStream, cfg replicaConfig, running *atomic.Pointer[worker.Worker]) error {
	layout := LayoutConfig(s, cfg.Layout)
	provision := func(ctx context.Context) (queue.Provisioned, error) {
		// A JetStream that is slow to answer (a leader election, a busy server) is waited
		// for; a layout it refuses (a setting it rejects) is not.
		b := backoff.NewExponentialBackOff()
		b.MaxElapsedTime = time.Minute
		return backoff.RetryNotifyWithData(func() (queue.Provisioned, error) {
			res, err := queue.Provision(ctx, js, layout)
			if err != nil && !provisionTransient(err) {
				return res, backoff.Permanent(err)
			}
			return res, err
		}, backoff.WithContext(b, ctx), func(err error, d time.Duration) {
			cfg.Logger.Warn("JetStream slow to provision; retrying", "err", err, "retry_in", d)
		})
	}
	res, err := provision(ctx)
	if err != nil && ctx.Err() != nil {
		return nil // stopped while starting
	}
	if err != nil {
		return fmt.Errorf("provision JetStream: %w", err)
	}
	wc := cfg.Config
	wc.Reprovision = func(ctx context.Context) error { _, err := provision(ctx); return err }
	w, err := worker.New(wc, js, res)
	if err != nil {
		return err
	}
	cfg.Metrics.ObserveWorker(w.InFlight, w.BreakerStates)
	running.Store(w)
	cfg.Logger.Info("worker started", "replica", s.Replica, "nats", js.Conn().ConnectedUrlRedacted(), "prefix", s.Prefix,
		"targets", len(cfg.Targets), "concurrency", s.Concurrency)
	err = w.Run(ctx)
	cfg.Logger.Info("worker stopped", "replica", s.Replica)
	return err
}

// readiness is what /readyz checks: the NATS connection, both shared consumers (which also
// says the layout is provisioned and the worker runs), and every cluster the targets use. A
// replica that is shutting down is not ready.
func readiness(ctx context.Context, conn func() *nats.Conn, running *atomic.Pointer[worker.Worker], clusters []*kube.Cluster) []telemetry.Check {
	checks := []telemetry.Check{
		{Name: "shutdown", Check: func(context.Context) error {
			if ctx.Err() != nil {
				return errors.New("shutting down: handing held builds over")
			}
			return nil
		}},
		{Name: "nats", Check: func(context.Context) error {
			nc := conn()
			if nc == nil {
				return errors.New("not connected to NATS yet")
			}
			if !nc.IsConnected() {
				return fmt.Errorf("NATS connection is %s", strings.ToLower(nc.Status().String()))
			}
			return nil
		}},
		{Name: "consumers", Check: func(ctx context.Context) error {
			w := running.Load()
			if w == nil {
				return errors.New("the JetStream layout is not provisioned yet")
			}
			return w.CheckConsumers(ctx)
		}},
	}
	for _, c := range clusters {
		checks = append(checks, telemetry.Check{Name: "cluster " + c.Name(), Check: c.Check})
	}
	return checks
}

// LayoutConfig is the JetStream layout the settings ask for.
func LayoutConfig(s config.Settings, layout protocol.Layout) queue.LayoutConfig {
	return queue.LayoutConfig{
		Layout:           layout,
		Replicas:         s.StreamReplicas,
		DuplicateWindow:  s.DuplicateWindow,
		EventsMaxAge:     s.EventsMaxAge,
		DeadLetterMaxAge: s.DeadLetterMaxAge,
		LogsMaxAge:       s.LogRetention,
		LogsMaxBytes:     s.LogStreamMaxBytes,
		RecordTTL:        s.RecordTTL,
		LivenessTTL:      s.LivenessTTL,
		AckWait:          s.AckWait,
		MaxAckPending:    s.MaxAckPending,
		QueueHold:        s.QueueHold,
	}
}
