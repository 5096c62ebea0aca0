package record_test

import (
	"context"
	"errors"
	"sync"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/natstest"
	"github.com/buildfleet/buildfleet/internal/record"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func newStore(t *testing.T) *record.Store {
	t.Helper()
	nc := natstest.Connect(t, natstest.Start(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "RECORDS", History: 1})
	if err != nil {
		t.Fatal(err)
	}
	return record.NewStore(kv)
}

// Concurrent writers never lose an update: each Mutate re-reads and re-applies on conflict.
func TestMutateConcurrentWritersLoseNothing(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	const writers, each = 8, 10
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for range writers {
		wg.Go(func() {
			for range each {
				_, err := s.Mutate(ctx, "b1", func(r *protocol.Record, exists bool) error {
					if !exists {
						*r = protocol.Record{State: protocol.StateQueued}
					}
					r.Attempts++
					return nil
				})
				if err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Mutate: %v", err)
	}
	got, _, err := s.Get(ctx, "b1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Attempts != writers*each {
		t.Errorf("Attempts = %d after %d concurrent increments, want %d", got.Attempts, writers*each, writers*each)
	}
}

// Exactly one of many racing writers wins a terminal transition.
func TestMutateOneWinnerPerTransition(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if _, err := s.Mutate(ctx, "b2", func(r *protocol.Record, _ bool) error {
		r.State = protocol.StateRunning
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	errDone := errors.New("already finished")
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 10 {
		wg.Go(func() {
			_, err := s.Mutate(ctx, "b2", func(r *protocol.Record, _ bool) error {
				if r.State.Terminal() {
					return errDone
				}
				r.State, r.Replica = protocol.StateSucceeded, string(rune('a'+i))
				return nil
			})
			if err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			} else if !errors.Is(err, errDone) {
				t.Errorf("Mutate: %v", err)
			}
		})
	}
	wg.Wait()
	if wins != 1 {
		t.Errorf("%d writers won the terminal transition, want exactly 1", wins)
	}
}

func TestMutateNoChangeAndGet(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if _, _, err := s.Get(ctx, "nope"); !errors.Is(err, record.ErrNotFound) {
		t.Errorf("Get of a missing record = %v, want ErrNotFound", err)
	}
	rec, err := s.Mutate(ctx, "nope", func(*protocol.Record, bool) error { return record.ErrNoChange })
	if err != nil || rec.ID != "" {
		t.Errorf("Mutate with ErrNoChange on a missing record = %+v, %v; want the zero record, nil", rec, err)
	}
	if _, _, err := s.Get(ctx, "nope"); !errors.Is(err, record.ErrNotFound) {
		t.Errorf("ErrNoChange wrote a record: %v", err)
	}
}
