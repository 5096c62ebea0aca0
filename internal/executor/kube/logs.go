package kube

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/buildfleet/buildfleet/internal/build"
)

// readBuffer is what one read of a pod's log holds at once. Small, as a replica follows every
// running build's log; a longer line is gathered up to build.MaxLogPiece.
const readBuffer = 4 << 10

// logCursor is a position in a container's log as the kubelet serves it with timestamps:
// the timestamp of the last line taken, how many whole lines with that timestamp were taken,
// and how many bytes of the next one (a long line taken in pieces). Timestamps are the
// runtime's, nanosecond precision, in order; the API's sinceTime only has seconds, so a read
// from a cursor starts at its second and skips what was taken.
type logCursor struct {
	at    time.Time
	lines int
	bytes int
}

func (c logCursor) String() string {
	return c.at.UTC().Format(time.RFC3339Nano) + " " + strconv.Itoa(c.lines) + " " + strconv.Itoa(c.bytes)
}

// taken is how many of the n bytes at byte at of line i with timestamp t the cursor has
// taken already.
func (c logCursor) taken(t time.Time, i, at, n int) int {
	switch {
	case c.at.IsZero() || t.After(c.at):
		return 0
	case t.Before(c.at), i < c.lines:
		return n
	case i == c.lines:
		return min(n, max(0, c.bytes-at))
	}
	return 0
}

func parseLogCursor(s string) (logCursor, error) {
	f := strings.Fields(s)
	if len(f) != 3 {
		return logCursor{}, fmt.Errorf("kube: log cursor %q is not \"<time> <lines> <bytes>\"", s)
	}
	at, err := time.Parse(time.RFC3339Nano, f[0])
	lines, err2 := strconv.Atoi(f[1])
	n, err3 := strconv.Atoi(f[2])
	if err := errors.Join(err, err2, err3); err != nil || lines < 0 || n < 0 {
		return logCursor{}, fmt.Errorf("kube: log cursor %q: %v", s, err)
	}
	return logCursor{at: at, lines: lines, bytes: n}, nil
}

// ReadLogs reads the build container's log through the apiserver (pods/log, with
// timestamps, so that a read can resume where another replica's stopped). It waits for the
// container to start; a pod that is gone has no more output. The output is complete when the
// log has been read to its end after the container terminated; a follow that ends before
// that (the kubelet rotated the log, a proxy cut the stream) is resumed from the cursor.
func (e *Executor) ReadLogs(ctx context.Context, job build.Job, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
	w, nudge, stop := e.space.followNudged(job.Workload)
	defer stop()
	if err := e.space.synced(ctx); err != nil {
		return err
	}
	for {
		pod, ok := e.space.get(job.Workload)
		if gone, _ := e.space.deletion(w); gone {
			return nil // the pod went, and its output with it
		}
		var c *corev1.ContainerStatus
		if ok {
			c = buildContainer(pod)
		}
		started := c != nil && (c.State.Running != nil || c.State.Terminated != nil)
		ended := c != nil && c.State.Terminated != nil
		if started {
			cur, err := e.readLog(ctx, pod, from, follow && !ended, emit)
			if err != nil || ended || !follow {
				return err
			}
			from = cur
			// The stream ended under a running container (a rotated log, a cut stream): read
			// on once the pod changes, or in a second.
			if !pause(ctx, nudge, time.Second) {
				return context.Cause(ctx)
			}
			continue
		}
		if !follow {
			return nil
		}
		select {
		case <-nudge:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// pause waits until the pod changes (or goes) or d has passed; false when ctx ended first.
func pause(ctx context.Context, nudge <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-nudge:
	case <-t.C:
	case <-ctx.Done():
		return false
	}
	return true
}

// readLog reads the container's log once, from the cursor on, and returns the cursor after
// the last line it passed on.
func (e *Executor) readLog(ctx context.Context, pod *corev1.Pod, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) (build.LogCursor, error) {
	source := string(pod.UID)
	var skip logCursor
	if from.Source == source && from.Pos != "" {
		var err error
		if skip, err = parseLogCursor(from.Pos); err != nil {
			return from, err
		}
	}
	opts := &corev1.PodLogOptions{Container: ContainerName, Follow: follow, Timestamps: true}
	if !skip.at.IsZero() {
		opts.SinceTime = &metav1.Time{Time: skip.at.Truncate(time.Second)}
	}
	stream, err := e.cluster.client.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, opts).Stream(ctx)
	switch {
	case apierrors.IsNotFound(err):
		return from, nil // the pod went: its output with it
	case err != nil:
		if ctx.Err() != nil {
			return from, context.Cause(ctx)
		}
		return from, unreachable(fmt.Errorf("kube: reading the log of pod %s/%s: %w", pod.Namespace, pod.Name, err))
	}
	defer stream.Close()
	cur := from
	if cur.Source != source {
		cur = build.LogCursor{Source: source}
	}
	r := bufio.NewReaderSize(stream, readBuffer)
	var (
		t      time.Time // the current line's timestamp
		i, at  int       // its index among the lines with that timestamp, and bytes passed on of it
		inLine bool      // the last piece read did not end its line
		buf    []byte    // what is read of the current line and not passed on yet
	)
	// pass passes n bytes of the current line on, unless the cursor had taken them.
	pass := func(n int, whole bool) error {
		text := buf[:n]
		drop := skip.taken(t, i, at, len(text))
		next := logCursor{at: t, lines: i, bytes: at + len(text)}
		if whole {
			next = logCursor{at: t, lines: i + 1}
		}
		if drop < len(text) {
			cur.Pos = next.String()
			if err := emit(text[drop:], cur); err != nil {
				return err
			}
		}
		at += len(text)
		buf = append(buf[:0], buf[n:]...)
		return nil
	}
	for {
		piece, err := r.ReadSlice('\n')
		if len(piece) > 0 {
			text := piece
			if !inLine {
				// "<RFC 3339 timestamp> <line>"
				sp := bytes.IndexByte(piece, ' ')
				lt, perr := time.Parse(time.RFC3339Nano, string(piece[:max(sp, 0)]))
				if sp < 0 || perr != nil {
					return cur, fmt.Errorf("kube: a line of the log of pod %s/%s has no timestamp: %.40q", pod.Namespace, pod.Name, piece)
				}
				if lt.Equal(t) {
					i++
				} else {
					t, i = lt, 0
				}
				text, at, buf = piece[sp+1:], 0, buf[:0]
			}
			whole := bytes.HasSuffix(piece, []byte("\n"))
			buf = append(buf, text...)
			inLine = !whole
			switch {
			case whole:
				if err := pass(len(buf), true); err != nil {
					return cur, err
				}
			case len(buf) >= build.MaxLogPiece:
				// A line too long to hold: passed on in pieces, each ending on a whole
				// character.
				if err := pass(build.PieceEnd(buf, build.MaxLogPiece), false); err != nil {
					return cur, err
				}
			}
		}
		if errors.Is(err, io.EOF) && len(buf) > 0 {
			// The log ends inside a line (for now): what there is of it goes on.
			if perr := pass(len(buf), false); perr != nil {
				return cur, perr
			}
		}
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			return cur, nil
		case err != nil:
			if ctx.Err() != nil {
				return cur, context.Cause(ctx)
			}
			return cur, unreachable(fmt.Errorf("kube: reading the log of pod %s/%s: %w", pod.Namespace, pod.Name, err))
		}
	}
}
