//go:build linux

package process_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/process"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

var _ worker.Executor = (*process.Executor)(nil)

// testGrace keeps the SIGTERM → SIGKILL escalation short enough for tests.
const testGrace = 200 * time.Millisecond

func newExecutor(t testing.TB, opts process.Options) (*process.Executor, string) {
	t.Helper()
	if opts.ScratchDir == "" {
		opts.ScratchDir = t.TempDir()
	}
	if opts.KillGrace == 0 {
		opts.KillGrace = testGrace
	}
	if opts.Logger == nil {
		// Shown with -v or when the test fails.
		opts.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	e, err := process.New(opts)
	if err != nil {
		t.Fatalf("New(%+v) = %v", opts, err)
	}
	return e, opts.ScratchDir
}

func newJob(id string, command ...string) build.Job {
	return build.Job{ID: id, Workload: build.WorkloadName(id), Target: "local", Attempt: 1, Command: command}
}

// launch launches job and makes sure its process is gone when the test ends.
func launch(t testing.TB, e *process.Executor, job build.Job) {
	t.Helper()
	if err := e.Launch(t.Context(), job); err != nil {
		t.Fatalf("Launch(%s) = %v", job.Workload, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.Cleanup(ctx, job); err != nil {
			t.Errorf("Cleanup(%s) = %v", job.Workload, err)
		}
	})
}

func wait(t testing.TB, e *process.Executor, job build.Job) build.Outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	out, err := e.Wait(ctx, job, nil)
	if err != nil {
		t.Fatalf("Wait(%s) = %v", job.Workload, err)
	}
	return out
}

