package perf

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// B0 and P1 compare what the control plane does for the bare loop with what it does for a
// replica. On one machine the control plane (kube-apiserver, etcd, kube-scheduler, kwok)
// saturates the cores, so a load generator's own CPU is taken from the apiserver: the bare
// loop's few client-go calls cost ~0.5 ms of CPU a pod, a replica's claim, record writes
// and events, with NATS serving them, ~1.3 ms. Measured so, P1/B0 says how the cores are
// shared, not whether the replica keeps the apiserver busy; in production neither NATS nor
// the replicas run on the apiserver's cores. So, for B0 and P1 alike, the control plane runs
// on one half of the CPUs and everything else (this process with its nats-server, the
// replicas it starts) on the other. A cap on the control plane's CPU (a CFS quota) is not
// enough: it is a limit, not a reservation, and the clients still preempt the apiserver.

// cpuSplit is the two halves, and every CPU this process may use, to give back.
type cpuSplit struct {
	plane, clients, all unix.CPUSet
	how                 string // for the report
}

// splitCPUs halves the CPUs this process may run on: the control plane gets the lower half.
func splitCPUs() (cpuSplit, error) {
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		return cpuSplit{}, fmt.Errorf("reading CPU affinity: %w", err)
	}
	var ids []int
	for i := range 1024 {
		if all.IsSet(i) {
			ids = append(ids, i)
		}
	}
	if len(ids) < 2 {
		return cpuSplit{}, fmt.Errorf("%d CPU: nothing to split", len(ids))
	}
	s := cpuSplit{all: all}
	half := len(ids) / 2
	for _, id := range ids[:half] {
		s.plane.Set(id)
	}
	for _, id := range ids[half:] {
		s.clients.Set(id)
	}
	s.how = fmt.Sprintf("control plane on CPU %s, benchmark, NATS and replicas on CPU %s", cpuList(ids[:half]), cpuList(ids[half:]))
	return s, nil
}

func cpuList(ids []int) string {
	if len(ids) == 1 {
		return strconv.Itoa(ids[0])
	}
	return fmt.Sprintf("%d-%d", ids[0], ids[len(ids)-1])
}

// pin sets the affinity of every thread of every process in pids (threads started later
// inherit it from the thread that starts them, children from their parent).
func pin(pids []int, set unix.CPUSet) error {
	var errs []error
	for _, pid := range pids {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			// A thread that ended meanwhile is no failure.
			if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("pinning thread %d of %d: %w", tid, pid, err))
			}
		}
	}
	return errors.Join(errs...)
}

// isolate splits the CPUs between the control plane and the rest, for B0 and P1. It returns
// what undoes it and how the CPUs were split; when they cannot be split (one CPU, or no
// right to set affinity) nothing is changed and how says so.
func (r *rig) isolate() (undo func(), how string) {
	s, err := splitCPUs()
	if err == nil {
		err = pin(r.cp.Pids(), s.plane)
	}
	if err == nil {
		err = pin([]int{os.Getpid()}, s.clients)
	}
	undo = func() {
		if err := errors.Join(pin(r.cp.Pids(), s.all), pin([]int{os.Getpid()}, s.all)); err != nil {
			r.logf("giving every CPU back: %v", err)
		}
	}
	if err != nil {
		if s.all.Count() > 0 {
			undo()
		}
		return func() {}, "CPUs shared (not split: " + err.Error() + ")"
	}
	return undo, s.how
}
