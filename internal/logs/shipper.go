// Package logs keeps build output in JetStream: a Shipper reads a workload's output through
// its executor and appends it, masked and in ordered chunks, to the build's log subject.
//
// Every append names the subject's last sequence it follows (compare-and-set), and every
// chunk carries the executor's cursor after its last line. So any number of replicas may
// ship the same build's output, one after another or (a paused replica waking up) at once:
// each appends only right after the last chunk stored, reading on from its cursor, and no
// line is ever stored twice or skipped. Nothing here rests on timing.
package logs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Defaults of Limits.
const (
	DefaultMaxBytes   = 16 << 20
	DefaultChunkBytes = 32 << 10
	DefaultFlush      = 500 * time.Millisecond
	// MinMaxBytes keeps the cap above a few chunks of head and tail.
	MinMaxBytes = 256 << 10
)

// publishTimeout bounds one append and its acknowledgement.
const publishTimeout = 5 * time.Second

// Limits shape what is kept of each build's output.
type Limits struct {
	// MaxBytes caps what is kept of one build's output: its first quarter (the head) and its
	// last three quarters (the tail) are kept, what lies between is deleted as the tail
	// moves on, and the last chunk says how much was cut.
	MaxBytes int64
	// ChunkBytes is the size at which a chunk is published at once.
	ChunkBytes int
	// Flush is how long output waits to be published with more.
	Flush time.Duration
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes == 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.ChunkBytes == 0 {
		l.ChunkBytes = DefaultChunkBytes
	}
	if l.Flush == 0 {
		l.Flush = DefaultFlush
	}
	return l
}

// Validate names the field that is out of range.
func (l Limits) Validate() error {
	l = l.withDefaults()
	switch {
	case l.MaxBytes < MinMaxBytes:
		return fmt.Errorf("logs: MaxBytes: must be at least %d (got %d)", MinMaxBytes, l.MaxBytes)
	case l.ChunkBytes < 1<<10 || int64(l.ChunkBytes) > l.MaxBytes/8:
		return fmt.Errorf("logs: ChunkBytes: must be between 1KiB and an eighth of MaxBytes (got %d)", l.ChunkBytes)
	case l.Flush < 0:
		return fmt.Errorf("logs: Flush: must not be negative (got %s)", l.Flush)
	}
	return nil
}

// Store is where logs are kept: the stream and its layout.
type Store struct {
	JS     jetstream.JetStream
	Stream jetstream.Stream
	Layout protocol.Layout
	Limits Limits
	Log    *slog.Logger
}

// errors of an append that another shipper got to first.
var (
	// errResync: another shipper of the same output appended; read on from its cursor.
	errResync = errors.New("logs: another replica appended to this log; reading on from there")
	// ErrSuperseded: another shipper appends a different output (a new run of the build).
	ErrSuperseded = errors.New("logs: another replica ships this build's output now")
	// ErrEnded: the log is complete; nothing more is appended.
	ErrEnded = errors.New("logs: the build's log is complete")
)

// state is what each chunk's HeaderLogState says: where the log stands after it.
type state struct {
	Cursor build.LogCursor `json:"at"`
	Offset int64           `json:"off"`  // bytes stored and cut so far
	Line   int64           `json:"line"` // number of the line the next byte belongs to
	Open   bool            `json:"open,omitempty"`
	Step   int             `json:"step,omitempty"` // steps begun
	Head   int64           `json:"head,omitempty"` // bytes of the head, once the tail has begun
	Cut    int64           `json:"cut,omitempty"`
	CutLn  int64           `json:"cutl,omitempty"`
	Epoch  int             `json:"epoch,omitempty"` // of the shipper that appended it
	Size   int64           `json:"size,omitempty"`  // this chunk's text
	Lines  int64           `json:"lines,omitempty"` // newlines in this chunk's text
	End    bool            `json:"end,omitempty"`
}

