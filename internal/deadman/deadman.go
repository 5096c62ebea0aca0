// Package deadman is a replica process's dead-man's switch: a kernel timer that kills the
// process (SIGKILL) at a deadline unless the deadline is moved first.
//
// A replica that is paused (SIGSTOP, a frozen VM, a stalled scheduler) cannot act on its
// own deadline, while its local build processes, which the pause does not stop, run on.
// Once its liveness key may expire, another replica may take its builds over and start
// them again. The kernel still delivers SIGKILL to a stopped process, and the parent-death
// signal then ends its build processes, so the paused replica and everything it ran are gone
// before anyone may take their place.
package deadman

import (
	"sync"
	"time"
)

// Switch kills the process at the deadline last set. The zero Switch is unarmed; it is safe
// for concurrent use.
type Switch struct {
	mu    sync.Mutex
	timer kernelTimer
	err   error
}

// Set moves the deadline to at, or disarms the switch when at is zero. A deadline already
// past kills the process at once. It returns an error when the kernel refuses the timer
// (then nothing is armed).
func (s *Switch) Set(at time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.timer == nil && s.err == nil {
		s.timer, s.err = newKernelTimer()
	}
	if s.err != nil {
		return s.err
	}
	if at.IsZero() {
		return s.timer.set(0)
	}
	return s.timer.set(max(time.Until(at), time.Nanosecond))
}

// kernelTimer is a timer the kernel fires without the process's help; set(0) disarms it.
type kernelTimer interface {
	set(after time.Duration) error
}
