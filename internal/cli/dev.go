package cli

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/telemetry"
)

func runDev(ctx context.Context, args []string, stdio Stdio) error {
	s, err := config.Load()
	if err != nil {
		return err
	}
	fs := flagSet("dev", "[flags]", stdio)
	fs.StringVar(&s.DevListen, "listen", s.DevListen, "address of the embedded NATS server (BUILDFLEET_DEV_LISTEN)")
	fs.StringVar(&s.DevDataDir, "data-dir", s.DevDataDir, "JetStream file store of the embedded server (BUILDFLEET_DEV_DATA_DIR)")
	fs.StringVar(&s.TargetsFile, "targets", s.TargetsFile, "targets file (BUILDFLEET_TARGETS_FILE); empty: one local process target")
	if err := parse(fs, args); err != nil {
		return err
	}
	log := slog.New(telemetry.TraceLogs(slog.NewTextHandler(stdio.Err, &slog.HandlerOptions{Level: s.SlogLevel()})))
	cfg, flush, err := prepareReplica(ctx, s, "buildfleet-dev", log) // a bad targets file stops dev before anything starts
	if err != nil {
		return err
	}
	defer flush()

	srv, err := startNATS(s.DevListen, s.DevDataDir)
	if err != nil {
		return err
	}
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	url := srv.ClientURL()
	s.NATSURL = url

	self := "buildfleet"
	if exe, err := os.Executable(); err == nil {
		if wd, err := os.Getwd(); err == nil {
			// A binary under the working directory (make run's bin/buildfleet) is named by
			// its path; anything else (go run's temporary build) by its plain name.
			if rel, err := filepath.Rel(wd, exe); err == nil && !strings.HasPrefix(rel, "..") {
				self = "./" + rel
			}
		}
	}
	natsFlag := ""
	if url != "nats://127.0.0.1:4222" {
		natsFlag = " --nats " + url
	}
	httpLine := ""
	if s.HTTPAddr != "" {
		httpLine = fmt.Sprintf("\n  metrics, health %s (/metrics /healthz /readyz)", s.HTTPAddr)
	}
	targets := "built in: one target \"local\" running builds as local processes"
	if s.TargetsFile != "" {
		targets = s.TargetsFile
	}
	fmt.Fprintf(stdio.Out, `buildfleet dev is running
  NATS JetStream  %s (data in %s)
  worker          replica %q, up to %d builds at once
  targets         %s
  build scratch   %s%s

In another terminal:
  %s submit%s --wait -- sh -c 'echo hello from buildfleet; sleep 1'
  %s watch%s                # every build's events
  %s status%s BUILD-ID
  %s stop%s BUILD-ID

Ctrl-C stops it (held builds are handed back to the queue).
`, url, s.DevDataDir, s.Replica, s.Concurrency, targets, s.ScratchDir, httpLine, self, natsFlag, self, natsFlag, self, natsFlag, self, natsFlag)
	return runReplica(ctx, s, func(context.Context) (*nats.Conn, error) {
		nc, err := nats.Connect(url, nats.Name("buildfleet-dev"), nats.MaxReconnects(-1))
		if err != nil {
			return nil, fmt.Errorf("connect to the embedded NATS server: %w", err)
		}
		return nc, nil
	}, cfg)
}

// startNATS starts an embedded nats-server with JetStream and a file store under dataDir.
func startNATS(listen, dataDir string) (*server.Server, error) {
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("BUILDFLEET_DEV_LISTEN: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("BUILDFLEET_DEV_LISTEN: port %q: %w", portStr, err)
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, fmt.Errorf("BUILDFLEET_DEV_DATA_DIR: %w", err)
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, err
	}
	srv, err := server.NewServer(&server.Options{
		ServerName: "buildfleet-dev",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   abs,
		NoSigs:     true,
		NoLog:      true,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not start on %s (is the port in use? set --listen or BUILDFLEET_DEV_LISTEN)", listen)
	}
	return srv, nil
}
