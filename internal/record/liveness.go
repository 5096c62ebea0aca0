package record

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// ErrIncarnationLost ends an incarnation's context: its liveness key expired, or could not be
// renewed in time, so other replicas may have taken its builds over.
var ErrIncarnationLost = errors.New("this replica's liveness lapsed: its builds may belong to others now")

// Liveness is one replica's presence in the liveness bucket: one key per incarnation (a
// random token, never used twice), renewed every fifth of the bucket's TTL. That is one
// write per replica per interval, however many builds it holds; a build record names its
// owner's token, and a claim reads that key to learn whether the owner still lives.
//
// Why this is safe without trusting timing: the key is renewed by compare-and-set on its
// revision, so once it has expired (or was deleted) it can never come back, and a build
// whose owner's key is gone can never again be written by that owner's lease holder as if
// nothing had happened: every owner write is fenced by the record (build.Lease). The replica
// itself stops counting on its key at a local deadline a margin before the server can
// expire it (the TTL runs from the server's store time, which is after the renewal was
// sent), and Run then ends the incarnation: the worker kills its local workloads before it
// does anything else. A replica that is paused, and so cannot act at that deadline, is
// covered by OnValid: the worker process arms a kernel timer with it that kills the process
// at the deadline (see internal/deadman).
type Liveness struct {
	kv      jetstream.KeyValue
	replica string
	log     *slog.Logger
	// OnValid, if set, is told after each registration and renewal the local time by which
	// the process must be dead if it has not renewed again (a margin before the server may
	// expire the key, and a margin after the incarnation's own deadline, by which Run has
	// stood every build down), and the zero time once the incarnation holds nothing.
	OnValid func(killAt time.Time)

	mu  sync.Mutex
	cur *Incarnation

	deadMu sync.Mutex
	dead   map[string]struct{} // tokens whose keys were found gone
}

// Incarnation is one registration of a replica: its token and a context that ends, with
// ErrIncarnationLost, when the incarnation lapses.
type Incarnation struct {
	Token string
	ctx   context.Context
	end   context.CancelCauseFunc
	rev   uint64 // only Register and Run touch it

	mu    sync.Mutex
	ttl   time.Duration
	until time.Time // local deadline (monotonic): stand down by then
}

// TTL is the liveness bucket's TTL as this incarnation knows it.
func (i *Incarnation) TTL() time.Duration {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.ttl
}

func (i *Incarnation) deadline() time.Time {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.until
}

// Context ends when the incarnation does.
func (i *Incarnation) Context() context.Context { return i.ctx }

// Valid reports whether the incarnation surely still lives: its key cannot have expired yet.
func (i *Incarnation) Valid() bool { return i.ctx.Err() == nil && time.Now().Before(i.deadline()) }

// NewLiveness uses the given bucket; replica names the replica in its keys' values.
func NewLiveness(kv jetstream.KeyValue, replica string, log *slog.Logger) *Liveness {
	return &Liveness{kv: kv, replica: replica, log: log}
}

// Current is the current incarnation (nil before Register).
func (l *Liveness) Current() *Incarnation {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cur
}

// Register makes a new incarnation and creates its key.
func (l *Liveness) Register(ctx context.Context) (*Incarnation, error) {
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("liveness token: %w", err)
	}
	ttl, err := l.ttl(ctx)
	if err != nil {
		return nil, err
	}
	inc := &Incarnation{Token: "r" + hex.EncodeToString(b[:])}
	sent := time.Now()
	rev, err := l.kv.Create(ctx, inc.Token, l.value())
	if err != nil {
		return nil, fmt.Errorf("register liveness key: %w", err)
	}
	inc.rev = rev
	inc.ctx, inc.end = context.WithCancelCause(context.Background())
	l.mu.Lock()
	l.cur = inc
	l.mu.Unlock()
	l.renewed(inc, sent, ttl)
	return inc, nil
}

// margin covers clock-rate differences between this replica and the NATS servers, and clock
// offsets between NATS servers (a new stream leader expires keys by its own clock). A key
// renewed at local time t expires on the server no earlier than t+ttl; the replica stands
// its builds down by t+ttl-2·margin and is killed by t+ttl-margin if it has not.
func margin(ttl time.Duration) time.Duration { return max(ttl/5, 100*time.Millisecond) }

// renewed records a renewal (or the registration) sent at local time sent.
func (l *Liveness) renewed(inc *Incarnation, sent time.Time, ttl time.Duration) {
	m := margin(ttl)
	inc.mu.Lock()
	inc.ttl, inc.until = ttl, sent.Add(ttl-2*m)
	inc.mu.Unlock()
	l.valid(sent.Add(ttl - m))
}

// ttl is the bucket's TTL as the server has it: the one that decides when keys expire.
func (l *Liveness) ttl(ctx context.Context) (time.Duration, error) {
	st, err := l.kv.Status(ctx)
	if err != nil {
		return 0, fmt.Errorf("liveness bucket: %w", err)
	}
	if st.TTL() <= 0 {
		return 0, fmt.Errorf("liveness bucket %s has no TTL: a dead replica's key would never expire", st.Bucket())
	}
	return st.TTL(), nil
}

