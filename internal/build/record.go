package build

import (
	"errors"
	"time"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// The build record's transitions. Each is a pure function of the record it is given: no
// I/O, no clock (the caller passes now), no hidden state, so the store may apply it again to
// a fresher copy after a lost compare-and-set, and the tables in record_test.go cover every
// state × event.
//
// Ownership is fenced by the record, never by the message that carried the request: a
// request message can be delivered again while its first holder still works (a consumer
// deleted and made again, a replica paused past AckWait), so a delivery may take a build
// only when the record's owner gave it back, or is provably gone (its liveness key is gone:
// the caller looks that up and passes it in). Every later write of the owner's is checked
// against the Lease its claim returned: the owner's incarnation and the claim's attempt
// number. A write under a lease the record no longer names is refused with ErrLost, and
// the replica that gets it stands down.

// Refusals of a transition. The record is left as it was.
var (
	// ErrFinished: the build already ended; nothing may follow a terminal state.
	ErrFinished = errors.New("build already finished")
	// ErrDuplicate: another message of the request stream (a copy published outside the
	// duplicate window) stands for this build.
	ErrDuplicate = errors.New("another copy of this request owns the build")
	// ErrOwned: a live replica owns the build. The delivery that asked must not touch it.
	ErrOwned = errors.New("a live replica owns the build")
	// ErrLost: the lease no longer owns the build (it was taken over, or given back).
	ErrLost = errors.New("this claim no longer owns the build")
	// ErrAborted: a stop request flagged the build before its workload was recorded as
	// dispatched.
	ErrAborted = errors.New("aborted by a stop request")
)

// Refused reports whether err is a refusal of a transition (one of the Err* above): retrying
// the same transition cannot help.
func Refused(err error) bool {
	for _, refusal := range []error{ErrFinished, ErrDuplicate, ErrOwned, ErrLost, ErrAborted} {
		if errors.Is(err, refusal) {
			return true
		}
	}
	return false
}

// Lease is what a claim grants: the owner's incarnation and the attempt number its claim
// wrote. It fences every later write of that owner.
type Lease struct {
	Owner   string
	Attempt int
}

// holds reports whether r still belongs to l.
func (l Lease) holds(r protocol.Record) error {
	switch {
	case r.State.Terminal():
		return ErrFinished
	case r.Owner != l.Owner || r.Attempts != l.Attempt || r.Released || l.Owner == "":
		return ErrLost
	}
	return nil
}

// Claimant is one delivery of a request asking to own its build.
type Claimant struct {
	Owner    string // the replica incarnation's token (its liveness key)
	Replica  string // the replica's name, for people
	Seq      uint64 // the request's stream sequence
	Delivery uint64 // the server's delivery count, for people
	// Target and TimeoutSeconds are the routing decision, recorded when the build has
	// none yet (empty Target: it could not be routed).
	Target         string
	TimeoutSeconds int
	// Outlives reports whether a workload launched on target runs on when its owner
	// vanishes (a pod does; a local process dies with its replica). Nil: none does.
	Outlives func(target string) bool
}

// How says how a claim took its build.
type How int

// The ways a claim takes a build.
const (
	// Fresh: nobody had claimed the build.
	Fresh How = iota
	// Adopted: the previous owner gave it back (a handover or a counted failure).
	Adopted
	// Recovered: the previous owner vanished (its liveness key is gone) without giving it
	// back: a crash. It costs the build one failure, unless its workload was launched and
	// outlives its owner (a pod, which ran on untouched and is only followed again).
	Recovered
	// Reclaimed: the previous claim was this same incarnation's (a delivery of the request
	// that came back to the replica that owns it).
	Reclaimed
)

// Claimed is a successful claim.
type Claimed struct {
	Record  protocol.Record
	Lease   Lease
	How     How
	Created bool // the claim made the record: the queued event is this claimant's to publish
}

// Every transition is given the stored record, or, when there is none (exists false), a
// record holding only the build's ID.

// Claim makes c the owner of the build. ownerAlive is whether the liveness key of r.Owner
// exists (false when the record names no owner); it must be read after r. The claim is
// refused when the build ended, when another stream message stands for it, and when it
// belongs to a live replica that has not given it back.
func Claim(r protocol.Record, exists bool, c Claimant, ownerAlive bool, now time.Time) (Claimed, error) {
	created := !exists
	if created {
		r = protocol.Record{ID: r.ID, State: protocol.StateQueued, QueuedAt: now}
	}
	switch {
	case r.State.Terminal():
		return Claimed{Record: r}, ErrFinished
	case r.Seq != 0 && r.Seq != c.Seq:
		return Claimed{Record: r}, ErrDuplicate
	}
	how := Fresh
	switch {
	case r.Owner == "":
	case r.Owner == c.Owner:
		how = Reclaimed
	case r.Released:
		how = Adopted
	case ownerAlive:
		return Claimed{Record: r}, ErrOwned
	default:
		how = Recovered
		if r.DispatchedAt == nil || c.Outlives == nil || !c.Outlives(r.Target) {
			r.Failures++
		}
	}
	r.Owner, r.Replica, r.Seq, r.Delivery, r.Released = c.Owner, c.Replica, c.Seq, c.Delivery, false
	r.Attempts++
	if r.Target == "" && c.Target != "" {
		r.Target = c.Target
		r.Workload = WorkloadName(r.ID)
		r.TimeoutSeconds = c.TimeoutSeconds
	}
	return Claimed{Record: r, Lease: Lease{Owner: c.Owner, Attempt: r.Attempts}, How: how, Created: created}, nil
}

// Dispatch records that the workload was launched: the first time, the state, the time and
// the build's deadline. first says whether this write did it (false on an adoption). A
// build flagged by a stop is refused with ErrAborted: its workload must be killed.
func Dispatch(r protocol.Record, l Lease, now time.Time) (rec protocol.Record, first bool, err error) {
	if err := l.holds(r); err != nil {
		return r, false, err
	}
	if r.Abort {
		return r, false, ErrAborted
	}
	if r.DispatchedAt != nil {
		return r, false, nil
	}
	at, deadline := now, now.Add(time.Duration(r.TimeoutSeconds)*time.Second)
	r.State, r.DispatchedAt, r.Deadline = protocol.StateDispatched, &at, &deadline
	return r, true, nil
}

// Running records that the workload runs; changed is false when it already did.
func Running(r protocol.Record, l Lease, now time.Time) (rec protocol.Record, changed bool, err error) {
	if err := l.holds(r); err != nil {
		return r, false, err
	}
	if r.RunningAt != nil {
		return r, false, nil
	}
	at := now
	r.State, r.RunningAt = protocol.StateRunning, &at
	return r, true, nil
}

// GiveBack releases the build, at no cost to it, so that the next delivery adopts it: the
// owner is shutting down.
func GiveBack(r protocol.Record, l Lease) (protocol.Record, error) {
	if err := l.holds(r); err != nil {
		return r, err
	}
	r.Handovers++
	r.Released = true
	return r, nil
}

// Postpone gives the build back without counting a failure: its target could not be reached
// (an Unavailable error), which says nothing about the build.
func Postpone(r protocol.Record, l Lease) (protocol.Record, error) {
	if err := l.holds(r); err != nil {
		return r, err
	}
	r.Released = true
	return r, nil
}

// Fail gives the build back after a transient failure, which counts against its delivery
// budget: once its failures reach maxFailures the build ends failed/dispatch_exhausted
// instead (exhausted), with cause in the message.
func Fail(r protocol.Record, l Lease, maxFailures int, cause string, now time.Time) (rec protocol.Record, exhausted bool, err error) {
	if err := l.holds(r); err != nil {
		return r, false, err
	}
	r.Failures++
	if r.Failures >= maxFailures {
		return end(r, Exhausted(r.Failures, cause), now), true, nil
	}
	r.Released = true
	return r, false, nil
}

// Exhausted is the outcome of a build whose deliveries failed failures times.
func Exhausted(failures int, cause string) Outcome {
	if cause == "" {
		return Failed(protocol.ReasonDispatchExhausted, "gave up after %d failed deliveries", failures)
	}
	return Failed(protocol.ReasonDispatchExhausted, "gave up after %d failed deliveries: %s", failures, cause)
}

// Finish moves the build to the terminal state of o. A build flagged by a stop ends aborted,
// whatever its workload said on the way out (the stop killed it), unless it succeeded or was
// rejected. A build that already ended is refused with ErrFinished and left as it ended.
func Finish(r protocol.Record, l Lease, o Outcome, now time.Time) (protocol.Record, error) {
	if err := l.holds(r); err != nil {
		return r, err
	}
	return end(r, o, now), nil
}

// end writes a terminal state, applying a stop's flag.
func end(r protocol.Record, o Outcome, now time.Time) protocol.Record {
	state, reason, code, msg := o.State, o.Reason, o.ExitCode, o.Message
	if r.Abort && state != protocol.StateSucceeded && state != protocol.StateRejected {
		state, reason, code, msg = protocol.StateAborted, "", nil, r.AbortReason
	}
	if state == protocol.StateAborted && msg == "" {
		msg = r.AbortReason
	}
	at := now
	r.State, r.Reason, r.ExitCode, r.Message, r.FinishedAt = state, reason, code, msg, &at
	return r
}

// Reject ends a build whose request message is invalid, unless another message stands for
// the build (ErrDuplicate: the invalid copy never touches it) or it already ended
// (ErrFinished: a redelivery of the rejected message).
func Reject(r protocol.Record, exists bool, c Claimant, message string, now time.Time) (protocol.Record, error) {
	switch {
	case exists && r.Seq != c.Seq:
		return r, ErrDuplicate
	case exists && r.State.Terminal():
		return r, ErrFinished
	case !exists:
		r = protocol.Record{ID: r.ID, QueuedAt: now}
	}
	r.Seq, r.Delivery, r.Replica = c.Seq, c.Delivery, c.Replica
	return end(r, Outcome{State: protocol.StateRejected, Reason: protocol.ReasonInvalidRequest, Message: message}, now), nil
}

// Abort flags the build for a stop request. A build that was never routed (no claim has
// recorded a target) has nothing to kill and ends aborted at once (ended); otherwise its
// owner, or whoever claims it next, kills the workload and ends it. A stop that arrives
// before its request makes the record, so the request finds the flag.
func Abort(r protocol.Record, exists bool, reason string, now time.Time) (rec protocol.Record, ended bool, err error) {
	if !exists {
		r = protocol.Record{ID: r.ID, State: protocol.StateQueued, QueuedAt: now}
	}
	if r.State.Terminal() {
		return r, false, ErrFinished
	}
	r.Abort, r.AbortReason = true, reason
	if r.Target == "" {
		return end(r, Outcome{State: protocol.StateAborted, Message: reason}, now), true, nil
	}
	return r, false, nil
}
