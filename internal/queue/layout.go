// Package queue owns buildfleet's JetStream resources: the streams, consumers and bucket
// it provisions, the message lease that holds a build, and the dead-letter stream.
package queue

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// LayoutConfig sizes the resources Provision creates.
type LayoutConfig struct {
	Layout           protocol.Layout
	Replicas         int           // stream replicas (1 in dev, 3 in a production NATS cluster)
	DuplicateWindow  time.Duration // Nats-Msg-Id dedupe window for requests and events
	EventsMaxAge     time.Duration
	DeadLetterMaxAge time.Duration
	LogsMaxAge       time.Duration // build output retention
	LogsMaxBytes     int64         // 0: no cap beyond the age
	StopsMaxAge      time.Duration // 0 = one day
	RecordTTL        time.Duration
	// LivenessTTL is how long a replica's liveness key outlives its last renewal.
	LivenessTTL time.Duration
	AckWait     time.Duration
	// MaxAckPending is the run consumer's: the fleet-wide cap on admitted (running) builds.
	MaxAckPending int
	// QueueHold is the request consumer's MaxAckPending: how many waiting builds the
	// scheduler holds and orders by fair share; more wait in the stream, in arrival order,
	// until it has room (0: DefaultQueueHold).
	QueueHold int
	// PinnedTTL is how long the scheduler may go without pulling before another replica is
	// pinned in its place (0: DefaultPinnedTTL).
	PinnedTTL time.Duration
}

// Defaults for the LayoutConfig fields left at zero.
const (
	DefaultQueueHold = 10_000
	DefaultPinnedTTL = 5 * time.Second
)

// maxStoredMsg is the streams' limit for one message: a request or stop at the contract's
// limit plus its headers (trace context, dedupe id).
const maxStoredMsg = protocol.MaxMessageBytes + 32<<10

// Provisioned is what Provision returns: the handles the worker and the client use.
type Provisioned struct {
	Requests   jetstream.Consumer // the queue: the scheduler holds what waits from here
	Runs       jetstream.Consumer // admitted builds: the runners hold what runs from here
	RunStream  jetstream.Stream
	Stops      jetstream.Consumer
	StopStream jetstream.Stream
	LogStream  jetstream.Stream
	Records    jetstream.KeyValue
	Replicas   jetstream.KeyValue // one liveness key per replica incarnation
}

// Streams returns the stream configurations of the layout, in creation order.
func (c LayoutConfig) Streams() []jetstream.StreamConfig {
	l := c.Layout
	stopsAge := c.StopsMaxAge
	if stopsAge == 0 {
		stopsAge = 24 * time.Hour
	}
	return []jetstream.StreamConfig{
		{
			// A work queue: each request is removed once a replica settles it for good.
			Name:        l.RequestStream(),
			Description: "buildfleet build requests (work queue)",
			Subjects:    []string{l.RequestSubject("*")},
			Retention:   jetstream.WorkQueuePolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			Duplicates:  c.DuplicateWindow,
			MaxMsgSize:  maxStoredMsg,
		},
		{
			// Admitted builds, one subject per target and tenant: the subject counts are
			// the fleet's running builds by target and tenant. Deduplicated by build id, so
			// that a build admitted twice (a scheduler that died between admitting and
			// settling its request) is stored once.
			Name:        l.RunStream(),
			Description: "buildfleet admitted builds, by target and tenant (work queue)",
			Subjects:    []string{l.AllRuns()},
			Retention:   jetstream.WorkQueuePolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			Duplicates:  c.DuplicateWindow,
			MaxMsgSize:  maxStoredMsg,
		},
		{
			// Stops have their own stream so an abort is never queued behind builds. Limits
			// retention lets every replica also read them (to kill what it runs itself)
			// while the shared durable consumer makes sure each is applied once.
			Name:        l.StopStream(),
			Description: "buildfleet stop requests",
			Subjects:    []string{l.StopSubject("*")},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			MaxAge:      stopsAge,
			Duplicates:  c.DuplicateWindow,
			MaxMsgSize:  maxStoredMsg,
		},
		{
			Name:        l.EventStream(),
			Description: "buildfleet lifecycle events (CloudEvents)",
			Subjects:    []string{l.AllEvents()},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			MaxAge:      c.EventsMaxAge,
			Duplicates:  c.DuplicateWindow,
		},
		{
			// Build output, chunk by chunk, one subject per build. Chunks are appended by
			// compare-and-set on the subject's last sequence, and the middle of an
			// over-long log is deleted chunk by chunk.
			Name:        l.LogStream(),
			Description: "buildfleet build output, in ordered chunks",
			Subjects:    []string{l.AllLogs()},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			MaxAge:      c.LogsMaxAge,
			MaxBytes:    unlimited(c.LogsMaxBytes),
			Discard:     jetstream.DiscardOld,
			MaxMsgSize:  maxStoredMsg,
		},
		{
			Name:        l.DeadLetterStream(),
			Description: "buildfleet requests that can never succeed, with the reason in headers",
			Subjects:    []string{l.DeadLetterSubject("*")},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Replicas:    c.Replicas,
			MaxAge:      c.DeadLetterMaxAge,
			Duplicates:  c.DuplicateWindow,
		},
	}
}

