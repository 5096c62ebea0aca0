package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// freeAddr is a loopback address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// get fetches http://addr/path and returns the status code and body (0 if it cannot).
func get(addr, path string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// waitReady waits until /readyz answers want, and returns its last body. A body check, if
// given, must hold too.
func waitReady(t testing.TB, addr string, want int, contains string, within time.Duration) string {
	t.Helper()
	var code int
	var body string
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		code, body = get(addr, "/readyz")
		if code == want && strings.Contains(body, contains) {
			return body
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("/readyz did not answer %d with %q within %s; last %d:\n%s", want, contains, within, code, body)
	return ""
}

// scrape reads /metrics into samples keyed `name{label="value",…}` (labels sorted); a
// histogram gives its _count and _sum.
func scrape(t testing.TB, addr string) map[string]float64 {
	t.Helper()
	code, body := get(addr, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics = %d: %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	out := map[string]float64{}
	for name, mf := range families {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			slices.Sort(labels)
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.Counter != nil:
				out[key] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[key] = m.GetGauge().GetValue()
			case m.Histogram != nil:
				hk := strings.Replace(key, name, name+"_count", 1)
				out[hk] = float64(m.GetHistogram().GetSampleCount())
				out[strings.Replace(key, name, name+"_sum", 1)] = m.GetHistogram().GetSampleSum()
			case m.Untyped != nil:
				out[key] = m.GetUntyped().GetValue()
			}
		}
	}
	return out
}

// TestMetricsMoveWithBuilds scrapes a replica's /metrics before and after real builds (one
// that succeeds, one that fails, one invalid, one pinned to a target that does not exist, one
// stopped before it was claimed)
// and while one runs, and checks that every series moved by what happened.
func TestMetricsMoveWithBuilds(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.HTTPAddr = freeAddr(t)
	f.start(s, nil)
	waitReady(t, s.HTTPAddr, http.StatusOK, "", 20*time.Second)
	before := scrape(t, s.HTTPAddr)

	f.submit("m-ok", "true")
	f.submit("m-fail", "sh", "-c", "exit 3")
	f.submitReq(protocol.BuildRequest{ID: "m-pinned", Image: "busybox", Command: []string{"true"},
		Annotations: map[string]string{protocol.AnnotationTarget: "no-such-target"}})
	if _, err := f.js.Publish(context.Background(), "buildfleet.requests.m-invalid", []byte(`{"id":"m-invalid"}`)); err != nil {
		t.Fatal(err)
	}
	// A stop that overtakes its request ends the build before it is ever claimed.
	if err := f.cl.Stop(context.Background(), "m-stopped", "test"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"m-ok", "m-fail", "m-pinned", "m-invalid", "m-stopped"} {
		f.await(id, 30*time.Second)
	}
	f.submit("m-slow", "sleep", "3")
	f.awaitState("m-slow", protocol.StateRunning, 20*time.Second)
	during := scrape(t, s.HTTPAddr)
	if got := during["buildfleet_builds_in_flight"]; got != 1 {
		t.Errorf("buildfleet_builds_in_flight = %v while one build runs, want 1", got)
	}
	f.await("m-slow", 30*time.Second)
	waitFor(t, 10*time.Second, "every request settled", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	after := scrape(t, s.HTTPAddr)

	for key, want := range map[string]float64{
		`buildfleet_requests_received_total{delivery="first"}`:                                      5,
		`buildfleet_builds_dispatched_total{target="local"}`:                                        3,
		`buildfleet_builds_finished_total{reason="",state="succeeded",target="local"}`:              2,
		`buildfleet_builds_finished_total{reason="exit_code",state="failed",target="local"}`:        1,
		`buildfleet_builds_finished_total{reason="invalid_request",state="rejected",target="none"}`: 1,
		`buildfleet_builds_finished_total{reason="",state="aborted",target="none"}`:                 1,
		`buildfleet_builds_rejected_total{reason="invalid_request"}`:                                1,
		`buildfleet_queue_to_dispatch_seconds_count{target="local"}`:                                3,
		`buildfleet_dispatch_to_running_seconds_count{target="local"}`:                              3,
	} {
		if got := after[key] - before[key]; got != want {
			t.Errorf("%s moved by %v, want %v", key, got, want)
		}
	}
	rejected := 0.0
	for key, v := range after {
		if strings.HasPrefix(key, "buildfleet_builds_rejected_total{") {
			rejected += v - before[key]
		}
	}
	if rejected != 2 {
		t.Errorf("buildfleet_builds_rejected_total moved by %v in all, want 2 (invalid, unknown target)", rejected)
	}
	if after[`buildfleet_queue_to_dispatch_seconds_sum{target="local"}`] <= before[`buildfleet_queue_to_dispatch_seconds_sum{target="local"}`] {
		t.Errorf("queue→dispatched latency sum did not grow")
	}
	// A delivery is in flight until it is settled, just after its terminal event.
	waitFor(t, 10*time.Second, "no build in flight", func() bool { return scrape(t, s.HTTPAddr)["buildfleet_builds_in_flight"] == 0 })
	after = scrape(t, s.HTTPAddr)
	for key, want := range map[string]float64{
		"buildfleet_builds_in_flight":                             0,
		`buildfleet_breaker_state{state="closed",target="local"}`: 1,
		`buildfleet_breaker_state{state="open",target="local"}`:   0,
		"buildfleet_nats_connected":                               1,
	} {
		if got, ok := after[key]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", key, got, ok, want)
		}
	}
}

// TestReadinessFollowsNATSAndTheConsumers breaks each NATS dependency of a running replica
// and mends it: /readyz must drop, name what is wrong, and recover, while /healthz stays up;
// a deleted consumer is provisioned again by the replica itself, which then runs builds.
func TestReadinessFollowsNATSAndTheConsumers(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.HTTPAddr = freeAddr(t)
	s.Concurrency = 1 // so that a second build stays queued, for the stop consumer alone to stop
	// A consumer lost from an empty stream comes back after the first backoff: ≥2s, long
	// enough to see it gone.
	s.RetryMin, s.RetryMax = 2*time.Second, 4*time.Second
	f.start(s, nil)
	body := waitReady(t, s.HTTPAddr, http.StatusOK, "", 20*time.Second)
	for _, want := range []string{"[+]nats ok", "[+]consumers ok", "[+]shutdown ok"} {
		if !strings.Contains(body, want) {
			t.Errorf("/readyz of a ready replica lacks %q:\n%s", want, body)
		}
	}

	f.srv.Shutdown()
	waitReady(t, s.HTTPAddr, http.StatusServiceUnavailable, "[-]nats: NATS connection is", 20*time.Second)
	if code, _ := get(s.HTTPAddr, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d with NATS down, want 200 (liveness must not follow dependencies)", code)
	}
	if m := scrape(t, s.HTTPAddr); m["buildfleet_nats_connected"] != 0 {
		t.Errorf("buildfleet_nats_connected = %v with NATS down, want 0", m["buildfleet_nats_connected"])
	}
	f.srv.Restart(t)
	waitReady(t, s.HTTPAddr, http.StatusOK, "", 30*time.Second)

	for _, consumer := range []struct{ stream, name, loop string }{{"BUILDFLEET_REQUESTS", "workers", "request"}, {"BUILDFLEET_RUN", "runners", "run"}, {"BUILDFLEET_STOPS", "stoppers", "stop"}} {
		// A provisioning still in flight (from the restart, or the last consumer deleted)
		// makes every consumer again, this one too, maybe before /readyz is asked: so
		// delete it only when none is, and count on this consumer's own loop alone to make
		// it again, after a backoff of RetryMin.
		f.awaitProvisioningSettled(30 * time.Second)
		seen := f.goneLogged(consumer.loop)
		if err := f.js.DeleteConsumer(context.Background(), consumer.stream, consumer.name); err != nil {
			t.Fatal(err)
		}
		waitReady(t, s.HTTPAddr, http.StatusServiceUnavailable, "[-]consumers: consumer "+consumer.name, 10*time.Second)
		f.awaitLog(30*time.Second, "the "+consumer.loop+" loop finding its consumer gone", func() bool { return f.goneLogged(consumer.loop) > seen })
		waitReady(t, s.HTTPAddr, http.StatusOK, "", 30*time.Second)
	}
	f.submit("after-consumers", "true")
	if evs := f.await("after-consumers", 30*time.Second); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
		t.Errorf("build after the consumers came back: %v", states(evs))
	}
	// A build held by the replica, and one queued behind it (concurrency 1): only the stop
	// consumer, back again, can stop the queued one.
	f.submit("blocker", "sleep", "30")
	f.awaitState("blocker", protocol.StateRunning, 20*time.Second)
	f.submit("queued-stop", "true")
	if err := f.cl.Stop(context.Background(), "queued-stop", "test"); err != nil {
		t.Fatal(err)
	}
	if evs := f.await("queued-stop", 30*time.Second); evs[len(evs)-1].Data.State != protocol.StateAborted ||
		slices.Contains(states(evs), protocol.StateDispatched) {
		t.Errorf("a queued build stopped after the stop consumer came back: %v, want aborted before dispatch", states(evs))
	}
	if err := f.cl.Stop(context.Background(), "blocker", "test"); err != nil {
		t.Fatal(err)
	}
	f.await("blocker", 30*time.Second)
}

