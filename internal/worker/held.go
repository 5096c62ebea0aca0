package worker

import (
	"context"
	"errors"
	"sync"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/queue"
)

// held is the registry of the builds this replica works on: one entry per build id, from the
// moment a delivery starts on it until its session has concluded. A stop finds the build's
// session here; a second delivery of a build already held here joins the entry instead of
// starting a second session, and is settled with the first (the server redelivers a message
// whose AckWait passed while its holder was slow, and a consumer made again delivers
// everything anew).
type held struct {
	mu     sync.Mutex
	builds map[string]*holding
	empty  chan struct{} // closed while nothing is held
}

type holding struct {
	s      *session
	cancel context.CancelCauseFunc
	leases []*queue.Lease // the deliveries the session settles when it concludes
}

func newHeld() *held {
	h := &held{builds: make(map[string]*holding), empty: make(chan struct{})}
	close(h.empty)
	return h
}

// hold registers session s of build id, started by delivery l; joined says another
// session already holds the build, and l now waits for it to be settled.
func (h *held) hold(id string, l *queue.Lease, cancel context.CancelCauseFunc, s *session) (joined bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e, ok := h.builds[id]; ok {
		e.leases = append(e.leases, l)
		return true
	}
	if len(h.builds) == 0 {
		h.empty = make(chan struct{})
	}
	h.builds[id] = &holding{s: s, cancel: cancel, leases: []*queue.Lease{l}}
	return false
}

// drop ends the holding of build id and returns every delivery it gathered.
func (h *held) drop(id string) []*queue.Lease {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.builds[id]
	if e == nil {
		return nil
	}
	delete(h.builds, id)
	if len(h.builds) == 0 {
		close(h.empty)
	}
	return e.leases
}

// abort cancels the session of build id, if held here, with the stop's reason.
func (h *held) abort(id, reason string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.builds[id]
	if e != nil {
		e.cancel(abortCause{reason: reason})
	}
	return e != nil
}

// session is the session of build id, if held here.
func (h *held) session(id string) *session {
	h.mu.Lock()
	defer h.mu.Unlock()
	if e := h.builds[id]; e != nil {
		return e.s
	}
	return nil
}

func (h *held) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.builds)
}

// idle is closed once nothing is held.
func (h *held) idle() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.empty
}

// abortCause cancels a build for a stop; it carries the stop's reason to the aborted event.
type abortCause struct{ reason string }

func (a abortCause) Error() string        { return build.ErrAborted.Error() + ": " + a.reason }
func (a abortCause) Is(target error) bool { return target == build.ErrAborted }

// abortReason is the stop's reason carried by err, if any.
func abortReason(err error) string {
	var a abortCause
	if errors.As(err, &a) {
		return a.reason
	}
	return ""
}
