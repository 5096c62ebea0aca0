package process

import (
	"bytes"
	"os"
	"strings"
	"syscall"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// The failure message quotes the end of the log, bounded so that events stay small.
const (
	tailLines = 20
	tailBytes = 2 << 10
)

// outcomeOf is how a reaped process ended. tail is the end of its log.
func outcomeOf(state *os.ProcessState, waitErr error, tail string) build.Outcome {
	if state == nil {
		return build.Failed(protocol.ReasonContainerError, "waiting for the process: %v", waitErr)
	}
	ws, ok := state.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		// The worker replaces this with aborted or timed_out when it was the one killing.
		return build.Failed(protocol.ReasonContainerError, "killed by signal %s", ws.Signal())
	}
	out := build.ExitedWith(state.ExitCode())
	if out.State != protocol.StateSucceeded && tail != "" {
		out.Message += "; last output: " + tail
	}
	return out
}

// logTail returns the last lines of the log at path, or "" when it cannot be read: the tail
// only decorates a failure message.
func logTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-tailBytes, 0)
	buf := make([]byte, fi.Size()-off)
	n, _ := f.ReadAt(buf, off)
	return tailOf(buf[:n], off > 0)
}

// tailOf returns the last tailLines lines of b. cut says b starts in the middle of the log,
// so its first line is probably partial and is dropped unless it is all there is.
func tailOf(b []byte, cut bool) string {
	b = bytes.TrimRight(b, " \t\r\n")
	if cut {
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	for i, n := len(b)-1, 0; i >= 0; i-- {
		if b[i] == '\n' {
			if n++; n == tailLines {
				b = b[i+1:]
				break
			}
		}
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}