// TestDeletedConsumerKeepsHeldBuilds deletes the run consumer while one of two
// replicas runs a build and is too busy to fetch. The other replica makes the consumer
// again at once and is offered the build anew; the record says a live replica owns it, so
// it waits, and the owner runs the build to its end: once, never twice at once, and never
// counted as a crashed delivery. (Before ownership lived in the record, the holder had to
// hand the build over, killing and re-running a local process, and the re-made consumer had
// to wait out AckWait; under CPU load that timing gave way and the build ran twice.)
func TestDeletedConsumerKeepsHeldBuilds(t *testing.T) {
	f := newFleet(t)
	for _, name := range []string{"a", "b"} {
		s := f.settings(name)
		s.Concurrency = 1
		f.start(s, nil)
	}
	mark := f.submitHeld("held")
	if err := f.js.DeleteConsumer(context.Background(), "BUILDFLEET_RUN", "runners"); err != nil {
		t.Fatal(err)
	}
	f.checkRanOnce("held", mark)
}

// TestReplicaStartingAfterALostConsumer deletes the run consumer while a replica runs a
// build, and starts another replica at once, which makes the consumer again without waiting
// and is offered the build: it must leave it to its live owner.
func TestReplicaStartingAfterALostConsumer(t *testing.T) {
	f := newFleet(t)
	s := f.settings("a")
	s.Concurrency = 1
	f.start(s, nil)
	mark := f.submitHeld("held")
	if err := f.js.DeleteConsumer(context.Background(), "BUILDFLEET_RUN", "runners"); err != nil {
		t.Fatal(err)
	}
	f.start(f.settings("c"), nil)
	f.checkRanOnce("held", mark)
}

