package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// gated builds start, note that they did in a shared file, and run until the test opens
// their gate: which build starts when is decided by the scheduler alone, and a build ends
// exactly when the test says.
type gated struct {
	f       *fleet
	started string
}

func newGated(f *fleet) *gated {
	return &gated{f: f, started: filepath.Join(f.dir, "started")}
}

// request is a gated build of tenant (its buildfleet.io/tenant annotation) with extra
// annotations.
func (g *gated) request(id, tenant string, annotations ...string) protocol.BuildRequest {
	gate := filepath.Join(g.f.dir, "gate-"+id)
	ann := map[string]string{protocol.AnnotationTenant: tenant}
	for i := 0; i+1 < len(annotations); i += 2 {
		ann[annotations[i]] = annotations[i+1]
	}
	return protocol.BuildRequest{ID: id, Image: "docker.io/library/busybox:stable", Annotations: ann,
		Command: []string{"sh", "-c", fmt.Sprintf("echo %s >> %s; while [ ! -e %s ]; do sleep 0.02; done", id, g.started, gate)}}
}

func (g *gated) submit(id, tenant string, annotations ...string) {
	g.f.t.Helper()
	g.f.submitReq(g.request(id, tenant, annotations...))
}

// open lets build id end.
func (g *gated) open(id string) {
	g.f.t.Helper()
	if err := os.WriteFile(filepath.Join(g.f.dir, "gate-"+id), nil, 0o644); err != nil {
		g.f.t.Fatal(err)
	}
}

// finish opens the gates of ids and checks that each succeeds.
func (g *gated) finish(ids ...string) {
	g.f.t.Helper()
	for _, id := range ids {
		g.open(id)
	}
	for _, id := range ids {
		if evs := g.f.await(id, 30*time.Second); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
			g.f.t.Errorf("%s ended %s", id, evs[len(evs)-1].Data.State)
		}
	}
}

// behindOne starts the gated build "first" and queues next-0 … next-<n-1> behind it (on a
// fleet that runs one build at a time they wait).
func (g *gated) behindOne(n int) {
	g.f.t.Helper()
	g.submit("first", "t")
	g.awaitStarts(1)
	for i := range n {
		g.submit(fmt.Sprintf("next-%d", i), "t")
	}
}

// ranOnce checks that each of ids started exactly once.
func (g *gated) ranOnce(ids ...string) {
	g.f.t.Helper()
	counts := map[string]int{}
	for _, id := range g.starts() {
		counts[id]++
	}
	for _, id := range ids {
		if counts[id] != 1 {
			g.f.t.Errorf("%s started %d times, want once", id, counts[id])
		}
	}
}

// starts are the builds that started, in order.
func (g *gated) starts() []string {
	b, _ := os.ReadFile(g.started)
	return strings.Fields(string(b))
}

// awaitStarts waits until n builds have started and returns them.
func (g *gated) awaitStarts(n int) []string {
	g.f.t.Helper()
	waitFor(g.f.t, 30*time.Second, fmt.Sprintf("%d builds to start (started: %v)", n, g.starts()), func() bool { return len(g.starts()) >= n })
	got := g.starts()
	if len(got) != n {
		g.f.t.Fatalf("started %v; want exactly %d", got, n)
	}
	return got
}

// queue is the fleet's merged queue status.
func (f *fleet) queue() protocol.QueueStatus {
	f.t.Helper()
	answers, err := f.cl.Queue(context.Background(), 20, 300*time.Millisecond)
	if err != nil {
		return protocol.QueueStatus{}
	}
	return mergeQueue(answers)
}

// awaitWaiting waits until the scheduler holds n waiting builds and has looked at them all
// since the last arrived.
func (f *fleet) awaitWaiting(n int) protocol.QueueStatus {
	f.t.Helper()
	var st protocol.QueueStatus
	waitFor(f.t, 30*time.Second, fmt.Sprintf("%d builds waiting", n), func() bool {
		st = f.queue()
		return st.Waiting == n && st.Current
	})
	return st
}

// writeTargets writes a targets file for the fleet and returns its path.
func (f *fleet) writeTargets(yaml string) string {
	f.t.Helper()
	path := filepath.Join(f.dir, "targets.yaml")
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		f.t.Fatal(err)
	}
	if _, err := config.LoadTargets(path); err != nil {
		f.t.Fatal(err)
	}
	return path
}

// named is the item of items called name, or the zero item.
func named[T any](items []T, nameOf func(T) string, name string) T {
	for _, it := range items {
		if nameOf(it) == name {
			return it
		}
	}
	var zero T
	return zero
}

func tenant(st protocol.QueueStatus, name string) protocol.TenantStatus {
	return named(st.Tenants, func(t protocol.TenantStatus) string { return t.Tenant }, name)
}

