package process

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// DefaultKillGrace is how long Kill waits after SIGTERM before it sends SIGKILL.
const DefaultKillGrace = 5 * time.Second

// ErrInvalidOptions is wrapped by every error New returns for a bad Options field.
var ErrInvalidOptions = errors.New("process: invalid options")

// Options configures an Executor.
type Options struct {
	// ScratchDir is the parent of the per-build directories; it is created if missing.
	ScratchDir string
	// KeepScratch keeps a build's work dir and log after Cleanup, for debugging.
	KeepScratch bool
	// KillGrace is the time between SIGTERM and SIGKILL; zero means DefaultKillGrace.
	KillGrace time.Duration
	// Logger receives the executor's logs; nil means slog.Default().
	Logger *slog.Logger
}

// New validates opts and returns an executor. It creates ScratchDir so that a scratch
// directory that cannot be written fails at start rather than on the first build.
func New(opts Options) (*Executor, error) {
	if opts.ScratchDir == "" {
		return nil, fmt.Errorf("%w: ScratchDir is required", ErrInvalidOptions)
	}
	if opts.KillGrace < 0 {
		return nil, fmt.Errorf("%w: KillGrace %s is negative", ErrInvalidOptions, opts.KillGrace)
	}
	scratch, err := filepath.Abs(opts.ScratchDir)
	if err != nil {
		return nil, fmt.Errorf("%w: ScratchDir %q: %w", ErrInvalidOptions, opts.ScratchDir, err)
	}
	if err := os.MkdirAll(scratch, 0o750); err != nil {
		return nil, fmt.Errorf("%w: ScratchDir: %w", ErrInvalidOptions, err)
	}
	grace := opts.KillGrace
	if grace == 0 {
		grace = DefaultKillGrace
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	return &Executor{
		scratch:  scratch,
		keep:     opts.KeepScratch,
		grace:    grace,
		log:      logger,
		procs:    make(map[string]*process),
		released: make(map[string]*output),
	}, nil
}