func readLog(t testing.TB, scratch string, job build.Job) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(scratch, job.Workload, "build.log"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// readPID waits for a build to write a pid to path.
func readPID(t *testing.T, path string) int {
	t.Helper()
	var pid int
	eventually(t, "a pid in "+path, func() bool {
		b, _ := os.ReadFile(path)
		var err error
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	})
	return pid
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// alive reports whether pid runs. A zombie does not: an orphan is reparented to PID 1, which
// in a container may never reap it.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	state := b[i+2]
	return state != 'Z' && state != 'X'
}

func exitCode(n int) *int { return &n }

func TestNewValidates(t *testing.T) {
	for _, opts := range []process.Options{
		{},
		{ScratchDir: t.TempDir(), KillGrace: -time.Second},
	} {
		if _, err := process.New(opts); !errors.Is(err, process.ErrInvalidOptions) {
			t.Errorf("New(%+v) = %v, want %v", opts, err, process.ErrInvalidOptions)
		}
	}
}

func TestNewCreatesScratchDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	if _, err := process.New(process.Options{ScratchDir: dir}); err != nil {
		t.Fatalf("New = %v", err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Errorf("Stat(%s) = %v, %v; want a directory", dir, fi, err)
	}
}

func TestSucceeded(t *testing.T) {
	e, scratch := newExecutor(t, process.Options{})
	job := newJob("ok", "echo", "hello")
	job.Image = "ignored:latest"
	launch(t, e, job)

	var running atomic.Int32
	out, err := e.Wait(t.Context(), job, func() { running.Add(1) })
	if err != nil {
		t.Fatalf("Wait = %v", err)
	}
	if diff := cmp.Diff(build.Succeeded(), out); diff != "" {
		t.Errorf("Wait outcome (-want +got):\n%s", diff)
	}
	if got := running.Load(); got != 1 {
		t.Errorf("running called %d times, want 1", got)
	}
	if got, want := readLog(t, scratch, job), "hello\n"; got != want {
		t.Errorf("log = %q, want %q", got, want)
	}
}

func TestExitCodeWithLogTail(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("exit3", "sh", "-c", "echo one; echo two >&2; exit 3")
	launch(t, e, job)

	want := build.Outcome{
		State:    protocol.StateFailed,
		Reason:   protocol.ReasonExitCode,
		ExitCode: exitCode(3),
		Message:  "exited with code 3; last output: one\ntwo",
	}
	if diff := cmp.Diff(want, wait(t, e, job)); diff != "" {
		t.Errorf("Wait outcome (-want +got):\n%s", diff)
	}
}

func TestConcurrentWaits(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("waits", "sh", "-c", "sleep 0.1; exit 2")
	launch(t, e, job)

	var wg sync.WaitGroup
	outs := make([]build.Outcome, 4)
	for i := range outs {
		wg.Go(func() { outs[i] = wait(t, e, job) })
	}
	wg.Wait()
	for i, out := range outs {
		if out.ExitCode == nil || *out.ExitCode != 2 {
			t.Errorf("Wait #%d outcome = %+v, want exit code 2", i, out)
		}
	}
}

func TestStartFailureIsPermanent(t *testing.T) {
	notExecutable := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(notExecutable, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, command := range map[string][]string{
		"not found":      {"buildfleet-no-such-command"},
		"not executable": {notExecutable},
		"empty":          nil,
	} {
		t.Run(name, func(t *testing.T) {
			e, _ := newExecutor(t, process.Options{})
			job := newJob("bad", command...)
			err := e.Launch(t.Context(), job)
			p, ok := build.AsPermanent(err)
			if !ok {
				t.Fatalf("Launch(%q) = %v, want a permanent error", command, err)
			}
			if p.Outcome.State != protocol.StateFailed || p.Outcome.Reason != protocol.ReasonContainerError {
				t.Errorf("Launch(%q) outcome = %s/%s, want %s/%s", command, p.Outcome.State, p.Outcome.Reason,
					protocol.StateFailed, protocol.ReasonContainerError)
			}
			if _, err := e.Wait(t.Context(), job, nil); !errors.Is(err, process.ErrNoProcess) {
				t.Errorf("Wait after a failed Launch = %v, want %v", err, process.ErrNoProcess)
			}
		})
	}
}

func TestSteps(t *testing.T) {
	tests := []struct {
		name     string
		steps    []protocol.Step
		wantCode int
		wantLog  string
	}{{
		name: "all pass",
		steps: []protocol.Step{
			{Name: "one", Run: "echo first"},
			{Name: "two", Run: "echo 'it''s quoted'; echo \"$BUILDFLEET_BUILD_ID\""},
		},
		wantLog: "==> step one\nfirst\n==> step two\nits quoted\nsteps\n",
	}, {
		name: "second fails",
		steps: []protocol.Step{
			{Name: "one", Run: "echo first"},
			{Name: "two", Run: "echo second; exit 4"},
			{Name: "three", Run: "echo third"},
		},
		wantCode: 4,
		wantLog:  "==> step one\nfirst\n==> step two\nsecond\n",
	}, {
		name: "set -e within a step",
		steps: []protocol.Step{
			{Name: "one", Run: "false\necho not reached"},
			{Name: "two", Run: "echo not run"},
		},
		wantCode: 1,
		wantLog:  "==> step one\n",
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, scratch := newExecutor(t, process.Options{})
			job := newJob("steps")
			job.Steps = tt.steps
			launch(t, e, job)

			out := wait(t, e, job)
			if got := out.ExitCode; tt.wantCode == 0 && got != nil || tt.wantCode != 0 && (got == nil || *got != tt.wantCode) {
				t.Errorf("outcome = %+v, want exit code %d", out, tt.wantCode)
			}
			if got := readLog(t, scratch, job); got != tt.wantLog {
				t.Errorf("log = %q, want %q", got, tt.wantLog)
			}
		})
	}
}

func TestEnvironment(t *testing.T) {
	t.Setenv("BUILDFLEET_TEST_SECRET", "hunter2")
	e, scratch := newExecutor(t, process.Options{})
	job := newJob("env", "env")
	job.Attempt = 2
	job.Env = map[string]string{"FOO": "bar", "LANG": "en_US.UTF-8", build.EnvBuildID: "forged"}
	launch(t, e, job)
	if out := wait(t, e, job); out.State != protocol.StateSucceeded {
		t.Fatalf("outcome = %+v, want success", out)
	}

	got := map[string]string{}
	for line := range strings.Lines(readLog(t, scratch, job)) {
		k, v, _ := strings.Cut(strings.TrimSuffix(line, "\n"), "=")
		got[k] = v
	}
	workDir := filepath.Join(scratch, job.Workload, "work")
	want := map[string]string{
		"PATH":           os.Getenv("PATH"),
		"HOME":           workDir,
		"TMPDIR":         workDir,
		"LANG":           "en_US.UTF-8",
		"FOO":            "bar",
		build.EnvBuildID: "env",
		build.EnvTarget:  "local",
		build.EnvAttempt: "2",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("build environment (-want +got):\n%s", diff)
	}
}

func TestFreshWorkDir(t *testing.T) {
	e, scratch := newExecutor(t, process.Options{})
	job := newJob("fresh", "ls", "-A")
	stale := filepath.Join(scratch, job.Workload, "work", "stale")
	if err := os.MkdirAll(stale, 0o755); err != nil {
		t.Fatal(err)
	}
	launch(t, e, job)
	wait(t, e, job)
	if got := readLog(t, scratch, job); got != "" {
		t.Errorf("work dir of a new attempt holds %q, want nothing", got)
	}
}

func killedBy(sig syscall.Signal) build.Outcome {
	return build.Failed(protocol.ReasonContainerError, "killed by signal %s", sig)
}

func TestKill(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("kill", "sleep", "60")
	launch(t, e, job)

	start := time.Now()
	if err := e.Kill(t.Context(), job); err != nil {
		t.Fatalf("Kill = %v", err)
	}
	if took := time.Since(start); took >= testGrace {
		t.Errorf("Kill of a process that honours SIGTERM took %s, want under the %s grace", took, testGrace)
	}
	if diff := cmp.Diff(killedBy(syscall.SIGTERM), wait(t, e, job)); diff != "" {
		t.Errorf("Wait outcome (-want +got):\n%s", diff)
	}
	if err := e.Kill(t.Context(), job); err != nil {
		t.Errorf("second Kill = %v, want nil", err)
	}
}

func TestKillEscalatesToSIGKILL(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	ready := filepath.Join(t.TempDir(), "ready")
	job := newJob("stubborn", "sh", "-c", `trap "" TERM; echo $$ > "$1"; sleep 60`, "sh", ready)
	launch(t, e, job)
	readPID(t, ready) // the trap is set

	start := time.Now()
	if err := e.Kill(t.Context(), job); err != nil {
		t.Fatalf("Kill = %v", err)
	}
	if took := time.Since(start); took < testGrace || took > 10*testGrace {
		t.Errorf("Kill took %s, want about the %s grace", took, testGrace)
	}
	if diff := cmp.Diff(killedBy(syscall.SIGKILL), wait(t, e, job)); diff != "" {
		t.Errorf("Wait outcome (-want +got):\n%s", diff)
	}
}

func TestKillReachesGrandchildren(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	pidFile := filepath.Join(t.TempDir(), "pid")
	job := newJob("tree", "sh", "-c", `sleep 60 & echo $! > "$1"; wait`, "sh", pidFile)
	launch(t, e, job)
	grandchild := readPID(t, pidFile)

	if err := e.Kill(t.Context(), job); err != nil {
		t.Fatalf("Kill = %v", err)
	}
	wait(t, e, job)
	eventually(t, fmt.Sprintf("grandchild %d to die", grandchild), func() bool { return !alive(grandchild) })
}

func TestLeftoversSweptOnExit(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	pidFile := filepath.Join(t.TempDir(), "pid")
	// The background job ignores SIGTERM and outlives the build's main process.
	job := newJob("leftover", "sh", "-c", `(trap "" TERM; exec sleep 60) & echo $! > "$1"`, "sh", pidFile)
	launch(t, e, job)

	if out := wait(t, e, job); out.State != protocol.StateSucceeded {
		t.Fatalf("outcome = %+v, want success", out)
	}
	leftover := readPID(t, pidFile)
	eventually(t, fmt.Sprintf("leftover %d to die", leftover), func() bool { return !alive(leftover) })
}

func TestUnknownWorkload(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("elsewhere", "true")
	if err := e.Kill(t.Context(), job); err != nil {
		t.Errorf("Kill(unknown) = %v, want nil", err)
	}
	if err := e.Release(t.Context(), job); err != nil {
		t.Errorf("Release(unknown) = %v, want nil", err)
	}
	if err := e.Cleanup(t.Context(), job); err != nil {
		t.Errorf("Cleanup(unknown) = %v, want nil", err)
	}
	_, err := e.Wait(t.Context(), job, func() { t.Error("running called for an unknown workload") })
	if !errors.Is(err, process.ErrNoProcess) {
		t.Errorf("Wait(unknown) = %v, want %v", err, process.ErrNoProcess)
	}
	if _, ok := build.AsPermanent(err); ok {
		t.Errorf("Wait(unknown) = %v, want a transient error", err)
	}
}

func TestLaunchIsIdempotent(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	runs := filepath.Join(t.TempDir(), "runs")
	job := newJob("once", "sh", "-c", `echo run >> "$1"; sleep 0.2`, "sh", runs)

	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if err := e.Launch(t.Context(), job); err != nil {
				t.Errorf("Launch = %v", err)
			}
		})
	}
	wg.Wait()
	launch(t, e, job)
	wait(t, e, job)
	// Found even after it has exited: a redelivery must not run a finished build again.
	launch(t, e, job)
	wait(t, e, job)

	b, err := os.ReadFile(runs)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(b), "run\n"); got != 1 {
		t.Errorf("the build ran %d times, want 1", got)
	}
}

