package record_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/record"
)

func livenessBucket(t *testing.T, ttl time.Duration) jetstream.KeyValue {
	t.Helper()
	nc := natstest.Connect(t, natstest.Start(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "REPLICAS", History: 1, TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// An incarnation whose key expired is gone for good: others see it dead, and its own
// renewal, a compare-and-set on the revision it last wrote, can never bring it back.
func TestExpiredIncarnationNeverComesBack(t *testing.T) {
	kv := livenessBucket(t, time.Second)
	ctx := context.Background()
	var mu sync.Mutex
	var killAt []time.Time
	l := record.NewLiveness(kv, "a", slog.Default())
	l.OnValid = func(at time.Time) { mu.Lock(); killAt = append(killAt, at); mu.Unlock() }
	start := time.Now()
	inc, err := l.Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if alive, err := l.Alive(ctx, inc.Token); err != nil || !alive {
		t.Fatalf("Alive(own key) = %v, %v; want true", alive, err)
	}
	mu.Lock()
	// The kill deadline lies before the earliest moment the server may expire the key.
	if len(killAt) != 1 || !killAt[0].Before(start.Add(time.Second)) {
		t.Errorf("kill deadlines %v; want one, within the TTL of the registration", killAt)
	}
	mu.Unlock()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		alive, err := l.Alive(ctx, inc.Token)
		if err != nil {
			t.Fatal(err)
		}
		if !alive {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the key did not expire within 10s of a 1s TTL")
		}
	}
	if inc.Valid() {
		t.Errorf("the incarnation says it is valid after its key expired")
	}
	// What the renewal would do: it must fail.
	if _, err := kv.Update(ctx, inc.Token, []byte("{}"), 1); err == nil {
		t.Errorf("an expired key was renewed")
	}
}

// Run notices a key that is gone (deleted, as an expiry would), ends the incarnation, lets
// the replica stand down, and only then registers a new one.
func TestRunReplacesALostIncarnation(t *testing.T) {
	kv := livenessBucket(t, 3*time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l := record.NewLiveness(kv, "a", slog.Default())
	first, err := l.Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- l.Run(ctx, func() {
			if first.Context().Err() == nil || !errors.Is(context.Cause(first.Context()), record.ErrIncarnationLost) {
				t.Errorf("stand-down called before the incarnation ended: %v", context.Cause(first.Context()))
			}
			if l.Current() != first {
				t.Errorf("a new incarnation was registered before the stand-down finished")
			}
			close(lost)
		})
	}()
	if err := kv.Delete(ctx, first.Token); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not notice its key was gone")
	}
	for deadline := time.Now().Add(10 * time.Second); l.Current() == first; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no new incarnation within 10s")
		}
	}
	next := l.Current()
	if next.Token == first.Token || !next.Valid() {
		t.Errorf("new incarnation %q valid=%v; want a new, valid token", next.Token, next.Valid())
	}
	if alive, _ := l.Alive(ctx, next.Token); !alive {
		t.Errorf("the new incarnation has no key")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}
