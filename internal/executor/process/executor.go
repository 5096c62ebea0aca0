// Package process is the executor that runs a build as a child process of the replica, in a
// scratch directory. It is what `buildfleet dev` uses by default. It isolates nothing beyond a
// minimal environment and a process group, so it is not for untrusted code, and it ignores
// the build's image.
//
// Each build gets <ScratchDir>/<workload>/work as its working directory, HOME and TMPDIR, and
// <ScratchDir>/<workload>/build.log for its stdout and stderr.
package process

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Names inside a build's scratch directory.
const (
	workDirName = "work"
	logName     = "build.log"
)

// ErrNoProcess is returned by Wait for a workload this executor has not launched, or has
// released or cleaned up since. It is transient: the worker always launches before it waits.
var ErrNoProcess = errors.New("process: no such build process on this replica")

// Executor runs builds as local child processes. It is safe for concurrent use.
type Executor struct {
	scratch string
	keep    bool
	grace   time.Duration
	log     *slog.Logger

	mu    sync.Mutex
	procs map[string]*process // by workload name, from Launch until Release or Cleanup
	// released keeps the output of a released process until it has been read to its end
	// once (the replica that lets a build go stores what it printed last), or until the
	// workload is launched or cleaned up again.
	released map[string]*output
}

// process is one launched build. The fields above each channel are written before it is
// closed and only read after it is.
type process struct {
	startErr error
	pid      int
	ready    chan struct{} // closed when the start has finished, successfully or not

	out *output // set before ready is closed, when the start succeeded

	outcome build.Outcome
	done    chan struct{} // closed when the process has been reaped and its output copied

	// sigMu keeps group signals from racing the reap, after which the group id may be reused.
	sigMu  sync.Mutex
	reaped bool
}

