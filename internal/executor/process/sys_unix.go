//go:build unix && !linux

package process

import (
	"errors"
	"syscall"
)

// sysProcAttr puts the build in its own process group, so that Kill reaches everything it
// started. Outside Linux there is no parent-death signal: a build outlives a replica that is
// SIGKILLed.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// waitExited is not available outside Linux, so the group a build leaves behind is not swept
// when its leader exits: it could by then have been reused.
func waitExited(int) error { return errors.ErrUnsupported }
