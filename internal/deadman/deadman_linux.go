//go:build linux

package deadman

import (
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sigevent is struct sigevent for SIGEV_SIGNAL (the union's other members unused).
type sigevent struct {
	value  uintptr
	signo  int32
	notify int32
	_      [48]byte
}

const sigevSignal = 0

// posixTimer is a POSIX per-process timer on CLOCK_MONOTONIC that delivers SIGKILL.
type posixTimer struct{ id int32 }

func newKernelTimer() (kernelTimer, error) {
	ev := sigevent{signo: int32(unix.SIGKILL), notify: sigevSignal}
	var id int32
	if _, _, e := unix.Syscall(unix.SYS_TIMER_CREATE, unix.CLOCK_MONOTONIC,
		uintptr(unsafe.Pointer(&ev)), uintptr(unsafe.Pointer(&id))); e != 0 {
		return nil, fmt.Errorf("deadman: timer_create: %w", e)
	}
	return &posixTimer{id: id}, nil
}

func (t *posixTimer) set(after time.Duration) error {
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(after))}
	if _, _, e := unix.Syscall6(unix.SYS_TIMER_SETTIME, uintptr(t.id), 0,
		uintptr(unsafe.Pointer(&spec)), 0, 0, 0); e != 0 {
		return fmt.Errorf("deadman: timer_settime: %w", e)
	}
	return nil
}
