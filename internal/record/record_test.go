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
				_, changed, err := s.Mutate(ctx, "b1", func(r protocol.Record, exists bool) (protocol.Record, bool, error) {
					if !exists {
						r.State = protocol.StateQueued
					}
					r.Attempts++
					return r, true, nil
				})
				if err == nil && !changed {
					err = errors.New("a write reported no change")
				}
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
	if _, _, err := s.Mutate(ctx, "b2", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		r.State = protocol.StateRunning
		return r, true, nil
	}); err != nil {
		t.Fatal(err)
	}
	errDone := errors.New("already finished")
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 10 {
		wg.Go(func() {
			_, _, err := s.Mutate(ctx, "b2", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
				if r.State.Terminal() {
					return r, false, errDone
				}
				r.State, r.Replica = protocol.StateSucceeded, string(rune('a'+i))
				return r, true, nil
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
	rec, changed, err := s.Mutate(ctx, "nope", func(r protocol.Record, _ bool) (protocol.Record, bool, error) { return r, false, nil })
	if err != nil || changed || rec != (protocol.Record{ID: "nope"}) {
		t.Errorf("Mutate with no change on a missing record = %+v, %v, %v; want the ID alone, unchanged", rec, changed, err)
	}
	if _, _, err := s.Get(ctx, "nope"); !errors.Is(err, record.ErrNotFound) {
		t.Errorf("no change wrote a record: %v", err)
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
	inc := func(r protocol.Record, _ bool) (protocol.Record, bool, error) { r.Attempts++; return r, true, nil }
	for _, s := range []*record.Store{a, b, a, b, a} {
		if _, _, err := s.Mutate(ctx, "x", inc); err != nil {
			t.Fatal(err)
		}
	}
	got, _, err := a.Get(ctx, "x")
	if err != nil || got.Attempts != 5 {
		t.Fatalf("Attempts = %d (%v) after five increments from two stores, want 5", got.Attempts, err)
	}
	// b ends the build; a, remembering it running, must not write over the end.
	if _, _, err := b.Mutate(ctx, "x", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		r.State = protocol.StateAborted
		return r, true, nil
	}); err != nil {
		t.Fatal(err)
	}
	errDone := errors.New("finished")
	_, _, err = a.Mutate(ctx, "x", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		if r.State.Terminal() {
			return r, false, errDone
		}
		r.State = protocol.StateSucceeded
		return r, true, nil
	})
	if !errors.Is(err, errDone) {
		t.Errorf("a's Mutate over b's end = %v, want it to see the end", err)
	}
	// And a's fn refusing on its remembered copy is asked again on the stored one.
	if _, _, err := b.Mutate(ctx, "y", inc); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.Mutate(ctx, "y", inc); err != nil { // a remembers y at 2 attempts
		t.Fatal(err)
	}
	if _, _, err := b.Mutate(ctx, "y", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		r.Abort = true
		return r, true, nil
	}); err != nil {
		t.Fatal(err)
	}
	seen, changed, err := a.Mutate(ctx, "y", func(r protocol.Record, _ bool) (protocol.Record, bool, error) {
		if !r.Abort {
			return r, false, nil
		}
		r.AbortReason = "seen"
		return r, true, nil
	})
	if err != nil || !changed || seen.AbortReason != "seen" {
		t.Errorf("a's Mutate judged its stale copy: %+v, %v, %v", seen, changed, err)
	}
}
