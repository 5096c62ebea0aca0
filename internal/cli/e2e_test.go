package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func TestBuildSucceeds(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	out := filepath.Join(f.dir, "out")
	req := protocol.BuildRequest{ID: "ok-1", Image: "docker.io/library/busybox:stable",
		Command: []string{"sh", "-c", `echo "$GREETING $BUILDFLEET_BUILD_ID" > ` + out},
		Env:     map[string]string{"GREETING": "hello"}}
	f.submitReq(req)
	evs := f.await("ok-1", 20*time.Second)
	want := []protocol.State{protocol.StateQueued, protocol.StateDispatched, protocol.StateRunning, protocol.StateSucceeded}
	if diff := cmp.Diff(want, states(evs)); diff != "" {
		t.Errorf("events (-want +got):\n%s", diff)
	}
	got, err := os.ReadFile(out)
	if err != nil || strings.TrimSpace(string(got)) != "hello ok-1" {
		t.Errorf("build output = %q, %v; want %q", got, err, "hello ok-1")
	}
	rec := f.status("ok-1")
	if rec.State != protocol.StateSucceeded || rec.Target != "local" || rec.Attempts != 1 ||
		rec.DispatchedAt == nil || rec.RunningAt == nil || rec.FinishedAt == nil || rec.Deadline == nil {
		t.Errorf("record = %+v; want succeeded on local after 1 attempt with every timestamp", rec)
	}
	for _, ev := range evs {
		if err := ev.Validate(); err != nil {
			t.Errorf("event %s does not match its schema: %v", ev.ID, err)
		}
		if ev.ID != protocol.EventMsgID("ok-1", ev.Data.State) || ev.Subject != "ok-1" {
			t.Errorf("event id/subject = %q/%q", ev.ID, ev.Subject)
		}
	}
}