// Consumers returns the durable consumer configurations: stream name → config.
func (c LayoutConfig) Consumers() map[string]jetstream.ConsumerConfig {
	l := c.Layout
	hold, pinned := c.QueueHold, c.PinnedTTL
	if hold <= 0 {
		hold = DefaultQueueHold
	}
	if pinned <= 0 {
		pinned = DefaultPinnedTTL
	}
	return map[string]jetstream.ConsumerConfig{
		l.RequestStream(): {
			Durable:     l.WorkerConsumer(),
			Description: "buildfleet queue: the pinned replica holds waiting builds and admits them by fair share",
			AckPolicy:   jetstream.AckExplicitPolicy,
			AckWait:     c.AckWait,
			// A waiting build's message is held by the scheduler until it is admitted: the
			// consumer's lag is what waits, whatever runs.
			MaxAckPending: hold,
			// One replica at a time schedules: the server pins the group to one client and
			// moves the pin when that client stops pulling for PinnedTTL.
			PriorityPolicy: jetstream.PriorityPolicyPinned,
			PriorityGroups: []string{l.SchedulerGroup()},
			PinnedTTL:      pinned,
			MaxDeliver:     -1, // as the run consumer's
		},
		l.RunStream(): {
			Durable:     l.RunConsumer(),
			Description: "buildfleet replicas: every replica pulls admitted builds from here",
			AckPolicy:   jetstream.AckExplicitPolicy,
			AckWait:     c.AckWait,
			// MaxAckPending is the fleet-wide cap on running builds: a running build holds
			// its message un-acked until the build ends.
			MaxAckPending: c.MaxAckPending,
			// The server never gives up on a request by itself: the worker counts failed
			// deliveries (handovers excepted) against BUILDFLEET_MAX_DELIVER and ends the build
			// as failed/dispatch_exhausted with a dead letter. A server-side MaxDeliver would
			// strand a build silently when a replica crashed on its last delivery, and would
			// count graceful handovers (rolling updates) as failures.
			MaxDeliver: -1,
		},
		l.StopStream(): {
			Durable:       l.StopConsumer(),
			Description:   "buildfleet replicas: every stop is applied once from here",
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       c.AckWait,
			MaxAckPending: 1000,
			MaxDeliver:    -1,
		},
	}
}

// KeyValue returns the build record bucket configuration.
func (c LayoutConfig) KeyValue() jetstream.KeyValueConfig {
	return c.bucket(c.Layout.RecordBucket(), "buildfleet build records, one key per build, written by compare-and-set", c.RecordTTL)
}

// ReplicaBucket returns the liveness bucket configuration: one key per replica
// incarnation, renewed by its replica and gone LivenessTTL after the last renewal.
func (c LayoutConfig) ReplicaBucket() jetstream.KeyValueConfig {
	return c.bucket(c.Layout.ReplicaBucket(), "buildfleet replica liveness: one key per replica incarnation, renewed while it lives", c.LivenessTTL)
}

// bucket is a KV bucket of the layout: the latest value of each key only, on file storage.
func (c LayoutConfig) bucket(name, description string, ttl time.Duration) jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{Bucket: name, Description: description, History: 1, TTL: ttl,
		Storage: jetstream.FileStorage, Replicas: c.Replicas}
}

