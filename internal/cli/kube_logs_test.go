package cli

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// podLog makes the output of build id's pod in the fleet's namespace.
func (f *kubeFleet) podLog(id string) *kubetest.PodLog {
	f.t.Helper()
	pl, err := f.cp.PodLog(context.Background(), f.ns, "build-"+id)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { pl.Close() })
	return pl
}

func printLines(t *testing.T, pl *kubetest.PodLog, from, to int) {
	t.Helper()
	lines := make([]string, 0, to-from+1)
	for i := from; i <= to; i++ {
		lines = append(lines, fmt.Sprintf("line %05d", i))
	}
	if err := pl.Print(lines...); err != nil {
		t.Fatal(err)
	}
}

// awaitLogLine follows build id's log until a chunk holds line.
func (f *fleet) awaitLogLine(id, line string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for c, err := range f.cl.Logs(ctx, id, true) {
		if err != nil {
			f.t.Fatalf("following the log of %s for %q: %v", id, line, err)
		}
		if strings.Contains(c.Text, line+"\n") {
			return
		}
	}
	f.t.Fatalf("the log of %s ended without %q", id, line)
}

// TestKubeLogs reads build pods' output through the apiserver (the worker holding only
// deploy/'s Role): 10,000 lines, kept after the pod is deleted; a secret the build echoes,
// masked; a build stopped mid-output, with every line printed before the stop; a build over
// the cap, its head and tail kept and the cut said.
func TestKubeLogs(t *testing.T) {
	f := newKubeFleet(t, "1s")
	s := f.settings("a")
	s.LogMaxBytes = 256 << 10
	f.start(s, nil)

	pl := f.podLog("k-10k")
	printLines(t, pl, 1, 10000)
	f.submitReq(sim("k-10k", map[string]string{"run-ms": "1500"}))

	secret := f.podLog("k-secret")
	if err := secret.Print("deploying with tok-abcdef123", "done"); err != nil {
		t.Fatal(err)
	}
	req := sim("k-secret", map[string]string{"run-ms": "500"})
	req.Env = map[string]string{"API_TOKEN": "tok-abcdef123"}
	f.submitReq(req)

	steps := f.podLog("k-steps")
	if err := steps.Print("==> step one", "a", "==> step two", "b"); err != nil {
		t.Fatal(err)
	}
	stepped := sim("k-steps", map[string]string{"run-ms": "500"})
	stepped.Command, stepped.Steps = nil, []protocol.Step{{Name: "one", Run: "echo a"}, {Name: "two", Run: "echo b"}}
	f.submitReq(stepped)

	stopped := f.podLog("k-stop")
	printLines(t, stopped, 1, 50)
	f.submitReq(sim("k-stop", map[string]string{"run-ms": "600000"}))

	loud := f.podLog("k-loud")
	printLines(t, loud, 1, 40000)
	if err := loud.Print("the failing end"); err != nil {
		t.Fatal(err)
	}
	f.submitReq(sim("k-loud", map[string]string{"run-ms": "3000", "exit-code": "2"}))

	// Timed out, OOM-killed, evicted: each keeps its output up to its last line.
	ends := map[string]map[string]string{"k-timeout": {"run-ms": "600000"}, "k-oom": {"outcome": "oom"}, "k-evict": {"outcome": "evict"}}
	for id, ann := range ends {
		pl := f.podLog(id)
		printLines(t, pl, 1, 200)
		req := sim(id, ann)
		if id == "k-timeout" {
			req.TimeoutSeconds = 3
		}
		f.submitReq(req)
	}

	// Stopped mid-output: everything printed before the stop is kept.
	f.awaitLogLine("k-stop", "line 00050")
	printLines(t, stopped, 51, 100)
	if err := f.cl.Stop(context.Background(), "k-stop", "enough"); err != nil {
		t.Fatal(err)
	}

	want := map[string]protocol.State{"k-10k": protocol.StateSucceeded, "k-secret": protocol.StateSucceeded,
		"k-stop": protocol.StateAborted, "k-loud": protocol.StateFailed,
		"k-steps": protocol.StateSucceeded, "k-timeout": protocol.StateTimedOut, "k-oom": protocol.StateFailed, "k-evict": protocol.StateFailed}
	for id, st := range want {
		evs := f.await(id, 2*time.Minute)
		if got := evs[len(evs)-1].Data.State; got != st {
			t.Errorf("%s ended %s; want %s", id, got, st)
		}
	}

	// Kept after the pod is gone (retention 1s).
	f.awaitNoPod("k-10k", time.Minute)
	text, chunks := f.readLog("k-10k")
	checkContiguous(t, chunks, 0)
	if want := numbered(10000); text != want {
		t.Errorf("the log of k-10k after its pod went holds %d bytes; want the 10,000 lines (%d)", len(text), len(want))
	}

	_, chunks = f.readLog("k-steps")
	bySteps := map[string]string{}
	for _, c := range chunks {
		bySteps[c.Step] += c.Text
	}
	if bySteps["one"] != "==> step one\na\n" || bySteps["two"] != "==> step two\nb\n" {
		t.Errorf("the pod's lines by step: %q; want each step's lines marked with its name", bySteps)
	}

	text, _ = f.readLog("k-secret")
	if text != "deploying with ***\ndone\n" {
		t.Errorf("the log of k-secret is %q; want the token masked", text)
	}

	text, chunks = f.readLog("k-stop")
	checkContiguous(t, chunks, 0)
	if want := numbered(100); text != want {
		t.Errorf("the log of the stopped build holds %d bytes; want the 100 lines printed before the stop (%d)", len(text), len(want))
	}

	for id := range ends {
		text, chunks := f.readLog(id)
		checkContiguous(t, chunks, 0)
		if text != numbered(200) {
			t.Errorf("the log of %s (%s) holds %d bytes; want its 200 lines", id, f.status(id).Reason, len(text))
		}
	}

	text, chunks = f.readLog("k-loud")
	end := chunks[len(chunks)-1].End
	if end == nil || end.CutBytes == 0 {
		t.Fatalf("the log of a build over the cap says no cut (end %+v)", end)
	}
	checkContiguous(t, chunks, end.CutBytes)
	if !strings.HasPrefix(text, "line 00001\n") || !strings.HasSuffix(text, "line 40000\nthe failing end\n") || int64(len(text)) > s.LogMaxBytes {
		t.Errorf("the log over the cap keeps %d bytes, %.12q … %.30q; want at most %d, the head and the failing end",
			len(text), text, text[max(0, len(text)-30):], s.LogMaxBytes)
	}
}

