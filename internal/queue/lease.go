package queue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// ErrSettled is returned when a lease is settled a second time: every message is settled by
// exactly one verb.
var ErrSettled = errors.New("message already settled")

// Lease is a held message: while it is un-acked, the build it carries belongs to this replica.
// The Leases heartbeat keeps it alive with InProgress; exactly one of Ack, Nak or Term ends it.
type Lease struct {
	msg       jetstream.Msg
	Stream    uint64 // stream sequence: identifies this request among copies with the same id
	Delivered uint64 // how many times the server has delivered it, this time included

	// mu orders heartbeats and settlement: an InProgress sent after a NakWithDelay would
	// reset the server's timer and undo the delay.
	mu      sync.Mutex
	settled bool
}

// NewLease wraps a delivered message.
func NewLease(msg jetstream.Msg) (*Lease, error) {
	md, err := msg.Metadata()
	if err != nil {
		return nil, fmt.Errorf("message metadata: %w", err)
	}
	return &Lease{msg: msg, Stream: md.Sequence.Stream, Delivered: md.NumDelivered}, nil
}

// Msg is the leased message.
func (l *Lease) Msg() jetstream.Msg { return l.msg }

// settle runs verb once, under the lease's lock.
func (l *Lease) settle(verb func() error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.settled {
		return ErrSettled
	}
	l.settled = true
	return verb()
}

// heartbeat resets the server's ack timer unless the lease is settled.
func (l *Lease) heartbeat() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.settled {
		_ = l.msg.InProgress() // best effort; the next tick tries again
	}
}

// Ack ends the lease for good and waits for the server to confirm it, so a finished build
// is not redelivered.
func (l *Lease) Ack(ctx context.Context) error {
	return l.settle(func() error { return l.msg.DoubleAck(ctx) })
}

// Nak hands the message back for redelivery after delay (0: at once).
func (l *Lease) Nak(delay time.Duration) error {
	return l.settle(func() error {
		if delay <= 0 {
			return l.msg.Nak()
		}
		return l.msg.NakWithDelay(delay)
	})
}

// Term ends the lease for good: the message can never succeed.
func (l *Lease) Term(reason string) error {
	return l.settle(func() error { return l.msg.TermWithReason(reason) })
}

// Leases is the set of messages this replica holds. One heartbeat loop serves them all,
// instead of a timer per build.
type Leases struct {
	mu   sync.Mutex
	held map[*Lease]struct{}
}

// NewLeases returns an empty set.
func NewLeases() *Leases { return &Leases{held: make(map[*Lease]struct{})} }

// Add starts heartbeating l. The first heartbeat comes with the next tick, within a third
// of AckWait: a message fresh from a fetch sized to the free slots needs none sooner.
func (s *Leases) Add(l *Lease) {
	s.mu.Lock()
	s.held[l] = struct{}{}
	s.mu.Unlock()
}

// Remove stops heartbeating l.
func (s *Leases) Remove(l *Lease) {
	s.mu.Lock()
	delete(s.held, l)
	s.mu.Unlock()
}

// Len is the number of held messages.
func (s *Leases) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held)
}

// Heartbeat sends InProgress for every held, unsettled message every interval() (a third of
// AckWait keeps two chances in hand) until ctx ends.
func (s *Leases) Heartbeat(ctx context.Context, interval func() time.Duration) error {
	t := time.NewTimer(interval())
	defer t.Stop()
	var batch []*Lease
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		batch = batch[:0]
		s.mu.Lock()
		for l := range s.held {
			batch = append(batch, l)
		}
		s.mu.Unlock()
		for _, l := range batch {
			l.heartbeat()
		}
		t.Reset(interval())
	}
}

// DeadLetter keeps a copy of a message that can never succeed on the dead-letter stream,
// with why in its headers, so nothing is lost.
func DeadLetter(ctx context.Context, js jetstream.JetStream, layout protocol.Layout, kind string,
	l *Lease, reason protocol.Reason, message string) error {
	m := Copy(l.msg, layout.DeadLetterSubject(kind))
	m.Header.Set(protocol.HeaderRejectReason, string(reason))
	m.Header.Set(protocol.HeaderRejectMessage, truncate(message, 4096))
	if m.Header.Get(protocol.HeaderOrigSubject) == "" {
		// A run message carries its request's subject and sequence already.
		m.Header.Set(protocol.HeaderOrigSubject, l.msg.Subject())
		m.Header.Set(protocol.HeaderOrigSequence, fmt.Sprint(l.Stream))
	}
	m.Header.Set(protocol.HeaderDeliveries, fmt.Sprint(l.Delivered))
	// Dedupe a dead letter written twice for the same stream message (a redelivery after a
	// crash between the dead letter and the Term).
	m.Header.Set(protocol.HeaderMsgID, fmt.Sprintf("%s.%d", kind, l.Stream))
	if _, err := js.PublishMsg(ctx, m); err != nil {
		return fmt.Errorf("dead letter: %w", err)
	}
	return nil
}

// Copy is msg's body and headers on a message to subject, for another stream. Nats-* headers
// steer a publish (expected stream, TTL, rollup, dedupe id) and could make the other stream
// refuse the copy; everything else, trace context included, is kept.
func Copy(msg jetstream.Msg, subject string) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Data = msg.Data()
	for k, v := range msg.Headers() {
		if !strings.HasPrefix(k, "Nats-") {
			m.Header[k] = v
		}
	}
	return m
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