// submitHeld submits build id running a shell that notes in a file when it starts, is
// killed (SIGTERM) or ends, and waits until it runs. It returns the file.
func (f *fleet) submitHeld(id string) string {
	f.t.Helper()
	mark := filepath.Join(f.dir, id+".log")
	f.submit(id, "sh", "-c", fmt.Sprintf(`trap 'echo killed >> %[1]s; exit 143' TERM; echo start >> %[1]s; sleep 4 & wait; echo end >> %[1]s`, mark))
	f.awaitState(id, protocol.StateRunning, 20*time.Second)
	return mark
}

// checkRanOnce checks that build id ended succeeded with one terminal event, on the replica
// that started it, which ran it once from start to end: no second run, no failure, no
// handover.
func (f *fleet) checkRanOnce(id, mark string) {
	t := f.t
	t.Helper()
	evs := f.await(id, 60*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
		t.Fatalf("%s ended %s, want succeeded (events %v)", id, got, states(evs))
	}
	waitFor(t, 30*time.Second, "the request settled", func() bool { return f.pending("BUILDFLEET_REQUESTS") == 0 })
	if n := terminalCount(f.storedEvents(id)); n != 1 {
		t.Errorf("%d terminal events, want 1", n)
	}
	rec := f.status(id)
	if rec.Failures != 0 || rec.Handovers != 0 || rec.Attempts != 1 {
		t.Errorf("record: attempts %d failures %d handovers %d; want one claim, kept by its live owner",
			rec.Attempts, rec.Failures, rec.Handovers)
	}
	got, _ := os.ReadFile(mark)
	if lines := strings.Fields(string(got)); !slices.Equal(lines, []string{"start", "end"}) {
		t.Errorf("runs of %s: %v; want one run from start to end", id, lines)
	}
}