// tailChunk is a stored chunk past the head, which the cap may delete.
type tailChunk struct {
	seq         uint64
	size, lines int64
}

// Shipper appends one build's output to its log. Its methods are safe for concurrent use:
// the timer that flushes a quiet build's output runs beside the reader.
type Shipper struct {
	store *Store
	id    string
	steps []string
	mask  build.Masker
	note  string // said when the output starts again from another source
	epoch int    // orders shippers of different runs: the later claim's is higher
	lim   Limits

	mu      sync.Mutex
	resumed bool
	seq     uint64 // the subject's last sequence, as far as this shipper knows
	st      state  // the log as stored up to seq
	tail    []tailChunk
	stopped error // ErrSuperseded or ErrEnded once either is known
	stale   bool  // the log moved on under the read under way: it must start again

	pending struct {
		text    strings.Builder
		lines   int64
		step    int
		cursor  build.LogCursor
		open    bool // pending ends inside a line
		note    string
		started bool
	}
	last  time.Time // of the last publish
	timer *time.Timer
}

// NewShipper ships the output of build id, whose steps (in order) mark its lines, masking
// with mask. note is said once if the output starts over from a new source (a local
// process run again). epoch orders the shippers of one build (the claim's attempt number):
// a shipper that finds a later one's output of another source stands down, one that finds
// an earlier one's goes on after it.
func (s *Store) NewShipper(id string, steps []protocol.Step, mask build.Masker, note string, epoch int) *Shipper {
	names := make([]string, len(steps))
	for i, st := range steps {
		names[i] = st.Name
	}
	return &Shipper{store: s, id: id, steps: names, mask: mask, note: note, epoch: epoch, lim: s.Limits.withDefaults()}
}

// ReadFunc reads a workload's output after from, as worker.Executor.ReadLogs does.
type ReadFunc func(ctx context.Context, from build.LogCursor, follow bool, emit func(line []byte, at build.LogCursor) error) error

// Ship reads the workload's output from where the log stands and appends it, until read
// returns (with follow, when the output is complete) or ctx ends. Output read is published
// before Ship returns, also when ctx ended (within publishTimeout). It returns ErrEnded or
// ErrSuperseded when there is nothing more for it to append.
func (sh *Shipper) Ship(ctx context.Context, read ReadFunc, follow bool) error {
	for {
		from, err := sh.restart(ctx)
		if err != nil {
			return err
		}
		err = read(ctx, from, follow, func(line []byte, at build.LogCursor) error { return sh.add(ctx, line, at) })
		if errors.Is(err, errResync) {
			continue
		}
		if ferr := sh.flushNow(context.WithoutCancel(ctx)); err == nil {
			// The last append found the log closed or taken over, or moved on by another
			// replica: then what it held is read again from where the log stands now.
			if errors.Is(ferr, errResync) {
				continue
			}
			err = ferr
		}
		return err
	}
}

// Finish reads what is left of the output of a workload that has ended, appends it, and
// closes the log (unless another replica has).
func (sh *Shipper) Finish(ctx context.Context, read ReadFunc) error {
	for {
		err := sh.Ship(ctx, read, false)
		if err == nil {
			sh.mu.Lock()
			err = sh.publishLocked(ctx, true)
			sh.mu.Unlock()
		}
		switch {
		case errors.Is(err, errResync):
			continue // another replica appended meanwhile: read on from there
		case errors.Is(err, ErrEnded):
			return nil
		}
		return err
	}
}

// restart begins a read: from where the log stands as stored, with nothing pending (what
// was pending when a read failed is read again).
func (sh *Shipper) restart(ctx context.Context) (build.LogCursor, error) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	sh.clearPending()
	sh.stale = false
	return sh.resumeLocked(ctx)
}

