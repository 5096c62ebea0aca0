package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/config"
	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// binary is the real buildfleet binary, built once for the tests that run it as a process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "buildfleet-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "buildfleet")
	// Replicas and dev run side by side here: each serves metrics and health on a free port.
	os.Setenv("BUILDFLEET_HTTP_ADDR", "127.0.0.1:0")
	out, err := exec.Command("go", "build", "-o", binary, "../../cmd/buildfleet").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building buildfleet: %v\n%s", err, out)
		os.Exit(1)
	}
	code := kubetest.RunMain(m)
	os.RemoveAll(dir)
	os.Exit(code)
}

// fleet is a real nats-server with JetStream, a client, and replicas started on demand.
type fleet struct {
	t    testing.TB
	srv  *natstest.Server
	urls string // every server of a cluster; empty: srv alone
	nc   *nats.Conn
	js   jetstream.JetStream
	cl   *client.Client
	dir  string

	logMu sync.Mutex
	logs  bytes.Buffer
}

func newFleet(t testing.TB) *fleet {
	t.Helper()
	return newFleetOn(t, natstest.Start(t), "")
}

// newClusterFleet is a fleet on a 3-server JetStream cluster, whose clients and replicas
// know every server.
func newClusterFleet(t testing.TB) (*fleet, []*natstest.Server) {
	t.Helper()
	servers := natstest.StartCluster(t, 3)
	return newFleetOn(t, servers[0], natstest.URLs(servers)), servers
}

func newFleetOn(t testing.TB, srv *natstest.Server, urls string) *fleet {
	t.Helper()
	f := &fleet{t: t, srv: srv, urls: urls, dir: t.TempDir()}
	// Registered first, so it runs last: after every replica has stopped logging.
	t.Cleanup(func() {
		if t.Failed() {
			f.logMu.Lock()
			t.Logf("replica logs:\n%s", f.logs.String())
			f.logMu.Unlock()
		}
	})
	f.nc = f.connect()
	var err error
	if f.js, err = jetstream.New(f.nc); err != nil {
		t.Fatal(err)
	}
	if f.cl, err = client.New(f.nc); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fleet) Write(p []byte) (int, error) {
	f.logMu.Lock()
	defer f.logMu.Unlock()
	return f.logs.Write(p)
}

// url is where clients and replicas connect.
func (f *fleet) url() string {
	if f.urls != "" {
		return f.urls
	}
	return f.srv.ClientURL()
}

// connect opens a connection to the fleet's NATS that reconnects for ever (to any server of
// a cluster) and closes when the test ends.
func (f *fleet) connect() *nats.Conn {
	f.t.Helper()
	if f.urls == "" {
		return natstest.Connect(f.t, f.srv)
	}
	nc, err := nats.Connect(f.urls, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		f.t.Fatalf("connect: %v", err)
	}
	f.t.Cleanup(nc.Close)
	return nc
}

// logged reports whether a replica has logged s.
func (f *fleet) logged(s string) bool {
	f.logMu.Lock()
	defer f.logMu.Unlock()
	return bytes.Contains(f.logs.Bytes(), []byte(s))
}

// countLogged is how many lines of the replicas' logs contain every one of parts.
func (f *fleet) countLogged(parts ...string) int {
	f.logMu.Lock()
	defer f.logMu.Unlock()
	n := 0
	for line := range bytes.Lines(f.logs.Bytes()) {
		all := true
		for _, p := range parts {
			all = all && bytes.Contains(line, []byte(p))
		}
		if all {
			n++
		}
	}
	return n
}

// goneLogged is how many times a replica's loop of consumer which (request, run, stop)
// found its shared consumer gone and set out to provision the layout again.
func (f *fleet) goneLogged(which string) int {
	return f.countLogged("a shared consumer is gone", "consumer="+which+" ")
}