// TestReadinessFollowsTheCluster puts a TCP proxy between a replica and the apiserver and
// cuts it: /readyz must name the cluster and recover when the proxy is back, and builds run
// after.
func TestReadinessFollowsTheCluster(t *testing.T) {
	f := newKubeFleet(t, "10m")
	p := startProxy(t, strings.TrimPrefix(f.cp.URL, "https://"))
	kc, err := os.ReadFile(f.cp.WorkerKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	proxied := filepath.Join(f.dir, "proxied.kubeconfig")
	if err := os.WriteFile(proxied, []byte(strings.ReplaceAll(string(kc), f.cp.URL, "https://"+p.addr)), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBECONFIG", proxied)
	s := f.settings("a")
	s.HTTPAddr = freeAddr(t)
	f.start(s, nil)
	body := waitReady(t, s.HTTPAddr, http.StatusOK, "", 30*time.Second)
	if !strings.Contains(body, "[+]cluster test ok") {
		t.Errorf("/readyz lacks the cluster check:\n%s", body)
	}
	p.cut()
	waitReady(t, s.HTTPAddr, http.StatusServiceUnavailable, "[-]cluster test: apiserver of test", 20*time.Second)
	p.mend(t)
	waitReady(t, s.HTTPAddr, http.StatusOK, "", 30*time.Second)
	f.submitReq(sim("after-cut", nil))
	if evs := f.await("after-cut", 60*time.Second); evs[len(evs)-1].Data.State != protocol.StateSucceeded {
		t.Errorf("build after the apiserver came back: %v", states(evs))
	}
}

// proxy forwards TCP connections to a backend until cut, and again once mended, on the
// same address.
type proxy struct {
	addr, backend string
	mu            sync.Mutex
	ln            net.Listener
	conns         []net.Conn
	wg            sync.WaitGroup
}

func startProxy(t *testing.T, backend string) *proxy {
	t.Helper()
	p := &proxy{addr: freeAddr(t), backend: backend}
	p.mend(t)
	t.Cleanup(func() { p.cut(); p.wg.Wait() })
	return p
}

func (p *proxy) mend(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", p.backend)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, b)
			p.mu.Unlock()
			p.wg.Go(func() { _, _ = io.Copy(b, c); b.Close() })
			p.wg.Go(func() { _, _ = io.Copy(c, b); c.Close() })
		}
	})
}