func TestReleaseThenAdoptRunsAgain(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	runs := filepath.Join(t.TempDir(), "runs")
	job := newJob("handover", "sh", "-c", `echo run >> "$1"; exec sleep 60`, "sh", runs)
	launch(t, e, job)
	eventually(t, "the first run", func() bool { b, _ := os.ReadFile(runs); return len(b) > 0 })

	if err := e.Release(t.Context(), job); err != nil {
		t.Fatalf("Release = %v", err)
	}
	if _, err := e.Wait(t.Context(), job, nil); !errors.Is(err, process.ErrNoProcess) {
		t.Errorf("Wait after Release = %v, want %v", err, process.ErrNoProcess)
	}
	job.Adopt = true
	launch(t, e, job)
	eventually(t, "the second run", func() bool { b, _ := os.ReadFile(runs); return string(b) == "run\nrun\n" })
}

func TestWaitCancelLeavesProcessRunning(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	pidFile := filepath.Join(t.TempDir(), "pid")
	job := newJob("cancel", "sh", "-c", `echo $$ > "$1"; exec sleep 60`, "sh", pidFile)
	launch(t, e, job)
	pid := readPID(t, pidFile)

	errStop := errors.New("replica stopping")
	ctx, cancel := context.WithTimeoutCause(t.Context(), 50*time.Millisecond, errStop)
	defer cancel()
	if _, err := e.Wait(ctx, job, nil); !errors.Is(err, errStop) {
		t.Errorf("Wait with a cancelled ctx = %v, want %v", err, errStop)
	}
	if !alive(pid) {
		t.Fatalf("process %d died when Wait was cancelled", pid)
	}
	if err := e.Kill(t.Context(), job); err != nil {
		t.Fatalf("Kill = %v", err)
	}
	if out := wait(t, e, job); out.Reason != protocol.ReasonContainerError {
		t.Errorf("outcome after Kill = %+v, want %s", out, protocol.ReasonContainerError)
	}
}

