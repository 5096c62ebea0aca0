package worker_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/process"
	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// The worker's own tests: one or two replicas in this process over a real nats-server, each
// with a process target whose launches are counted.

type env struct {
	t      *testing.T
	srv    *natstest.Server
	js     jetstream.JetStream
	cl     *client.Client
	dir    string
	layout queue.LayoutConfig
	res    queue.Provisioned

	logMu sync.Mutex
	logs  bytes.Buffer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, srv: natstest.Start(t), dir: t.TempDir()}
	t.Cleanup(func() {
		if t.Failed() {
			e.logMu.Lock()
			t.Logf("replica logs:\n%s", e.logs.String())
			e.logMu.Unlock()
		}
	})
	nc := natstest.Connect(t, e.srv)
	var err error
	if e.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	if e.cl, err = client.New(nc); err != nil {
		t.Fatal(err)
	}
	l, _ := protocol.NewLayout(protocol.DefaultPrefix)
	e.layout = queue.LayoutConfig{Layout: l, Replicas: 1, DuplicateWindow: 10 * time.Minute, EventsMaxAge: time.Hour,
		DeadLetterMaxAge: time.Hour, RecordTTL: time.Hour, LivenessTTL: 6 * time.Second, AckWait: 2 * time.Second, MaxAckPending: 100}
	if e.res, err = queue.Provision(context.Background(), e.js, e.layout); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) Write(p []byte) (int, error) {
	e.logMu.Lock()
	defer e.logMu.Unlock()
	return e.logs.Write(p)
}

func (e *env) logged(s string) bool {
	e.logMu.Lock()
	defer e.logMu.Unlock()
	return strings.Contains(e.logs.String(), s)
}

// counting counts the launches of an executor.
type counting struct {
	worker.Executor
	mu       sync.Mutex
	launches int
}

func (c *counting) Launch(ctx context.Context, job build.Job) error {
	c.mu.Lock()
	c.launches++
	c.mu.Unlock()
	return c.Executor.Launch(ctx, job)
}

func (c *counting) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.launches
}

type replica struct {
	w      *worker.Worker
	exec   *counting
	cancel context.CancelFunc
	done   chan error
}

// start runs a replica named name until the test ends.
func (e *env) start(name string) *replica {
	e.t.Helper()
	log := slog.New(slog.NewTextHandler(e, &slog.HandlerOptions{Level: slog.LevelDebug}))
	pe, err := process.New(process.Options{ScratchDir: filepath.Join(e.dir, "scratch-"+name), Logger: log})
	if err != nil {
		e.t.Fatal(err)
	}
	exec := &counting{Executor: pe}
	table, err := routing.NewTable([]routing.Target{{Name: "local", Weight: 1}}, "local")
	if err != nil {
		e.t.Fatal(err)
	}
	w, err := worker.New(worker.Config{
		Layout: e.layout.Layout, Replica: name, Concurrency: 4, AckWait: e.layout.AckWait, MaxDeliver: 5,
		RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond, DrainTimeout: 10 * time.Second,
		DuplicateWindow: e.layout.DuplicateWindow, Routes: table,
		Targets: map[string]worker.Target{"local": {Executor: exec, DefaultTimeout: time.Minute, MaxTimeout: time.Minute}},
		Reprovision: func(ctx context.Context) error {
			_, err := queue.Provision(ctx, e.js, e.layout)
			return err
		},
		Logger: log,
	}, e.js, e.res)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &replica{w: w, exec: exec, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- w.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-r.done; err != nil {
			e.t.Errorf("replica %s: %v", name, err)
		}
	})
	return r
}

// submitMarked submits a build running a shell that notes in a file when it starts, when it
// is asked to stop (SIGTERM) and when it ends, and that holds an exclusive lock while it
// runs: a second run while the first lives notes "overlap". It returns the file.
func (e *env) submitMarked(id string, seconds int) string {
	e.t.Helper()
	mark := filepath.Join(e.dir, id+".log")
	lock := filepath.Join(e.dir, id+".lock")
	script := fmt.Sprintf(`exec 9>%[2]s; flock -n 9 || { echo overlap >> %[1]s; exit 1; }
trap 'echo killed >> %[1]s; exit 143' TERM; echo start >> %[1]s; sleep %[3]d 9>&- & wait; echo end >> %[1]s`, mark, lock, seconds)
	if _, err := e.cl.Submit(context.Background(), protocol.BuildRequest{ID: id, Image: "docker.io/library/busybox:stable",
		Command: []string{"sh", "-c", script}}); err != nil {
		e.t.Fatal(err)
	}
	return mark
}

func (e *env) runs(mark string) []string {
	b, _ := os.ReadFile(mark)
	return strings.Fields(string(b))
}