// Launch starts the job's process, unless this executor already has one for the workload:
// then it finds it, running or exited, as a pod executor finds an existing pod, so that a
// redelivered build that already ran does not run twice.
//
// A job with Adopt set is started again when there is no process to find: a local process
// cannot outlive the replica that started it (Release kills it, and the kernel kills it when
// the replica dies), so the replica that adopts the build has to run it anew.
func (e *Executor) Launch(ctx context.Context, job build.Job) error {
	if err := checkWorkload(job.Workload); err != nil {
		return build.Permanent(protocol.StateFailed, protocol.ReasonContainerError, err)
	}
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	e.mu.Lock()
	if p, ok := e.procs[job.Workload]; ok {
		e.mu.Unlock()
		select {
		case <-p.ready:
			return p.startErr
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	// Claim the name before the slow part (clearing an earlier attempt's files), so that a
	// concurrent Launch finds this one instead of starting a second process.
	p := &process{ready: make(chan struct{}), done: make(chan struct{})}
	e.procs[job.Workload] = p
	delete(e.released, job.Workload)
	e.mu.Unlock()

	p.startErr = e.start(ctx, job, p)
	if p.startErr != nil {
		e.forget(job.Workload, p)
	}
	close(p.ready)
	return p.startErr
}

// start starts the build process; ctx only carries the trace into the logs: the process
// outlives the launch.
func (e *Executor) start(ctx context.Context, job build.Job, p *process) error {
	log := e.log.With("workload", job.Workload, "build", job.ID)
	if job.Adopt {
		log.InfoContext(ctx, "a local process cannot be adopted; running the build again")
	}
	if job.Image != "" {
		log.DebugContext(ctx, "the process executor ignores the image", "image", job.Image)
	}
	args, err := job.Argv()
	if err != nil {
		return build.Permanent(protocol.StateFailed, protocol.ReasonContainerError, err)
	}
	if len(job.SecretRefs) > 0 {
		return build.Permanent(protocol.StateRejected, protocol.ReasonLaunchRefused,
			errors.New("the process executor cannot read Kubernetes Secrets (secret_refs): run the build on a kubernetes target that allows them"))
	}

	dir := filepath.Join(e.scratch, job.Workload)
	workDir := filepath.Join(dir, workDirName)
	// An earlier attempt may have left files behind; every attempt starts from an empty dir.
	if err := removeAll(workDir); err != nil {
		return fmt.Errorf("process: clearing the work dir: %w", err)
	}
	if err := os.MkdirAll(workDir, 0o750); err != nil {
		return fmt.Errorf("process: creating the work dir: %w", err)
	}
	logPath := filepath.Join(dir, logName)
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("process: creating the build log: %w", err)
	}
	// One pipe for both, so the child gets a single descriptor and its output lands in the
	// log in the order it was written; the replica copies it into the log as it comes, so
	// that the fleet can follow it.
	pipeR, pipeW, err := os.Pipe()
	if err != nil {
		logFile.Close()
		return fmt.Errorf("process: creating the output pipe: %w", err)
	}
	// Not exec.CommandContext: the process must outlive the Launch call. args[0] is looked up
	// in the replica's PATH, not in a PATH the job sets.
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = workDir
	cmd.Env = environ(job, workDir, os.Getenv("PATH"))
	cmd.Stdout = pipeW
	cmd.Stderr = pipeW
	cmd.SysProcAttr = sysProcAttr()
	err = cmd.Start()
	pipeW.Close() // the child holds its own descriptor
	if err != nil {
		pipeR.Close()
		logFile.Close()
		return classifyStart(err)
	}
	p.pid = cmd.Process.Pid
	p.out = newOutput(logPath, fmt.Sprintf("%s/%d/%d", job.Workload, p.pid, time.Now().UnixNano()))
	log.InfoContext(ctx, "build process started", "pid", p.pid, "dir", workDir)

	// The two goroutines of a process: the copy of its output, which ends when the pipe
	// closes, and the reap (cmd.Wait is the only way to reap the child and must run whether
	// or not anyone waits for the build), which ends when the process has exited and its
	// output is copied.
	go p.out.copyFrom(pipeR, logFile)
	go p.reap(cmd, pipeR)
	return nil
}

// classifyStart sorts a start failure. A system short of processes, memory or descriptors
// may recover, so the start is retried; a missing or unusable command never will.
func classifyStart(err error) error {
	err = fmt.Errorf("starting the build: %w", err)
	for _, transient := range []error{syscall.EAGAIN, syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE} {
		if errors.Is(err, transient) {
			return fmt.Errorf("process: %w", err)
		}
	}
	return build.Permanent(protocol.StateFailed, protocol.ReasonContainerError, err)
}

// reap waits for the process to exit, ends what it left running in its group, as the end of
// a container's main process would, and records the outcome.
func (p *process) reap(cmd *exec.Cmd, pipe io.Closer) {
	// Sweep while the leader is an unreaped zombie: its pid, and so the group id, cannot have
	// been reused yet. Where that cannot be done the leftovers are not swept.
	swept := waitExited(p.pid) == nil
	if swept {
		p.signal(syscall.SIGKILL)
		p.markReaped()
	}
	err := cmd.Wait()
	if !swept {
		p.markReaped()
	}
	p.out.await(pipe)
	p.outcome = outcomeOf(cmd.ProcessState, err, logTail(p.out.path))
	close(p.done)
}

// signal sends sig to the process's whole group, unless the process has been reaped.
func (p *process) signal(sig syscall.Signal) {
	p.sigMu.Lock()
	defer p.sigMu.Unlock()
	if !p.reaped {
		// ESRCH only means the group has already gone.
		_ = syscall.Kill(-p.pid, sig)
	}
}

func (p *process) markReaped() {
	p.sigMu.Lock()
	p.reaped = true
	p.sigMu.Unlock()
}

// Wait calls running once the process has started, then blocks until it exits and returns how
// it ended. Cancelling ctx returns its cause and leaves the process running.
func (e *Executor) Wait(ctx context.Context, job build.Job, running func()) (build.Outcome, error) {
	p, err := e.started(ctx, job.Workload)
	if err != nil {
		return build.Outcome{}, err
	}
	if p == nil {
		return build.Outcome{}, fmt.Errorf("%w: %s", ErrNoProcess, job.Workload)
	}
	if running != nil {
		running()
	}
	select {
	case <-p.done:
		return p.outcome, nil
	case <-ctx.Done():
		return build.Outcome{}, context.Cause(ctx)
	}
}

// Kill sends SIGTERM to the build's process group, then SIGKILL once the grace period has
// passed or ctx is done, whichever comes first, and returns when the process has exited or
// ctx is done. A workload this executor
// does not have, perhaps because it runs on another replica, is not an error.
func (e *Executor) Kill(ctx context.Context, job build.Job) error {
	p, err := e.started(ctx, job.Workload)
	if err != nil || p == nil {
		return err
	}
	return e.kill(ctx, job, p)
}

func (e *Executor) kill(ctx context.Context, job build.Job, p *process) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	e.log.InfoContext(ctx, "killing build process", "workload", job.Workload, "build", job.ID, "pid", p.pid)
	p.signal(syscall.SIGTERM)
	grace := time.NewTimer(e.grace)
	defer grace.Stop()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		// Cut short, a kill still kills: at once.
		p.signal(syscall.SIGKILL)
		return context.Cause(ctx)
	case <-grace.C:
	}
	p.signal(syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// Release kills the build's process, as a local process cannot outlive its replica, and
// forgets it; the replica that takes the build over runs it again.
func (e *Executor) Release(ctx context.Context, job build.Job) error {
	p, err := e.started(ctx, job.Workload)
	if err != nil || p == nil {
		return err
	}
	// Forgotten even when ctx cut the kill short: it was sent SIGKILL, and the replica that
	// launches the build next must start it anew rather than find this one. Its output can
	// still be read to its end (ReadLogs).
	defer func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.procs[job.Workload] == p {
			delete(e.procs, job.Workload)
			e.released[job.Workload] = p.out
		}
	}()
	return e.kill(ctx, job, p)
}

