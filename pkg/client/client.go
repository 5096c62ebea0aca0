// Package client is what producers and subscribers import: Submit and Stop builds, Watch their
// lifecycle events and read their Status, over NATS JetStream.
package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/trace"

	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// ErrNotFound is returned by Status for a build the fleet has no record of.
var ErrNotFound = errors.New("build not found")

// Client talks to one buildfleet installation.
type Client struct {
	js     jetstream.JetStream
	layout protocol.Layout
	source string
	tracer trace.Tracer // nil: the provider of the caller's span, or the global one
}

// Option configures a Client.
type Option func(*Client) error

// WithPrefix selects the installation by its subject prefix (default protocol.DefaultPrefix).
func WithPrefix(prefix string) Option {
	return func(c *Client) error {
		l, err := protocol.NewLayout(prefix)
		c.layout = l
		return err
	}
}

// WithSource names this producer in the source of the events it publishes.
func WithSource(source string) Option {
	return func(c *Client) error { c.source = source; return nil }
}

// WithTracerProvider makes Submit and Stop start their producer spans with tp, rather than
// with the provider of the caller's span or the global one.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *Client) error { c.tracer = tp.Tracer(tracing.ScopeName); return nil }
}

// New returns a client over an open NATS connection. The installation's streams must exist:
// a worker creates them when it starts.
func New(nc *nats.Conn, opts ...Option) (*Client, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	c := &Client{js: js, layout: protocol.Layout{Prefix: protocol.DefaultPrefix}, source: "buildfleet/client"}
	for _, o := range opts {
		if err := o(c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// SubmitResult says what Submit did.
type SubmitResult struct {
	// Duplicate is set when the build was already submitted: nothing new was queued.
	Duplicate bool
	// Record is the build's record as Submit left it.
	Record protocol.Record
}

// Submit validates req and queues it. It is idempotent by build id: submitting the same id
// again, at any time, queues nothing new (within the duplicate window the stream drops the
// copy; after it, the build record does). It publishes the `queued` event.
//
// Submit is the producer span of the build's trace: the request carries its context in W3C
// trace headers, and the fleet's spans, events and the build's pod continue it.
func (c *Client) Submit(ctx context.Context, req protocol.BuildRequest) (res SubmitResult, err error) {
	if err := req.Validate(); err != nil {
		return SubmitResult{}, err
	}
	dest := tracing.Destination{Subject: c.layout.RequestSubject(req.ID), Template: c.layout.RequestSubject("{id}")}
	ctx, span := tracing.StartSend(ctx, c.tracer, dest, req.ID, tracing.AttrBuildID.String(req.ID))
	defer func() {
		if err != nil {
			tracing.Fail(span, err)
		}
		span.SetAttributes(tracing.AttrDuplicate.Bool(res.Duplicate))
		span.End()
	}()
	// Each attempt is bounded: a publish whose acknowledgement was lost with a stream leader
	// would otherwise wait out the caller's whole deadline. Every step is idempotent, so an
	// attempt cut short is simply made again.
	published := false // an earlier attempt of this call may have stored the request
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		res, err = c.submit(actx, req, dest, &published)
		cancel()
		if err == nil || ctx.Err() != nil || !retryable(err) {
			return res, err
		}
		select {
		case <-ctx.Done():
			return res, err
		case <-time.After(min(time.Duration(attempt)*100*time.Millisecond, time.Second)):
		}
	}
}

// attemptTimeout bounds one attempt of Submit.
const attemptTimeout = 5 * time.Second

// retryable says whether a failed attempt may succeed if made again: NATS did not answer in
// time, or had no one to answer (a leader election).
func retryable(err error) bool {
	var api *jetstream.APIError
	if errors.As(err, &api) && api.Code == 503 {
		return true
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse)
}

// submit is one attempt of Submit. *published says an earlier attempt may have stored the
// request: a duplicate acknowledgement is then this call's own request, not a resubmission.
func (c *Client) submit(ctx context.Context, req protocol.BuildRequest, dest tracing.Destination, published *bool) (SubmitResult, error) {
	kv, err := c.records(ctx)
	if err != nil {
		return SubmitResult{}, err
	}
	rec := protocol.Record{ID: req.ID, State: protocol.StateQueued, QueuedAt: time.Now().UTC(),
		TimeoutSeconds: req.TimeoutSeconds}
	_, err = kv.Create(ctx, req.ID, protocol.Marshal(rec))
	if errors.Is(err, jetstream.ErrKeyExists) {
		existing, gerr := c.Status(ctx, req.ID)
		if gerr != nil {
			return SubmitResult{}, gerr
		}
		if existing.State != protocol.StateQueued {
			return SubmitResult{Duplicate: !*published, Record: existing}, nil
		}
		// Still queued: an earlier Submit may have stopped between the record and the
		// publish. Publish again; the stream drops it if the first one got through.
		rec, err = existing, nil
	}
	if err != nil {
		return SubmitResult{}, fmt.Errorf("create build record: %w", err)
	}
	msg := &nats.Msg{Subject: dest.Subject, Data: protocol.Marshal(req), Header: nats.Header{}}
	tracing.Inject(ctx, msg.Header)
	ours := *published
	*published = true
	ack, err := c.js.PublishMsg(ctx, msg, jetstream.WithMsgID(req.ID))
	if err != nil {
		return SubmitResult{}, fmt.Errorf("publish build request: %w", err)
	}
	duplicate := ack.Duplicate && !ours
	if !duplicate {
		// Deduplicated by its own id: sent again by an attempt after a lost acknowledgement.
		ev := protocol.EventFromRecord(c.source, rec)
		evDest := tracing.Destination{Subject: c.layout.EventSubject(req.ID), Template: c.layout.EventSubject("{id}")}
		if _, err := tracing.Publish(ctx, c.js, nil, evDest, protocol.Marshal(ev), ev.ID,
			tracing.AttrBuildID.String(req.ID), tracing.AttrState.String(string(rec.State))); err != nil {
			return SubmitResult{}, fmt.Errorf("publish queued event: %w", err)
		}
	}
	return SubmitResult{Duplicate: duplicate, Record: rec}, nil
}

// Stop asks the fleet to abort build id. It returns once the stop is stored; the build's
// `aborted` event follows (none if the build had already ended).
func (c *Client) Stop(ctx context.Context, id, reason string) error {
	s := protocol.StopRequest{ID: id, Reason: reason}
	if err := s.Validate(); err != nil {
		return err
	}
	dest := tracing.Destination{Subject: c.layout.StopSubject(id), Template: c.layout.StopSubject("{id}")}
	if _, err := tracing.Publish(ctx, c.js, c.tracer, dest, protocol.Marshal(s), "", tracing.AttrBuildID.String(id)); err != nil {
		return fmt.Errorf("publish stop: %w", err)
	}
	return nil
}

// Status returns the build record of id.
func (c *Client) Status(ctx context.Context, id string) (protocol.Record, error) {
	if !protocol.ValidID(id) {
		return protocol.Record{}, fmt.Errorf("invalid build id %q: must match %s", id, protocol.IDPattern)
	}
	kv, err := c.records(ctx)
	if err != nil {
		return protocol.Record{}, err
	}
	e, err := kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return protocol.Record{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return protocol.Record{}, fmt.Errorf("read build record: %w", err)
	}
	return decodeRecord(e.Value())
}

func (c *Client) records(ctx context.Context) (jetstream.KeyValue, error) {
	kv, err := c.js.KeyValue(ctx, c.layout.RecordBucket())
	if err != nil {
		return nil, fmt.Errorf("build record bucket %s (is a worker running?): %w", c.layout.RecordBucket(), err)
	}
	return kv, nil
}

// WatchOption configures Watch.
type WatchOption func(*jetstream.OrderedConsumerConfig)

// FromStart replays every stored event, also when watching all builds.
func FromStart() WatchOption {
	return func(c *jetstream.OrderedConsumerConfig) { c.DeliverPolicy = jetstream.DeliverAllPolicy }
}

// Watch yields lifecycle events in order. With an id it replays the build's events from the
// start and ends after the terminal one; with id "" it follows every build from now on until
// ctx ends. The iteration ends with an error when the events cannot be read.
func (c *Client) Watch(ctx context.Context, id string, opts ...WatchOption) iter.Seq2[protocol.Event, error] {
	return func(yield func(protocol.Event, error) bool) {
		cfg := jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{c.layout.AllEvents()},
			DeliverPolicy:  jetstream.DeliverNewPolicy,
		}
		if id != "" {
			if !protocol.ValidID(id) {
				yield(protocol.Event{}, fmt.Errorf("invalid build id %q: must match %s", id, protocol.IDPattern))
				return
			}
			cfg.FilterSubjects = []string{c.layout.EventSubject(id)}
			cfg.DeliverPolicy = jetstream.DeliverAllPolicy
		}
		for _, o := range opts {
			o(&cfg)
		}
		cons, err := c.js.OrderedConsumer(ctx, c.layout.EventStream(), cfg)
		if err != nil {
			yield(protocol.Event{}, fmt.Errorf("watch events (is a worker running?): %w", err))
			return
		}
		it, err := cons.Messages()
		if err != nil {
			yield(protocol.Event{}, fmt.Errorf("watch events: %w", err))
			return
		}
		defer it.Stop()
		stop := context.AfterFunc(ctx, it.Stop)
		defer stop()
		for {
			msg, err := it.Next()
			if err != nil {
				if ctx.Err() != nil {
					yield(protocol.Event{}, ctx.Err())
				} else if !errors.Is(err, jetstream.ErrMsgIteratorClosed) {
					yield(protocol.Event{}, fmt.Errorf("watch events: %w", err))
				}
				return
			}
			ev, err := protocol.DecodeEvent(msg.Data())
			if err != nil {
				err = fmt.Errorf("event on %s: %w", msg.Subject(), err)
			}
			if !yield(ev, err) {
				return
			}
			if id != "" && ev.Data.State.Terminal() {
				return
			}
		}
	}
}

func decodeRecord(data []byte) (protocol.Record, error) {
	var r protocol.Record
	if err := json.Unmarshal(data, &r); err != nil {
		return protocol.Record{}, fmt.Errorf("decode build record: %w", err)
	}
	return r, nil
}
