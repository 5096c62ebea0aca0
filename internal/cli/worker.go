package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"k8s.io/klog/v2"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/internal/executor/process"
	bfjs "github.com/buildfleet/buildfleet/internal/jetstream"
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
	log := slog.New(slog.NewJSONHandler(stdio.Err, &slog.HandlerOptions{Level: s.SlogLevel()}))
	routeKlog(log)
	// Targets and clusters are checked before NATS is dialled: a configuration mistake
	// stops the replica at once, naming the field, rather than after a connection retry.
	cfg, err := workerConfig(s, log)
	if err != nil {
		return err
	}
	nc, err := connectWorker(ctx, s, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	return runReplica(ctx, s, nc, cfg)
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
	if s.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(s.NATSCreds))
	}
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

// workerConfig builds the routing table and one executor per target.
func workerConfig(s config.Settings, log *slog.Logger) (worker.Config, error) {
	layout, err := protocol.NewLayout(s.Prefix)
	if err != nil {
		return worker.Config{}, fmt.Errorf("BUILDFLEET_PREFIX: %w", err)
	}
	targets, kopts, err := loadTargets(s)
	if err != nil {
		return worker.Config{}, err
	}
	table, err := targets.Table()
	if err != nil {
		return worker.Config{}, err
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
				return worker.Config{}, fmt.Errorf("target %q: %w", ts.Name, err)
			}
			ex = kube.New(c, ts.Name, opts)
		case config.ExecutorProcess:
			opts := process.Options{ScratchDir: s.ScratchDir, Logger: log}
			if ts.Process != nil {
				opts.KeepScratch = ts.Process.KeepScratch
			}
			if ex, err = process.New(opts); err != nil {
				return worker.Config{}, fmt.Errorf("target %q: %w", ts.Name, err)
			}
		default:
			return worker.Config{}, fmt.Errorf("target %q: executor %q is not supported by this build", ts.Name, ts.Executor)
		}
		def, maxT := ts.Timeouts(s)
		execs[ts.Name] = worker.Target{Executor: ex, DefaultTimeout: def, MaxTimeout: maxT}
	}
	var services []func(context.Context) error
	if clusters.Len() > 0 {
		services = append(services, clusters.Run)
	}
	return worker.Config{
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
		// The streams' dedupe window bounds how far back a redelivery re-announces.
		DuplicateWindow: s.DuplicateWindow,
		Targets:         execs,
		Logger:          log,
	}, nil
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

// runReplica provisions the JetStream layout (idempotently) and runs the replica.
func runReplica(ctx context.Context, s config.Settings, nc *nats.Conn, cfg worker.Config) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	// A JetStream that is slow to answer (a leader election, a busy server) is waited for;
	// a layout it refuses (a setting it rejects) is not.
	b := backoff.NewExponentialBackOff()
	b.MaxElapsedTime = time.Minute
	res, err := backoff.RetryNotifyWithData(func() (bfjs.Provisioned, error) {
		res, err := bfjs.Provision(ctx, js, LayoutConfig(s, cfg.Layout))
		if err != nil && !provisionTransient(err) {
			return res, backoff.Permanent(err)
		}
		return res, err
	}, backoff.WithContext(b, ctx), func(err error, d time.Duration) {
		cfg.Logger.Warn("JetStream slow to provision; retrying", "err", err, "retry_in", d)
	})
	if err != nil && ctx.Err() != nil {
		return nil // stopped while starting
	}
	if err != nil {
		return fmt.Errorf("provision JetStream: %w", err)
	}
	w, err := worker.New(cfg, js, res)
	if err != nil {
		return err
	}
	cfg.Logger.Info("worker started", "replica", s.Replica, "nats", nc.ConnectedUrlRedacted(), "prefix", s.Prefix,
		"targets", len(cfg.Targets), "concurrency", s.Concurrency)
	err = w.Run(ctx)
	cfg.Logger.Info("worker stopped", "replica", s.Replica)
	return err
}

// LayoutConfig is the JetStream layout the settings ask for.
func LayoutConfig(s config.Settings, layout protocol.Layout) bfjs.LayoutConfig {
	return bfjs.LayoutConfig{
		Layout:           layout,
		Replicas:         s.StreamReplicas,
		DuplicateWindow:  s.DuplicateWindow,
		EventsMaxAge:     s.EventsMaxAge,
		DeadLetterMaxAge: s.DeadLetterMaxAge,
		RecordTTL:        s.RecordTTL,
		AckWait:          s.AckWait,
		MaxAckPending:    s.MaxAckPending,
	}
}
