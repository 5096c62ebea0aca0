package cli

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// readLog reads build id's log as it is stored once closed: it follows the log until it is
// closed (the fleet closes it right after it announces the build's end), then reads what is
// kept (a live follower also sees the middle of an over-long log before it is cut).
func (f *fleet) readLog(id string) (text string, chunks []protocol.LogChunk) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, err := range f.cl.Logs(ctx, id, true) {
		if err != nil {
			f.t.Fatalf("following the log of %s to its end: %v", id, err)
		}
	}
	var b strings.Builder
	for c, err := range f.cl.Logs(ctx, id, false) {
		if err != nil {
			f.t.Fatalf("Logs(%s): %v", id, err)
		}
		chunks = append(chunks, c)
		b.WriteString(c.Text)
	}
	return b.String(), chunks
}

// checkContiguous fails unless each chunk starts where the one before ended, except past a
// cut of exactly cut bytes.
func checkContiguous(t *testing.T, chunks []protocol.LogChunk, cut int64) {
	t.Helper()
	var next, jumped int64
	for i, c := range chunks {
		if c.Offset < next {
			t.Fatalf("chunk %d starts at %d, before the end of the one before (%d): output doubled", i, c.Offset, next)
		}
		jumped += c.Offset - next
		next = c.Offset + int64(len(c.Text))
	}
	if jumped != cut {
		t.Errorf("the chunks leave %d bytes out; want %d", jumped, cut)
	}
	if len(chunks) == 0 || chunks[len(chunks)-1].End == nil {
		t.Fatalf("the log is not closed: its last chunk has no end (%d chunks)", len(chunks))
	}
	if end := chunks[len(chunks)-1].End; end.Bytes != next || end.CutBytes != cut {
		t.Errorf("end = %+v; want %d bytes with %d cut", *end, next, cut)
	}
}

func numbered(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		fmt.Fprintf(&b, "line %05d\n", i)
	}
	return b.String()
}

// TestLogsOfAProcessBuild: a build printing 10,000 lines has all of them in its log, in
// order, once; the CLI prints them; a multi-step build's chunks name their steps; a secret
// the build echoes is masked.
func TestLogsOfAProcessBuild(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())

	f.submit("ten-k", "sh", "-c", `i=1; while [ $i -le 10000 ]; do printf 'line %05d\n' $i; i=$((i+1)); done`)
	f.await("ten-k", time.Minute)
	text, chunks := f.readLog("ten-k")
	if want := numbered(10000); text != want {
		t.Errorf("the log holds %d bytes; want the 10,000 lines (%d bytes)", len(text), len(want))
	}
	checkContiguous(t, chunks, 0)
	if end := chunks[len(chunks)-1].End; end.Lines != 10000 {
		t.Errorf("end says %d lines; want 10000", end.Lines)
	}
	out, errOut, code := run(t, "", "logs", "ten-k")
	if code != 0 || out != numbered(10000) {
		t.Errorf("logs ten-k: exit %d, %d bytes, stderr %q; want the 10,000 lines", code, len(out), errOut)
	}

	f.submitReq(protocol.BuildRequest{ID: "stepped", Image: "busybox", Steps: []protocol.Step{
		{Name: "first", Run: "echo one; echo two"}, {Name: "second", Run: `echo "three $DEPLOY_TOKEN"`}},
		Env: map[string]string{"DEPLOY_TOKEN": "tok-123456"}})
	f.await("stepped", time.Minute)
	text, chunks = f.readLog("stepped")
	if want := "==> step first\none\ntwo\n==> step second\nthree ***\n"; text != want {
		t.Errorf("the log of a multi-step build is %q; want %q", text, want)
	}
	steps := map[string]string{}
	for _, c := range chunks {
		steps[c.Step] += c.Text
	}
	if steps["first"] != "==> step first\none\ntwo\n" || steps["second"] != "==> step second\nthree ***\n" {
		t.Errorf("lines by step: %q; want each step's lines marked with its name", steps)
	}

	// submit --wait shows the output as it comes, before the end.
	out, errOut, code = run(t, "", "submit", "--wait", "--id", "hello", "--", "sh", "-c", "echo hello; sleep 1")
	if code != 0 || !strings.Contains("\n"+out, "\nhello\n") || strings.Index("\n"+out, "\nhello\n") > strings.Index(out, "succeeded") {
		t.Errorf("submit --wait: exit %d, stdout %q, stderr %q; want hello before the end", code, out, errOut)
	}
	out, _, _ = run(t, "", "submit", "--wait", "--states-only", "--id", "quiet", "--", "sh", "-c", "echo hush")
	if strings.Contains(out, "hush") || !strings.Contains(out, "succeeded") {
		t.Errorf("submit --wait --states-only printed %q; want the states without the output", out)
	}
	_, errOut, code = run(t, "", "logs", "never-submitted")
	if code != 1 || !strings.Contains(errOut, "not found") {
		t.Errorf("logs of an unknown build: exit %d, stderr %q; want 1 and 'not found'", code, errOut)
	}
}

