// Package record keeps the build record: one JetStream KV key per build, only ever written by
// compare-and-set on its revision, so two replicas can never both win a transition.
package record

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// ErrNotFound is returned by Get for a build with no record.
var ErrNotFound = errors.New("no build record")

// opTimeout bounds each read or write of the bucket, whatever deadline the caller's context
// has: a write whose acknowledgement was lost with a stream leader would otherwise wait out a
// build's whole deadline (JetStream applies its default timeout only to a context with none).
const opTimeout = 5 * time.Second

// maxConflicts bounds the compare-and-set retries of one Mutate. Writers of one record are
// few (the holder, a stop), so running out means something is badly wrong.
const maxConflicts = 64

// Store reads and writes build records.
type Store struct {
	kv jetstream.KeyValue

	// known holds the last record this store read or wrote for each build it is working on,
	// with its revision, so that the next Mutate can write at once instead of reading first.
	// A stale entry costs one failed compare-and-set and a read: it can never win.
	mu    sync.Mutex
	known map[string]knownRecord
}

type knownRecord struct {
	rec protocol.Record
	rev uint64
}

// maxKnown bounds the remembered records; past it the memory starts afresh.
const maxKnown = 100_000

// NewStore uses the given bucket.
func NewStore(kv jetstream.KeyValue) *Store { return &Store{kv: kv, known: map[string]knownRecord{}} }

func (s *Store) remember(id string, r protocol.Record, rev uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.State.Terminal() {
		delete(s.known, id) // nothing more to write, as a rule
		return
	}
	if len(s.known) >= maxKnown {
		clear(s.known)
	}
	s.known[id] = knownRecord{rec: r, rev: rev}
}

func (s *Store) recall(id string) (protocol.Record, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.known[id]
	return k.rec, k.rev, ok
}

// Forget drops what the store remembers of build id: the build is no longer worked on here.
func (s *Store) Forget(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.known, id)
}

// Get returns the record of build id and its revision.
func (s *Store) Get(ctx context.Context, id string) (protocol.Record, uint64, error) {
	octx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	e, err := s.kv.Get(octx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return protocol.Record{}, 0, ErrNotFound
	}
	if err != nil {
		return protocol.Record{}, 0, fmt.Errorf("get record %s: %w", id, err)
	}
	var r protocol.Record
	if err := json.Unmarshal(e.Value(), &r); err != nil {
		return protocol.Record{}, 0, fmt.Errorf("decode record %s: %w", id, err)
	}
	return r, e.Revision(), nil
}

// Step is one transition of a record: given the stored record (or, when there is none,
// exists false and a record holding only the ID) it returns the record to write, whether
// that changes anything, or an error that leaves the record as it is. It must be a pure
// function of its arguments (Mutate may apply it more than once, to fresher copies), and
// must set a pointer field anew rather than write through it: the record it is given may
// be the one the store remembers.
type Step func(r protocol.Record, exists bool) (next protocol.Record, changed bool, err error)

// Mutate applies step to the record of build id and writes the result by compare-and-set,
// reading again and re-applying step when another writer got there first. It returns the
// record as stored afterwards and whether this call changed it. An error from step is
// returned as is, with the stored record it judged.
func (s *Store) Mutate(ctx context.Context, id string, step Step) (protocol.Record, bool, error) {
	for attempt := range maxConflicts {
		if attempt > 0 {
			// Writers that keep colliding take turns: a short, random, growing pause.
			pause := time.Duration(rand.Int64N(int64(min(attempt, 20))*int64(time.Millisecond)) + 1)
			select {
			case <-ctx.Done():
				return protocol.Record{}, false, ctx.Err()
			case <-time.After(pause):
			}
		}
		r, rev, remembered := protocol.Record{}, uint64(0), false
		if attempt == 0 {
			r, rev, remembered = s.recall(id)
		}
		var err error
		if !remembered {
			r, rev, err = s.Get(ctx, id)
			if err != nil && !errors.Is(err, ErrNotFound) {
				return protocol.Record{}, false, err
			}
		}
		exists := err == nil
		if !exists {
			r = protocol.Record{ID: id}
		}
		next, changed, err := step(r, exists)
		if (err != nil || !changed) && remembered {
			// step judged a remembered record, which may be stale: judge the stored one.
			s.Forget(id)
			continue
		}
		if err != nil {
			return r, false, err
		}
		if !changed {
			return r, false, nil
		}
		next.ID = id
		data := protocol.Marshal(next)
		var newRev uint64
		octx, cancel := context.WithTimeout(ctx, opTimeout)
		if exists {
			newRev, err = s.kv.Update(octx, id, data, rev)
		} else {
			newRev, err = s.kv.Create(octx, id, data)
		}
		cancel()
		if err == nil {
			s.remember(id, next, newRev)
			return next, true, nil
		}
		s.Forget(id)
		if !isConflict(err) {
			return r, false, fmt.Errorf("write record %s: %w", id, err)
		}
	}
	return protocol.Record{}, false, fmt.Errorf("write record %s: gave up after %d conflicting writes", id, maxConflicts)
}

func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
}