// Cleanup forgets the build's process and removes its scratch directory, unless KeepScratch
// is set. A process still running is killed first, so its files do not go from under it.
func (e *Executor) Cleanup(ctx context.Context, job build.Job) error {
	if err := checkWorkload(job.Workload); err != nil {
		return build.Permanent(protocol.StateFailed, protocol.ReasonContainerError, err)
	}
	p, err := e.started(ctx, job.Workload)
	if err != nil {
		return err
	}
	if p != nil {
		if err := e.kill(ctx, job, p); err != nil {
			return err
		}
		e.forget(job.Workload, p)
	}
	e.mu.Lock()
	delete(e.released, job.Workload)
	e.mu.Unlock()
	if e.keep {
		return nil
	}
	if err := removeAll(filepath.Join(e.scratch, job.Workload)); err != nil {
		return fmt.Errorf("process: removing the scratch dir: %w", err)
	}
	return nil
}

// started returns the workload's process once its start has finished, or nil when there is
// none or it failed to start.
func (e *Executor) started(ctx context.Context, workload string) (*process, error) {
	e.mu.Lock()
	p := e.procs[workload]
	e.mu.Unlock()
	if p == nil {
		return nil, nil
	}
	select {
	case <-p.ready:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	if p.startErr != nil {
		return nil, nil
	}
	return p, nil
}

// forget drops the workload's entry if it is still p, not a later launch's.
func (e *Executor) forget(workload string, p *process) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.procs[workload] == p {
		delete(e.procs, workload)
	}
}

// checkWorkload guards the scratch dir: the workload name becomes a path element in it.
func checkWorkload(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("workload name %q is not a single path element", name)
	}
	return nil
}

// ReadLogs reads the build process's output from its log file as the process writes it, or
// the rest of a released process's output, once. A build this executor has no process for
// (cleaned up, or run by another replica) has no output to read here.
func (e *Executor) ReadLogs(ctx context.Context, job build.Job, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
	p, err := e.started(ctx, job.Workload)
	if err != nil {
		return err
	}
	if p != nil {
		return p.out.read(ctx, from, follow, emit)
	}
	e.mu.Lock()
	out := e.released[job.Workload]
	e.mu.Unlock()
	if out == nil {
		return nil
	}
	if err := out.read(ctx, from, false, emit); err != nil {
		return err
	}
	if _, done, _ := out.state(); done {
		e.mu.Lock()
		if e.released[job.Workload] == out {
			delete(e.released, job.Workload)
		}
		e.mu.Unlock()
	}
	return nil
}

// Reruns is true: a local process cannot outlive the replica that started it, so the replica
// that adopts a build runs it anew.
func (e *Executor) Reruns() bool { return true }
