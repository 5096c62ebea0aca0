package logs_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/logs"
	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// store provisions the layout on a fresh nats-server and returns its log store.
func store(t *testing.T, lim logs.Limits) (*logs.Store, jetstream.JetStream) {
	t.Helper()
	nc := natstest.Connect(t, natstest.Start(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	layout := protocol.Layout{Prefix: protocol.DefaultPrefix}
	ctx := context.Background()
	res, err := queue.Provision(ctx, js, queue.LayoutConfig{Layout: layout, Replicas: 1, DuplicateWindow: time.Minute,
		EventsMaxAge: time.Hour, DeadLetterMaxAge: time.Hour, LogsMaxAge: time.Hour, RecordTTL: time.Hour,
		LivenessTTL: 10 * time.Second, AckWait: 10 * time.Second, MaxAckPending: 10})
	if err != nil {
		t.Fatal(err)
	}
	return &logs.Store{JS: js, Stream: res.LogStream, Layout: layout, Limits: lim, Log: slog.Default()}, js
}

// output is a workload's output for tests: lines, each with its index as the cursor, from
// one source. gate, when set, is waited on before each line: the test decides how far a
// read gets.
type output struct {
	source string
	lines  []string
}

func (o output) read(ctx context.Context, from build.LogCursor, _ bool, emit func([]byte, build.LogCursor) error) error {
	start := 0
	if from.Source == o.source && from.Pos != "" {
		n, err := strconv.Atoi(from.Pos)
		if err != nil {
			return err
		}
		start = n
	}
	for i := start; i < len(o.lines); i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := emit([]byte(o.lines[i]), build.LogCursor{Source: o.source, Pos: strconv.Itoa(i + 1)}); err != nil {
			return err
		}
	}
	return nil
}

func lines(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s %05d\n", prefix, i+1)
	}
	return out
}

// stored reads the build's log back.
func stored(t *testing.T, js jetstream.JetStream, id string) (string, []protocol.LogChunk) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := js.OrderedConsumer(ctx, "BUILDFLEET_LOGS", jetstream.OrderedConsumerConfig{FilterSubjects: []string{"buildfleet.logs." + id}})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	var chunks []protocol.LogChunk
	for {
		batch, err := cons.FetchNoWait(100)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for msg := range batch.Messages() {
			n++
			c, err := protocol.DecodeLogChunk(msg.Data())
			if err != nil {
				t.Fatal(err)
			}
			chunks = append(chunks, c)
			b.WriteString(c.Text)
		}
		if n == 0 {
			return b.String(), chunks
		}
	}
}

// TestShippersRacing: replicas that ship the same output at once (a paused owner waking up
// beside the new one) store every line exactly once, whoever wins each append.
func TestShippersRacing(t *testing.T) {
	for round := range 5 {
		t.Run(strconv.Itoa(round), func(t *testing.T) {
			st, js := store(t, logs.Limits{ChunkBytes: 1 << 10, Flush: time.Millisecond})
			out := output{source: "pod-1", lines: lines("line", 3000)}
			var g errgroup.Group
			for range 3 {
				sh := st.NewShipper("b1", nil, build.Masker{}, "", 1)
				g.Go(func() error { return sh.Ship(context.Background(), out.read, false) })
			}
			if err := g.Wait(); err != nil {
				t.Fatal(err)
			}
			if err := st.NewShipper("b1", nil, build.Masker{}, "", 1).Finish(context.Background(), out.read); err != nil {
				t.Fatal(err)
			}
			text, chunks := stored(t, js, "b1")
			if want := strings.Join(out.lines, ""); text != want {
				t.Fatalf("stored %d bytes; want the %d of the output exactly once", len(text), len(want))
			}
			var next int64
			for i, c := range chunks {
				if c.Offset != next {
					t.Fatalf("chunk %d at offset %d; want %d", i, c.Offset, next)
				}
				next += int64(len(c.Text))
			}
			if end := chunks[len(chunks)-1].End; end == nil || end.Bytes != next || end.Lines != 3000 {
				t.Errorf("end = %+v; want %d bytes and 3000 lines", end, next)
			}
		})
	}
}

