package client

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Logs yields the chunks of build id's output, in order, from its start. Without follow it
// ends after the chunks stored now; with follow it waits for more, and ends with the chunk
// that closes the log, or, once the build has ended, when no chunk has come for
// LogGrace (a log that a failing replica could not close). A chunk whose Offset is beyond the
// end of the one before marks where an over-long log was cut. The iteration ends with an
// error for a build the fleet has no record of, or when the log cannot be read.
func (c *Client) Logs(ctx context.Context, id string, follow bool) iter.Seq2[protocol.LogChunk, error] {
	return func(yield func(protocol.LogChunk, error) bool) {
		if _, err := c.Status(ctx, id); err != nil {
			yield(protocol.LogChunk{}, err)
			return
		}
		stream, err := c.js.Stream(ctx, c.layout.LogStream())
		if err != nil {
			yield(protocol.LogChunk{}, fmt.Errorf("log stream %s (is a worker of this version running?): %w", c.layout.LogStream(), err))
			return
		}
		last, err := c.lastLogSeq(ctx, stream, id)
		if err != nil {
			yield(protocol.LogChunk{}, err)
			return
		}
		if !follow && last == 0 {
			return
		}
		cons, err := c.js.OrderedConsumer(ctx, c.layout.LogStream(), jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{c.layout.LogSubject(id)}, DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		if err != nil {
			yield(protocol.LogChunk{}, fmt.Errorf("read the log of %s: %w", id, err))
			return
		}
		it, err := cons.Messages()
		if err != nil {
			yield(protocol.LogChunk{}, fmt.Errorf("read the log of %s: %w", id, err))
			return
		}
		defer it.Stop()
		stopOnCancel := context.AfterFunc(ctx, it.Stop)
		defer stopOnCancel()

		// Where the iteration ends, when no chunk closes the log: the last chunk stored now
		// (without follow), or when the build has ended (with follow). 0: not known yet.
		var endAt, seen atomic.Uint64
		var ended atomic.Bool
		if !follow {
			endAt.Store(last)
			ended.Store(true)
		} else {
			wctx, cancel := context.WithCancel(ctx)
			var g errgroup.Group // the iteration's own: they end before the iteration returns
			defer func() { cancel(); _ = g.Wait() }()
			g.Go(func() error {
				c.wantLog(wctx, id, func() bool { return seen.Load() > last })
				return nil
			})
			g.Go(func() error {
				// Watched until the build's end is seen: a watch that fails is made again.
				for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
					for ev, err := range c.Watch(wctx, id) {
						if err != nil {
							break
						}
						if !ev.Data.State.Terminal() {
							continue
						}
						// The end is announced before the log is closed: the output may go on
						// for a moment. Ended once nothing more has come for LogGrace.
						for {
							n, err := c.lastLogSeq(wctx, stream, id)
							if err != nil {
								break
							}
							select {
							case <-wctx.Done():
								return nil
							case <-time.After(LogGrace):
							}
							if m, err := c.lastLogSeq(wctx, stream, id); err != nil || m != n {
								continue // more came: wait again
							}
							endAt.Store(n)
							ended.Store(true)
							if seen.Load() >= n {
								it.Stop()
							}
							return nil
						}
					}
					select {
					case <-wctx.Done():
						return nil
					case <-time.After(wait):
					}
				}
			})
		}
		for {
			if ended.Load() && seen.Load() >= endAt.Load() {
				return
			}
			msg, err := it.Next()
			if err != nil {
				switch {
				case ctx.Err() != nil:
					yield(protocol.LogChunk{}, ctx.Err())
				case errors.Is(err, jetstream.ErrMsgIteratorClosed):
				default:
					yield(protocol.LogChunk{}, fmt.Errorf("read the log of %s: %w", id, err))
				}
				return
			}
			md, err := msg.Metadata()
			if err != nil {
				yield(protocol.LogChunk{}, fmt.Errorf("read the log of %s: %w", id, err))
				return
			}
			chunk, err := protocol.DecodeLogChunk(msg.Data())
			if err != nil {
				err = fmt.Errorf("log chunk %d of %s: %w", md.Sequence.Stream, id, err)
			}
			if !yield(chunk, err) || chunk.End != nil {
				return
			}
			seen.Store(md.Sequence.Stream)
		}
	}
}

// wantLog says that the output of build id is wanted live: every second until flowing
// reports output stored since the follow began (the build may not be running yet, or its
// replica not yet launched it), then every protocol.LogWantEvery, until ctx ends. The
// replica that holds the build follows its output into the log meanwhile.
func (c *Client) wantLog(ctx context.Context, id string, flowing func() bool) {
	t := time.NewTicker(logWantSoon)
	defer t.Stop()
	var last time.Time
	for {
		if !flowing() || time.Since(last) >= protocol.LogWantEvery {
			// A lost want costs only liveness: the next one, or the build's end, brings the
			// output.
			_ = c.js.Conn().Publish(c.layout.LogWantSubject(id), nil)
			last = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// logWantSoon is how often a follower says it wants output that has not begun to flow.
const logWantSoon = time.Second

// LogGrace is how long Logs, following, waits for more output once the build has ended: the
// fleet announces a build's end first and closes its log right after.
const LogGrace = 10 * time.Second

// lastLogSeq is the stream sequence of the last chunk of id's log, 0 when it has none.
func (c *Client) lastLogSeq(ctx context.Context, stream jetstream.Stream, id string) (uint64, error) {
	msg, err := stream.GetLastMsgForSubject(ctx, c.layout.LogSubject(id))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return 0, nil
	case err != nil:
		return 0, fmt.Errorf("read the log of %s: %w", id, err)
	}
	return msg.Sequence, nil
}
