package cli

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// DefaultImage is the image `submit` names when --image is not given.
const DefaultImage = "docker.io/library/busybox:stable"

func runSubmit(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("submit", "[flags] [--] COMMAND [ARG...]", stdio)
	if err != nil {
		return err
	}
	fs := c.fs
	req := protocol.BuildRequest{Env: map[string]string{}, Annotations: map[string]string{}}
	var (
		file    string
		target  string
		timeout time.Duration
		wait    bool
		asJSON  bool
		states  bool
	)
	fs.StringVar(&req.ID, "id", "", "build id (default: a random one); submitting the same id twice runs one build")
	fs.StringVar(&req.Image, "image", DefaultImage, "container image")
	fs.Var(kvFlag(req.Env), "env", "KEY=VALUE added to the build's environment (repeatable)")
	fs.Var(kvFlag(req.Annotations), "annotation", "KEY=VALUE annotation (repeatable)")
	fs.StringVar(&target, "target", "", "pin the build to a target (annotation "+protocol.AnnotationTarget+")")
	fs.DurationVar(&timeout, "timeout", 0, "build timeout (default: the target's)")
	fs.StringVar(&req.Pipeline, "pipeline", "", "pipeline name")
	fs.StringVar(&req.Job, "job", "", "job name")
	fs.StringVar(&file, "file", "", "read the whole build request as JSON from this file (- for stdin) instead of flags")
	fs.BoolVar(&wait, "wait", false, "follow the build to its end; exit 0 only if it succeeded")
	fs.BoolVar(&asJSON, "json", false, "with --wait, print the events as JSON lines (and not the output)")
	fs.BoolVar(&states, "states-only", false, "with --wait, print the build's states but not its output")
	prepare := func(argv []string) error {
		if file != "" {
			if len(argv) > 0 {
				return usageError("give the command either in --file or after the flags, not both")
			}
			req, err = readRequest(file, stdio.In)
			return err
		}
		if len(argv) == 0 {
			return usageError("no command: buildfleet submit [flags] -- COMMAND [ARG...]")
		}
		req.Command = argv
		if req.ID == "" {
			req.ID = randomID()
		}
		if target != "" {
			req.Annotations[protocol.AnnotationTarget] = target
		}
		if timeout > 0 {
			req.TimeoutSeconds = int((timeout + time.Second - 1) / time.Second)
		}
		return nil
	}
	return c.run(args, prepare, func(cl *client.Client, _ []string) error {
		res, err := cl.Submit(ctx, req)
		if err != nil {
			return err
		}
		if res.Duplicate {
			fmt.Fprintf(stdio.Err, "build %s was already submitted (%s); nothing new was queued\n", req.ID, res.Record.State)
		}
		if !wait {
			fmt.Fprintln(stdio.Out, req.ID)
			return nil
		}
		if asJSON || states {
			return follow(ctx, cl, req.ID, asJSON, stdio.Out)
		}
		return followWithOutput(ctx, cl, req.ID, stdio.Out)
	})
}

