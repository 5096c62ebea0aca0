//go:build linux

package process

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// sysProcAttr puts the build in its own process group, so that Kill reaches everything it
// started, and has the kernel SIGKILL it when the replica dies without a chance to clean up.
// Pdeathsig fires when the forking OS thread exits; the Go runtime keeps its threads, except
// those of goroutines that exit while locked to their thread, which this package never does.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// waitExited blocks until pid has exited, without reaping it. While it is a zombie its pid,
// and so its process group id, cannot be reused, so the group can still be signalled safely.
func waitExited(pid int) error {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return err
		}
	}
}