// TestKubeLogsAfterAKill: a replica is killed (SIGKILL) while its build prints; the replica
// that recovers the build reads on from where the log stood.
func TestKubeLogsAfterAKill(t *testing.T) {
	f := newKubeFleet(t, "10m")
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_LOG_LIVE=always", "BUILDFLEET_TARGETS_FILE="+f.targets, "KUBECONFIG="+f.cp.WorkerKubeconfig)
	pl := f.podLog("k-kill")
	printLines(t, pl, 1, 30)
	f.submitReq(sim("k-kill", map[string]string{"run-ms": "10000"}))
	f.awaitLogLine("k-kill", "line 00030")
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.done
	a.done <- nil // for the cleanup
	printLines(t, pl, 31, 60)
	f.start(f.settings("b"), nil)
	evs := f.await("k-kill", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded || f.status("k-kill").Replica != "b" {
		t.Fatalf("ended %s on %q; want succeeded on b", last.State, f.status("k-kill").Replica)
	}
	text, chunks := f.readLog("k-kill")
	checkContiguous(t, chunks, 0)
	if want := numbered(60); text != want {
		t.Errorf("the log across the kill is %q; want the 60 lines once each", text)
	}
}

// TestKubeLogsAcrossAHandover: a replica shuts down while its build prints; the replica that
// takes the build over reads on from where the log stood: every line once, in order, and
// no note (the same pod runs on).
func TestKubeLogsAcrossAHandover(t *testing.T) {
	f := newKubeFleet(t, "10m")
	a := f.startBinary("a", "BUILDFLEET_ACK_WAIT=60s", "BUILDFLEET_LOG_LIVE=always", "BUILDFLEET_TARGETS_FILE="+f.targets, "KUBECONFIG="+f.cp.WorkerKubeconfig)
	pl := f.podLog("k-hand")
	printLines(t, pl, 1, 30)
	f.submitReq(sim("k-hand", map[string]string{"run-ms": "8000"}))
	f.awaitLogLine("k-hand", "line 00030")
	if err := pl.PrintBurst("line 00031", "line 00032", "line 00033"); err != nil {
		t.Fatal(err)
	}
	f.start(f.settings("b"), nil)
	a.terminate(t, 30*time.Second)
	if err := pl.PrintBurst("line 00034", "line 00035"); err != nil {
		t.Fatal(err)
	}
	printLines(t, pl, 36, 60)
	evs := f.await("k-hand", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded || f.status("k-hand").Handovers < 1 {
		t.Fatalf("ended %s after %d handovers; want succeeded after a handover", last.State, f.status("k-hand").Handovers)
	}
	text, chunks := f.readLog("k-hand")
	checkContiguous(t, chunks, 0)
	if want := numbered(60); text != want {
		t.Errorf("the log across the handover is %q; want the 60 lines once each", text)
	}
	for _, c := range chunks {
		if c.Note != "" {
			t.Errorf("a note %q in the log of a pod that ran on", c.Note)
		}
	}
}

// TestKubeLogsWanted: by default (BUILDFLEET_LOG_LIVE=wanted) a running build's output is
// followed live once someone follows its log: the follower sees it while the build runs, and
// the log holds it once, in order, after a stop.
func TestKubeLogsWanted(t *testing.T) {
	f := newKubeFleet(t, "10m")
	f.startBinary("a", "BUILDFLEET_TARGETS_FILE="+f.targets, "KUBECONFIG="+f.cp.WorkerKubeconfig)
	pl := f.podLog("k-want")
	printLines(t, pl, 1, 30)
	f.submitReq(sim("k-want", map[string]string{"run-ms": "600000"}))
	f.awaitState("k-want", protocol.StateRunning, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var text strings.Builder
	for c, err := range f.cl.Logs(ctx, "k-want", true) {
		if err != nil {
			t.Fatal(err)
		}
		text.WriteString(c.Text)
		if strings.Contains(text.String(), "line 00030\n") {
			break
		}
	}
	if st := f.status("k-want").State; st.Terminal() {
		t.Fatalf("the build ended (%s) before its output was seen; want it seen while it runs", st)
	}
	if err := f.cl.Stop(context.Background(), "k-want", "enough"); err != nil {
		t.Fatal(err)
	}
	f.await("k-want", time.Minute)
	got, chunks := f.readLog("k-want")
	checkContiguous(t, chunks, 0)
	if want := numbered(30); got != want {
		t.Errorf("the log of the followed build is %q; want the 30 lines once each", got)
	}
}
