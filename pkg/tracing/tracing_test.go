package tracing_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

const (
	traceID     = "4bf92f3577b34da6a3ce929d0e0e4736"
	parentID    = "00f067aa0ba902b7"
	traceparent = "00-" + traceID + "-" + parentID + "-01"
)

func init() { otel.SetTextMapPropagator(propagation.TraceContext{}) }

func TestHeaderCarrierMatchesAnyCase(t *testing.T) {
	for _, key := range []string{"traceparent", "Traceparent", "TRACEPARENT", "TraceParent"} {
		h := nats.Header{}
		h[key] = []string{traceparent} // as a non-Go producer writes it: no canonicalisation
		sc := trace.SpanContextFromContext(tracing.Extract(context.Background(), h))
		if got := sc.TraceID().String(); got != traceID || !sc.IsRemote() {
			t.Errorf("header %q: extracted trace %q (remote %v), want %q", key, got, sc.IsRemote(), traceID)
		}
	}
}

func TestHeaderCarrierSetReplacesCaseVariants(t *testing.T) {
	h := nats.Header{"TRACEPARENT": {"00-" + "11111111111111111111111111111111" + "-" + "2222222222222222" + "-01"}, "Other": {"x"}}
	ctx := trace.ContextWithSpanContext(context.Background(), mustSpanContext(t))
	tracing.Inject(ctx, h)
	if _, ok := h["TRACEPARENT"]; ok {
		t.Errorf("the old upper-case traceparent survived Inject: %v", h)
	}
	if got := h.Get("traceparent"); got != traceparent {
		t.Errorf("traceparent = %q, want %q", got, traceparent)
	}
	if h.Get("Other") != "x" {
		t.Errorf("Inject dropped an unrelated header: %v", h)
	}
}

func mustSpanContext(t *testing.T) trace.SpanContext {
	t.Helper()
	tid, err := trace.TraceIDFromHex(traceID)
	if err != nil {
		t.Fatal(err)
	}
	sid, err := trace.SpanIDFromHex(parentID)
	if err != nil {
		t.Fatal(err)
	}
	return trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled, Remote: true})
}

// TestThroughJetStream sends trace context the way producers in other languages do, with a
// header key that is not Go's canonical form, through a real JetStream stream, and checks
// that the consumer span continues that trace and links the producer; then that Publish's
// own headers come out the other end.
func TestThroughJetStream(t *testing.T) {
	srv := natstest.Start(t)
	nc := natstest.Connect(t, srv)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}})
	if err != nil {
		t.Fatal(err)
	}
	cons, err := stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatal(err)
	}
	raw := &nats.Msg{Subject: "t.from-python", Data: []byte("{}"), Header: nats.Header{"Traceparent": {traceparent}}}
	if _, err := js.PublishMsg(ctx, raw); err != nil {
		t.Fatal(err)
	}
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	msg := next(t, cons)
	pctx, span := tracing.StartProcess(context.Background(), tp, msg, "t.{id}", "c", attribute.String("k", "v"))
	// A publish under the process span: the same provider, the same trace.
	if _, err := tracing.Publish(pctx, js, nil, tracing.Destination{Subject: "t.onward", Template: "t.{id}"}, []byte("{}"), "onward-1"); err != nil {
		t.Fatal(err)
	}
	span.End()

	ended := rec.Ended()
	if len(ended) != 2 {
		t.Fatalf("%d spans ended, want 2 (send, process)", len(ended))
	}
	send, process := ended[0], ended[1]
	if got := process.SpanContext().TraceID().String(); got != traceID {
		t.Errorf("process span is in trace %s, want the producer's %s", got, traceID)
	}
	if got := process.Parent().SpanID().String(); got != parentID {
		t.Errorf("process span's parent = %s, want the producer's span %s", got, parentID)
	}
	if len(process.Links()) != 1 || process.Links()[0].SpanContext.SpanID().String() != parentID {
		t.Errorf("process span links = %v, want one link to the producer's span", process.Links())
	}
	if process.SpanKind() != trace.SpanKindConsumer || process.Name() != "process t.{id}" {
		t.Errorf("process span = %q kind %v, want \"process t.{id}\" consumer", process.Name(), process.SpanKind())
	}
	wantAttrs(t, process, map[string]string{"messaging.system": "nats", "messaging.destination.name": "t.from-python",
		"messaging.operation.type": "process", "messaging.consumer.group.name": "c", "k": "v"})
	if send.Parent().SpanID() != process.SpanContext().SpanID() || send.SpanKind() != trace.SpanKindProducer {
		t.Errorf("send span: parent %s kind %v; want a producer span under the process span", send.Parent().SpanID(), send.SpanKind())
	}
	wantAttrs(t, send, map[string]string{"messaging.system": "nats", "messaging.destination.name": "t.onward",
		"messaging.operation.type": "send", "messaging.message.id": "onward-1"})

	onward := next(t, cons)
	sc := trace.SpanContextFromContext(tracing.Extract(context.Background(), onward.Headers()))
	if sc.TraceID().String() != traceID || sc.SpanID() != send.SpanContext().SpanID() {
		t.Errorf("the published message carries %s/%s, want the send span %s/%s", sc.TraceID(), sc.SpanID(), traceID, send.SpanContext().SpanID())
	}
}

func next(t *testing.T, cons jetstream.Consumer) jetstream.Msg {
	t.Helper()
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for msg := range batch.Messages() {
		_ = msg.Ack()
		return msg
	}
	t.Fatalf("no message: %v", batch.Error())
	return nil
}

func wantAttrs(t *testing.T, s sdktrace.ReadOnlySpan, want map[string]string) {
	t.Helper()
	got := map[string]string{}
	for _, kv := range s.Attributes() {
		got[string(kv.Key)] = kv.Value.Emit()
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("span %q: %s = %q, want %q", s.Name(), k, got[k], v)
		}
	}
}

// TestRemoteParentUsesTheGlobalProvider: a context holding only a remote parent (extracted
// from a message, no span started here) must not lose the spans started under it.
func TestRemoteParentUsesTheGlobalProvider(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	old := otel.GetTracerProvider()
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)))
	t.Cleanup(func() { otel.SetTracerProvider(old) })
	ctx := trace.ContextWithRemoteSpanContext(context.Background(), mustSpanContext(t))
	_, span := tracing.Tracer(ctx).Start(ctx, "child")
	span.End()
	if got := len(rec.Ended()); got != 1 {
		t.Fatalf("%d spans recorded under a remote parent, want 1", got)
	}
	if p := rec.Ended()[0].Parent(); p.SpanID().String() != parentID {
		t.Errorf("the span's parent = %s, want the remote %s", p.SpanID(), parentID)
	}
}
