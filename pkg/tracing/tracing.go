// Package tracing carries OpenTelemetry trace context through NATS message headers and
// names the spans of publishing and processing messages after the OpenTelemetry messaging
// conventions (messaging.system=nats). Producers use it through pkg/client; the fleet uses
// it for requests, stops and lifecycle events, so that one trace runs from a Submit to the
// build's terminal event and on into the build's pod.
//
// Spans come from the tracer provider of the span already in the context, or from the global
// one (otel.GetTracerProvider) when there is none; context is injected and extracted with the
// global propagator (otel.GetTextMapPropagator). A program that configures neither exports
// nothing and carries nothing, as OpenTelemetry instrumentation does by default.
package tracing

import (
	"context"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"
)

// ScopeName is the instrumentation scope of every buildfleet span.
const ScopeName = "github.com/buildfleet/buildfleet"

// Attribute keys of buildfleet's own span attributes.
const (
	AttrBuildID  = attribute.Key("buildfleet.build.id")
	AttrState    = attribute.Key("buildfleet.build.state")
	AttrReason   = attribute.Key("buildfleet.build.reason")
	AttrTarget   = attribute.Key("buildfleet.target")
	AttrDelivery = attribute.Key("buildfleet.delivery")
	AttrTenant   = attribute.Key("buildfleet.tenant")
	AttrPriority = attribute.Key("buildfleet.priority")
	// AttrDuplicate marks a publish the stream dropped as a duplicate of one it has.
	AttrDuplicate = attribute.Key("buildfleet.duplicate")
)

// HeaderCarrier adapts NATS message headers to an OpenTelemetry TextMapCarrier.
//
// NATS header keys are case-sensitive (nats.Header is a plain map, unlike http.Header), and a
// producer written in another language may send "Traceparent" or "TRACEPARENT" where a Go
// propagator asks for "traceparent": Get falls back to a case-insensitive match, and Set
// replaces every case variant of its key, so a message never carries two trace contexts.
type HeaderCarrier nats.Header

// Get returns the first value of key, matched exactly or else ignoring case.
func (c HeaderCarrier) Get(key string) string {
	if v := c[key]; len(v) > 0 {
		return v[0]
	}
	for k, v := range c {
		if len(v) > 0 && strings.EqualFold(k, key) {
			return v[0]
		}
	}
	return ""
}

// Set sets key to value, dropping any variant of key that differs only in case.
func (c HeaderCarrier) Set(key, value string) {
	for k := range c {
		if k != key && strings.EqualFold(k, key) {
			delete(c, k)
		}
	}
	c[key] = []string{value}
}

// Keys lists the header keys.
func (c HeaderCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

var _ propagation.TextMapCarrier = HeaderCarrier{}

// Inject writes the trace context of ctx into h.
func Inject(ctx context.Context, h nats.Header) {
	otel.GetTextMapPropagator().Inject(ctx, HeaderCarrier(h))
}

// Extract returns ctx with the remote trace context h carries, if any.
func Extract(ctx context.Context, h nats.Header) context.Context {
	if h == nil {
		return ctx
	}
	return otel.GetTextMapPropagator().Extract(ctx, HeaderCarrier(h))
}

// W3C returns the W3C traceparent and tracestate of the span in ctx, whatever propagators
// are configured: that is the format of the TRACEPARENT and TRACESTATE environment variables
// a workload continues the trace from. Both are empty when ctx holds no valid span.
func W3C(ctx context.Context) (traceparent, tracestate string) {
	m := propagation.MapCarrier{}
	propagation.TraceContext{}.Inject(ctx, m)
	return m["traceparent"], m["tracestate"]
}

// Tracer is the buildfleet tracer of the provider behind ctx's span, or of the global
// provider when ctx holds none of this process's spans (a remote parent extracted from a
// message has no provider: its placeholder's would record nothing).
func Tracer(ctx context.Context) trace.Tracer {
	if span := trace.SpanFromContext(ctx); span.SpanContext().IsValid() && !span.SpanContext().IsRemote() {
		return span.TracerProvider().Tracer(ScopeName)
	}
	return otel.GetTracerProvider().Tracer(ScopeName)
}

// Destination describes where a message goes: its subject and the subject's template
// (low-cardinality, for span names: "buildfleet.requests.{id}").
type Destination struct {
	Subject  string
	Template string
}

// messaging are the attributes every NATS messaging span carries.
func messaging(d Destination, op string, opType attribute.KeyValue) []attribute.KeyValue {
	return []attribute.KeyValue{
		semconv.MessagingSystemKey.String("nats"),
		semconv.MessagingDestinationName(d.Subject),
		semconv.MessagingDestinationTemplate(d.Template),
		semconv.MessagingOperationName(op),
		opType,
	}
}

// StartSend starts the producer span ("send <template>") of a message to d with tracer (nil:
// Tracer(ctx)). msgID, if set, is the message's Nats-Msg-Id. Inject the returned context into
// the message's headers.
func StartSend(ctx context.Context, tracer trace.Tracer, d Destination, msgID string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if tracer == nil {
		tracer = Tracer(ctx)
	}
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(messaging(d, "publish", semconv.MessagingOperationTypeSend)...),
		trace.WithAttributes(attrs...),
	}
	if msgID != "" {
		opts = append(opts, trace.WithAttributes(semconv.MessagingMessageID(msgID)))
	}
	return tracer.Start(ctx, "send "+d.Template, opts...)
}

