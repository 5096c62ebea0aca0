package cli

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/worker"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// TestOneTraceFromSubmitToPod runs a build as a pod on the real control plane with an
// in-memory span recorder behind both the producer and the replica, and checks that it
// makes one connected trace: Submit's producer span, the replica's process span (its child,
// linked to it), route, launch and pod create under it, one event span per lifecycle
// transition, and the pod's TRACEPARENT continuing it under the launch.
func TestOneTraceFromSubmitToPod(t *testing.T) {
	f := newKubeFleet(t, "10m")
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	f.start(f.settings("a"), func(c *worker.Config) { c.TracerProvider = tp })
	cl, err := client.New(f.nc, client.WithTracerProvider(tp))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req := sim("traced", map[string]string{"run-ms": "300"})
	req.Annotations[protocol.AnnotationTarget] = "kata"
	if _, err := cl.Submit(ctx, req); err != nil {
		t.Fatal(err)
	}
	evs := f.await("traced", 60*time.Second)
	if got := evs[len(evs)-1].Data.State; got != protocol.StateSucceeded {
		t.Fatalf("traced build ended %s, want succeeded", got)
	}
	// The process span ends once the delivery is settled, just after the terminal event.
	waitFor(t, 10*time.Second, "the process span ended", func() bool {
		return slices.ContainsFunc(rec.Ended(), func(s sdktrace.ReadOnlySpan) bool { return strings.HasPrefix(s.Name(), "process buildfleet.run.") })
	})
	spans := rec.Ended()
	byID := map[trace.SpanID]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		byID[s.SpanContext().SpanID()] = s
	}
	find := func(name string, match func(sdktrace.ReadOnlySpan) bool) sdktrace.ReadOnlySpan {
		t.Helper()
		for _, s := range spans {
			if s.Name() == name && (match == nil || match(s)) {
				return s
			}
		}
		t.Fatalf("no span %q among:\n%s", name, renderTrace(spans))
		return nil
	}
	submit := find("send buildfleet.requests.{id}", nil)
	traceID := submit.SpanContext().TraceID()
	if submit.Parent().IsValid() || submit.SpanKind() != trace.SpanKindProducer {
		t.Errorf("submit span: parent %v, kind %v; want the root, a producer", submit.Parent().SpanID(), submit.SpanKind())
	}
	attrs := func(s sdktrace.ReadOnlySpan) map[string]string {
		m := map[string]string{}
		for _, kv := range s.Attributes() {
			m[string(kv.Key)] = kv.Value.Emit()
		}
		return m
	}
	if a := attrs(submit); a["messaging.system"] != "nats" || a["messaging.destination.name"] != "buildfleet.requests.traced" ||
		a["messaging.operation.type"] != "send" || a["messaging.message.id"] != "traced" {
		t.Errorf("submit span attributes %v; want the messaging conventions for a NATS send", a)
	}
	// The scheduler's admission processes the request, from its arrival on; the runner's
	// span processes the admitted build, under it.
	admit := find("process buildfleet.requests.{id}", nil)
	if admit.Parent().SpanID() != submit.SpanContext().SpanID() || admit.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("admission span: parent %v kind %v; want a consumer span under submit", admit.Parent().SpanID(), admit.SpanKind())
	}
	if l := admit.Links(); len(l) != 1 || l[0].SpanContext.SpanID() != submit.SpanContext().SpanID() {
		t.Errorf("admission span links %v; want one, to the submit span", l)
	}
	if a := attrs(admit); a["messaging.consumer.group.name"] != "workers" || a[string(tracing.AttrTarget)] != "kata" ||
		a[string(tracing.AttrTenant)] != "default" {
		t.Errorf("admission span attributes %v", a)
	}
	process := find("process buildfleet.run.{target}.{tenant}", nil)
	if process.Parent().SpanID() != admit.SpanContext().SpanID() || process.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("process span: parent %v kind %v; want a consumer span under the admission", process.Parent().SpanID(), process.SpanKind())
	}
	if a := attrs(process); a["messaging.operation.type"] != "process" || a["messaging.consumer.group.name"] != "runners" ||
		a[string(tracing.AttrState)] != "succeeded" || a["messaging.destination.name"] != "buildfleet.run.kata.default" {
		t.Errorf("process span attributes %v", a)
	}
	route := find("route", nil)
	launch := find("launch", nil)
	create := find("create pod", nil)
	for _, c := range []struct {
		child, parent sdktrace.ReadOnlySpan
	}{{route, process}, {launch, process}, {create, launch}} {
		if c.child.Parent().SpanID() != c.parent.SpanContext().SpanID() {
			t.Errorf("span %q has parent %v, want %q", c.child.Name(), c.child.Parent().SpanID(), c.parent.Name())
		}
	}
	if a := attrs(route); a[string(tracing.AttrTarget)] != "kata" {
		t.Errorf("route span attributes %v, want target kata", a)
	}
	if a := attrs(create); a["k8s.pod.name"] != "build-traced" || a["k8s.namespace.name"] != f.ns || create.SpanKind() != trace.SpanKindClient {
		t.Errorf("create pod span: %v kind %v", a, create.SpanKind())
	}
	for state, parent := range map[protocol.State]sdktrace.ReadOnlySpan{
		protocol.StateQueued: submit, protocol.StateDispatched: process, protocol.StateRunning: process, protocol.StateSucceeded: process,
	} {
		ev := find("send buildfleet.events.{id}", func(s sdktrace.ReadOnlySpan) bool { return attrs(s)[string(tracing.AttrState)] == string(state) })
		if ev.Parent().SpanID() != parent.SpanContext().SpanID() {
			t.Errorf("%s event span's parent is %v, want %q", state, ev.Parent().SpanID(), parent.Name())
		}
	}
	// One connected trace: every span in it, each one's parent recorded, one root.
	roots := 0
	for _, s := range spans {
		if s.SpanContext().TraceID() != traceID {
			t.Errorf("span %q is in trace %s, want %s", s.Name(), s.SpanContext().TraceID(), traceID)
		}
		if !s.Parent().IsValid() {
			roots++
		} else if _, ok := byID[s.Parent().SpanID()]; !ok {
			t.Errorf("span %q has a parent that was not recorded", s.Name())
		}
	}
	if roots != 1 {
		t.Errorf("%d root spans, want 1", roots)
	}
	// The pod continues the trace under the launch.
	pod, err := f.pod("traced")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("00-%s-%s-01", traceID, launch.SpanContext().SpanID())
	var got string
	for _, e := range pod.Spec.Containers[0].Env {
		if e.Name == build.EnvTraceParent {
			got = e.Value
		}
	}
	if got != want {
		t.Errorf("pod TRACEPARENT = %q, want %q (the launch span)", got, want)
	}
	t.Logf("the build's trace:\n%s", renderTrace(spans))
}