func (sh *Shipper) resumeLocked(ctx context.Context) (build.LogCursor, error) {
	if sh.stopped != nil {
		return build.LogCursor{}, sh.stopped
	}
	if sh.resumed {
		return sh.st.Cursor, nil
	}
	msg, err := sh.store.Stream.GetLastMsgForSubject(ctx, sh.store.Layout.LogSubject(sh.id))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		sh.seq, sh.st, sh.tail = 0, state{Line: 1}, nil
	case err != nil:
		return build.LogCursor{}, fmt.Errorf("logs: reading where the log of %s stands: %w", sh.id, err)
	default:
		st, err := decodeState(msg.Header)
		if err != nil {
			return build.LogCursor{}, err
		}
		sh.seq, sh.st = msg.Sequence, st
		if st.End {
			sh.stopped = ErrEnded
			return build.LogCursor{}, ErrEnded
		}
		if st.Offset > sh.head() {
			if err := sh.scanTail(ctx); err != nil {
				return build.LogCursor{}, err
			}
		}
	}
	sh.resumed = true
	return sh.st.Cursor, nil
}

func decodeState(h nats.Header) (state, error) {
	var st state
	if err := json.Unmarshal([]byte(h.Get(protocol.HeaderLogState)), &st); err != nil {
		return state{}, fmt.Errorf("logs: the last chunk's %s header: %w", protocol.HeaderLogState, err)
	}
	return st, nil
}

// scanTail finds the stored chunks past the head, which a resumed shipper may have to cut,
// from the chunks' headers alone, and counts what was cut from what is stored: a shipper
// whose append failed after it cut may not have recorded its cut.
func (sh *Shipper) scanTail(ctx context.Context) error {
	sh.tail = nil
	var bytes, lines int64
	done := func() error {
		sh.st.Cut, sh.st.CutLn = sh.st.Offset-bytes, sh.st.Line-1-lines
		return nil
	}
	cons, err := sh.store.JS.OrderedConsumer(ctx, sh.store.Layout.LogStream(), jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{sh.store.Layout.LogSubject(sh.id)}, HeadersOnly: true,
	})
	if err != nil {
		return fmt.Errorf("logs: scanning the log of %s: %w", sh.id, err)
	}
	for {
		batch, err := cons.FetchNoWait(256)
		if err != nil {
			return fmt.Errorf("logs: scanning the log of %s: %w", sh.id, err)
		}
		n := 0
		for msg := range batch.Messages() {
			n++
			md, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("logs: scanning the log of %s: %w", sh.id, err)
			}
			st, err := decodeState(msg.Headers())
			if err != nil {
				return fmt.Errorf("logs: scanning the log of %s: %w", sh.id, err)
			}
			bytes, lines = bytes+st.Size, lines+st.Lines
			if st.Offset-st.Size >= sh.head() {
				sh.tail = append(sh.tail, tailChunk{seq: md.Sequence.Stream, size: st.Size, lines: st.Lines})
			}
			if md.Sequence.Stream >= sh.seq {
				return done()
			}
		}
		if err := batch.Error(); err != nil {
			return fmt.Errorf("logs: scanning the log of %s: %w", sh.id, err)
		}
		if n == 0 {
			return done()
		}
	}
}

func (sh *Shipper) head() int64 { return sh.lim.MaxBytes / 4 }