// Publish publishes data to JetStream under a producer span started with tracer (nil:
// Tracer(ctx)), carrying the span's context in the message headers. msgID, if set, is the
// Nats-Msg-Id the stream deduplicates by.
func Publish(ctx context.Context, js jetstream.JetStream, tracer trace.Tracer, d Destination, data []byte, msgID string, attrs ...attribute.KeyValue) (*jetstream.PubAck, error) {
	ctx, span := StartSend(ctx, tracer, d, msgID, attrs...)
	defer span.End()
	msg := &nats.Msg{Subject: d.Subject, Data: data, Header: nats.Header{}}
	Inject(ctx, msg.Header)
	var opts []jetstream.PublishOpt
	if msgID != "" {
		opts = append(opts, jetstream.WithMsgID(msgID))
	}
	ack, err := js.PublishMsg(ctx, msg, opts...)
	if err != nil {
		Fail(span, err)
		return nil, err
	}
	if ack.Duplicate {
		span.SetAttributes(AttrDuplicate.Bool(true))
	}
	return ack, nil
}

// StartProcess starts the consumer span ("process <template>") of a delivered message. The
// span continues the producer's trace, so that a build is one trace from its Submit on, and
// also links to the producer's span, as the messaging conventions ask of a consumer.
func StartProcess(ctx context.Context, tp trace.TracerProvider, msg jetstream.Msg, template, consumer string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return StartProcessSince(ctx, tp, msg, template, consumer, time.Time{}, attrs...)
}

// StartProcessSince is StartProcess for a span that began at since (zero: now): a message
// processed from the moment it arrived, with nothing held while it waited.
func StartProcessSince(ctx context.Context, tp trace.TracerProvider, msg jetstream.Msg, template, consumer string, since time.Time, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	ctx = Extract(ctx, msg.Headers())
	d := Destination{Subject: msg.Subject(), Template: template}
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(messaging(d, "process", semconv.MessagingOperationTypeProcess)...),
		trace.WithAttributes(semconv.MessagingConsumerGroupName(consumer)),
		trace.WithAttributes(attrs...),
	}
	if producer := trace.SpanContextFromContext(ctx); producer.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: producer}))
	}
	if id := msg.Headers().Get(jetstream.MsgIDHeader); id != "" {
		opts = append(opts, trace.WithAttributes(semconv.MessagingMessageID(id)))
	}
	if !since.IsZero() {
		opts = append(opts, trace.WithTimestamp(since))
	}
	return tp.Tracer(ScopeName).Start(ctx, "process "+template, opts...)
}

// Fail records err on span and marks it failed.
func Fail(span trace.Span, err error) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
}