// renderTrace draws spans as a tree, with durations, for logs and the README.
func renderTrace(spans []sdktrace.ReadOnlySpan) string {
	children := map[trace.SpanID][]sdktrace.ReadOnlySpan{}
	var roots []sdktrace.ReadOnlySpan
	known := map[trace.SpanID]bool{}
	for _, s := range spans {
		known[s.SpanContext().SpanID()] = true
	}
	for _, s := range spans {
		if p := s.Parent().SpanID(); s.Parent().IsValid() && known[p] {
			children[p] = append(children[p], s)
		} else {
			roots = append(roots, s)
		}
	}
	var b strings.Builder
	var walk func(s sdktrace.ReadOnlySpan, depth int)
	walk = func(s sdktrace.ReadOnlySpan, depth int) {
		extra := ""
		for _, kv := range s.Attributes() {
			switch kv.Key {
			case tracing.AttrState, tracing.AttrTarget, "k8s.pod.name":
				extra += fmt.Sprintf(" %s=%s", kv.Key, kv.Value.Emit())
			}
		}
		fmt.Fprintf(&b, "%s%s [%s] %s%s\n", strings.Repeat("  ", depth), s.Name(), s.SpanKind(),
			s.EndTime().Sub(s.StartTime()).Round(time.Millisecond), extra)
		kids := children[s.SpanContext().SpanID()]
		slices.SortFunc(kids, func(a, b sdktrace.ReadOnlySpan) int { return a.StartTime().Compare(b.StartTime()) })
		for _, k := range kids {
			walk(k, depth+1)
		}
	}
	for _, r := range roots {
		walk(r, 0)
	}
	return b.String()
}
