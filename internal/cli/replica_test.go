package cli

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// binaryReplica is the real buildfleet binary running `worker` as its own process.
type binaryReplica struct {
	cmd  *exec.Cmd
	done chan error
}

func (f *fleet) startBinary(replica string, env ...string) *binaryReplica {
	f.t.Helper()
	cmd := exec.Command(binary, "worker")
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"BUILDFLEET_NATS_URL=" + f.url(),
		"BUILDFLEET_REPLICA=" + replica,
		"BUILDFLEET_SCRATCH_DIR=" + filepath.Join(f.dir, "scratch-"+replica),
		"BUILDFLEET_LOG_LEVEL=debug",
		"BUILDFLEET_HTTP_ADDR=127.0.0.1:0", // replicas side by side: each on a free port
	}, env...)
	p := &binaryReplica{cmd: cmd, done: make(chan error, 1)}
	cmd.Stderr = &lockedWriter{w: f, prefix: replica + "| "}
	if err := cmd.Start(); err != nil {
		f.t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	f.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
	})
	f.waitConsumer()
	return p
}

// terminate sends SIGTERM and waits for a clean exit.
func (p *binaryReplica) terminate(t *testing.T, within time.Duration) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		p.done <- nil // for the cleanup
		if err != nil {
			t.Errorf("replica exited with %v after SIGTERM, want 0", err)
		}
	case <-time.After(within):
		t.Fatalf("replica did not exit within %s of SIGTERM", within)
	}
}

// lockedWriter prefixes each of a child's log lines into the fleet's log. The child's
// stderr comes in chunks as the pipe is read, which may hold several lines or part of one:
// a partial line waits for its end.
type lockedWriter struct {
	w       *fleet
	prefix  string
	partial []byte
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.partial = append(l.partial, p...)
	var out []byte
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		out = append(append(out, l.prefix...), l.partial[:i+1]...)
		l.partial = l.partial[i+1:]
	}
	if len(out) == 0 {
		return len(p), nil
	}
	_, err := l.w.Write(out)
	return len(p), err
}

// TestKilledReplicaBuildsAreAdopted kills a replica (SIGKILL: no handover) while it runs
// builds. Another replica adopts each once AckWait has passed, and each build ends with
// exactly one terminal event.
func TestKilledReplicaBuildsAreAdopted(t *testing.T) {
	f := newFleet(t)
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=2s")
	ids := []string{"crash-1", "crash-2", "crash-3"}
	for _, id := range ids {
		mark := filepath.Join(f.dir, id)
		f.submit(id, "sh", "-c", fmt.Sprintf("echo start >> %s; sleep 2", mark))
	}
	for _, id := range ids {
		f.awaitState(id, protocol.StateRunning, 20*time.Second)
	}
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.done
	a.done <- nil // for the cleanup
	b := f.settings("b")
	b.HTTPAddr = freeAddr(t)
	before := scrape(t, f.startReady(b))
	for _, id := range ids {
		evs := f.await(id, 30*time.Second)
		if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
			t.Errorf("%s ended %s, want succeeded", id, got)
		}
		waitFor(t, 10*time.Second, "settled", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
		counts := f.storedEvents(id)
		if terminalCount(counts) != 1 || counts[protocol.StateRunning] != 1 || counts[protocol.StateDispatched] != 1 {
			t.Errorf("%s events = %v; want one each of dispatched, running and one terminal", id, counts)
		}
		rec := f.status(id)
		if rec.Replica != "b" || rec.Attempts != 2 || rec.Handovers != 0 || rec.Failures != 1 {
			t.Errorf("%s record: replica %q attempts %d handovers %d failures %d; want b, 2, 0, 1 (the crash)",
				id, rec.Replica, rec.Attempts, rec.Handovers, rec.Failures)
		}
		// The process executor cannot adopt a process across replicas: the adopter runs it
		// again. The killed replica's child died with it (Pdeathsig), so it never finished.
		got, _ := os.ReadFile(filepath.Join(f.dir, id))
		if n := strings.Count(string(got), "start"); n != 2 {
			t.Errorf("%s started %d times, want 2 (once per replica)", id, n)
		}
	}
	f.checkTakeovers(b.HTTPAddr, before, "recovery", len(ids))
}