// followWithOutput prints a build's states and its output as they come, the end last, and
// returns the build's outcome as an exit status.
func followWithOutput(ctx context.Context, cl *client.Client, id string, out io.Writer) error {
	var mu sync.Mutex
	w := &serialWriter{mu: &mu, w: out}
	var g errgroup.Group
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g.Go(func() error { return printLog(lctx, cl, id, true, w) })
	var start time.Time
	for ev, err := range cl.Watch(ctx, id) {
		if err != nil {
			cancel()
			return errors.Join(err, ignoreCanceled(g.Wait()))
		}
		if start.IsZero() {
			start = ev.Time
		}
		if ev.Data.State.Terminal() {
			// The output ends before the end is said: the log closes first.
			if err := g.Wait(); err != nil {
				fmt.Fprintf(w, "(the output could not be read: %v)\n", err)
			}
			printEvent(w, ev, false, ev.Time.Sub(start))
			return outcomeError(ev)
		}
		printEvent(w, ev, false, ev.Time.Sub(start))
	}
	cancel()
	_ = g.Wait()
	return ctx.Err()
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// serialWriter serialises the writes of the states and of the output.
type serialWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *serialWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// printLog prints a build's output: its text as the build printed it (secrets masked), the
// fleet's notes and cuts on lines of their own.
func printLog(ctx context.Context, cl *client.Client, id string, follow bool, out io.Writer) error {
	var next int64 // where the next chunk should start
	open := false  // the output so far ends inside a line
	for chunk, err := range cl.Logs(ctx, id, follow) {
		if err != nil {
			return err
		}
		var b strings.Builder
		remark := func(format string, args ...any) {
			if open {
				b.WriteString("\n")
				open = false
			}
			fmt.Fprintf(&b, "[buildfleet] "+format+"\n", args...)
		}
		if chunk.Offset > next {
			remark("… %d bytes of output cut here (the log keeps its head and its tail) …", chunk.Offset-next)
		}
		if chunk.Note != "" {
			remark("%s", chunk.Note)
		}
		b.WriteString(chunk.Text)
		if chunk.Text != "" {
			open = !strings.HasSuffix(chunk.Text, "\n")
		}
		if chunk.End != nil && open {
			b.WriteString("\n")
		}
		next = chunk.Offset + int64(len(chunk.Text))
		if _, err := io.WriteString(out, b.String()); err != nil {
			return err
		}
	}
	return nil
}

func runLogs(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("logs", "[flags] BUILD-ID", stdio)
	if err != nil {
		return err
	}
	followFlag := c.fs.Bool("f", false, "follow the output until the build ends; exit with its outcome, as watch BUILD-ID does")
	return c.run(args, exactly(1, "logs takes one build id"), func(cl *client.Client, argv []string) error {
		id := argv[0]
		if err := printLog(ctx, cl, id, *followFlag, stdio.Out); err != nil {
			return err
		}
		if !*followFlag {
			return nil
		}
		rec, err := cl.Status(ctx, id)
		if err != nil {
			return err
		}
		return outcomeError(protocol.Event{Data: protocol.EventData{State: rec.State}})
	})
}

func readRequest(file string, stdin io.Reader) (protocol.BuildRequest, error) {
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(io.LimitReader(stdin, protocol.MaxMessageBytes+1))
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return protocol.BuildRequest{}, fmt.Errorf("read build request: %w", err)
	}
	req, err := protocol.DecodeBuildRequest(data)
	if err != nil {
		return protocol.BuildRequest{}, fmt.Errorf("%s: %w", file, err)
	}
	return req, nil
}

// randomID is a fresh build id: "b-" and 12 base-36 characters.
func randomID() string {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return "b-" + string(b)
}

// follow prints a build's events from its start until its end and returns its outcome as an
// exit status.
func follow(ctx context.Context, cl *client.Client, id string, asJSON bool, out io.Writer) error {
	var start time.Time
	for ev, err := range cl.Watch(ctx, id) {
		if err != nil {
			return err
		}
		if start.IsZero() {
			start = ev.Time
		}
		printEvent(out, ev, asJSON, ev.Time.Sub(start))
		if ev.Data.State.Terminal() {
			return outcomeError(ev)
		}
	}
	return ctx.Err()
}

// outcomeError maps a terminal event to the exit status of submit --wait and watch ID.
func outcomeError(ev protocol.Event) error {
	code := map[protocol.State]int{
		protocol.StateSucceeded: 0,
		protocol.StateFailed:    ExitFailed,
		protocol.StateTimedOut:  ExitTimedOut,
		protocol.StateAborted:   ExitAborted,
		protocol.StateRejected:  ExitRejected,
	}[ev.Data.State]
	if code == 0 {
		return nil
	}
	return &ExitError{Code: code}
}

// printEvent prints one event: as JSON, or as a line with the time since the build was
// queued (elapsed), or the time of day when elapsed is negative.
func printEvent(out io.Writer, ev protocol.Event, asJSON bool, elapsed time.Duration) {
	if asJSON {
		fmt.Fprintln(out, string(protocol.Marshal(ev)))
		return
	}
	d := ev.Data
	var extra []string
	if d.Target != "" && (d.State == protocol.StateDispatched || d.State.Terminal()) {
		extra = append(extra, "target="+d.Target)
	}
	if d.Reason != "" {
		extra = append(extra, "reason="+string(d.Reason))
	}
	if d.ExitCode != nil {
		extra = append(extra, fmt.Sprintf("exit_code=%d", *d.ExitCode))
	}
	when := fmt.Sprintf("%7.1fs", elapsed.Seconds())
	if elapsed < 0 { // following every build: the time of day says more
		when = ev.Time.Local().Format("15:04:05.000")
	}
	line := fmt.Sprintf("%-14s %-11s %s", d.BuildID, d.State, when)
	if len(extra) > 0 {
		line += "  " + strings.Join(extra, " ")
	}
	if d.Message != "" {
		line += "  " + strings.ReplaceAll(d.Message, "\n", "\n    ")
	}
	fmt.Fprintln(out, line)
}