// When the fleet is full, the next build to start comes from the tenant furthest below its
// share, not from the head of one queue: a tenant that submits two builds behind another's
// backlog starts them as soon as room frees up; within a tenant a higher priority goes
// first (capped by the tenant's max_priority), then the older.
func TestFairShareBetweenTenants(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.MaxAckPending = 2 // the fleet runs two builds at once
	s.TargetsFile = f.writeTargets(`
targets:
  - {name: local, executor: process, weight: 1}
policy:
  tenants:
    from: ["annotation:buildfleet.io/tenant"]
    limits:
      - {name: big, max_priority: 5}
`)
	f.start(s, nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())
	g := newGated(f)
	for i := range 5 {
		g.submit(fmt.Sprintf("big-%d", i), "big")
	}
	g.awaitStarts(2)
	g.submit("big-urgent", "big", protocol.AnnotationPriority, "9") // asks 9, gets 5
	g.submit("small-0", "small")
	g.submit("small-1", "small")
	st := f.awaitWaiting(6)
	if big, small := tenant(st, "big"), tenant(st, "small"); big.Waiting != 4 || big.Running != 2 || small.Waiting != 2 || small.Running != 0 {
		t.Fatalf("queue: big %+v, small %+v", big, small)
	}
	if next := tenant(st, "big").Next; len(next) == 0 || next[0].ID != "big-urgent" || next[0].Priority != 5 || next[0].Asked != 9 {
		t.Errorf("big's next build = %+v; want big-urgent at priority 5 (asked 9)", next)
	}
	if why := tenant(st, "small").Why; !strings.Contains(why, "the fleet is full: 2 of 2 running") {
		t.Errorf("why small waits = %q", why)
	}
	out, errOut, code := run(t, "", "queue")
	for _, want := range []string{"running: 2 of 2", "waiting: 6", "big", "small", "the fleet is full", "big-urgent  priority 5 (asked 9)"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("buildfleet queue (exit %d, stderr %q) lacks %q:\n%s", code, errOut, want, out)
		}
	}

	// Each freed place goes to the tenant with the fewest running builds.
	g.open("big-0") // big 1, small 0 running
	g.awaitStarts(3)
	g.open("big-1") // big 0, small 1
	g.awaitStarts(4)
	g.open("small-0") // big 1, small 0
	g.awaitStarts(5)
	g.open("big-urgent") // big 0, small 1
	got := g.awaitStarts(6)
	want := []string{"big-0", "big-1", "small-0", "big-urgent", "small-1", "big-2"}
	slices.Sort(got[:2]) // admitted together, started in either order
	if !slices.Equal(got, want) {
		t.Fatalf("start order %v, want %v (first come first served would be big-0..4, then small)", got, want)
	}
	g.finish(append(want, "big-3", "big-4")...)
	waitFor(t, 10*time.Second, "the queue to empty", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 && f.pending("BUILDFLEET_RUN") == 0 })
}

// A target at its cap gets no new builds: builds that may go elsewhere do, builds pinned to
// it wait (queued, not failed) until it has room. A tenant at its cap waits while the others
// go. The caps hold across replicas: two replicas run here.
func TestTargetAndTenantCaps(t *testing.T) {
	f := newFleet(t)
	targets := f.writeTargets(`
targets:
  - {name: east, executor: process, weight: 1, max_running: 1}
  - {name: west, executor: process, weight: 1}
policy:
  tenants:
    from: ["annotation:buildfleet.io/tenant"]
    limits:
      - {name: capped, cap: 1}
`)
	var addrs []string
	for _, name := range []string{"a", "b"} {
		s := f.settings(name)
		s.TargetsFile = targets
		s.HTTPAddr = freeAddr(t)
		addrs = append(addrs, s.HTTPAddr)
		f.start(s, nil)
	}
	g := newGated(f)
	g.submit("pin-0", "t", protocol.AnnotationTarget, "east")
	g.awaitStarts(1)
	g.submit("pin-1", "t", protocol.AnnotationTarget, "east")
	st := f.awaitWaiting(1)
	if next := tenant(st, "t").Next; len(next) != 1 || !strings.Contains(next[0].Why, `target "east": unavailable (full, 1 of 1 running)`) {
		t.Errorf("why pin-1 waits: %+v", next)
	}
	// Unpinned builds go around the full target, whatever their weights say.
	for i := range 4 {
		g.submit(fmt.Sprintf("free-%d", i), "t")
	}
	g.awaitStarts(5)
	for i := range 4 {
		if rec := f.status(fmt.Sprintf("free-%d", i)); rec.Target != "west" {
			t.Errorf("free-%d went to %q while east was full", i, rec.Target)
		}
	}
	// A tenant at its cap waits; the queue says why.
	g.submit("cap-0", "capped")
	g.awaitStarts(6)
	g.submit("cap-1", "capped")
	st = f.awaitWaiting(2)
	if why := tenant(st, "capped").Why; why != "at its cap: 1 of 1 running" {
		t.Errorf("why capped waits = %q", why)
	}
	if east := targetStatus(st, "east"); east.Running != 1 || east.MaxRunning != 1 {
		t.Errorf("east in the queue status: %+v", east)
	}
	// Every replica's metrics show each target's running builds against its cap (west: the
	// four free builds and cap-0).
	for _, addr := range addrs {
		waitFor(t, 20*time.Second, "the target metrics on "+addr, func() bool {
			m := scrape(t, addr)
			return m[`buildfleet_target_running_builds{target="east"}`] == 1 && m[`buildfleet_target_max_running_builds{target="east"}`] == 1 &&
				m[`buildfleet_target_running_builds{target="west"}`] == 5 && m[`buildfleet_target_max_running_builds{target="west"}`] == 0 &&
				m[`buildfleet_tenant_running_builds{tenant="capped"}`] == 1
		})
	}

	g.open("pin-0")
	g.awaitStarts(7)
	g.open("cap-0")
	got := g.awaitStarts(8)
	if !slices.Equal(got[6:], []string{"pin-1", "cap-1"}) {
		t.Errorf("started %v; want pin-1 once east had room, then cap-1 once capped had", got)
	}
	g.finish(got...) // pin-0 and cap-0 are open already
	if rec := f.status("pin-1"); rec.Target != "east" || rec.Failures != 0 || rec.Attempts != 1 {
		t.Errorf("pin-1: target %q, failures %d, attempts %d; want east, 0, 1 (it waited, it did not fail)", rec.Target, rec.Failures, rec.Attempts)
	}
}