func TestBuildFailsWithExitCode(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	f.submit("exit-3", "sh", "-c", "echo going down; exit 3")
	evs := f.await("exit-3", 20*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateFailed || last.Reason != protocol.ReasonExitCode || last.ExitCode == nil || *last.ExitCode != 3 {
		t.Fatalf("terminal event = %+v; want failed/exit_code 3", last)
	}
	if !strings.Contains(last.Message, "going down") {
		t.Errorf("message %q should carry the output's tail", last.Message)
	}
}

func TestBuildTimesOut(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	req := protocol.BuildRequest{ID: "slow", Image: "docker.io/library/busybox:stable",
		Command: []string{"sleep", "60"}, TimeoutSeconds: 1}
	f.submitReq(req)
	evs := f.await("slow", 20*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateTimedOut {
		t.Fatalf("terminal state = %s, want timed_out (events %v)", got, states(evs))
	}
	if rec := f.status("slow"); rec.TimeoutSeconds != 1 {
		t.Errorf("recorded timeout = %d, want 1", rec.TimeoutSeconds)
	}
}

func TestStopBeforeStart(t *testing.T) {
	f := newFleet(t)
	marker := filepath.Join(f.dir, "ran")
	// No replica yet: the stop reaches the request's record before any replica does.
	s := f.settings("a")
	r := f.start(s, nil)
	r.stop(t) // provisions the layout, then leaves the queue without consumers
	f.submit("early", "touch", marker)
	if err := f.cl.Stop(context.Background(), "early", "changed my mind"); err != nil {
		t.Fatal(err)
	}
	f.start(s, nil)
	evs := f.await("early", 20*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateAborted || last.Message != "changed my mind" {
		t.Fatalf("terminal event = %+v; want aborted with the stop's reason", last)
	}
	// The request itself still reaches a replica, which must settle it without running it.
	waitFor(t, 10*time.Second, "request stream empty", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stopped build ran (marker: %v)", err)
	}
	if n := terminalCount(f.storedEvents("early")); n != 1 {
		t.Errorf("terminal events = %d, want 1", n)
	}
}

func TestStopWhileRunning(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	f.submit("long", "sleep", "60")
	f.awaitState("long", protocol.StateRunning, 20*time.Second)
	if err := f.cl.Stop(context.Background(), "long", ""); err != nil {
		t.Fatal(err)
	}
	evs := f.await("long", 20*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateAborted {
		t.Fatalf("terminal state = %s, want aborted", got)
	}
	if n := terminalCount(f.storedEvents("long")); n != 1 {
		t.Errorf("terminal events = %d, want 1", n)
	}
}

// gate holds Launch until the test opens it: the window in which a stop arrives during start.
type gate struct {
	worker.Executor
	entered chan struct{}
	open    chan struct{}
}

func (g *gate) Launch(ctx context.Context, job build.Job) error {
	close(g.entered)
	<-g.open
	return g.Executor.Launch(ctx, job)
}

func TestStopDuringStart(t *testing.T) {
	f := newFleet(t)
	g := &gate{entered: make(chan struct{}), open: make(chan struct{})}
	f.start(f.settings("a"), func(c *worker.Config) {
		g.Executor = c.Targets["local"].Executor
		t := c.Targets["local"]
		t.Executor = g
		c.Targets["local"] = t
	})
	marker := filepath.Join(f.dir, "finished")
	f.submit("racy", "sh", "-c", "sleep 2; touch "+marker)
	<-g.entered
	if err := f.cl.Stop(context.Background(), "racy", ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "abort flag recorded", func() bool { return f.status("racy").Abort })
	close(g.open)
	evs := f.await("racy", 20*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateAborted {
		t.Fatalf("terminal state = %s, want aborted (events %v)", got, states(evs))
	}
	time.Sleep(3 * time.Second) // longer than the build would have taken
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the build launched during the stop was not killed (marker: %v)", err)
	}
}

func TestStopAfterFinish(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	f.submit("done", "true")
	f.await("done", 20*time.Second)
	if err := f.cl.Stop(context.Background(), "done", ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "stop consumed", func() bool {
		return f.ackPending("BUILDFLEET_STOPS", "stoppers") == 0 && f.pending("BUILDFLEET_STOPS") == 1
	})
	counts := f.storedEvents("done")
	if counts[protocol.StateAborted] != 0 || counts[protocol.StateSucceeded] != 1 {
		t.Errorf("events = %v; want one succeeded and no aborted", counts)
	}
	if rec := f.status("done"); rec.State != protocol.StateSucceeded || rec.Abort {
		t.Errorf("record = %s abort=%v; want succeeded, no abort", rec.State, rec.Abort)
	}
}

func TestInvalidRequestIsRejectedAndDeadLettered(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	ctx := context.Background()
	// Published raw, as a producer without the client might: the worker validates it.
	bad := []byte(`{"id":"bad-1","image":"Not An Image!","command":[]}`)
	// With a publish header that the dead-letter stream would refuse if it were copied, and
	// a forged mark of the scheduler's check, which the runner must not trust.
	forged := &nats.Msg{Subject: "buildfleet.requests.bad-1", Data: bad, Header: nats.Header{protocol.HeaderChecked: []string{"1"}}}
	if _, err := f.js.PublishMsg(ctx, forged, jetstream.WithExpectStream("BUILDFLEET_REQUESTS")); err != nil {
		t.Fatal(err)
	}
	if _, err := f.js.Publish(ctx, "buildfleet.requests.garbage", []byte(`{not json`)); err != nil {
		t.Fatal(err)
	}
	evs := f.await("bad-1", 20*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateRejected || last.Reason != protocol.ReasonInvalidRequest || !strings.Contains(last.Message, "/image") {
		t.Fatalf("terminal event = %+v; want rejected/invalid_request naming /image", last)
	}
	waitFor(t, 10*time.Second, "two dead letters", func() bool { return f.pending("BUILDFLEET_DEADLETTER") == 2 })
	dl, err := f.js.Stream(ctx, "BUILDFLEET_DEADLETTER")
	if err != nil {
		t.Fatal(err)
	}
	msg, err := dl.GetLastMsgForSubject(ctx, "buildfleet.deadletter.request")
	if err == nil && msg.Header.Get(protocol.HeaderOrigSubject) != "buildfleet.requests.bad-1" {
		msg, err = dl.GetMsg(ctx, msg.Sequence-1)
	}
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Data) != string(bad) || msg.Header.Get(protocol.HeaderRejectReason) != "invalid_request" ||
		msg.Header.Get(protocol.HeaderOrigSubject) != "buildfleet.requests.bad-1" {
		t.Errorf("dead letter = %q %v; want the original body with reason and subject", msg.Data, msg.Header)
	}
	// The worker keeps going.
	f.submit("after-bad", "true")
	if got := f.await("after-bad", 20*time.Second); got[len(got)-1].Data.State != protocol.StateSucceeded {
		t.Errorf("build after the invalid ones: %v", states(got))
	}
	waitFor(t, 10*time.Second, "every request settled and removed from the work queue",
		func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
}

func TestClientRejectsInvalidRequest(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	_, err := f.cl.Submit(context.Background(), protocol.BuildRequest{ID: "Bad.ID", Image: "busybox", Command: []string{"true"}})
	var verr *protocol.ValidationError
	if !errors.As(err, &verr) || !strings.Contains(err.Error(), "/id") {
		t.Fatalf("Submit with a bad id = %v; want a ValidationError naming /id", err)
	}
}

func TestPinToUnknownTargetIsRejected(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	req := protocol.BuildRequest{ID: "pinned", Image: "docker.io/library/busybox:stable", Command: []string{"true"},
		Annotations: map[string]string{protocol.AnnotationTarget: "nowhere"}}
	f.submitReq(req)
	evs := f.await("pinned", 20*time.Second)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateRejected || last.Reason != protocol.ReasonUnknownTarget {
		t.Fatalf("terminal event = %+v; want rejected/unknown_target", last)
	}
	waitFor(t, 10*time.Second, "dead letter", func() bool { return f.pending("BUILDFLEET_DEADLETTER") == 1 })
}

func TestDuplicateSubmitRunsOnce(t *testing.T) {
	f := newFleet(t)
	runs := filepath.Join(f.dir, "runs")
	req := protocol.BuildRequest{ID: "twice", Image: "docker.io/library/busybox:stable",
		Command: []string{"sh", "-c", "echo run >> " + runs + "; sleep 1"}}
	f.start(f.settings("a"), nil).stop(t) // provision, then leave the queue without consumers
	first := f.submitReq(req)
	second := f.submitReq(req)
	if first.Duplicate || !second.Duplicate {
		t.Errorf("Duplicate = %v then %v; want false then true", first.Duplicate, second.Duplicate)
	}
	// A producer that retries outside the duplicate window (a different message id).
	m := nats.NewMsg("buildfleet.requests.twice")
	m.Data = protocol.Marshal(req)
	m.Header.Set(protocol.HeaderMsgID, "twice-retry")
	if _, err := f.js.PublishMsg(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	f.start(f.settings("a"), nil)
	f.await("twice", 20*time.Second)
	waitFor(t, 10*time.Second, "request stream empty", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	third := f.submitReq(req) // after the end: still one build
	if !third.Duplicate || third.Record.State != protocol.StateSucceeded {
		t.Errorf("submit after the end = %+v; want a duplicate of the succeeded build", third)
	}
	got, _ := os.ReadFile(runs)
	if n := strings.Count(string(got), "run"); n != 1 {
		t.Errorf("the build ran %d times, want 1", n)
	}
	want := map[protocol.State]int{protocol.StateQueued: 1, protocol.StateDispatched: 1, protocol.StateRunning: 1, protocol.StateSucceeded: 1}
	if diff := cmp.Diff(want, f.storedEvents("twice")); diff != "" {
		t.Errorf("stored events (-want +got):\n%s", diff)
	}
}

// flaky fails every launch with a transient error.
type flaky struct{ worker.Executor }

func (flaky) Launch(context.Context, build.Job) error {
	return errors.New("apiserver: 503 service unavailable")
}

func TestTransientFailuresExhaustDispatch(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.MaxDeliver = 3
	f.start(s, func(c *worker.Config) {
		t := c.Targets["local"]
		t.Executor = flaky{t.Executor}
		c.Targets["local"] = t
	})
	f.submit("unlucky", "true")
	evs := f.await("unlucky", 30*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateFailed || last.Reason != protocol.ReasonDispatchExhausted {
		t.Fatalf("terminal event = %+v; want failed/dispatch_exhausted", last)
	}
	if rec := f.status("unlucky"); rec.Attempts != 3 {
		t.Errorf("attempts = %d, want 3", rec.Attempts)
	}
	waitFor(t, 10*time.Second, "dead letter", func() bool { return f.pending("BUILDFLEET_DEADLETTER") == 1 })
}

func TestProvisionIsIdempotent(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	f.start(s, nil).stop(t)
	ctx := context.Background()
	before := f.infos(ctx)
	layout, _ := protocol.NewLayout(s.Prefix)
	for range 2 {
		if _, err := queue.Provision(ctx, f.js, LayoutConfig(f.settings("b"), layout)); err != nil {
			t.Fatalf("Provision again: %v", err)
		}
	}
	after := f.infos(ctx)
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("provisioning again changed the layout (-before +after):\n%s", diff)
	}
	// A changed setting is applied to the existing resources.
	changed := f.settings("c")
	changed.RecordTTL, changed.EventsMaxAge = 48*time.Hour, 72*time.Hour
	if _, err := queue.Provision(ctx, f.js, LayoutConfig(changed, layout)); err != nil {
		t.Fatalf("Provision with changed retention: %v", err)
	}
	kv, err := f.js.KeyValue(ctx, "BUILDFLEET_BUILDS")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := kv.Status(ctx); err != nil || st.TTL() != 48*time.Hour {
		t.Errorf("record TTL after a changed setting = %v (%v), want 48h", st.TTL(), err)
	}
	if st, err := f.js.Stream(ctx, "BUILDFLEET_EVENTS"); err != nil || st.CachedInfo().Config.MaxAge != 72*time.Hour {
		t.Errorf("events max age after a changed setting: %v", err)
	}
	// The run consumer caps what runs; the queue's caps what the scheduler holds, and pins
	// one replica at a time.
	for _, c := range []struct {
		stream, consumer string
		maxAckPending    int
		pinned           bool
	}{{"BUILDFLEET_RUN", "runners", s.MaxAckPending, false}, {"BUILDFLEET_REQUESTS", "workers", s.QueueHold, true}} {
		cons, err := f.js.Consumer(ctx, c.stream, c.consumer)
		if err != nil {
			t.Fatal(err)
		}
		cfg := cons.CachedInfo().Config
		if cfg.AckWait != s.AckWait || cfg.MaxAckPending != c.maxAckPending || cfg.AckPolicy != jetstream.AckExplicitPolicy ||
			(cfg.PriorityPolicy == jetstream.PriorityPolicyPinned) != c.pinned {
			t.Errorf("consumer %s config = AckWait %s MaxAckPending %d priority %v; want %s %d pinned %v",
				c.consumer, cfg.AckWait, cfg.MaxAckPending, cfg.PriorityPolicy, s.AckWait, c.maxAckPending, c.pinned)
		}
	}
}

// infos are the creation times and configurations of every stream and consumer.
func (f *fleet) infos(ctx context.Context) map[string]string {
	out := map[string]string{}
	for name := range f.js.StreamNames(ctx).Name() {
		st, err := f.js.Stream(ctx, name)
		if err != nil {
			f.t.Fatal(err)
		}
		info := st.CachedInfo()
		out[name] = info.Created.String() + " " + string(protocol.Marshal(info.Config))
		for c := range st.ListConsumers(ctx).Info() {
			out[name+"/"+c.Name] = c.Created.String() + " " + string(protocol.Marshal(c.Config))
		}
	}
	return out
}

func (f *fleet) pending(stream string) uint64 {
	f.t.Helper()
	st, err := f.js.Stream(context.Background(), stream)
	if err != nil {
		f.t.Fatal(err)
	}
	return st.CachedInfo().State.Msgs
}

func (f *fleet) ackPending(stream, consumer string) int {
	f.t.Helper()
	c, err := f.js.Consumer(context.Background(), stream, consumer)
	if err != nil {
		f.t.Fatal(err)
	}
	info := c.CachedInfo()
	return info.NumAckPending + int(info.NumPending)
}

func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", within, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLongBuildKeepsItsLease runs a build for longer than AckWait: the heartbeat must keep
// the message from being redelivered, so the build runs once, on one attempt.
func TestLongBuildKeepsItsLease(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.AckWait = time.Second
	f.start(s, nil)
	f.start(f.settings("b"), nil) // a second replica that would take a redelivery
	runs := filepath.Join(f.dir, "runs")
	f.submit("marathon", "sh", "-c", "echo run >> "+runs+"; sleep 4")
	evs := f.await("marathon", 30*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
		t.Fatalf("ended %s, want succeeded", got)
	}
	if rec := f.status("marathon"); rec.Attempts != 1 {
		t.Errorf("attempts = %d, want 1: the lease lapsed", rec.Attempts)
	}
	if got, _ := os.ReadFile(runs); strings.Count(string(got), "run") != 1 {
		t.Errorf("ran %d times, want 1", strings.Count(string(got), "run"))
	}
}

// TestNATSRestartMidBuild takes the NATS server away while a build runs and brings it back:
// the replica must keep its consumer (never stop silently), finish the build with exactly
// one terminal event, run it once although a second replica may be offered it again after
// the restart, and go on taking new builds.
func TestNATSRestartMidBuild(t *testing.T) {
	f := newFleet(t)
	for _, name := range []string{"a", "b"} {
		s := f.settings(name)
		s.AckWait = 3 * time.Second
		f.start(s, nil)
	}
	runs := filepath.Join(f.dir, "runs")
	f.submit("through-outage", "sh", "-c", "echo run >> "+runs+"; sleep 3")
	f.awaitState("through-outage", protocol.StateRunning, 20*time.Second)
	f.srv.Shutdown()
	time.Sleep(time.Second)
	f.srv.Restart(t)
	evs := f.await("through-outage", 60*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
		t.Errorf("build through the outage ended %s, want succeeded", got)
	}
	if n := terminalCount(f.storedEvents("through-outage")); n != 1 {
		t.Errorf("%d terminal events, want 1", n)
	}
	if got, _ := os.ReadFile(runs); strings.Count(string(got), "run") != 1 {
		t.Errorf("ran %d times, want 1", strings.Count(string(got), "run"))
	}
	f.submit("after-outage", "true")
	if evs := f.await("after-outage", 60*time.Second); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
		t.Errorf("build after the outage: %v", states(evs))
	}
}

func TestInvalidStopIsDeadLettered(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	ctx := context.Background()
	if _, err := f.js.Publish(ctx, "buildfleet.stops.some-build", []byte(`{"id":"other-build"}`)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a dead letter for the stop", func() bool { return f.pending("BUILDFLEET_DEADLETTER") == 1 })
	dl, _ := f.js.Stream(ctx, "BUILDFLEET_DEADLETTER")
	msg, err := dl.GetLastMsgForSubject(ctx, "buildfleet.deadletter.stop")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(msg.Header.Get(protocol.HeaderRejectMessage), "other-build") {
		t.Errorf("dead letter reason = %q; want the subject/body mismatch explained", msg.Header.Get(protocol.HeaderRejectMessage))
	}
	if _, err := f.cl.Status(ctx, "some-build"); err == nil {
		t.Errorf("an invalid stop created a record for the build")
	}
}

// TestBreakerRoutesAroundAFailingTarget: a target whose launches keep failing opens its
// circuit breaker, and builds the weighted choice would send there go to the other target.
func TestBreakerRoutesAroundAFailingTarget(t *testing.T) {
	f := newFleet(t)
	targets := filepath.Join(f.dir, "targets.yaml")
	body := "default: b\ntargets:\n  - {name: a, executor: process, weight: 1}\n  - {name: b, executor: process, weight: 1}\n"
	if err := os.WriteFile(targets, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	s := f.settings("r")
	s.TargetsFile = targets
	s.MaxDeliver = 2
	s.BreakerFailures = 2
	s.BreakerCooldown = time.Hour
	f.start(s, func(c *worker.Config) {
		t := c.Targets["a"]
		t.Executor = flaky{t.Executor}
		c.Targets["a"] = t
	})
	loaded, err := config.LoadTargets(targets)
	if err != nil {
		t.Fatal(err)
	}
	table, err := loaded.Table()
	if err != nil {
		t.Fatal(err)
	}
	// Ids the weighted choice sends to a when every target is available.
	var toA []string
	for i := 0; len(toA) < 4; i++ {
		id := fmt.Sprintf("brk-%d", i)
		if d, err := table.Choose(routing.Request{BuildID: id, Image: "busybox"}, nil); err == nil && d.Target == "a" {
			toA = append(toA, id)
		}
	}
	f.submit(toA[0], "true")
	evs := f.await(toA[0], 30*time.Second)
	if last := evs[len(evs)-1].Data; last.Reason != protocol.ReasonDispatchExhausted {
		t.Fatalf("%s on the failing target: %s/%s, want failed/dispatch_exhausted", toA[0], last.State, last.Reason)
	}
	for _, id := range toA[1:] {
		f.submit(id, "true")
		evs := f.await(id, 30*time.Second)
		if last := evs[len(evs)-1].Data; last.State != protocol.StateSucceeded {
			t.Errorf("%s: %s/%s (%s), want succeeded on b", id, last.State, last.Reason, last.Message)
		}
		if rec := f.status(id); rec.Target != "b" {
			t.Errorf("%s routed to %q with a's breaker open, want b", id, rec.Target)
		}
	}
	f.logMu.Lock()
	logged := strings.Contains(f.logs.String(), "circuit breaker changed state")
	f.logMu.Unlock()
	if !logged {
		t.Error("the breaker opened without a log line")
	}
}

// TestSecretsAreMasked runs a build that prints a secret-looking variable, one the request
// marks secret and a plain one, then fails: the failed event's message (the output's tail),
// the record and the replica's logs must show neither secret, only the plain value. A request
// rejected for an env value names the variable, never its value.
func TestSecretsAreMasked(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	req := protocol.BuildRequest{ID: "leaky", Image: "docker.io/library/busybox:stable",
		Command:   []string{"sh", "-c", `echo "token=$API_TOKEN mine=$MINE plain=$PLAIN"; exit 2`},
		Env:       map[string]string{"API_TOKEN": "s3cr3t-t0ken", "MINE": "my-own-secret", "PLAIN": "not-a-secret"},
		SecretEnv: []string{"MINE"}}
	f.submitReq(req)
	evs := f.await("leaky", 20*time.Second)
	last := evs[len(evs)-1].Data
	if last.State != protocol.StateFailed || !strings.Contains(last.Message, "token=*** mine=*** plain=not-a-secret") {
		t.Errorf("failed event message %q; want the output with both secrets masked", last.Message)
	}
	if msg := f.status("leaky").Message; strings.Contains(msg, "s3cr3t") || strings.Contains(msg, "my-own") {
		t.Errorf("the record's message shows a secret: %q", msg)
	}
	ctx := context.Background()
	bad := []byte(`{"id":"leaky-2","image":"busybox","command":["true"],"env":{"DB_PASSWORD":"hunter22\u0000"}}`)
	if _, err := f.js.Publish(ctx, "buildfleet.requests.leaky-2", bad); err != nil {
		t.Fatal(err)
	}
	evs = f.await("leaky-2", 20*time.Second)
	if last := evs[len(evs)-1].Data; last.State != protocol.StateRejected || !strings.Contains(last.Message, "/env/DB_PASSWORD") ||
		strings.Contains(last.Message, "hunter22") {
		t.Errorf("rejected event %s %q; want rejected naming /env/DB_PASSWORD without its value", last.State, last.Message)
	}
	f.logMu.Lock()
	logs := f.logs.String()
	f.logMu.Unlock()
	for _, secret := range []string{"s3cr3t-t0ken", "my-own-secret", "hunter22"} {
		if strings.Contains(logs, secret) {
			t.Errorf("the replica's logs show the secret %q", secret)
		}
	}
}

// TestStreamLeaderFailover runs builds on a 3-server JetStream cluster with every stream,
// consumer and bucket at 3 replicas, as deploy/nats ships it, and kills the server that
// leads the request stream while they run, then brings it back: every build ends once, and
// none runs twice.
func TestStreamLeaderFailover(t *testing.T) {
	f, servers := newClusterFleet(t)
	for _, name := range []string{"a", "b"} {
		s := f.settings(name)
		s.StreamReplicas = 3
		s.AckWait = 3 * time.Second
		f.start(s, nil)
	}
	const n = 12
	runs := filepath.Join(f.dir, "runs")
	for i := range n {
		f.submit(fmt.Sprintf("fo-%02d", i), "sh", "-c", fmt.Sprintf("echo fo-%02d >> %s; sleep 2", i, runs))
	}
	f.awaitState("fo-00", protocol.StateRunning, 30*time.Second)
	ctx := context.Background()
	var info *jetstream.StreamInfo
	waitFor(t, 30*time.Second, "the request stream's leader and 2 replicas", func() bool {
		stream, err := f.js.Stream(ctx, "BUILDFLEET_REQUESTS")
		if err == nil {
			info, err = stream.Info(ctx)
		}
		return err == nil && info.Cluster != nil && info.Cluster.Leader != "" && len(info.Cluster.Replicas) == 2
	})
	var leader *natstest.Server
	for _, s := range servers {
		if s.Name() == info.Cluster.Leader {
			leader = s
		}
	}
	if leader == nil {
		t.Fatalf("no server named %q, the stream's leader", info.Cluster.Leader)
	}
	leader.Shutdown()
	// Submit retries through the election by itself (each attempt bounded); a new leader
	// takes the request.
	late := protocol.BuildRequest{ID: "fo-late", Image: "docker.io/library/busybox:stable", Command: []string{"true"}}
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	if _, err := f.cl.Submit(sctx, late); err != nil {
		t.Fatalf("a submit through the election: %v", err)
	}
	cancel()
	leader.Restart(t)
	for i := range n {
		id := fmt.Sprintf("fo-%02d", i)
		evs := f.await(id, 2*time.Minute)
		if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
			t.Errorf("%s ended %s (%s), want succeeded", id, got, evs[len(evs)-1].Data.Message)
		}
	}
	if evs := f.await("fo-late", 2*time.Minute); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
		t.Errorf("fo-late: %v", states(evs))
	}
	waitFor(t, time.Minute, "every request settled", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	got, _ := os.ReadFile(runs)
	for i := range n {
		id := fmt.Sprintf("fo-%02d", i)
		if c := strings.Count(string(got), id+"\n"); c != 1 {
			t.Errorf("%s ran %d times, want 1", id, c)
		}
		if c := terminalCount(f.storedEvents(id)); c != 1 {
			t.Errorf("%s: %d terminal events, want 1", id, c)
		}
	}
}