// TestLogsFollowAndStop: logs -f follows a build live and exits with its outcome; a build
// stopped mid-output keeps its output up to its last line, and its log is closed.
func TestLogsFollowAndStop(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())

	f.submit("chatty", "sh", "-c", `i=1; while true; do echo "tick $i"; i=$((i+1)); sleep 0.01; done`)
	done := make(chan struct{})
	var out, errOut string
	var code int
	go func() {
		defer close(done)
		out, errOut, code = run(t, "", "logs", "-f", "chatty")
	}()
	// The follower sees output while the build runs.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for c, err := range f.cl.Logs(ctx, "chatty", true) {
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(c.Text, "tick 50\n") {
			break
		}
	}
	if err := f.cl.Stop(context.Background(), "chatty", "enough"); err != nil {
		t.Fatal(err)
	}
	f.await("chatty", 30*time.Second)
	<-done
	if code != ExitAborted {
		t.Errorf("logs -f of a stopped build: exit %d (stderr %q); want %d", code, errOut, ExitAborted)
	}
	text, chunks := f.readLog("chatty")
	checkContiguous(t, chunks, 0)
	if out != text {
		t.Errorf("logs -f printed %d bytes; want the %d the log holds", len(out), len(text))
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	for i, l := range lines {
		if l != fmt.Sprintf("tick %d", i+1) {
			t.Fatalf("line %d is %q; want tick %d: no line lost or doubled", i+1, l, i+1)
		}
	}
	if len(lines) < 50 {
		t.Errorf("the log of the stopped build holds %d lines; want at least the 50 seen before the stop", len(lines))
	}
}