func targetStatus(st protocol.QueueStatus, name string) protocol.TargetStatus {
	return named(st.Targets, func(t protocol.TargetStatus) string { return t.Target }, name)
}

// A stop gets through at once to a build waiting behind a full fleet: it ends aborted while
// the fleet is still full, and never starts.
func TestStopOfAWaitingBuild(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.MaxAckPending = 1
	f.start(s, nil)
	g := newGated(f)
	g.submit("runs", "t")
	g.awaitStarts(1)
	g.submit("waits", "t")
	f.awaitWaiting(1)
	if err := f.cl.Stop(context.Background(), "waits", "not needed"); err != nil {
		t.Fatal(err)
	}
	evs := f.await("waits", 30*time.Second)
	if st := evs[len(evs)-1].Data.State; st != protocol.StateAborted {
		t.Fatalf("the stopped waiting build ended %s", st)
	}
	if rec := f.status("runs"); rec.State != protocol.StateRunning {
		t.Fatalf("the running build is %s; the stop should not have waited for room", rec.State)
	}
	waitFor(t, 10*time.Second, "the stopped build's request to be settled", func() bool { return f.queue().Waiting == 0 })
	g.open("runs")
	f.await("runs", 30*time.Second)
	if got := g.starts(); !slices.Equal(got, []string{"runs"}) {
		t.Errorf("started %v; the stopped build must never start", got)
	}
}

// The scheduling replica that shuts down gives what waits back at once and releases its pin:
// another replica schedules it, each waiting build runs once.
func TestSchedulerHandsTheQueueOver(t *testing.T) {
	f := newFleet(t)
	sa := f.settings("a")
	sa.MaxAckPending = 1
	a := f.start(sa, nil)
	g := newGated(f)
	g.behindOne(3)
	if st := f.awaitWaiting(3); st.Replica != "a" {
		t.Fatalf("the queue is held by %q, want a (the only replica)", st.Replica)
	}
	sb := f.settings("b")
	sb.MaxAckPending = 1 // as every replica of a fleet is configured alike
	f.start(sb, nil)
	a.stop(t)
	st := f.awaitWaiting(3)
	if st.Replica != "b" {
		t.Fatalf("after a stopped the queue is held by %q, want b", st.Replica)
	}
	g.open("first")
	g.finish("next-0", "next-1", "next-2")
	g.ranOnce("next-0", "next-1", "next-2")
}

// buildfleet queue says so when no replica answers, and --json prints the merged status.
func TestQueueCommand(t *testing.T) {
	f := newFleet(t)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())
	_, errOut, code := run(t, "", "queue", "--wait", "200ms")
	if code == 0 || !strings.Contains(errOut, "no replica answered") {
		t.Errorf("queue without a fleet: exit %d, stderr %q", code, errOut)
	}
	f.start(f.settings("a"), nil)
	waitFor(t, 10*time.Second, "the replica to count the fleet", func() bool { return f.queue().MaxRunning > 0 })
	out, errOut, code := run(t, "", "queue", "--json")
	var st protocol.QueueStatus
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Waiting != 0 || st.MaxRunning != 1000 || len(st.Targets) != 1 {
		t.Errorf("queue --json: exit %d, stderr %q, out %q", code, errOut, out)
	}
	if _, _, code := run(t, "", "queue", "extra"); code != ExitUsage {
		t.Errorf("queue with an argument: exit %d, want %d", code, ExitUsage)
	}
}