// startReady starts an in-process replica serving HTTP at s.HTTPAddr and returns that
// address once it is ready.
func (f *fleet) startReady(s config.Settings) string {
	f.t.Helper()
	f.start(s, nil)
	waitReady(f.t, s.HTTPAddr, http.StatusOK, "", 20*time.Second)
	return s.HTTPAddr
}

// checkTakeovers checks that the in-process replica serving at addr took n builds from
// replica a (how: "recovery" or "handover"): its counter moved by n since before, it logged
// the first build taken at once (a recovery as a warning) and the rest at debug level, and
// a report sums them up.
func (f *fleet) checkTakeovers(addr string, before map[string]float64, how string, n int) {
	f.t.Helper()
	key := fmt.Sprintf(`buildfleet_builds_taken_over_total{how=%q}`, how)
	if got := scrape(f.t, addr)[key] - before[key]; got != float64(n) {
		f.t.Errorf("%s moved by %v, want %d", key, got, n)
	}
	msg, first := "taking over a build handed over by another replica", "level=INFO"
	if how == "recovery" {
		msg, first = "taking over a build whose owner's liveness is gone", "level=WARN"
	}
	if got := f.countLogged(msg, "from=a", first); got != 1 {
		f.t.Errorf("%d lines %q at %s, want 1 (the first build taken)", got, msg, first)
	}
	if got := f.countLogged(msg, "from=a", "level=DEBUG"); got != n-1 {
		f.t.Errorf("%d lines %q at debug level, want %d (the rest)", got, msg, n-1)
	}
	f.awaitLog(20*time.Second, "a report of the builds taken over", func() bool {
		return f.countLogged("took over builds of another replica", "from=a", "how="+how, fmt.Sprintf("builds=%d ", n)) == 1
	})
}

// TestSIGTERMHandsBuildsOver sends SIGTERM to a replica holding builds: it must Nak them at
// once (long before AckWait) so another replica adopts them, and exit cleanly.
func TestSIGTERMHandsBuildsOver(t *testing.T) {
	f := newFleet(t)
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=60s")
	ids := []string{"move-1", "move-2"}
	for _, id := range ids {
		f.submit(id, "sleep", "2")
	}
	for _, id := range ids {
		f.awaitState(id, protocol.StateRunning, 20*time.Second)
	}
	b := f.settings("b")
	b.HTTPAddr = freeAddr(t)
	before := scrape(t, f.startReady(b))
	a.terminate(t, 20*time.Second)
	// The replica handing over sums up what it gave back in one line.
	if got := f.countLogged(`a| `, `"msg":"handed over builds"`, fmt.Sprintf(`"builds":%d}`, len(ids))); got != 1 {
		t.Errorf("the replica handing over logged %d lines saying it handed over %d builds, want 1", got, len(ids))
	}
	// AckWait is 60s: an adoption within 20s can only come from the handover's Nak.
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		rec := waitRecord(ctx, t, f, id, func(r protocol.Record) bool { return r.State.Terminal() })
		cancel()
		// The server sometimes delivers a Nak'd message twice in quick succession; the older
		// delivery then stands down, so more than two attempts are fine, failures are not.
		if rec.State != protocol.StateSucceeded || rec.Replica != "b" || rec.Handovers != 1 || rec.Attempts < 2 || rec.Failures != 0 {
			t.Errorf("%s record: %s on %q, attempts %d handovers %d failures %d; want succeeded on b, 2+ attempts, 1 handover, no failure",
				id, rec.State, rec.Replica, rec.Attempts, rec.Handovers, rec.Failures)
		}
		if n := terminalCount(f.storedEvents(id)); n != 1 {
			t.Errorf("%s: %d terminal events, want 1", id, n)
		}
	}
	f.checkTakeovers(b.HTTPAddr, before, "handover", len(ids))
}

