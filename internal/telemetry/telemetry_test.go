package telemetry

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"go.opentelemetry.io/otel/trace"
)

func TestTracingConfigured(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want bool
	}{
		{map[string]string{}, false},
		{map[string]string{"OTEL_SERVICE_NAME": "x"}, false},
		{map[string]string{"OTEL_TRACES_EXPORTER": "otlp"}, true},
		{map[string]string{"OTEL_TRACES_EXPORTER": "console"}, true},
		{map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "TRUE"}, false},
	} {
		if got := TracingConfigured(func(k string) string { return tc.env[k] }); got != tc.want {
			t.Errorf("TracingConfigured(%v) = %v, want %v", tc.env, got, tc.want)
		}
	}
}

func TestHealthAndReadiness(t *testing.T) {
	var natsDown atomic.Bool
	checks := []Check{
		{Name: "nats", Check: func(context.Context) error {
			if natsDown.Load() {
				return errors.New("NATS connection is reconnecting")
			}
			return nil
		}},
	}
	m := NewMetrics()
	m.BuildsDispatched.WithLabelValues("kata").Inc()
	srv := httptest.NewServer(NewServer("", m, checks, slog.New(slog.DiscardHandler)).Handler())
	defer srv.Close()
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("/readyz"); code != 200 || !strings.Contains(body, "[+]nats ok") {
		t.Errorf("/readyz = %d %q, want 200 with [+]nats ok", code, body)
	}
	natsDown.Store(true)
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "[-]nats: NATS connection is reconnecting") {
		t.Errorf("/readyz with NATS down = %d %q, want 503 naming nats", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d while a dependency is down, want 200: liveness must not follow dependencies", code)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, `buildfleet_builds_dispatched_total{target="kata"} 1`) {
		t.Errorf("/metrics = %d, want 200 with the dispatched counter; got:\n%s", code, body)
	}
}

func TestReadyBoundsAHangingCheck(t *testing.T) {
	s := NewServer("", NewMetrics(), []Check{{Name: "hangs", Check: func(ctx context.Context) error {
		<-ctx.Done()
		return ctx.Err()
	}}}, slog.New(slog.DiscardHandler))
	if errs := s.Ready(context.Background()); !errors.Is(errs[0], context.DeadlineExceeded) {
		t.Errorf("a hanging check gave %v, want it cut off at CheckTimeout", errs[0])
	}
}

func TestWorkerMetrics(t *testing.T) {
	m := NewMetrics()
	states := map[string]string{"kata": "open", "runc": "closed"}
	m.ObserveWorker(func() int { return 3 }, func() map[string]string { return states })
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		`buildfleet_breaker_state{state="open",target="kata"} 1`,
		`buildfleet_breaker_state{state="closed",target="kata"} 0`,
		`buildfleet_breaker_state{state="closed",target="runc"} 1`,
		`buildfleet_builds_in_flight 3`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

func TestTraceLogsAddTheSpan(t *testing.T) {
	var buf strings.Builder
	log := slog.New(TraceLogs(slog.NewJSONHandler(&buf, nil))).With("build", "b1")
	tid, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	sid, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	ctx := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid}))
	log.InfoContext(ctx, "with span")
	log.Info("without")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines: %q", len(lines), buf.String())
	}
	if !strings.Contains(lines[0], `"build":"b1"`) || !strings.Contains(lines[0], `"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"`) ||
		!strings.Contains(lines[0], `"span_id":"00f067aa0ba902b7"`) {
		t.Errorf("line logged with a span = %s; want build, trace_id and span_id", lines[0])
	}
	if strings.Contains(lines[1], "trace_id") {
		t.Errorf("line logged without a span carries a trace: %s", lines[1])
	}
}