// TestResumeKeepsTheCap: a shipper that takes over an over-long log from another finds the
// chunks past the head and goes on cutting: what is kept stays within the cap, and the end
// counts every byte cut.
func TestResumeKeepsTheCap(t *testing.T) {
	lim := logs.Limits{MaxBytes: 256 << 10, ChunkBytes: 4 << 10, Flush: time.Millisecond}
	st, js := store(t, lim)
	out := output{source: "pod-1", lines: lines("line", 60000)} // 660 KB
	half := output{source: out.source, lines: out.lines[:30000]}
	if err := st.NewShipper("b2", nil, build.Masker{}, "", 1).Ship(context.Background(), half.read, false); err != nil {
		t.Fatal(err)
	}
	if err := st.NewShipper("b2", nil, build.Masker{}, "", 1).Finish(context.Background(), out.read); err != nil {
		t.Fatal(err)
	}
	text, chunks := stored(t, js, "b2")
	end := chunks[len(chunks)-1].End
	whole := int64(len(strings.Join(out.lines, "")))
	if end == nil || end.Bytes != whole || end.CutBytes != whole-int64(len(text)) || end.Lines != 60000 {
		t.Fatalf("end = %+v; want %d bytes, %d of them cut", end, whole, whole-int64(len(text)))
	}
	if int64(len(text)) > lim.MaxBytes {
		t.Errorf("kept %d bytes; want at most the cap %d", len(text), lim.MaxBytes)
	}
	if !strings.HasPrefix(text, "line 00001\n") || !strings.HasSuffix(text, "line 60000\n") {
		t.Errorf("kept %.11q … %.11q; want the head and the tail", text, text[len(text)-11:])
	}
}

// TestANewRunSupersedes: a build run again (a local process cannot be adopted) begins a new
// part of the log with a note; the replica of the first run, waking up, appends nothing more.
func TestANewRunSupersedes(t *testing.T) {
	st, js := store(t, logs.Limits{Flush: time.Millisecond})
	first := output{source: "run-1", lines: lines("first", 10)}
	old := st.NewShipper("b3", []protocol.Step{{Name: "compile", Run: "make"}}, build.Masker{}, "", 1)
	if err := old.Ship(context.Background(), output{source: "run-1", lines: first.lines[:5]}.read, false); err != nil {
		t.Fatal(err)
	}
	second := output{source: "run-2", lines: append([]string{"==> step compile\n"}, lines("second", 3)...)}
	if err := st.NewShipper("b3", []protocol.Step{{Name: "compile", Run: "make"}}, build.Masker{}, "run again: handed over", 2).
		Finish(context.Background(), second.read); err != nil {
		t.Fatal(err)
	}
	err := old.Ship(context.Background(), first.read, false)
	if !errors.Is(err, logs.ErrEnded) && !errors.Is(err, logs.ErrSuperseded) {
		t.Errorf("the first run's shipper appended after the new run (err %v)", err)
	}
	text, chunks := stored(t, js, "b3")
	if want := strings.Join(first.lines[:5], "") + strings.Join(second.lines, ""); text != want {
		t.Errorf("the log is %q; want the first run's lines up to the handover, then the new run's", text)
	}
	notes, steps := 0, map[string]bool{}
	for _, c := range chunks {
		if c.Note == "run again: handed over" {
			notes++
		}
		steps[c.Step] = true
	}
	if notes != 1 || !steps["compile"] {
		t.Errorf("%d notes, steps %v; want one note and the new run's step marked", notes, steps)
	}
}