// add takes one line (or a piece of one) and the cursor after it.
func (sh *Shipper) add(ctx context.Context, line []byte, at build.LogCursor) error {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.stopped != nil {
		return sh.stopped
	}
	if sh.stale {
		return errResync
	}
	p := &sh.pending
	base := sh.st
	if p.started {
		base.Step, base.Open, base.Cursor = p.step, p.open, p.cursor
	}
	if at.Source != base.Cursor.Source && base.Cursor.Source != "" && sh.st.Epoch > sh.epoch {
		sh.stopped = ErrSuperseded // a later run's output is in the log
		return ErrSuperseded
	}
	if at.Source != base.Cursor.Source && base.Cursor.Source != "" {
		// A new run of the build: its output follows on a line of its own, with a note.
		if err := sh.publishLocked(ctx, false); err != nil {
			return err
		}
		p.note, p.step, p.open, p.started = sh.note, 0, false, true
		if p.note == "" {
			p.note = "the build runs again from the start"
		}
		base.Step, base.Open = 0, false
	}
	step := base.Step
	if !base.Open && step < len(sh.steps) && string(line) == "==> step "+sh.steps[step]+"\n" {
		// The steps script begins the next step: its lines are a chunk of their own.
		if p.text.Len() > 0 {
			if err := sh.publishLocked(ctx, false); err != nil {
				return err
			}
		}
		step++
		p.step = step
	}
	text := sh.mask.Mask(strings.ToValidUTF8(string(line), string(utf8.RuneError)))
	if !p.started {
		p.started, p.step = true, step
	}
	p.text.WriteString(text)
	if strings.HasSuffix(text, "\n") {
		p.lines++
		p.open = false
	} else {
		p.open = true
	}
	p.cursor = at
	switch {
	case p.text.Len() >= sh.lim.ChunkBytes, time.Since(sh.last) >= sh.lim.Flush:
		return sh.publishLocked(ctx, false)
	case sh.timer == nil:
		// The one timer of a quiet build with output waiting: no per-build timer otherwise.
		sh.timer = time.AfterFunc(sh.lim.Flush, func() { sh.flushQuiet(ctx) })
	}
	return nil
}

// flushQuiet is the timer's: it publishes what a quiet build left pending, and tries again
// later if that fails while the read goes on (ctx, the read's, still live).
func (sh *Shipper) flushQuiet(ctx context.Context) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	sh.timer = nil
	if err := sh.publishLocked(ctx, false); err != nil && ctx.Err() == nil && sh.stopped == nil && !sh.stale {
		sh.store.Log.Debug("publishing build output failed; trying again", "build", sh.id, "err", err)
		sh.timer = time.AfterFunc(sh.lim.Flush, func() { sh.flushQuiet(ctx) })
	}
}

// flushNow publishes what is pending, within publishTimeout, and returns ErrEnded or
// ErrSuperseded once either is known.
func (sh *Shipper) flushNow(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.timer != nil {
		sh.timer.Stop()
		sh.timer = nil
	}
	if err := sh.publishLocked(ctx, false); err != nil && !errors.Is(err, errResync) && sh.stopped == nil {
		sh.store.Log.Warn("publishing build output failed; the next owner reads it again", "build", sh.id, "err", err)
	}
	if sh.stopped == nil && sh.stale {
		return errResync
	}
	return sh.stopped
}

func (sh *Shipper) clearPending() {
	p := &sh.pending
	p.text.Reset()
	p.lines, p.started, p.note = 0, false, ""
}