func (l *Liveness) value() []byte {
	return protocol.Marshal(struct {
		Replica string    `json:"replica"`
		At      time.Time `json:"at"`
	}{l.replica, time.Now().UTC()})
}

func (l *Liveness) valid(until time.Time) {
	if l.OnValid != nil {
		l.OnValid(until)
	}
}

// Run renews the current incarnation's key every fifth of its TTL until ctx ends. When the
// key cannot be renewed before the local deadline, or is found gone, the incarnation ends:
// its context is cancelled with ErrIncarnationLost, lost is called (the worker stands down
// every build it holds and returns once none is left), and a new incarnation is registered.
func (l *Liveness) Run(ctx context.Context, lost func()) error {
	for {
		inc := l.Current()
		if inc == nil {
			return errors.New("liveness: Run before Register")
		}
		err := l.renew(ctx, inc)
		if err == nil {
			return nil // ctx ended
		}
		l.log.Error("this replica's liveness lapsed; standing down every build it holds", "incarnation", inc.Token, "err", err)
		inc.end(ErrIncarnationLost)
		lost()
		// Everything is stood down: the old key may go at once, so that others need not
		// wait out its TTL, and the kill deadline is lifted.
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_ = l.kv.Delete(dctx, inc.Token)
		cancel()
		l.valid(time.Time{})
		if err := l.Establish(ctx); err != nil {
			return nil // ctx ended
		}
	}
}

// renew keeps inc alive until ctx ends (nil) or inc lapses (the reason).
func (l *Liveness) renew(ctx context.Context, inc *Incarnation) error {
	ttl := inc.TTL()
	t := time.NewTimer(ttl / 5)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		until := inc.deadline()
		if !time.Now().Before(until) {
			return fmt.Errorf("not renewed within %s", ttl-2*margin(ttl))
		}
		sent := time.Now()
		rctx, cancel := context.WithDeadline(ctx, until)
		rev, err := l.kv.Update(rctx, inc.Token, l.value(), inc.rev)
		cancel()
		switch {
		case err == nil:
			// The TTL read at registration holds: provisioning only ever raises it, and a
			// longer TTL only makes this replica's deadlines more careful.
			inc.rev = rev
			l.renewed(inc, sent, ttl)
		case errors.Is(err, jetstream.ErrKeyNotFound), isConflict(err):
			return fmt.Errorf("liveness key %s is gone: %w", inc.Token, err)
		case ctx.Err() != nil:
			return nil
		default:
			l.log.Warn("renewing the liveness key failed; retrying", "err", err)
		}
		t.Reset(min(ttl/5, max(time.Until(inc.deadline()), 0)+time.Millisecond))
	}
}

// Establish registers a new incarnation, retrying what NATS may answer later, until it
// succeeds or ctx ends (its error).
func (l *Liveness) Establish(ctx context.Context) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval, b.MaxInterval, b.MaxElapsedTime = 100*time.Millisecond, 5*time.Second, 0
	err := backoff.RetryNotify(func() error {
		_, err := l.Register(ctx)
		return err
	}, backoff.WithContext(b, ctx), func(err error, d time.Duration) {
		l.log.Warn("registering a new incarnation failed; retrying", "err", err, "in", d)
	})
	if err != nil {
		return err // ctx ended
	}
	l.log.Info("registered a new incarnation", "incarnation", l.Current().Token)
	return nil
}

// Alive reports whether the incarnation token still has its key. An error is no answer.
func (l *Liveness) Alive(ctx context.Context, token string) (bool, error) {
	if token == "" || l.seenDead(token) {
		return false, nil
	}
	_, err := l.kv.Get(ctx, token)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		l.died(token)
		return false, nil
	}
	return false, fmt.Errorf("liveness of %s: %w", token, err)
}

// maxDead bounds the tokens remembered dead.
const maxDead = 1024

// seenDead says whether token's key was found gone before. A key that is gone never comes
// back (a token is never used twice, and a renewal updates the key at its revision), so the
// ten thousand builds of a replica that vanished cost one read of its key, not one each.
func (l *Liveness) seenDead(token string) bool {
	l.deadMu.Lock()
	defer l.deadMu.Unlock()
	_, ok := l.dead[token]
	return ok
}

func (l *Liveness) died(token string) {
	l.deadMu.Lock()
	defer l.deadMu.Unlock()
	if l.dead == nil || len(l.dead) >= maxDead {
		l.dead = map[string]struct{}{}
	}
	l.dead[token] = struct{}{}
}

// errClosed ends an incarnation whose replica stopped.
var errClosed = errors.New("the replica stopped")

// Close ends the current incarnation. With deleteKey (the replica holds nothing any more)
// its key is deleted, so that builds whose records still name it are adopted at once
// instead of after the TTL; without, the key is left to expire.
func (l *Liveness) Close(ctx context.Context, deleteKey bool) error {
	inc := l.Current()
	if inc == nil {
		return nil
	}
	inc.end(errClosed)
	if !deleteKey {
		return nil // the kill deadline stays: builds may still run here
	}
	if err := l.kv.Delete(ctx, inc.Token); err != nil {
		return fmt.Errorf("delete liveness key: %w", err)
	}
	l.valid(time.Time{})
	return nil
}