func TestCleanup(t *testing.T) {
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep=%t", keep), func(t *testing.T) {
			e, scratch := newExecutor(t, process.Options{KeepScratch: keep})
			// Go's module cache makes read-only directories like these under HOME.
			job := newJob("clean", "sh", "-c", "mkdir -p ro/sub && touch ro/sub/f && chmod -R a-w ro")
			launch(t, e, job)
			wait(t, e, job)

			for range 2 {
				if err := e.Cleanup(t.Context(), job); err != nil {
					t.Fatalf("Cleanup = %v", err)
				}
			}
			_, err := os.Stat(filepath.Join(scratch, job.Workload, "build.log"))
			if keep && err != nil {
				t.Errorf("with KeepScratch, the log is gone: %v", err)
			}
			if !keep && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("after Cleanup, Stat(log) = %v, want %v", err, os.ErrNotExist)
			}
			if _, err := e.Wait(t.Context(), job, nil); !errors.Is(err, process.ErrNoProcess) {
				t.Errorf("Wait after Cleanup = %v, want %v", err, process.ErrNoProcess)
			}
		})
	}
}

func TestCleanupKillsARunningProcess(t *testing.T) {
	e, scratch := newExecutor(t, process.Options{})
	pidFile := filepath.Join(t.TempDir(), "pid")
	job := newJob("early", "sh", "-c", `echo $$ > "$1"; exec sleep 60`, "sh", pidFile)
	launch(t, e, job)
	pid := readPID(t, pidFile)

	if err := e.Cleanup(t.Context(), job); err != nil {
		t.Fatalf("Cleanup = %v", err)
	}
	eventually(t, fmt.Sprintf("process %d to die", pid), func() bool { return !alive(pid) })
	if _, err := os.Stat(filepath.Join(scratch, job.Workload)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after Cleanup, Stat(scratch dir) = %v, want %v", err, os.ErrNotExist)
	}
}

