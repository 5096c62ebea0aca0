package cli

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// chaosKind is what a chaos build does, and so how it must end.
type chaosKind int

const (
	chaosOK      chaosKind = iota // sleeps, exits 0: succeeded
	chaosExit                     // sleeps, exits 3: failed/exit_code 3
	chaosTimeout                  // sleeps past its 2s timeout: timed_out
	chaosStop                     // sleeps until the suite stops it: aborted
	chaosNoPull                   // a pod whose image never pulls: failed/image_pull
)

func (k chaosKind) want() (protocol.State, protocol.Reason) {
	switch k {
	case chaosExit:
		return protocol.StateFailed, protocol.ReasonExitCode
	case chaosNoPull:
		return protocol.StateFailed, protocol.ReasonImagePull
	}
	return [...]protocol.State{protocol.StateSucceeded, protocol.StateFailed, protocol.StateTimedOut, protocol.StateAborted}[k], ""
}

func (k chaosKind) String() string {
	return [...]string{"ok", "exit", "timeout", "stop", "nopull"}[k]
}

// TestChaosCombinedFaults runs BUILDFLEET_CHAOS_BUILDS builds (default 200; `make chaos`
// runs 1,000) of mixed outcomes (success, exit code, timeout, stop mid-run, an image that
// never pulls) over three real worker binaries. The workers run them as pods on two
// clusters (a runc target on each, a Kata target on one) and as local processes, on a
// 3-server JetStream cluster with everything at 3 replicas. Meanwhile, on a schedule drawn
// from a printed seed (BUILDFLEET_CHAOS_SEED replays it), the suite SIGKILLs a random
// replica every few seconds and starts a new one, SIGSTOPs one for longer than AckWait and
// resumes it, kills the server that leads the request stream and restarts it, once restarts
// every server, and stops the east cluster's kube-apiserver for 30s, while every request to
// the west cluster passes a proxy that answers 10% of them with 5xx or 429 and holds each up
// to 40ms. Then it checks, from the events stream, the records, a watch of every pod on both
// clusters and the process builds' own notes: exactly one terminal event per build, the end
// each build's program called for, the same end as its pod really had, never two pods for a
// build nor a process run twice at once (a lock each run holds), no pod left running, none
// missing, the east target's breaker opened and builds went west meanwhile; and prints the
// figures.
func TestChaosCombinedFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test: runs without -short")
	}
	n := 200
	if v := os.Getenv("BUILDFLEET_CHAOS_BUILDS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 4 {
			t.Fatalf("BUILDFLEET_CHAOS_BUILDS=%q: want a number of builds, at least 4", v)
		}
	}
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("BUILDFLEET_CHAOS_SEED"); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("BUILDFLEET_CHAOS_SEED=%q: %v", v, err)
		}
	}
	t.Logf("chaos: %d builds, seed %d (BUILDFLEET_CHAOS_SEED=%d replays this schedule)", n, seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	f, servers := newClusterFleet(t)
	k := newChaosKube(t, f, seed)
	env := append([]string{"BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_LIVENESS_TTL=5s", "BUILDFLEET_CONCURRENCY=32",
		"BUILDFLEET_STREAM_REPLICAS=3", "BUILDFLEET_LOG_LEVEL=info", "BUILDFLEET_RETRY_MIN=100ms", "BUILDFLEET_RETRY_MAX=1s",
		"BUILDFLEET_BREAKER_COOLDOWN=5s"}, k.env()...)
	var mu sync.Mutex
	replicas := map[string]*binaryReplica{}
	next := 0
	spawn := func() {
		mu.Lock()
		name := fmt.Sprintf("r%d", next)
		next++
		mu.Unlock()
		p := f.startBinary(name, env...)
		mu.Lock()
		replicas[name] = p
		mu.Unlock()
	}
	for range 3 {
		spawn()
	}

	// The builds: kinds drawn from the seed. Three in five run as pods (routed by weight
	// over east, west and kata); the rest are pinned to the process target, and each of those
	// notes its runs and holds a lock while it runs. The first four are pinned to east and
	// run across its outage: three for a minute (two succeed, one exits 3), and one until
	// the suite stops it while east is down.
	const across = 4
	kinds := make([]chaosKind, n)
	pods := make([]bool, n)
	runFor := make([]time.Duration, n) // what the build's own program takes, or its timeout
	ids := make([]string, n)
	notes := filepath.Join(f.dir, "notes")
	if err := os.MkdirAll(notes, 0o755); err != nil {
		t.Fatal(err)
	}
	reqs := make([]protocol.BuildRequest, n)
	for i := range n {
		ids[i] = fmt.Sprintf("c%04d", i)
		pods[i] = rng.IntN(5) < 3
		if pods[i] {
			kinds[i] = chaosKind(rng.IntN(5))
		} else {
			kinds[i] = chaosKind(rng.IntN(4))
		}
		ms := 200 + rng.IntN(700)
		if i < across {
			pods[i], kinds[i], ms = true, []chaosKind{chaosOK, chaosOK, chaosExit, chaosStop}[i], 60000
		}
		runFor[i] = time.Duration(ms) * time.Millisecond
		if pods[i] {
			req := sim(ids[i], map[string]string{"run-ms": strconv.Itoa(ms)})
			switch kinds[i] {
			case chaosExit:
				req.Annotations["sim.buildfleet.io/exit-code"] = "3"
			case chaosTimeout:
				req.Annotations["sim.buildfleet.io/run-ms"] = "30000"
				req.TimeoutSeconds = 2
				runFor[i] = 2 * time.Second
			case chaosStop:
				req.Annotations["sim.buildfleet.io/run-ms"] = "120000"
			case chaosNoPull:
				req.Image = "registry.example/does-not-exist:1"
				runFor[i] = 2 * time.Second // the target's image-pull budget
			}
			if i < across {
				req.Annotations[protocol.AnnotationTarget] = "east"
			}
			reqs[i] = req
			continue
		}
		req := protocol.BuildRequest{ID: ids[i], Image: "docker.io/library/busybox:stable",
			Annotations: map[string]string{protocol.AnnotationTarget: "local"}}
		mark, lock := filepath.Join(notes, ids[i]), filepath.Join(notes, ids[i]+".lock")
		body := fmt.Sprintf(`exec 9>%[2]s; flock -n 9 || { echo overlap >> %[1]s; exit 1; }; echo start >> %[1]s; `, mark, lock)
		sleep := fmt.Sprintf("sleep %.3f 9>&-; echo end >> %s", runFor[i].Seconds(), mark)
		switch kinds[i] {
		case chaosOK:
			req.Command = []string{"sh", "-c", body + sleep}
		case chaosExit:
			req.Command = []string{"sh", "-c", body + sleep + "; exit 3"}
		case chaosTimeout:
			req.Command = []string{"sh", "-c", body + "sleep 30 9>&-"}
			req.TimeoutSeconds = 2
			runFor[i] = 2 * time.Second
		case chaosStop:
			req.Command = []string{"sh", "-c", body + "sleep 60 9>&-"}
		}
		reqs[i] = req
	}
	// Submitted over a while (at least 40s, 10 builds a second), so that the faults fall
	// among running builds.
	start := time.Now()
	pace := max(40*time.Second/time.Duration(n), 100*time.Millisecond)
	submitted := make(chan error, 1)
	go func() {
		for i, req := range reqs {
			time.Sleep(time.Until(start.Add(time.Duration(i) * pace)))
			// Submit itself retries through leader elections, each attempt bounded, within
			// the caller's deadline.
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			if _, err := f.cl.Submit(ctx, req); err != nil {
				cancel()
				submitted <- fmt.Errorf("submit %s: %w (request stream: %s)", req.ID, err, streamState(f))
				return
			}
			cancel()
		}
		submitted <- nil
	}()

	// The faults, on their own schedule, while the builds run.
	faults := map[string]int{}
	count := func(fault string) {
		mu.Lock()
		faults[fault]++
		mu.Unlock()
	}
	var schedule []string
	log := func(format string, args ...any) {
		line := fmt.Sprintf("%6.1fs ", time.Since(start).Seconds()) + fmt.Sprintf(format, args...)
		mu.Lock()
		schedule = append(schedule, line)
		mu.Unlock()
		t.Log("chaos: " + line)
	}
	ctx, stopFaults := context.WithCancel(context.Background())
	sleep := func(d time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	pick := func() (string, *binaryReplica) {
		mu.Lock()
		defer mu.Unlock()
		names := slices.Sorted(maps.Keys(replicas))
		name := names[rng.IntN(len(names))]
		return name, replicas[name]
	}
	// The east apiserver's outage, on a clock of its own: 30s, from a few seconds in.
	var outageFrom, outageTo time.Time
	var outageStarted atomic.Bool
	// A stop build is stopped once it runs; the one that runs across the outage, once the
	// outage has begun.
	stoppable := func(i int) bool { return kinds[i] == chaosStop && (i >= across || outageStarted.Load()) }
	outageDone := make(chan error, 1)
	outageAt := time.Duration(5000+rng.IntN(5000)) * time.Millisecond
	go func() {
		if !sleep(outageAt) {
			outageDone <- nil
			return
		}
		if err := k.east.StopAPIServer(); err != nil {
			outageDone <- err
			return
		}
		outageFrom = time.Now()
		outageStarted.Store(true)
		count("apiserver outage")
		log("stopped the east kube-apiserver for 30s")
		time.Sleep(30 * time.Second)
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		err := k.east.StartAPIServer(rctx)
		outageTo = time.Now()
		log("started the east kube-apiserver again (ready after %s)", outageTo.Sub(outageFrom).Round(100*time.Millisecond))
		outageDone <- err
	}()
	faultsDone := make(chan struct{})
	go func() {
		defer close(faultsDone)
		// Faults come while builds are submitted and for a while after; then the fleet is
		// left to finish what the faults interrupted.
		until := start.Add(time.Duration(n)*pace + 15*time.Second)
		step := 0
		for time.Now().Before(until) && sleep(time.Duration(4000+rng.IntN(3000))*time.Millisecond) {
			step++
			switch {
			case step%3 == 1 || step > 6:
				name, p := pick()
				_ = p.cmd.Process.Signal(syscall.SIGKILL)
				<-p.done
				p.done <- nil
				mu.Lock()
				delete(replicas, name)
				mu.Unlock()
				count("SIGKILL")
				log("SIGKILL %s", name)
				spawn()
			case step == 2:
				name, p := pick()
				_ = p.cmd.Process.Signal(syscall.SIGSTOP)
				count("SIGSTOP")
				log("SIGSTOP %s for 3s (AckWait 2s)", name)
				sleep(3 * time.Second)
				_ = p.cmd.Process.Signal(syscall.SIGCONT)
				log("SIGCONT %s", name)
			case step == 3:
				leader := streamLeader(t, f, servers)
				if leader == nil {
					log("no request stream leader found; skipping the failover")
					continue
				}
				leader.Shutdown()
				count("leader killed")
				log("killed %s, the request stream's leader", leader.Name())
				sleep(2 * time.Second)
				leader.Restart(t)
				log("restarted %s", leader.Name())
			case step == 5:
				// A rolling restart, as a StatefulSet does it: the next server goes once
				// the last one is healthy again (its streams caught up).
				for _, s := range servers {
					s.Shutdown()
					s.Restart(t)
					count("server restarted")
					healthy := time.Now()
					for !s.Healthy() && time.Since(healthy) < time.Minute {
						time.Sleep(100 * time.Millisecond)
					}
					log("restarted %s (healthy after %s)", s.Name(), time.Since(healthy).Round(100*time.Millisecond))
				}
			default:
				// The stop builds: stop every one that runs by now.
				stopped := 0
				for i, id := range ids {
					if stoppable(i) {
						if err := f.cl.Stop(ctx, id, "chaos"); err == nil {
							stopped++
						}
					}
				}
				log("stopped %d builds", stopped)
			}
		}
	}()
	halt := func() {
		stopFaults()
		<-faultsDone
		if err := <-outageDone; err != nil {
			t.Errorf("the east kube-apiserver did not come back: %v", err)
		}
	}

	// Stops reach every stop build, whatever the faults do: send them again until each ends.
	deadline := time.Now().Add(time.Duration(n)*pace + 8*time.Minute)
	ended := map[string]bool{}
	for len(ended) < n {
		select {
		case err := <-submitted:
			if err != nil {
				halt()
				t.Fatal(err)
			}
		default:
		}
		if time.Now().After(deadline) {
			halt()
			var missing []string
			for _, id := range ids {
				if !ended[id] {
					missing = append(missing, id)
				}
			}
			t.Fatalf("builds missing after %s: %d of %d (%v)", time.Since(start).Round(time.Second), len(missing), n, missing[:min(len(missing), 20)])
		}
		for i, id := range ids {
			if ended[id] {
				continue
			}
			rec, err := f.cl.Status(context.Background(), id)
			if err != nil || !rec.State.Terminal() {
				if err == nil && stoppable(i) && rec.State == protocol.StateRunning {
					_ = f.cl.Stop(context.Background(), id, "chaos")
				}
				continue
			}
			ended[id] = true
		}
		time.Sleep(200 * time.Millisecond)
	}
	elapsed := time.Since(start)
	halt()
	// Pods the fleet stopped take their grace to go; none may be left running.
	leakDeadline := time.Now().Add(time.Minute)
	for len(k.running()) > 0 && time.Now().Before(leakDeadline) {
		time.Sleep(200 * time.Millisecond)
	}

	// The figures and the checks.
	var c struct{ wrongEnd, badTerminal, disagree, twoPods, doubleRuns, leaked, failedOver, heldThrough int }
	var slowest time.Duration
	var slowestID string
	var problems []string
	problem := func(counter *int, format string, args ...any) {
		*counter++
		problems = append(problems, fmt.Sprintf(format, args...))
	}
	events := f.allStoredEvents()
	perTarget := map[string]int{}
	for i, id := range ids {
		rec := f.status(id)
		perTarget[rec.Target]++
		state, reason := kinds[i].want()
		if rec.State != state || (reason != "" && rec.Reason != reason) || (kinds[i] == chaosExit && (rec.ExitCode == nil || *rec.ExitCode != 3)) {
			problem(&c.wrongEnd, "%s (%s, %s) ended %s/%s %q, want %s/%s", id, kinds[i], rec.Target, rec.State, rec.Reason, rec.Message, state, reason)
		}
		if n := terminalCount(events[id]); n != 1 {
			problem(&c.badTerminal, "%s: %d terminal events", id, n)
		}
		tr, hadPod := k.trail(id)
		outcome := ""
		if hadPod {
			outcome = podOutcome(tr)
		}
		switch {
		case !pods[i] && hadPod:
			problem(&c.disagree, "%s, a process build, had a pod", id)
		case pods[i] && !podAgrees(rec, outcome):
			problem(&c.disagree, "%s ended %s/%s on %s, but its pod: %q", id, rec.State, rec.Reason, rec.Target, outcome)
		}
		if len(tr.uids) > 1 {
			problem(&c.twoPods, "%s had %d pods: %v", id, len(tr.uids), tr.uids)
		}
		if got, _ := os.ReadFile(filepath.Join(notes, id)); strings.Contains(string(got), "overlap") {
			problem(&c.doubleRuns, "%s ran twice at once: %q", id, got)
		}
		if hadPod && !tr.deleted && tr.last.Status.Phase != corev1.PodSucceeded && tr.last.Status.Phase != corev1.PodFailed {
			problem(&c.leaked, "%s's pod is still %s a minute after the build ended %s", id, tr.last.Status.Phase, rec.State)
		}
		if !outageFrom.IsZero() && pods[i] && rec.QueuedAt.After(outageFrom.Add(5*time.Second)) && rec.QueuedAt.Before(outageTo) && rec.Target != "east" {
			c.failedOver++
		}
		if hadPod && tr.uids[tr.last.UID] == "east" && rec.DispatchedAt != nil && rec.DispatchedAt.Before(outageFrom) &&
			rec.FinishedAt != nil && rec.FinishedAt.After(outageTo) {
			c.heldThrough++
		}
		if kinds[i] != chaosStop && rec.FinishedAt != nil {
			if wait := rec.FinishedAt.Sub(rec.QueuedAt) - runFor[i]; wait > slowest {
				slowest, slowestID = wait, id
			}
		}
	}
	breakerOpened := f.logged(`"target":"east","from":"closed","to":"open"`)
	mu.Lock()
	k.mu.Lock()
	relists := k.relists
	k.mu.Unlock()
	t.Logf("chaos: %d builds in %s, seed %d; per target %v; faults %v; west proxy %v; pod watches listed again: %d",
		n, elapsed.Round(time.Second), seed, perTarget, faults, k.proxy.Counts(), relists)
	t.Logf("chaos: terminal events != 1: %d; end not as its program called for: %d; end disagreeing with its pod: %d; "+
		"two pods: %d; a process run twice at once: %d; pods left running: %d; missing: 0; "+
		"east breaker opened: %v; builds queued during the outage that ran elsewhere: %d; east pods followed across the outage: %d; "+
		"slowest wait beyond its own run time: %s (%s)",
		c.badTerminal, c.wrongEnd, c.disagree, c.twoPods, c.doubleRuns, c.leaked, breakerOpened, c.failedOver, c.heldThrough,
		slowest.Round(100*time.Millisecond), slowestID)
	t.Logf("chaos schedule:\n%s", strings.Join(schedule, "\n"))
	mu.Unlock()
	if !outageFrom.IsZero() {
		if !breakerOpened {
			t.Error("the east target's breaker never opened while its apiserver was down")
		}
		if c.failedOver == 0 {
			t.Error("no build queued during the east outage ran on another target")
		}
		if c.heldThrough < across-1 {
			t.Errorf("%d east pods were followed across the outage, want the %d that ran through it at least", c.heldThrough, across-1)
		}
	}
	for _, p := range problems[:min(len(problems), 30)] {
		t.Error(p)
	}
	if len(problems) > 0 {
		t.Errorf("%d problems; replay with BUILDFLEET_CHAOS_SEED=%d", len(problems), seed)
	}
}

// streamState describes the request stream's cluster, for a failure's log.
func streamState(f *fleet) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := f.js.Stream(ctx, "BUILDFLEET_REQUESTS")
	if err != nil {
		return err.Error()
	}
	info, err := s.Info(ctx)
	if err != nil || info.Cluster == nil {
		return fmt.Sprint(err)
	}
	out := "leader " + info.Cluster.Leader
	for _, r := range info.Cluster.Replicas {
		out += fmt.Sprintf(", %s current=%v offline=%v lag=%d", r.Name, r.Current, r.Offline, r.Lag)
	}
	return out
}

// streamLeader is the server that leads the request stream now, if one does.
func streamLeader(t *testing.T, f *fleet, servers []*natstest.Server) *natstest.Server {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := f.js.Stream(ctx, "BUILDFLEET_REQUESTS")
	if err != nil {
		return nil
	}
	info, err := s.Info(ctx)
	if err != nil || info.Cluster == nil {
		return nil
	}
	for _, srv := range servers {
		if srv.Name() == info.Cluster.Leader {
			return srv
		}
	}
	return nil
}
