// Package events publishes lifecycle events: one CloudEvent per state a build enters, on the
// build's own subject, deduplicated by Nats-Msg-Id so replicas racing on the same transition
// publish it once.
package events

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

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

// PublishState publishes the event of a state rec has reached, now or earlier.
func (p *Publisher) PublishState(ctx context.Context, rec protocol.Record, state protocol.State) error {
	ev := protocol.EventForState(p.source, rec, state)
	_, err := p.js.Publish(ctx, p.layout.EventSubject(rec.ID), protocol.Marshal(ev), jetstream.WithMsgID(ev.ID))
	if err != nil {
		return fmt.Errorf("publish %s event of %s: %w", state, rec.ID, err)
	}
	return nil
}
