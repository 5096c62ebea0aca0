package process

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/buildfleet/buildfleet/internal/build"
)

// strayHold bounds how long the end of the output is awaited once the build's process group
// is gone: only a process that left the group (setsid) can still hold the pipe open, and
// what it prints is not the build's.
const strayHold = 2 * time.Second

// output is a build process's stdout and stderr: one pipe, copied into the build's log file
// as it comes, so that the fleet can follow it live.
type output struct {
	source string // this run's: a new run of the build has a new one
	path   string

	mu   sync.Mutex
	size int64         // bytes in the file
	done bool          // the pipe has closed: the file holds all of it
	grew chan struct{} // closed when size or done changes
	err  error         // why the copy stopped early
}

func newOutput(path, source string) *output {
	return &output{path: path, source: source, grew: make(chan struct{})}
}

// copyFrom copies the pipe r into the file f until r ends, then closes both.
func (o *output) copyFrom(r io.ReadCloser, f *os.File) {
	defer r.Close()
	defer f.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := f.Write(buf[:n]); werr != nil {
				o.finish(fmt.Errorf("process: writing the build log: %w", werr))
				return
			}
			o.mu.Lock()
			o.size += int64(n)
			close(o.grew)
			o.grew = make(chan struct{})
			o.mu.Unlock()
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, os.ErrClosed) {
				err = nil
			}
			o.finish(err)
			return
		}
	}
}

func (o *output) finish(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.done {
		o.done, o.err = true, err
		close(o.grew)
	}
}

// state is what the file holds now, and a channel closed when that changes.
func (o *output) state() (size int64, done bool, grew <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.size, o.done, o.grew
}

// await waits until the copy has finished. Once the build's process group is gone only a
// process that left it can hold the pipe open: after strayHold the pipe is closed on it.
func (o *output) await(pipe io.Closer) {
	hold := time.NewTimer(strayHold)
	defer hold.Stop()
	for {
		_, done, grew := o.state()
		if done {
			return
		}
		select {
		case <-grew:
		case <-hold.C:
			_ = pipe.Close() // the copy ends with os.ErrClosed
		}
	}
}

// read passes the output after from to emit, a line at a time, as worker.Executor.ReadLogs
// describes.
func (o *output) read(ctx context.Context, from build.LogCursor, follow bool, emit func([]byte, build.LogCursor) error) error {
	var off int64
	if from.Source == o.source && from.Pos != "" {
		n, err := strconv.ParseInt(from.Pos, 10, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("process: log cursor %q is not a byte offset", from.Pos)
		}
		off = n
	}
	f, err := os.Open(o.path)
	if err != nil {
		return fmt.Errorf("process: opening the build log: %w", err)
	}
	defer f.Close()
	var buf []byte
	for {
		size, done, grew := o.state()
		if size > off+int64(len(buf)) {
			chunk := make([]byte, min(size-off-int64(len(buf)), 256<<10))
			n, err := f.ReadAt(chunk, off+int64(len(buf)))
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("process: reading the build log: %w", err)
			}
			buf = append(buf, chunk[:n]...)
			// Whole lines, and pieces of a line too long to wait for.
			for len(buf) > 0 {
				i := bytes.IndexByte(buf, '\n')
				if i < 0 && len(buf) < build.MaxLogPiece {
					break
				}
				end := i + 1
				if i < 0 || end > build.MaxLogPiece {
					end = build.PieceEnd(buf, build.MaxLogPiece)
				}
				off += int64(end)
				if err := emit(buf[:end], build.LogCursor{Source: o.source, Pos: strconv.FormatInt(off, 10)}); err != nil {
					return err
				}
				buf = buf[end:]
			}
			buf = bytes.Clone(buf) // do not keep the read chunk alive through the wait
			continue
		}
		if done {
			if len(buf) > 0 { // the last line, without its newline
				off += int64(len(buf))
				if err := emit(buf, build.LogCursor{Source: o.source, Pos: strconv.FormatInt(off, 10)}); err != nil {
					return err
				}
			}
			return o.err
		}
		if !follow {
			return nil
		}
		select {
		case <-grew:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}
