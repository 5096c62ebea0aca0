package cli

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// TestChaosEveryBuildEndsOnce runs a batch of builds over three replicas (real binaries),
// SIGKILLs one and SIGTERMs another mid-flight, and starts a fresh one: every build must end
// succeeded with exactly one terminal event, and nothing may be left in the work queue.
func TestChaosEveryBuildEndsOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test: runs without -short")
	}
	f := newFleet(t)
	ackWait := "BUILDFLEET_ACK_WAIT=2s"
	a := f.startBinary("a", ackWait, "BUILDFLEET_CONCURRENCY=8")
	b := f.startBinary("b", ackWait, "BUILDFLEET_CONCURRENCY=8")
	f.startBinary("c", ackWait, "BUILDFLEET_CONCURRENCY=8")
	const n = 40
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("chaos-%02d", i)
		f.submit(ids[i], "sleep", "0.7")
	}
	time.Sleep(500 * time.Millisecond)
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	f.startBinary("d", ackWait, "BUILDFLEET_CONCURRENCY=8")
	start := time.Now()
	for _, id := range ids {
		evs := f.await(id, 90*time.Second)
		if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
			t.Errorf("%s ended %s, want succeeded (events %v)", id, got, states(evs))
		}
	}
	t.Logf("every build ended %s after the kills", time.Since(start).Round(time.Millisecond))
	waitFor(t, 30*time.Second, "every request settled", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	for _, id := range ids {
		if c := f.storedEvents(id); terminalCount(c) != 1 {
			t.Errorf("%s: events %v, want exactly one terminal", id, c)
		}
	}
}