func (e *env) await(what string, within time.Duration, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("waited %s for %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *env) record(id string) protocol.Record {
	rec, err := e.cl.Status(context.Background(), id)
	if err != nil {
		return protocol.Record{}
	}
	return rec
}

// requestsLeft counts the messages left waiting or running: requests and admitted builds.
func (e *env) requestsLeft() uint64 {
	var n uint64
	for _, name := range []string{e.layout.Layout.RequestStream(), e.layout.Layout.RunStream()} {
		s, err := e.js.Stream(context.Background(), name)
		if err != nil {
			return 1
		}
		info, err := s.Info(context.Background())
		if err != nil {
			return 1
		}
		n += info.State.Msgs
	}
	return n
}

// A build whose record names a live owner is only offered to this replica: it must not
// launch it, however often the request comes back, until the owner's liveness key is gone;
// then it recovers it, counting one failure.
func TestLiveOwnerIsNeverTakenOver(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	// Another replica's incarnation, alive for as long as the test keeps its key.
	ghost := record.NewLiveness(e.res.Replicas, "ghost", slog.New(slog.NewTextHandler(e, nil)))
	inc, err := ghost.Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.res.Records.Create(ctx, "owned", protocol.Marshal(protocol.Record{ID: "owned",
		State: protocol.StateQueued, Owner: inc.Token, Replica: "ghost", Attempts: 1, QueuedAt: time.Now()})); err != nil {
		t.Fatal(err)
	}
	mark := e.submitMarked("owned", 0)
	r := e.start("a")
	// Seen twice and turned down: the standby wait is what brings it back.
	e.await("the request offered twice", 20*time.Second, func() bool {
		info, err := e.res.Runs.Info(ctx)
		return err == nil && info.Delivered.Consumer >= 2
	})
	if n := r.exec.count(); n != 0 {
		t.Fatalf("the replica launched a build a live replica owns (%d launches)", n)
	}
	if !e.logged("a live replica owns this build; waiting") {
		t.Errorf("the replica did not say why it waits")
	}
	// The owner dies: its key goes.
	if err := e.res.Replicas.Delete(ctx, inc.Token); err != nil {
		t.Fatal(err)
	}
	e.await("the build to succeed", 20*time.Second, func() bool { return e.record("owned").State == protocol.StateSucceeded })
	rec := e.record("owned")
	if rec.Failures != 1 || rec.Replica != "a" || rec.Attempts != 2 {
		t.Errorf("record: replica %q attempts %d failures %d; want a, 2, 1 (recovered from a vanished owner)", rec.Replica, rec.Attempts, rec.Failures)
	}
	if got := e.runs(mark); !slices.Equal(got, []string{"start", "end"}) {
		t.Errorf("runs: %v; want one", got)
	}
	e.await("the request settled", 10*time.Second, func() bool { return e.requestsLeft() == 0 })
}

// A replica that learns its liveness lapsed (here its key is deleted under it, as an expiry
// would) kills its local workload before anything else, registers a new incarnation, and
// only then may the build be claimed again: by anyone, itself included, never while the
// first run lives.
func TestLostLivenessKillsLocalWorkloadFirst(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r := e.start("a")
	mark := e.submitMarked("lapse", 3)
	e.await("the build to run", 20*time.Second, func() bool {
		return e.record("lapse").State == protocol.StateRunning && slices.Contains(e.runs(mark), "start")
	})
	owner := e.record("lapse").Owner
	if err := e.res.Replicas.Delete(ctx, owner); err != nil {
		t.Fatal(err)
	}
	e.await("the build to succeed", 30*time.Second, func() bool { return e.record("lapse").State == protocol.StateSucceeded })
	rec := e.record("lapse")
	if rec.Owner == owner || rec.Failures != 1 {
		t.Errorf("record: owner %q (was %q) failures %d; want a new incarnation and one failure", rec.Owner, owner, rec.Failures)
	}
	if got := e.runs(mark); !slices.Equal(got, []string{"start", "killed", "start", "end"}) {
		t.Errorf("runs: %v; want the first run killed before the second started", got)
	}
	if !strings.Contains(rec.Message, "run again") {
		t.Errorf("message %q should say the build ran again", rec.Message)
	}
	if n := r.exec.count(); n != 2 {
		t.Errorf("%d launches, want 2", n)
	}
}

// An admitted build delivered again to the replica that holds it (here: the run consumer is
// deleted and made again, which delivers everything anew) joins the running session and is
// settled with it: one run, one terminal event, nothing left in the queue.
func TestRedeliveryToTheHolderJoinsItsSession(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r := e.start("a")
	mark := e.submitMarked("again", 3)
	e.await("the build to run", 20*time.Second, func() bool { return e.record("again").State == protocol.StateRunning })
	if err := e.js.DeleteConsumer(ctx, e.layout.Layout.RunStream(), e.layout.Layout.RunConsumer()); err != nil {
		t.Fatal(err)
	}
	e.await("the redelivery to join", 20*time.Second, func() bool {
		return e.logged("another delivery of this build is held here")
	})
	e.await("the build to succeed", 20*time.Second, func() bool { return e.record("again").State == protocol.StateSucceeded })
	e.await("the request settled", 10*time.Second, func() bool { return e.requestsLeft() == 0 })
	if got := e.runs(mark); !slices.Equal(got, []string{"start", "end"}) {
		t.Errorf("runs: %v; want one", got)
	}
	if n := r.exec.count(); n != 1 {
		t.Errorf("%d launches, want 1", n)
	}
	if rec := e.record("again"); rec.Attempts != 1 || rec.Failures != 0 {
		t.Errorf("record: attempts %d failures %d; want 1, 0", rec.Attempts, rec.Failures)
	}
}

// A graceful stop hands held builds over and deletes the liveness key: the next replica
// adopts at once, without counting a failure, and runs the local process again.
func TestShutdownHandsOverAndDeregisters(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a := e.start("a")
	mark := e.submitMarked("move", 2)
	e.await("the build to run", 20*time.Second, func() bool {
		return e.record("move").State == protocol.StateRunning && slices.Contains(e.runs(mark), "start")
	})
	owner := e.record("move").Owner
	a.cancel()
	if err := <-a.done; err != nil {
		t.Fatal(err)
	}
	a.done <- nil // for the cleanup
	if _, err := e.res.Replicas.Get(ctx, owner); err == nil {
		t.Errorf("the liveness key of a stopped replica is still there")
	}
	if rec := e.record("move"); !rec.Released || rec.Handovers != 1 {
		t.Errorf("record after the handover: released %v handovers %d", rec.Released, rec.Handovers)
	}
	e.start("b")
	e.await("the build to succeed", 20*time.Second, func() bool { return e.record("move").State == protocol.StateSucceeded })
	rec := e.record("move")
	if rec.Replica != "b" || rec.Failures != 0 || rec.Handovers != 1 {
		t.Errorf("record: replica %q failures %d handovers %d; want b, 0, 1", rec.Replica, rec.Failures, rec.Handovers)
	}
	if got := e.runs(mark); !slices.Equal(got, []string{"start", "killed", "start", "end"}) {
		t.Errorf("runs: %v; want start killed start end", got)
	}
}

// A build admitted twice (a scheduler that died between admitting it and settling its
// request, or a paused one that woke after another had taken the queue over) runs once: a
// second run message with the build's id inside the dedupe window is dropped by the stream,
// and one past it (another id) meets the record's claim, which names the first message.
func TestAdmittedTwiceRunsOnce(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	r := e.start("a")
	mark := e.submitMarked("twice", 1)
	e.await("the build to run", 20*time.Second, func() bool { return slices.Contains(e.runs(mark), "start") })
	runMsg, err := e.res.RunStream.GetLastMsgForSubject(ctx, e.layout.Layout.RunSubject("local", "default"))
	if err != nil {
		t.Fatal(err)
	}
	again := func(msgID string) *jetstream.PubAck {
		m := nats.NewMsg(runMsg.Subject)
		m.Data = runMsg.Data
		for k, v := range runMsg.Header {
			m.Header[k] = slices.Clone(v)
		}
		m.Header.Set(protocol.HeaderMsgID, msgID)
		ack, err := e.js.PublishMsg(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return ack
	}
	if ack := again("twice"); !ack.Duplicate {
		t.Errorf("a second admission within the dedupe window was stored (seq %d)", ack.Sequence)
	}
	// A copy past the window while the build runs joins its session; one after it ended
	// finds it ended.
	if ack := again("twice-past-the-window"); ack.Duplicate {
		t.Fatal("a copy under another id was dropped: the test proves nothing")
	}
	e.await("the build to succeed", 20*time.Second, func() bool { return e.record("twice").State == protocol.StateSucceeded })
	e.await("the copy settled", 20*time.Second, func() bool { return e.requestsLeft() == 0 })
	again("twice-after-it-ended")
	e.await("the late copy settled", 20*time.Second, func() bool { return e.requestsLeft() == 0 })
	if got := e.runs(mark); !slices.Equal(got, []string{"start", "end"}) {
		t.Errorf("runs: %v; want one", got)
	}
	if n := r.exec.count(); n != 1 {
		t.Errorf("%d launches, want 1", n)
	}
	if rec := e.record("twice"); rec.Attempts != 1 {
		t.Errorf("attempts %d, want 1: a copy claimed the build", rec.Attempts)
	}
}