// TestLogsCapKeepsHeadAndTail: a build printing more than the cap keeps its head and its
// tail, and says how much was cut.
func TestLogsCapKeepsHeadAndTail(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.LogMaxBytes = 256 << 10
	f.start(s, nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())

	// 100,000 lines of 11 bytes: 1.1 MB, over four times the cap.
	f.submit("loud", "sh", "-c", `i=1; while [ $i -le 100000 ]; do printf 'line %05d\n' $((i % 100000)); i=$((i+1)); done; echo "the failing end"; exit 4`)
	evs := f.await("loud", 2*time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateFailed {
		t.Fatalf("ended %s; want failed", last.State)
	}
	text, chunks := f.readLog("loud")
	end := chunks[len(chunks)-1].End
	if end == nil || end.CutBytes == 0 {
		t.Fatalf("the log of a build over the cap says no cut (end %+v)", end)
	}
	checkContiguous(t, chunks, end.CutBytes)
	if kept := int64(len(text)); kept > s.LogMaxBytes || kept < s.LogMaxBytes/2 {
		t.Errorf("kept %d bytes; want between half the cap and the cap (%d)", kept, s.LogMaxBytes)
	}
	if !strings.HasPrefix(text, "line 00001\nline 00002\n") || !strings.HasSuffix(text, "line 00000\nthe failing end\n") {
		t.Errorf("the log keeps %.30q … %.30q; want the head and the failing end", text, text[max(0, len(text)-30):])
	}
	if end.Bytes != 100000*11+int64(len("the failing end\n")) || end.Lines != 100001 {
		t.Errorf("end = %+v; want the whole output counted: %d bytes, 100001 lines", *end, 100000*11+16)
	}
	out, _, _ := run(t, "", "logs", "loud")
	if !strings.Contains(out, fmt.Sprintf("[buildfleet] … %d bytes of output cut here", end.CutBytes)) {
		t.Errorf("logs loud does not say where and how much was cut:\n%.300s", out)
	}
}

// TestLogsAcrossAHandover: a replica that shuts down mid-output hands the build over; the
// process runs again on the replica that takes it, and its log holds the first run's lines
// up to the handover, a note, and the second run's lines: none lost or doubled.
func TestLogsAcrossAHandover(t *testing.T) {
	f := newFleet(t)
	a := f.start(f.settings("a"), nil)
	f.submit("moved", "sh", "-c", `i=1; while [ $i -le 300 ]; do echo "tick $i"; i=$((i+1)); sleep 0.01; done`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for c, err := range f.cl.Logs(ctx, "moved", true) {
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(c.Text, "tick 20\n") {
			break
		}
	}
	f.start(f.settings("b"), nil)
	a.stop(t)
	evs := f.await("moved", time.Minute)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded {
		t.Fatalf("ended %s %q; want succeeded on the second run", last.State, last.Message)
	}
	_, chunks := f.readLog("moved")
	checkContiguous(t, chunks, 0)
	var runs []string
	cur := ""
	for _, c := range chunks {
		if c.Note != "" {
			if !strings.Contains(c.Note, "run again") {
				t.Errorf("note %q; want it to say the build runs again", c.Note)
			}
			runs = append(runs, cur)
			cur = ""
		}
		cur += c.Text
	}
	runs = append(runs, cur)
	if len(runs) != 2 {
		t.Fatalf("the log holds %d runs; want 2 (the first up to the handover, the second whole)", len(runs))
	}
	for r, text := range runs {
		lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
		for i, l := range lines {
			if l != fmt.Sprintf("tick %d", i+1) {
				t.Fatalf("run %d, line %d is %q; want tick %d: no line lost or doubled", r+1, i+1, l, i+1)
			}
		}
		if r == 0 && len(lines) < 20 {
			t.Errorf("the first run kept %d lines; want at least the 20 seen before the handover", len(lines))
		}
		if r == 1 && len(lines) != 300 {
			t.Errorf("the second run kept %d lines; want all 300", len(lines))
		}
	}
}

// TestLogsReadAtTheEnd: with BUILDFLEET_LOG_LIVE=false the output is read once, when the
// build ends, or before it is killed: the log is just as complete.
func TestLogsReadAtTheEnd(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.LogLive = "never"
	f.start(s, nil)
	f.submit("at-end", "sh", "-c", `i=1; while [ $i -le 1000 ]; do echo "tick $i"; i=$((i+1)); done`)
	f.submit("at-end-stopped", "sh", "-c", `echo started; exec sleep 60`)
	f.await("at-end", time.Minute)
	text, chunks := f.readLog("at-end")
	checkContiguous(t, chunks, 0)
	if lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n"); len(lines) != 1000 || lines[999] != "tick 1000" {
		t.Errorf("the log read at the end holds %d lines; want the 1000", len(lines))
	}
	f.awaitState("at-end-stopped", protocol.StateRunning, 30*time.Second)
	if err := f.cl.Stop(context.Background(), "at-end-stopped", ""); err != nil {
		t.Fatal(err)
	}
	f.await("at-end-stopped", 30*time.Second)
	text, chunks = f.readLog("at-end-stopped")
	checkContiguous(t, chunks, 0)
	if text != "started\n" {
		t.Errorf("the stopped build's log is %q; want what it printed", text)
	}
}