// publishLocked appends what is pending as one chunk (with end, the last one), right after
// the chunk this shipper knows as the last. When another shipper appended first, it reads
// where the log stands now and returns errResync (or ErrSuperseded, ErrEnded).
func (sh *Shipper) publishLocked(ctx context.Context, end bool) error {
	p := &sh.pending
	if sh.stopped != nil {
		return sh.stopped
	}
	if sh.stale {
		// The log moved on under the read under way: nothing is appended (an end least of
		// all) until a read from where it stands now.
		return errResync
	}
	if !p.started && !end {
		return nil
	}
	text := p.text.String()
	next := sh.st
	next.End, next.Size, next.Lines, next.Epoch = end, int64(len(text)), p.lines, sh.epoch
	chunk := protocol.LogChunk{BuildID: sh.id, Offset: sh.st.Offset, Line: sh.st.Line, Text: text,
		Note: p.note, Time: time.Now().UTC()}
	if p.started {
		next.Cursor, next.Step, next.Open = p.cursor, p.step, p.open
		if p.step > 0 {
			chunk.Step = sh.steps[p.step-1]
		}
	}
	next.Offset += next.Size
	next.Line += p.lines
	tail := chunk.Offset >= sh.head() && next.Size > 0
	cut := 0
	if tail {
		if next.Head == 0 {
			next.Head = chunk.Offset // the head ends where the first chunk past it begins
		}
		cut = sh.cutLocked(ctx, next.Size, &next)
	}
	if end {
		chunk.End = &protocol.LogEnd{Bytes: next.Offset, Lines: next.Line - 1, CutBytes: next.Cut, CutLines: next.CutLn}
		if next.Open {
			chunk.End.Lines++
		}
	}
	msg := nats.NewMsg(sh.store.Layout.LogSubject(sh.id))
	msg.Data = protocol.Marshal(chunk)
	msg.Header.Set(protocol.HeaderLogState, string(protocol.Marshal(next)))
	pctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	ack, err := sh.store.JS.PublishMsg(pctx, msg, jetstream.WithExpectLastSequencePerSubject(sh.seq))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return sh.resyncLocked(ctx)
	}
	if err != nil {
		return fmt.Errorf("logs: appending to the log of %s: %w", sh.id, err)
	}
	sh.last = time.Now()
	sh.seq, sh.st = ack.Sequence, next
	sh.tail = sh.tail[cut:] // counted in the state just stored
	sh.clearPending()
	if end {
		sh.stopped = ErrEnded
	}
	if tail {
		sh.tail = append(sh.tail, tailChunk{seq: ack.Sequence, size: next.Size, lines: next.Lines})
	}
	return nil
}

// cutLocked deletes the oldest stored chunks past the head while the tail, with a new chunk
// of size bytes, is over what the head leaves of the cap, counts them in next, the new
// chunk's state, and returns how many it deleted. They leave the tail list only once that
// state is stored: an append that fails deletes them again (a deleted one is not found) and
// counts them again. The last stored chunk stays: the new one's append names its sequence
// (deleting earlier ones leaves the subject's last sequence as it is). A chunk is at most
// an eighth of the cap, so the tail always fits without it.
func (sh *Shipper) cutLocked(ctx context.Context, size int64, next *state) int {
	kept := size
	for _, c := range sh.tail {
		kept += c.size
	}
	n := 0
	for n < len(sh.tail) && sh.tail[n].seq != sh.seq && kept > sh.lim.MaxBytes-next.Head {
		c := sh.tail[n]
		if err := sh.store.Stream.DeleteMsg(ctx, c.seq); err != nil && !gone(err) {
			sh.store.Log.Warn("cutting an over-long build log failed; trying again with the next chunk", "build", sh.id, "err", err)
			break
		}
		n++
		kept -= c.size
		next.Cut += c.size
		next.CutLn += c.lines
	}
	return n
}

// gone reports the error of deleting a message that is not there (deleted already). nats.go
// flattens the server's answer into the text of ErrMsgDeleteUnsuccessful, so the server's
// error code (10043, "sequence not found") is read from it.
func gone(err error) bool {
	return errors.Is(err, jetstream.ErrMsgNotFound) ||
		errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) && strings.Contains(err.Error(), "err_code=10043")
}

// resyncLocked reads the log's last chunk after another shipper appended.
func (sh *Shipper) resyncLocked(ctx context.Context) error {
	mine := sh.pending.cursor.Source
	if !sh.pending.started {
		mine = sh.st.Cursor.Source
	}
	sh.resumed = false
	sh.clearPending()
	sh.stale = true
	if _, err := sh.resumeLocked(ctx); err != nil {
		return err
	}
	if mine != "" && sh.st.Cursor.Source != "" && sh.st.Cursor.Source != mine && sh.st.Epoch > sh.epoch {
		// A later run's output: this shipper's run is over.
		sh.stopped = ErrSuperseded
		return ErrSuperseded
	}
	return errResync // the same output read on by another replica, or an earlier run's late lines
}
