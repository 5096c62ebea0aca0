//go:build !linux

package deadman

import "errors"

func newKernelTimer() (kernelTimer, error) {
	return nil, errors.New("deadman: no kernel kill timer on this platform; a paused replica's build processes can outlive its liveness")
}