// awaitProvisioningSettled waits until every shared consumer the replicas found gone was
// dealt with: made again, found back, or a failure logged (the loop then finds it gone
// again and says so). No provisioning of the layout is in flight then.
func (f *fleet) awaitProvisioningSettled(within time.Duration) {
	f.t.Helper()
	f.awaitLog(within, "every provisioning of the layout to end", func() bool {
		done := f.countLogged("shared consumer provisioned again") + f.countLogged("shared consumer is back already") +
			f.countLogged("provisioning the JetStream layout again failed")
		return done == f.countLogged("a shared consumer is gone")
	})
}

// awaitLog waits until cond, which reads the replicas' logs, holds.
func (f *fleet) awaitLog(within time.Duration, what string, cond func() bool) {
	f.t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			f.t.Fatalf("no sign in the logs of %s within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// settings are the defaults with short timings for tests.
func (f *fleet) settings(replica string) config.Settings {
	f.t.Helper()
	s, err := config.Load()
	if err != nil {
		f.t.Fatalf("config.Load: %v", err)
	}
	s.NATSURL = f.url()
	s.Replica = replica
	s.AckWait = 2 * time.Second
	s.LivenessTTL = 6 * time.Second
	s.RetryMin = 50 * time.Millisecond
	s.RetryMax = 500 * time.Millisecond
	s.DrainTimeout = 10 * time.Second
	s.ScratchDir = filepath.Join(f.dir, "scratch-"+replica)
	return s
}

// replica is one in-process worker running the real runReplica.
type replica struct {
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// start runs a replica until stop or the end of the test. edit, if given, may change the
// worker configuration (wrap an executor) before it starts.
func (f *fleet) start(s config.Settings, edit func(*worker.Config)) *replica {
	f.t.Helper()
	log := slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg, err := workerConfig(s, log)
	if err != nil {
		f.t.Fatalf("workerConfig: %v", err)
	}
	if edit != nil {
		edit(&cfg.Config)
	}
	nc := f.connect()
	ctx, cancel := context.WithCancel(context.Background())
	r := &replica{cancel: cancel, done: make(chan error, 1)}
	go func() {
		r.done <- runReplica(ctx, s, func(context.Context) (*nats.Conn, error) { return nc, nil }, cfg)
	}()
	f.t.Cleanup(func() { r.stop(f.t) })
	f.waitConsumer()
	return r
}

func (r *replica) stop(t testing.TB) {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("replica: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("replica did not stop within 30s")
		}
	})
}

// waitConsumer waits until the JetStream layout exists.
func (f *fleet) waitConsumer() {
	f.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := f.js.Consumer(context.Background(), "BUILDFLEET_REQUESTS", "workers"); err == nil {
			// The liveness bucket is the last thing Provision makes.
			_, err := f.js.KeyValue(context.Background(), "BUILDFLEET_BUILDS")
			if _, lerr := f.js.KeyValue(context.Background(), "BUILDFLEET_REPLICAS"); err == nil && lerr == nil {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	f.t.Fatal("the JetStream layout was not provisioned within 30s")
}

// submit queues a build running argv.
func (f *fleet) submit(id string, argv ...string) protocol.BuildRequest {
	f.t.Helper()
	req := protocol.BuildRequest{ID: id, Image: "docker.io/library/busybox:stable", Command: argv}
	f.submitReq(req)
	return req
}

func (f *fleet) submitReq(req protocol.BuildRequest) client.SubmitResult {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := f.cl.Submit(ctx, req)
	if err != nil {
		f.t.Fatalf("Submit(%s): %v", req.ID, err)
	}
	return res
}

// await follows build id until its terminal event and returns every event seen.
func (f *fleet) await(id string, within time.Duration) []protocol.Event {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var evs []protocol.Event
	for ev, err := range f.cl.Watch(ctx, id) {
		if err != nil {
			f.t.Fatalf("watching %s: %v (events so far: %v)", id, err, states(evs))
		}
		evs = append(evs, ev)
	}
	if len(evs) == 0 || !evs[len(evs)-1].Data.State.Terminal() {
		f.t.Fatalf("build %s did not end within %s (events: %v)", id, within, states(evs))
	}
	return evs
}

// awaitState waits until build id has published an event for state.
func (f *fleet) awaitState(id string, state protocol.State, within time.Duration) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var seen []protocol.Event
	for ev, err := range f.cl.Watch(ctx, id) {
		if err != nil {
			break
		}
		seen = append(seen, ev)
		if ev.Data.State == state {
			return
		}
	}
	f.t.Fatalf("build %s did not reach %s within %s (events: %v)", id, state, within, states(seen))
}

// storedEvents counts the events stored for build id, by state.
func (f *fleet) storedEvents(id string) map[protocol.State]int {
	f.t.Helper()
	// A stream whose leader is being elected (a cluster server restarted) answers nothing
	// for a moment: read again.
	deadline := time.Now().Add(30 * time.Second)
	for {
		counts, err := f.readStoredEvents(id)
		if err == nil {
			return counts
		}
		var ve *protocol.ValidationError
		if errors.As(err, &ve) || time.Now().After(deadline) {
			f.t.Fatalf("stored events of %s: %v", id, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (f *fleet) readStoredEvents(id string) (map[protocol.State]int, error) {
	all, err := f.readEvents("buildfleet.events." + id)
	return all[id], err
}

// allStoredEvents counts, for every build, the events the stream holds of each state: one
// pass over the stream, for suites with many builds.
func (f *fleet) allStoredEvents() map[string]map[protocol.State]int {
	f.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		all, err := f.readEvents("buildfleet.events.>")
		if err == nil {
			return all
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("stored events: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// readEvents reads every event stored on the subjects filter matches: as many as the
// stream says it holds there, so that a read which comes up short (a consumer made during an
// election may see nothing for a moment) is an error to retry, never a smaller count.
func (f *fleet) readEvents(filter string) (map[string]map[protocol.State]int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := f.js.Stream(ctx, "BUILDFLEET_EVENTS")
	if err != nil {
		return nil, err
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil, err
	}
	var want uint64
	for _, n := range info.State.Subjects {
		want += n
	}
	cons, err := f.js.OrderedConsumer(ctx, "BUILDFLEET_EVENTS", jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
	})
	if err != nil {
		return nil, err
	}
	all := map[string]map[protocol.State]int{}
	var got uint64
	for got < want {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, err
		}
		n := 0
		for msg := range batch.Messages() {
			n++
			ev, err := protocol.DecodeEvent(msg.Data())
			if err != nil {
				return nil, err
			}
			if all[ev.Subject] == nil {
				all[ev.Subject] = map[protocol.State]int{}
			}
			all[ev.Subject][ev.Data.State]++
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return nil, err
		}
		got += uint64(n)
		if n == 0 {
			return nil, fmt.Errorf("read %d of the %d events stored on %s", got, want, filter)
		}
	}
	return all, nil
}

// status reads the build record.
func (f *fleet) status(id string) protocol.Record {
	f.t.Helper()
	// A bucket whose leader is being elected (a cluster server restarted) answers nothing for
	// a moment: ask again.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		rec, err := f.cl.Status(ctx, id)
		cancel()
		if err == nil {
			return rec
		}
		if errors.Is(err, client.ErrNotFound) || time.Now().After(deadline) {
			f.t.Fatalf("Status(%s): %v", id, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func states(evs []protocol.Event) []protocol.State {
	out := make([]protocol.State, len(evs))
	for i, ev := range evs {
		out[i] = ev.Data.State
	}
	return out
}

// terminalCount is the number of terminal events among counts.
func terminalCount(counts map[protocol.State]int) int {
	n := 0
	for s, c := range counts {
		if s.Terminal() {
			n += c
		}
	}
	return n
}