func TestBadWorkloadName(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	for _, name := range []string{"", ".", "..", "a/b"} {
		job := newJob("x", "true")
		job.Workload = name
		if _, ok := build.AsPermanent(e.Launch(t.Context(), job)); !ok {
			t.Errorf("Launch(workload %q) is not a permanent error", name)
		}
		if _, ok := build.AsPermanent(e.Cleanup(t.Context(), job)); !ok {
			t.Errorf("Cleanup(workload %q) is not a permanent error", name)
		}
	}
}

func BenchmarkLaunchWait(b *testing.B) {
	e, _ := newExecutor(b, process.Options{Logger: slog.New(slog.DiscardHandler)})
	ctx := b.Context()
	for i := 0; b.Loop(); i++ {
		job := newJob(fmt.Sprintf("bench-%d", i), "true")
		if err := e.Launch(ctx, job); err != nil {
			b.Fatal(err)
		}
		if _, err := e.Wait(ctx, job, nil); err != nil {
			b.Fatal(err)
		}
		if err := e.Cleanup(ctx, job); err != nil {
			b.Fatal(err)
		}
	}
}

// A job that reads Kubernetes Secrets cannot run as a local process: refused, never started.
func TestSecretRefsAreRefused(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("refs", "true")
	job.SecretRefs = map[string]protocol.SecretRef{"NPM_TOKEN": {Secret: "npm", Key: "token"}}
	p, ok := build.AsPermanent(e.Launch(t.Context(), job))
	if !ok || p.Outcome.State != protocol.StateRejected || p.Outcome.Reason != protocol.ReasonLaunchRefused {
		t.Fatalf("Launch with secret_refs = %v, want rejected/launch_refused", p)
	}
	if _, err := e.Wait(t.Context(), job, nil); !errors.Is(err, process.ErrNoProcess) {
		t.Errorf("Wait after a refused Launch = %v, want %v", err, process.ErrNoProcess)
	}
}

// TestReadLogs: a process's output is read live, from any cursor on, and a released
// process's output, down to what it printed as it was killed, can still be read to its end,
// once.
func TestReadLogs(t *testing.T) {
	e, _ := newExecutor(t, process.Options{})
	job := newJob("logs", "sh", "-c", `trap 'echo bye; exit 0' TERM; echo one; echo two; printf 'é%.0s' $(seq 1 40000); echo; sleep 60 & wait`)
	launch(t, e, job)
	type piece struct {
		text string
		at   build.LogCursor
	}
	var got []piece
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	fctx, stop := context.WithCancel(ctx)
	err := e.ReadLogs(fctx, job, build.LogCursor{}, true, func(line []byte, at build.LogCursor) error {
		got = append(got, piece{string(line), at})
		if strings.HasSuffix(string(line), "é\n") {
			stop()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadLogs (follow) = %v; want it to follow until cancelled", err)
	}
	var all strings.Builder
	for _, p := range got {
		if !utf8.ValidString(p.text) {
			t.Errorf("a piece of %d bytes cuts a character", len(p.text))
		}
		all.WriteString(p.text)
	}
	if want := "one\ntwo\n" + strings.Repeat("é", 40000) + "\n"; all.String() != want || len(got) < 4 {
		t.Fatalf("read %d bytes in %d pieces; want the %d printed, the long line in pieces", all.Len(), len(got), len(want))
	}
	var rest strings.Builder
	if err := e.ReadLogs(ctx, job, got[0].at, false, func(line []byte, _ build.LogCursor) error { rest.Write(line); return nil }); err != nil {
		t.Fatal(err)
	}
	if rest.String() != all.String()[len(got[0].text):] {
		t.Errorf("from the cursor after the first line the log reads %d bytes; want %d", rest.Len(), all.Len()-len(got[0].text))
	}

	if err := e.Release(ctx, job); err != nil {
		t.Fatal(err)
	}
	var tail strings.Builder
	last := got[len(got)-1].at
	if err := e.ReadLogs(ctx, job, last, false, func(line []byte, _ build.LogCursor) error { tail.Write(line); return nil }); err != nil {
		t.Fatal(err)
	}
	if tail.String() != "bye\n" {
		t.Errorf("after Release the rest of the output is %q; want what it printed as it was killed", tail.String())
	}
	tail.Reset()
	if err := e.ReadLogs(ctx, job, last, false, func(line []byte, _ build.LogCursor) error { tail.Write(line); return nil }); err != nil || tail.Len() != 0 {
		t.Errorf("a second read after Release gave %q (%v); want nothing: it was read to its end", tail.String(), err)
	}
}
