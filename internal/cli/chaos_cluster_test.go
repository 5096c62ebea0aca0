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
	"syscall"
	"testing"
	"time"

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
)

func (k chaosKind) want() protocol.State {
	return [...]protocol.State{protocol.StateSucceeded, protocol.StateFailed, protocol.StateTimedOut, protocol.StateAborted}[k]
}

// TestChaosCombinedFaults runs BUILDFLEET_CHAOS_BUILDS builds (default 200; `make chaos`
// runs 1,000) of mixed outcomes over three real worker binaries on a 3-server JetStream
// cluster with everything at 3 replicas, while, on a schedule drawn from a printed seed
// (BUILDFLEET_CHAOS_SEED replays one), it SIGKILLs a random replica every few seconds and
// starts a new one, SIGSTOPs one for longer than AckWait and resumes it, kills the server
// that leads the request stream and restarts it, and once restarts every server. Then it
// checks, from the events stream and the builds' own notes: exactly one terminal event per
// build, the terminal state each build's program called for, no build run twice at once (a
// lock each run holds), none missing; and prints the figures.
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
	env := []string{"BUILDFLEET_ACK_WAIT=2s", "BUILDFLEET_LIVENESS_TTL=5s", "BUILDFLEET_CONCURRENCY=24",
		"BUILDFLEET_STREAM_REPLICAS=3", "BUILDFLEET_LOG_LEVEL=info", "BUILDFLEET_RETRY_MIN=100ms", "BUILDFLEET_RETRY_MAX=1s"}
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

	// The builds: kinds drawn from the seed, each noting its runs and holding a lock.
	kinds := make([]chaosKind, n)
	ids := make([]string, n)
	notes := filepath.Join(f.dir, "notes")
	if err := os.MkdirAll(notes, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		kinds[i] = chaosKind(rng.IntN(4))
		ids[i] = fmt.Sprintf("c%04d", i)
	}
	// Submitted over a while (at least 30s, 10 builds a second), so that the faults fall among
	// running builds.
	start := time.Now()
	pace := max(30*time.Second/time.Duration(n), 100*time.Millisecond)
	reqs := make([]protocol.BuildRequest, n)
	for i, id := range ids {
		req := protocol.BuildRequest{ID: id, Image: "docker.io/library/busybox:stable"}
		mark, lock := filepath.Join(notes, id), filepath.Join(notes, id+".lock")
		body := fmt.Sprintf(`exec 9>%[2]s; flock -n 9 || { echo overlap >> %[1]s; exit 1; }; echo start >> %[1]s; `, mark, lock)
		switch kinds[i] {
		case chaosOK:
			req.Command = []string{"sh", "-c", body + fmt.Sprintf("sleep 0.%d 9>&-; echo end >> %s", 2+rng.IntN(8), mark)}
		case chaosExit:
			req.Command = []string{"sh", "-c", body + fmt.Sprintf("sleep 0.%d 9>&-; echo end >> %s; exit 3", 2+rng.IntN(8), mark)}
		case chaosTimeout:
			req.Command = []string{"sh", "-c", body + "sleep 30 9>&-"}
			req.TimeoutSeconds = 2
		case chaosStop:
			req.Command = []string{"sh", "-c", body + "sleep 60 9>&-"}
		}
		reqs[i] = req
	}
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
	var schedule []string
	log := func(format string, args ...any) {
		line := fmt.Sprintf("%6.1fs ", time.Since(start).Seconds()) + fmt.Sprintf(format, args...)
		mu.Lock()
		schedule = append(schedule, line)
		mu.Unlock()
		t.Log("chaos: " + line)
	}
	ctx, stopFaults := context.WithCancel(context.Background())
	faultsDone := make(chan struct{})
	pick := func() (string, *binaryReplica) {
		mu.Lock()
		defer mu.Unlock()
		names := slices.Sorted(maps.Keys(replicas))
		name := names[rng.IntN(len(names))]
		return name, replicas[name]
	}
	go func() {
		defer close(faultsDone)
		sleep := func(d time.Duration) bool {
			select {
			case <-ctx.Done():
				return false
			case <-time.After(d):
				return true
			}
		}
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
				faults["SIGKILL"]++
				log("SIGKILL %s", name)
				spawn()
			case step == 2:
				name, p := pick()
				_ = p.cmd.Process.Signal(syscall.SIGSTOP)
				faults["SIGSTOP"]++
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
				faults["leader killed"]++
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
					faults["server restarted"]++
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
					if kinds[i] == chaosStop {
						if err := f.cl.Stop(ctx, id, "chaos"); err == nil {
							stopped++
						}
					}
				}
				log("stopped %d builds", stopped)
			}
		}
	}()

	// Stops reach every stop build, whatever the faults do: send them again until each ends.
	deadline := time.Now().Add(time.Duration(n)*pace + 8*time.Minute)
	ended := map[string]protocol.Event{}
	for len(ended) < n {
		select {
		case err := <-submitted:
			if err != nil {
				stopFaults()
				<-faultsDone
				t.Fatal(err)
			}
		default:
		}
		if time.Now().After(deadline) {
			stopFaults()
			<-faultsDone
			var missing []string
			for _, id := range ids {
				if _, ok := ended[id]; !ok {
					missing = append(missing, id)
				}
			}
			t.Fatalf("builds missing after %s: %d of %d (%v)", time.Since(start).Round(time.Second), len(missing), n, missing[:min(len(missing), 20)])
		}
		for i, id := range ids {
			if _, ok := ended[id]; ok {
				continue
			}
			rec, err := f.cl.Status(context.Background(), id)
			if err != nil || !rec.State.Terminal() {
				if err == nil && kinds[i] == chaosStop && rec.State == protocol.StateRunning {
					_ = f.cl.Stop(context.Background(), id, "chaos")
				}
				continue
			}
			ended[id] = protocol.EventFromRecord("", rec)
		}
		time.Sleep(200 * time.Millisecond)
	}
	stopFaults()
	<-faultsDone
	elapsed := time.Since(start)

	// The figures and the checks.
	wrongEnd, doubleRuns, badTerminal, slowest := 0, 0, 0, time.Duration(0)
	var problems []string
	events := f.allStoredEvents()
	for i, id := range ids {
		rec := f.status(id)
		if rec.State != kinds[i].want() || (kinds[i] == chaosExit && (rec.ExitCode == nil || *rec.ExitCode != 3)) {
			wrongEnd++
			problems = append(problems, fmt.Sprintf("%s ended %s/%s %q, want %s", id, rec.State, rec.Reason, rec.Message, kinds[i].want()))
		}
		if c := terminalCount(events[id]); c != 1 {
			badTerminal++
			problems = append(problems, fmt.Sprintf("%s: %d terminal events", id, c))
		}
		got, _ := os.ReadFile(filepath.Join(notes, id))
		if strings.Contains(string(got), "overlap") {
			doubleRuns++
			problems = append(problems, fmt.Sprintf("%s ran twice at once: %q", id, got))
		}
		if rec.FinishedAt != nil {
			slowest = max(slowest, rec.FinishedAt.Sub(rec.QueuedAt))
		}
	}
	mu.Lock()
	t.Logf("chaos: %d builds in %s, seed %d; faults %v; terminal events != 1: %d; wrong end: %d; run twice at once: %d; missing: 0; slowest queued→end: %s",
		n, elapsed.Round(time.Second), seed, faults, badTerminal, wrongEnd, doubleRuns, slowest.Round(100*time.Millisecond))
	t.Logf("chaos schedule:\n%s", strings.Join(schedule, "\n"))
	mu.Unlock()
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