func waitRecord(ctx context.Context, t *testing.T, f *fleet, id string, cond func(protocol.Record) bool) protocol.Record {
	t.Helper()
	for {
		rec, err := f.cl.Status(ctx, id)
		if err == nil && cond(rec) {
			return rec
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for the record of %s: %v (last: %+v)", id, ctx.Err(), rec)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// submitLocked submits build id running a shell that holds an exclusive lock on a file
// while it runs (a second run while the first lives notes "overlap" instead of starting),
// notes in another when it starts, is asked to stop (SIGTERM) and ends, and runs for
// seconds. It waits until the build runs and returns the notes' file.
func (f *fleet) submitLocked(id string, seconds int) string {
	f.t.Helper()
	mark := filepath.Join(f.dir, id+".log")
	lock := filepath.Join(f.dir, id+".lock")
	f.submit(id, "sh", "-c", fmt.Sprintf(`exec 9>%[2]s; flock -n 9 || { echo overlap >> %[1]s; exit 1; }
trap 'echo killed >> %[1]s; exit 143' TERM; echo start >> %[1]s; sleep %[3]d 9>&- & wait; echo end >> %[1]s`, mark, lock, seconds))
	f.awaitState(id, protocol.StateRunning, 20*time.Second)
	return mark
}

// TestPausedOwnerKeepsItsBuild stops the replica running a build (SIGSTOP) for longer than
// AckWait, so the server offers the build to another replica, then resumes it. The other
// replica must leave the build to its owner, whose liveness has not lapsed: one run, from
// start to end, on the replica that started it.
func TestPausedOwnerKeepsItsBuild(t *testing.T) {
	f := newFleet(t)
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_LIVENESS_TTL=30s", "BUILDFLEET_CONCURRENCY=1")
	mark := f.submitLocked("paused", 5)
	s := f.settings("b")
	s.LivenessTTL = 30 * time.Second
	f.start(s, nil)
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// AckWait has passed once the server offered the build to b, which turned it down.
	waitFor(t, 30*time.Second, "the build offered to b", func() bool { return f.logged("a live replica owns this build; waiting") })
	if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	f.checkRanOnce("paused", mark)
	if rec := f.status("paused"); rec.Replica != "a" {
		t.Errorf("record names replica %q, want a (the owner that was paused)", rec.Replica)
	}
}

// TestPausedPastLivenessIsKilled stops the replica running a build (SIGSTOP) and never
// resumes it. Its dead-man's switch must kill it (SIGKILL, delivered even to a stopped
// process) before its liveness key can expire, and its build process with it; only then
// may another replica recover the build, run it again, and say so.
func TestPausedPastLivenessIsKilled(t *testing.T) {
	f := newFleet(t)
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_LIVENESS_TTL=5s", "BUILDFLEET_CONCURRENCY=1")
	mark := f.submitLocked("frozen", 6)
	s := f.settings("b")
	s.LivenessTTL = 5 * time.Second
	f.start(s, nil)
	if err := a.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.done:
		a.done <- nil // for the cleanup
	case <-time.After(30 * time.Second):
		t.Fatal("the paused replica was not killed by its dead-man's switch within 30s")
	}
	if ws, ok := a.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("the paused replica ended %v, want killed by SIGKILL", a.cmd.ProcessState)
	}
	evs := f.await("frozen", 60*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateSucceeded || !strings.Contains(last.Message, "run again") {
		t.Errorf("terminal event %s %q; want succeeded, saying it ran again", last.State, last.Message)
	}
	if n := terminalCount(f.storedEvents("frozen")); n != 1 {
		t.Errorf("%d terminal events, want 1", n)
	}
	rec := f.status("frozen")
	if rec.Replica != "b" || rec.Failures != 1 {
		t.Errorf("record: replica %q failures %d; want b, 1 (recovered from a vanished owner)", rec.Replica, rec.Failures)
	}
	got, _ := os.ReadFile(mark)
	// The first run was killed with its replica (no note), the second ran whole; the lock
	// shows they never ran at once.
	if lines := strings.Fields(string(got)); !slices.Equal(lines, []string{"start", "start", "end"}) {
		t.Errorf("runs of frozen: %v; want start (killed with its replica), start, end", lines)
	}
}