// cut closes the listener and every connection through it.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestLogsCarryBuildAndTraceID runs the real binary (JSON logs on stderr) with no exporter
// configured, and publishes a request as a non-Go producer would, with a "Traceparent"
// header: the replica's log lines about the build carry its id and the producer's trace id,
// so logs and traces join up even where no spans are exported.
func TestLogsCarryBuildAndTraceID(t *testing.T) {
	f := newFleet(t)
	f.startBinary("a")
	const traceID = "0af7651916cd43dd8448eb211c80319c"
	req := protocol.BuildRequest{ID: "logged", Image: "busybox", Command: []string{"true"}}
	msg := &nats.Msg{Subject: "buildfleet.requests.logged", Data: protocol.Marshal(req),
		Header: nats.Header{"Traceparent": {"00-" + traceID + "-b7ad6b7169203331-01"}}}
	if _, err := f.js.PublishMsg(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
	f.await("logged", 30*time.Second)
	var lines []map[string]any
	waitFor(t, 10*time.Second, "the replica logs the build's end", func() bool {
		lines = lines[:0]
		f.logMu.Lock()
		text := f.logs.String()
		f.logMu.Unlock()
		for line := range strings.Lines(text) {
			var m map[string]any
			if rest, ok := strings.CutPrefix(line, "a| "); ok && json.Unmarshal([]byte(rest), &m) == nil && m["build"] == "logged" {
				lines = append(lines, m)
			}
		}
		return slices.ContainsFunc(lines, func(m map[string]any) bool { return m["msg"] == "build finished" })
	})
	for _, m := range lines {
		if m["trace_id"] != traceID {
			t.Errorf("log line %v: trace_id = %v, want %s", m["msg"], m["trace_id"], traceID)
		}
		if _, ok := m["time"]; !ok || m["level"] == nil {
			t.Errorf("log line %v is not structured slog JSON (time, level, msg)", m)
		}
	}
}

// TestServesHealthBeforeNATS starts a replica while NATS is down: it must answer /healthz at
// once (so a liveness probe does not kill a replica waiting for NATS), say on /readyz what it
// waits for, and become ready when NATS comes up.
func TestServesHealthBeforeNATS(t *testing.T) {
	f := newFleet(t)
	f.srv.Shutdown()
	s := f.settings("a")
	s.HTTPAddr = freeAddr(t)
	log := slog.New(slog.NewTextHandler(f, nil))
	cfg, err := workerConfig(s, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runReplica(ctx, s, func(ctx context.Context) (*nats.Conn, error) { return connectWorker(ctx, s, log) }, cfg)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("replica: %v", err)
		}
	}()
	waitFor(t, 10*time.Second, "/healthz answers", func() bool { code, _ := get(s.HTTPAddr, "/healthz"); return code == http.StatusOK })
	waitReady(t, s.HTTPAddr, http.StatusServiceUnavailable, "[-]nats: not connected to NATS yet", 5*time.Second)
	if m := scrape(t, s.HTTPAddr); m["buildfleet_nats_connected"] != 0 {
		t.Errorf("buildfleet_nats_connected = %v before NATS is up, want 0", m["buildfleet_nats_connected"])
	}
	f.srv.Restart(t)
	waitReady(t, s.HTTPAddr, http.StatusOK, "[+]consumers ok", 30*time.Second)
}

// otlpReceiver is an OTLP/HTTP trace endpoint that keeps what it is sent.
type otlpReceiver struct {
	mu    sync.Mutex
	spans map[string][]string // service.name → span names
}

func startOTLPReceiver(t *testing.T) (*otlpReceiver, string) {
	t.Helper()
	r := &otlpReceiver{spans: map[string][]string{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, err := io.ReadAll(req.Body)
		var export coltracepb.ExportTraceServiceRequest
		if err != nil || req.URL.Path != "/v1/traces" || proto.Unmarshal(body, &export) != nil {
			http.Error(w, "not an OTLP trace export", http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		for _, rs := range export.GetResourceSpans() {
			service := ""
			for _, kv := range rs.GetResource().GetAttributes() {
				if kv.GetKey() == "service.name" {
					service = kv.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.GetScopeSpans() {
				for _, s := range ss.GetSpans() {
					r.spans[service] = append(r.spans[service], s.GetName())
				}
			}
		}
		r.mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(nil)
	}))
	t.Cleanup(srv.Close)
	return r, srv.URL
}

func (r *otlpReceiver) names(service string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.spans[service])
}

// TestWorkerExportsOverOTLP runs the real binary with only the standard variables
// (OTEL_EXPORTER_OTLP_ENDPOINT, OTLP over HTTP) and a build through it: the replica's spans
// reach the collector under its service name. (With no OTEL_* variable set nothing is
// exported: TestTracingConfigured.)
func TestWorkerExportsOverOTLP(t *testing.T) {
	recv, url := startOTLPReceiver(t)
	f := newFleet(t)
	f.startBinary("a", "OTEL_EXPORTER_OTLP_ENDPOINT="+url, "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
		"OTEL_BSP_SCHEDULE_DELAY=100", "OTEL_SERVICE_NAME=bf-under-test")
	f.submit("exported", "true")
	f.await("exported", 30*time.Second)
	waitFor(t, 20*time.Second, "the replica's spans reach the collector", func() bool {
		got := recv.names("bf-under-test")
		return slices.Contains(got, "process buildfleet.requests.{id}") && slices.Contains(got, "launch")
	})
}
