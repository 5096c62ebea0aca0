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

// Two stores on one bucket (two replicas): what one writes, the other's next Mutate sees,
// although it remembers an older revision.
func TestMutateAcrossStores(t *testing.T) {
	nc := natstest.Connect(t, natstest.Start(t))
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "RECORDS", History: 1})
	if err != nil {
		t.Fatal(err)
	}
	a, b := record.NewStore(kv), record.NewStore(kv)
	inc := func(r *protocol.Record, _ bool) error { r.Attempts++; return nil }
	for _, s := range []*record.Store{a, b, a, b, a} {
		if _, err := s.Mutate(ctx, "x", inc); err != nil {
			t.Fatal(err)
		}
	}
	got, _, err := a.Get(ctx, "x")
	if err != nil || got.Attempts != 5 {
		t.Fatalf("Attempts = %d (%v) after five increments from two stores, want 5", got.Attempts, err)
	}
	// b ends the build; a, remembering it running, must not write over the end.
	if _, err := b.Mutate(ctx, "x", func(r *protocol.Record, _ bool) error { r.State = protocol.StateAborted; return nil }); err != nil {
		t.Fatal(err)
	}
	errDone := errors.New("finished")
	_, err = a.Mutate(ctx, "x", func(r *protocol.Record, _ bool) error {
		if r.State.Terminal() {
			return errDone
		}
		r.State = protocol.StateSucceeded
		return nil
	})
	if !errors.Is(err, errDone) {
		t.Errorf("a's Mutate over b's end = %v, want it to see the end", err)
	}
	// And a's fn refusing on its remembered copy is asked again on the stored one.
	if _, err := b.Mutate(ctx, "y", inc); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Mutate(ctx, "y", inc); err != nil { // a remembers y at 2 attempts
		t.Fatal(err)
	}
	if _, err := b.Mutate(ctx, "y", func(r *protocol.Record, _ bool) error { r.Abort = true; return nil }); err != nil {
		t.Fatal(err)
	}
	seen, err := a.Mutate(ctx, "y", func(r *protocol.Record, _ bool) error {
		if !r.Abort {
			return record.ErrNoChange
		}
		r.AbortReason = "seen"
		return nil
	})
	if err != nil || seen.AbortReason != "seen" {
		t.Errorf("a's Mutate judged its stale copy: %+v, %v", seen, err)
	}
}
