// Package events publishes lifecycle events: one CloudEvent per state a build enters, on the
// build's own subject, deduplicated by Nats-Msg-Id so replicas racing on the same transition
// publish it once.
package events

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"

	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// publishTimeout bounds one publish and its acknowledgement.
const publishTimeout = 5 * time.Second

// Publisher publishes the events of one emitter.
type Publisher struct {
	js     jetstream.JetStream
	layout protocol.Layout
	source string
}

// NewPublisher names the emitter in each event's source attribute.
func NewPublisher(js jetstream.JetStream, layout protocol.Layout, source string) *Publisher {
	return &Publisher{js: js, layout: layout, source: source}
}

// Publish publishes the event for the state rec is in now and waits for the stream to store it.
func (p *Publisher) Publish(ctx context.Context, rec protocol.Record) error {
	return p.PublishState(ctx, rec, rec.State)
}

// PublishState publishes the event of a state rec has reached, now or earlier. Each publish
// is a span of the trace in ctx (the build's), and the event carries its context, so a
// subscriber can continue the build's trace.
func (p *Publisher) PublishState(ctx context.Context, rec protocol.Record, state protocol.State) error {
	ev := protocol.EventForState(p.source, rec, state)
	dest := tracing.Destination{Subject: p.layout.EventSubject(rec.ID), Template: p.layout.EventSubject("{id}")}
	attrs := []attribute.KeyValue{tracing.AttrBuildID.String(rec.ID), tracing.AttrState.String(string(state))}
	if state == rec.State && rec.Reason != "" {
		attrs = append(attrs, tracing.AttrReason.String(string(rec.Reason)))
	}
	// Bounded whatever the caller's deadline: an acknowledgement lost with a stream leader
	// must not hold the build up until its own deadline.
	pctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	_, err := tracing.Publish(pctx, p.js, nil, dest, protocol.Marshal(ev), ev.ID, attrs...)
	if err != nil {
		return fmt.Errorf("publish %s event of %s: %w", state, rec.ID, err)
	}
	return nil
}