// The queue consumer deleted under the scheduler is made again and delivers every waiting
// request anew: each is held once and runs once.
func TestDeletedQueueConsumerKeepsWaitingBuilds(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.MaxAckPending = 1
	f.start(s, nil)
	g := newGated(f)
	g.behindOne(3)
	f.awaitWaiting(3)
	if err := f.js.DeleteConsumer(context.Background(), "BUILDFLEET_REQUESTS", "workers"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the queue consumer made again", func() bool {
		_, err := f.js.Consumer(context.Background(), "BUILDFLEET_REQUESTS", "workers")
		return err == nil
	})
	// Delivered anew, held once each.
	waitFor(t, 30*time.Second, "the waiting builds delivered again", func() bool {
		c, err := f.js.Consumer(context.Background(), "BUILDFLEET_REQUESTS", "workers")
		if err != nil {
			return false
		}
		info, err := c.Info(context.Background())
		return err == nil && info.NumAckPending == 3
	})
	if st := f.awaitWaiting(3); tenant(st, "default").Waiting != 3 {
		t.Fatalf("queue after the consumer came back: %+v", st)
	}
	g.finish("first", "next-0", "next-1", "next-2")
	if got := g.starts(); !slices.Equal(got, []string{"first", "next-0", "next-1", "next-2"}) {
		t.Errorf("started %v; want each once, in order", got)
	}
	waitFor(t, 10*time.Second, "the queue to empty", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 && f.pending("BUILDFLEET_RUN") == 0 })
}

// The scheduler holds at most BUILDFLEET_QUEUE_HOLD waiting requests; the rest wait in the
// stream, in arrival order, and buildfleet queue counts them.
func TestQueueHoldBoundsWhatTheSchedulerHolds(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.MaxAckPending, s.QueueHold = 1, 2
	f.start(s, nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())
	g := newGated(f)
	g.behindOne(4)
	var st protocol.QueueStatus
	waitFor(t, 30*time.Second, "two held, two unread", func() bool {
		st = f.queue()
		return st.Waiting == 2 && st.Unread == 2
	})
	if out, _, code := run(t, "", "queue"); code != 0 || !strings.Contains(out, "not yet read by the scheduler: 2") || !strings.Contains(out, "waiting: 2") {
		t.Errorf("buildfleet queue (exit %d):\n%s", code, out)
	}
	want := []string{"first"}
	for i := range 4 {
		id := fmt.Sprintf("next-%d", i)
		g.open(want[len(want)-1])
		want = append(want, id)
		if got := g.awaitStarts(len(want)); !slices.Equal(got, want) {
			t.Fatalf("started %v, want %v", got, want)
		}
	}
	g.open("next-3")
	f.await("next-3", 30*time.Second)
}

// When the pin moves to another replica (here the test unpins the scheduler, and the next
// request goes to whichever replica's pull comes first, until that is the other one, as a
// pause past the pin's TTL would have it), the old scheduler gives what it holds back at
// once: the new one holds the whole queue, and each build runs once.
func TestMovedPinGivesTheQueueBack(t *testing.T) {
	f := newFleet(t)
	for _, name := range []string{"a", "b"} {
		s := f.settings(name)
		s.MaxAckPending = 1
		f.start(s, nil)
	}
	g := newGated(f)
	g.behindOne(3)
	ids := []string{"first", "next-0", "next-1", "next-2"}
	holder := f.awaitWaiting(3).Replica
	stream, err := f.js.Stream(context.Background(), "BUILDFLEET_REQUESTS")
	if err != nil {
		t.Fatal(err)
	}
	for moved := false; !moved; {
		if len(ids) > 24 {
			t.Fatalf("the pin stayed with %s through %d unpins", holder, len(ids)-4)
		}
		if err := stream.UnpinConsumer(context.Background(), "workers", "scheduler"); err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("extra-%d", len(ids))
		g.submit(id, "t")
		ids = append(ids, id)
		var st protocol.QueueStatus
		waitFor(t, 30*time.Second, id+" held, and the queue in one place", func() bool {
			st = f.queue()
			return st.Waiting == len(ids)-1 && st.Current && !strings.Contains(st.Replica, ",")
		})
		moved = st.Replica != holder
	}
	if !f.logged("another replica schedules now; giving back what waits here") {
		t.Errorf("the old scheduler did not say it gave the queue back")
	}
	g.finish(ids...)
	g.ranOnce(ids...)
}
