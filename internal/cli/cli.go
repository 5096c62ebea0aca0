// Package cli holds the buildfleet subcommands. Each is thin: it parses flags and settings
// and hands over to pkg/client or internal/worker.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/pkg/client"
)

// Version is stamped at build time with -ldflags -X.
var Version = "dev"

// Stdio is where a subcommand reads and writes.
type Stdio struct {
	In       io.Reader
	Out, Err io.Writer
}

// Exit codes beyond 0 (success), 1 (error) and 2 (usage): how a build ended, for
// `submit --wait` and `watch ID`.
const (
	ExitUsage    = 2
	ExitFailed   = 3
	ExitTimedOut = 4
	ExitAborted  = 5
	ExitRejected = 6
)

// ExitError carries an exit code; its message, if any, is printed.
type ExitError struct {
	Code int
	Msg  string
}

func (e *ExitError) Error() string { return e.Msg }

func usageError(format string, args ...any) error {
	return &ExitError{Code: ExitUsage, Msg: fmt.Sprintf(format, args...)}
}

// ExitCode prints err (if it says anything) and returns the process exit code for it.
func ExitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Msg != "" {
			fmt.Fprintln(stderr, "buildfleet:", ee.Msg)
		}
		return ee.Code
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, "buildfleet:", err)
	return 1
}

type command struct {
	name, args, summary string
	run                 func(ctx context.Context, args []string, io Stdio) error
}

func commands() []command {
	return []command{
		{"dev", "[flags]", "embedded NATS JetStream + one worker with the process executor: try everything with one command", runDev},
		{"worker", "[flags]", "run one replica of the fleet against NATS (configured by BUILDFLEET_* variables)", runWorker},
		{"submit", "[flags] [--] COMMAND [ARG...]", "submit a build (from flags, or a JSON request with --file); --wait follows it and its output to its end", runSubmit},
		{"watch", "[flags] [BUILD-ID]", "print lifecycle events: one build's from its start, or every build's from now on", runWatch},
		{"logs", "[flags] BUILD-ID", "print a build's output; -f follows it live until the build ends", runLogs},
		{"stop", "[flags] BUILD-ID", "abort a build", runStop},
		{"status", "[flags] BUILD-ID", "print a build's record", runStatus},
		{"queue", "[flags]", "show what waits, per tenant, and why; and each target's running builds against its cap", runQueue},
		{"route", "[flags] --image IMAGE", "explain which target a build would go to, and why", runRoute},
		{"version", "", "print the version", func(_ context.Context, _ []string, stdio Stdio) error {
			fmt.Fprintln(stdio.Out, "buildfleet", Version)
			return nil
		}},
	}
}

// Run runs the subcommand named by args[0].
func Run(ctx context.Context, args []string, stdio Stdio) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stdio.Out)
		if len(args) == 0 {
			return &ExitError{Code: ExitUsage}
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdio)
		}
	}
	usage(stdio.Err)
	return usageError("unknown command %q", args[0])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "buildfleet runs CI builds from a NATS JetStream queue as pods (or local processes).")
	fmt.Fprintln(w, "\nUsage: buildfleet COMMAND [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\n`buildfleet COMMAND -h` shows a command's flags. Settings come from BUILDFLEET_* environment variables (see README).")
}

// flagSet is a FlagSet whose usage names the command.
func flagSet(name, args string, stdio Stdio) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stdio.Err)
	fs.Usage = func() {
		fmt.Fprintf(stdio.Err, "Usage: buildfleet %s %s\n\nFlags:\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return &ExitError{Code: ExitUsage}
	}
	return nil
}

// connFlags are the flags of every subcommand that talks to NATS as a client.
type connFlags struct {
	url, prefix string
	timeout     time.Duration
}

func (c *connFlags) register(fs *flag.FlagSet, s config.Settings) {
	fs.StringVar(&c.url, "nats", s.NATSURL, "NATS server URL (BUILDFLEET_NATS_URL)")
	fs.StringVar(&c.prefix, "prefix", s.Prefix, "subject prefix of the installation (BUILDFLEET_PREFIX)")
	fs.DurationVar(&c.timeout, "connect-timeout", 5*time.Second, "how long to wait for NATS")
}

// connect opens a client connection with a message that says what to do when NATS is away.
func (c *connFlags) connect(s config.Settings) (*nats.Conn, *client.Client, error) {
	security, err := natsSecurity(s)
	if err != nil {
		return nil, nil, err
	}
	opts := append([]nats.Option{nats.Name("buildfleet-cli"), nats.Timeout(c.timeout)}, security...)
	nc, err := nats.Connect(c.url, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot reach NATS at %s (is `buildfleet dev` or a NATS server running?): %w", c.url, err)
	}
	cl, err := client.New(nc, client.WithPrefix(c.prefix))
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, cl, nil
}

// kvFlag collects repeated KEY=VALUE flags.
type kvFlag map[string]string

func (m kvFlag) String() string { return "" }
func (m kvFlag) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", v)
	}
	m[k] = val
	return nil
}