func runWatch(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("watch", "[flags] [BUILD-ID]", stdio)
	if err != nil {
		return err
	}
	asJSON := c.fs.Bool("json", false, "print the events as JSON lines (CloudEvents)")
	fromStart := c.fs.Bool("from-start", false, "without BUILD-ID: replay every stored event first")
	return c.run(args, atMost(1, "watch takes at most one build id"), func(cl *client.Client, argv []string) error {
		if len(argv) == 1 {
			return follow(ctx, cl, argv[0], *asJSON, stdio.Out)
		}
		var opts []client.WatchOption
		if *fromStart {
			opts = append(opts, client.FromStart())
		}
		for ev, err := range cl.Watch(ctx, "", opts...) {
			if errors.Is(err, context.Canceled) {
				return nil
			}
			if err != nil {
				return err
			}
			printEvent(stdio.Out, ev, *asJSON, -1)
		}
		return nil
	})
}

func runStop(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("stop", "[flags] BUILD-ID", stdio)
	if err != nil {
		return err
	}
	reason := c.fs.String("reason", "", "why (recorded in the aborted event)")
	return c.run(args, exactly(1, "stop takes one build id"), func(cl *client.Client, argv []string) error {
		if err := cl.Stop(ctx, argv[0], *reason); err != nil {
			return err
		}
		fmt.Fprintf(stdio.Out, "stop requested for %s\n", argv[0])
		return nil
	})
}

func runStatus(ctx context.Context, args []string, stdio Stdio) error {
	c, err := newClientCmd("status", "[flags] BUILD-ID", stdio)
	if err != nil {
		return err
	}
	return c.run(args, exactly(1, "status takes one build id"), func(cl *client.Client, argv []string) error {
		rec, err := cl.Status(ctx, argv[0])
		if err != nil {
			return err
		}
		enc := json.NewEncoder(stdio.Out)
		enc.SetIndent("", "  ")
		return enc.Encode(rec)
	})
}

// clientCmd is the frame of the subcommands that talk to NATS as a client: settings,
// flags (with --nats and --prefix), argument checks, a connection.
type clientCmd struct {
	s     config.Settings
	fs    *flag.FlagSet
	conn  connFlags
	stdio Stdio
}

func newClientCmd(name, usage string, stdio Stdio) (*clientCmd, error) {
	s, err := config.Load()
	if err != nil {
		return nil, err
	}
	c := &clientCmd{s: s, fs: flagSet(name, usage, stdio), stdio: stdio}
	c.conn.register(c.fs, s)
	return c, nil
}

// run parses args, lets prepare check the positional arguments before anything connects,
// then connects and calls fn.
func (c *clientCmd) run(args []string, prepare func(argv []string) error, fn func(cl *client.Client, argv []string) error) error {
	if err := parse(c.fs, args); err != nil {
		return err
	}
	if err := prepare(c.fs.Args()); err != nil {
		return err
	}
	// With OTEL_* set, a submit from the command line is the producer span of the build's
	// trace, like a Submit from any instrumented producer.
	flush, err := startTracing(context.Background(), "buildfleet-cli", slog.New(slog.NewTextHandler(c.stdio.Err, nil)))
	if err != nil {
		return err
	}
	defer flush()
	nc, cl, err := c.conn.connect(c.s)
	if err != nil {
		return err
	}
	defer nc.Close()
	return fn(cl, c.fs.Args())
}

func exactly(n int, msg string) func([]string) error {
	return func(argv []string) error {
		if len(argv) != n {
			return usageError("%s", msg)
		}
		return nil
	}
}

func atMost(n int, msg string) func([]string) error {
	return func(argv []string) error {
		if len(argv) > n {
			return usageError("%s", msg)
		}
		return nil
	}
}