// TestFinishAfterAnotherAppended: a shipper whose last append loses to another replica's
// reads on from where the log stands before it closes the log: no line is lost.
func TestFinishAfterAnotherAppended(t *testing.T) {
	st, js := store(t, logs.Limits{ChunkBytes: 1 << 20, Flush: time.Hour})
	out := output{source: "pod-1", lines: lines("line", 100)}
	a := st.NewShipper("r1", nil, build.Masker{}, "", 1)
	readA := func(ctx context.Context, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
		first := true
		return out.read(ctx, from, follow, func(l []byte, at build.LogCursor) error {
			if err := emit(l, at); err != nil {
				return err
			}
			if first { // line 1 published at once (last is zero); now B appends lines 2..50
				first = false
				b := st.NewShipper("r1", nil, build.Masker{}, "", 1)
				if err := b.Ship(ctx, output{source: "pod-1", lines: out.lines[:50]}.read, false); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := a.Finish(context.Background(), readA); err != nil {
		t.Fatal(err)
	}
	text, chunks := stored(t, js, "r1")
	if want := strings.Join(out.lines, ""); text != want {
		t.Errorf("stored %d lines, end=%+v; want 100", strings.Count(text, "\n"), chunks[len(chunks)-1].End)
	}
}

type failingJS struct {
	jetstream.JetStream
	fail func() bool
}

func (f failingJS) PublishMsg(ctx context.Context, m *nats.Msg, o ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if f.fail() {
		return nil, errors.New("injected publish failure")
	}
	return f.JetStream.PublishMsg(ctx, m, o...)
}

// TestCutCountedAfterAFailedAppend: an append that fails after it cut counts the cut when
// it is tried again.
func TestCutCountedAfterAFailedAppend(t *testing.T) {
	lim := logs.Limits{MaxBytes: 256 << 10, ChunkBytes: 4 << 10, Flush: time.Hour}
	st, js := store(t, lim)
	n := 0
	st.JS = failingJS{JetStream: st.JS, fail: func() bool { n++; return n == 150 }}
	out := output{source: "pod-1", lines: lines("line", 60000)}
	sh := st.NewShipper("r2", nil, build.Masker{}, "", 1)
	for {
		err := sh.Finish(context.Background(), out.read)
		if err == nil {
			break
		}
		t.Logf("finish: %v (retrying)", err)
	}
	text, chunks := stored(t, js, "r2")
	end := chunks[len(chunks)-1].End
	whole := int64(len(strings.Join(out.lines, "")))
	if end.Bytes != whole || end.CutBytes != whole-int64(len(text)) {
		t.Errorf("end = %+v; stored %d, so cut should be %d", end, len(text), whole-int64(len(text)))
	}
}

// TestAnEarlierRunsLateLinesDoNotStopTheNewRun: a paused replica of an earlier run that wakes
// and appends its run's lines first does not stop the current run's shipper, which goes on
// after them; the earlier one then stands down.
func TestAnEarlierRunsLateLinesDoNotStopTheNewRun(t *testing.T) {
	st, js := store(t, logs.Limits{ChunkBytes: 1 << 20, Flush: time.Hour})
	first := output{source: "run-1", lines: lines("first", 10)}
	old := st.NewShipper("r3", nil, build.Masker{}, "", 1)
	if err := old.Ship(context.Background(), output{source: "run-1", lines: first.lines[:5]}.read, false); err != nil {
		t.Fatal(err)
	}
	second := output{source: "run-2", lines: lines("second", 5)}
	nw := st.NewShipper("r3", nil, build.Masker{}, "run again", 2)
	woke := false
	readNew := func(ctx context.Context, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
		return second.read(ctx, from, follow, func(l []byte, at build.LogCursor) error {
			if !woke { // the old replica wakes and appends its run's next lines first
				woke = true
				if err := old.Ship(ctx, first.read, false); err != nil {
					return err
				}
			}
			return emit(l, at)
		})
	}
	if err := nw.Finish(context.Background(), readNew); err != nil {
		t.Fatalf("the new run's Finish: %v", err)
	}
	text, chunks := stored(t, js, "r3")
	if want := strings.Join(first.lines, "") + strings.Join(second.lines, ""); text != want || chunks[len(chunks)-1].End == nil {
		t.Errorf("stored %q (end %+v); want the first run's lines, then the new run's, and the log closed", text, chunks[len(chunks)-1].End)
	}
	more := output{source: "run-1", lines: lines("first", 12)}
	if err := old.Ship(context.Background(), more.read, false); !errors.Is(err, logs.ErrEnded) && !errors.Is(err, logs.ErrSuperseded) {
		t.Errorf("the earlier run's shipper, with more lines after the new run's: %v; want it to stand down", err)
	}
	if again, _ := stored(t, js, "r3"); again != text {
		t.Errorf("the earlier run's shipper appended after the new run closed the log: %q", again)
	}
}