// Provision creates the layout, or brings an existing one to this configuration. It is
// idempotent: a second replica starting with the same configuration changes nothing, since
// a resource is only updated when its configuration differs.
func Provision(ctx context.Context, js jetstream.JetStream, c LayoutConfig) (Provisioned, error) {
	for _, sc := range c.Streams() {
		if err := ensureStream(ctx, js, sc); err != nil {
			return Provisioned{}, err
		}
	}
	var p Provisioned
	stops, err := js.Stream(ctx, c.Layout.StopStream())
	if err != nil {
		return Provisioned{}, fmt.Errorf("stream %s: %w", c.Layout.StopStream(), err)
	}
	p.StopStream = stops
	if p.RunStream, err = js.Stream(ctx, c.Layout.RunStream()); err != nil {
		return Provisioned{}, fmt.Errorf("stream %s: %w", c.Layout.RunStream(), err)
	}
	if p.LogStream, err = js.Stream(ctx, c.Layout.LogStream()); err != nil {
		return Provisioned{}, fmt.Errorf("stream %s: %w", c.Layout.LogStream(), err)
	}
	for stream, cc := range c.Consumers() {
		cons, err := js.CreateOrUpdateConsumer(ctx, stream, cc)
		if err != nil {
			return Provisioned{}, fmt.Errorf("consumer %s on %s: %w", cc.Durable, stream, err)
		}
		switch stream {
		case c.Layout.RequestStream():
			p.Requests = cons
		case c.Layout.RunStream():
			p.Runs = cons
		default:
			p.Stops = cons
		}
	}
	if p.Records, err = ensureBucket(ctx, js, c.KeyValue(), false); err != nil {
		return Provisioned{}, err
	}
	// The liveness TTL is only ever raised in place. Lowered under running replicas, it would
	// expire keys before the deadlines their replicas computed from the old TTL: another
	// replica could take over a build its owner still runs. (Lowering it takes a fleet
	// stopped and the bucket deleted.)
	if p.Replicas, err = ensureBucket(ctx, js, c.ReplicaBucket(), true); err != nil {
		return Provisioned{}, err
	}
	return p, nil
}

// ensureBucket creates a KV bucket, or brings a changed TTL or history to an existing one;
// with raiseOnly, a shorter TTL than the bucket has is not applied.
func ensureBucket(ctx context.Context, js jetstream.JetStream, want jetstream.KeyValueConfig, raiseOnly bool) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, want.Bucket)
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		kv, err = js.CreateKeyValue(ctx, want)
		if errors.Is(err, jetstream.ErrBucketExists) { // another replica won the race
			kv, err = js.KeyValue(ctx, want.Bucket)
		}
	case err == nil:
		var st jetstream.KeyValueStatus
		if st, err = kv.Status(ctx); err != nil {
			break
		}
		if raiseOnly && st.TTL() > want.TTL {
			want.TTL = st.TTL()
		}
		if st.TTL() != want.TTL || st.History() != int64(want.History) {
			kv, err = js.UpdateKeyValue(ctx, want)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", want.Bucket, err)
	}
	return kv, nil
}

func ensureStream(ctx context.Context, js jetstream.JetStream, sc jetstream.StreamConfig) error {
	s, err := js.Stream(ctx, sc.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		_, err = js.CreateStream(ctx, sc)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return nil // another replica created it at the same moment
		}
		if err != nil {
			return fmt.Errorf("create stream %s: %w", sc.Name, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("stream %s: %w", sc.Name, err)
	}
	if streamMatches(s.CachedInfo().Config, sc) {
		return nil
	}
	if _, err := js.UpdateStream(ctx, sc); err != nil {
		return fmt.Errorf("update stream %s: %w", sc.Name, err)
	}
	return nil
}

// unlimited is a limit in the server's notation: -1 for none (it reports an unset limit so).
func unlimited[T int32 | int64](n T) T {
	if n <= 0 {
		return -1
	}
	return n
}

// streamMatches compares the fields Provision sets.
func streamMatches(have, want jetstream.StreamConfig) bool {
	if len(have.Subjects) != len(want.Subjects) {
		return false
	}
	for i := range want.Subjects {
		if have.Subjects[i] != want.Subjects[i] {
			return false
		}
	}
	replicas := want.Replicas
	if replicas == 0 {
		replicas = 1
	}
	return have.Retention == want.Retention && have.Storage == want.Storage &&
		have.Replicas == replicas && have.MaxAge == want.MaxAge &&
		have.Duplicates == want.Duplicates && unlimited(have.MaxBytes) == unlimited(want.MaxBytes) &&
		unlimited(have.MaxMsgSize) == unlimited(want.MaxMsgSize) &&
		have.Description == want.Description
}
