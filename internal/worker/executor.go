package worker

import (
	"context"

	"github.com/buildfleet/buildfleet/internal/build"
)

// Executor runs builds on one target. The worker holds one per configured target.
//
// Errors returned by an executor are classified where they arise: a *build.PermanentError
// ends the build with its outcome; any other error is transient and the request is retried
// with backoff until MaxDeliver.
type Executor interface {
	// Launch starts the job's workload, or finds the one an earlier attempt started: the
	// workload name is deterministic, so launching twice never makes a second workload.
	Launch(ctx context.Context, job build.Job) error
	// Wait follows the workload until it ends and returns how it ended. running is called
	// once, when the workload starts running. Cancelling ctx stops the following, not the
	// workload; Kill or Release decide what happens to it.
	Wait(ctx context.Context, job build.Job, running func()) (build.Outcome, error)
	// Kill ends the workload (stop, timeout). It is idempotent: a workload that is already
	// gone, or that this replica cannot reach, is not an error.
	Kill(ctx context.Context, job build.Job) error
	// Release is called when this replica lets the build go: it hands it over (shutdown),
	// or its liveness lapsed and another replica may own the build now. A pod is left
	// running for the owner to follow; a local process cannot outlive its replica and is
	// killed, so the adopter launches it again. A Release whose ctx ends must still kill
	// what it must kill, at once.
	Release(ctx context.Context, job build.Job) error
	// Cleanup removes what is left of a finished workload.
	Cleanup(ctx context.Context, job build.Job) error
	// Reruns says whether Launch runs an adopted job's workload anew (a local process
	// cannot outlive its replica) rather than following the one that runs.
	Reruns() bool
	// ReadLogs passes the workload's output after from to emit, one line at a time (a
	// line longer than a chunk in pieces), each with the cursor right after it. An output
	// other than from.Source's (a new run of a local process) is read from its start. With
	// follow it waits for more until the output is complete (the workload has ended and
	// all of it was read) or ctx ends; without, it returns once what there is now has been
	// read. An error of emit ends it with that error.
	ReadLogs(ctx context.Context, job build.Job, from build.LogCursor, follow bool, emit func(line []byte, at build.LogCursor) error) error
}

// Tracker is an Executor that also follows a workload without a goroutine of its own
// (Kubernetes: through the cluster's shared informer). A session on such a target parks once
// its workload is launched (park.go): it costs the replica no goroutine, timer or watch while
// the build runs, and wakes when its workload changes, its deadline comes, a stop arrives or
// the build is handed over.
type Tracker interface {
	// Track starts following the job's workload, as Wait would: wake is called (from any
	// goroutine, never blocking for long) whenever it may have changed, from before Track
	// returns on: a wake may come while Track is still setting the Tracking up, so whoever
	// follows it does not look until Track has returned.
	Track(job build.Job, wake func()) build.Tracking
}
