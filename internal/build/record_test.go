package build

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

var (
	t0 = time.Date(2026, 12, 1, 8, 0, 0, 0, time.UTC)
	t1 = t0.Add(time.Minute)
)

func at(t time.Time) *time.Time { return &t }

// The states a record can be in, as the transitions see them. "mine" is owned by incarnation
// a at attempt 1 (the lease la); "theirs" by incarnation b.
var (
	la = Lease{Owner: "a", Attempt: 1}

	unclaimed = protocol.Record{ID: "b1", State: protocol.StateQueued, QueuedAt: t0}
	stopped   = protocol.Record{ID: "b1", State: protocol.StateQueued, QueuedAt: t0, Abort: true, AbortReason: "no"}
	claimed   = protocol.Record{ID: "b1", State: protocol.StateQueued, QueuedAt: t0, Owner: "a", Replica: "ra", Seq: 7,
		Delivery: 1, Attempts: 1, Target: "local", Workload: "build-b1", TimeoutSeconds: 60}
	dispatched = with(claimed, func(r *protocol.Record) {
		r.State, r.DispatchedAt, r.Deadline = protocol.StateDispatched, at(t0), at(t0.Add(time.Minute))
	})
	running  = with(dispatched, func(r *protocol.Record) { r.State, r.RunningAt = protocol.StateRunning, at(t0) })
	released = with(running, func(r *protocol.Record) { r.Released, r.Handovers = true, 1 })
	theirs   = with(running, func(r *protocol.Record) { r.Owner, r.Replica = "b", "rb" })
	aborting = with(running, func(r *protocol.Record) { r.Abort, r.AbortReason = true, "stop it" })
	moved    = with(running, func(r *protocol.Record) { r.Attempts = 2 }) // a later claim of a's own
	ended    = with(running, func(r *protocol.Record) {
		r.State, r.FinishedAt = protocol.StateSucceeded, at(t0)
	})
	rejected = protocol.Record{ID: "b1", State: protocol.StateRejected, Reason: protocol.ReasonInvalidRequest, Seq: 7, QueuedAt: t0, FinishedAt: at(t0)}
)

func with(r protocol.Record, edit func(*protocol.Record)) protocol.Record {
	edit(&r)
	return r
}

func TestClaim(t *testing.T) {
	byA := Claimant{Owner: "a", Replica: "ra", Seq: 7, Delivery: 3, Target: "local", TimeoutSeconds: 60}
	byC := Claimant{Owner: "c", Replica: "rc", Seq: 7, Delivery: 2, Target: "other", TimeoutSeconds: 30}
	tests := []struct {
		name       string
		r          protocol.Record
		exists     bool
		c          Claimant
		ownerAlive bool
		want       protocol.Record // zero: the record is unchanged
		how        How
		created    bool
		err        error
	}{
		{name: "no record: made and claimed, routed", r: protocol.Record{ID: "b1"}, exists: false, c: byA, created: true,
			want: protocol.Record{ID: "b1", State: protocol.StateQueued, QueuedAt: t1, Owner: "a", Replica: "ra", Seq: 7, Delivery: 3,
				Attempts: 1, Target: "local", Workload: "build-b1", TimeoutSeconds: 60}},
		{name: "unclaimed", r: unclaimed, exists: true, c: byA,
			want: with(unclaimed, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Seq, r.Delivery, r.Attempts = "a", "ra", 7, 3, 1
				r.Target, r.Workload, r.TimeoutSeconds = "local", "build-b1", 60
			})},
		{name: "unclaimed, no route", r: unclaimed, exists: true, c: Claimant{Owner: "a", Replica: "ra", Seq: 7},
			want: with(unclaimed, func(r *protocol.Record) { r.Owner, r.Replica, r.Seq, r.Attempts = "a", "ra", 7, 1 })},
		{name: "flagged by a stop before any claim: claimed, flag kept", r: stopped, exists: true, c: byA,
			want: with(stopped, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Seq, r.Delivery, r.Attempts = "a", "ra", 7, 3, 1
				r.Target, r.Workload, r.TimeoutSeconds = "local", "build-b1", 60
			})},
		{name: "live owner holds it: refused", r: running, exists: true, c: byC, ownerAlive: true, err: ErrOwned},
		{name: "live owner, another incarnation of the same replica name: refused", r: running, exists: true,
			c: Claimant{Owner: "a2", Replica: "ra", Seq: 7}, ownerAlive: true, err: ErrOwned},
		{name: "owner gone without giving it back: recovered, a failure, route kept", r: running, exists: true, c: byC,
			how: Recovered, want: with(running, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Delivery, r.Attempts, r.Failures = "c", "rc", 2, 2, 1
			})},
		{name: "owner gone, its pod running on: recovered without a failure", r: running, exists: true,
			c:   func() Claimant { c := byC; c.Outlives = func(t string) bool { return t == "local" }; return c }(),
			how: Recovered, want: with(running, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Delivery, r.Attempts = "c", "rc", 2, 2
			})},
		{name: "owner gone before its launch: a failure, whatever the target", r: claimed, exists: true,
			c:   func() Claimant { c := byC; c.Outlives = func(string) bool { return true }; return c }(),
			how: Recovered, want: with(claimed, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Delivery, r.Attempts, r.Failures = "c", "rc", 2, 2, 1
			})},
		{name: "given back: adopted without a failure, even while the owner lives", r: released, exists: true, c: byC,
			ownerAlive: true, how: Adopted, want: with(released, func(r *protocol.Record) {
				r.Owner, r.Replica, r.Delivery, r.Attempts, r.Released = "c", "rc", 2, 2, false
			})},
		{name: "own record: reclaimed, no failure", r: running, exists: true, c: byA, ownerAlive: true, how: Reclaimed,
			want: with(running, func(r *protocol.Record) { r.Delivery, r.Attempts = 3, 2 })},
		{name: "another stream message owns it", r: running, exists: true,
			c: Claimant{Owner: "c", Seq: 8}, err: ErrDuplicate},
		{name: "another stream message, even when the owner is gone", r: running, exists: true,
			c: Claimant{Owner: "c", Seq: 8}, ownerAlive: false, err: ErrDuplicate},
		{name: "made by the client (seq 0): claimed by the first message", r: unclaimed, exists: true,
			c: Claimant{Owner: "a", Seq: 9}, want: with(unclaimed, func(r *protocol.Record) { r.Owner, r.Seq, r.Attempts = "a", 9, 1 })},
		{name: "finished", r: ended, exists: true, c: byC, err: ErrFinished},
		{name: "rejected", r: rejected, exists: true, c: byA, err: ErrFinished},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Claim(tt.r, tt.exists, tt.c, tt.ownerAlive, t1)
			if !errors.Is(err, tt.err) {
				t.Fatalf("Claim error = %v, want %v", err, tt.err)
			}
			if tt.err != nil {
				return
			}
			want := tt.want
			if diff := cmp.Diff(want, got.Record); diff != "" {
				t.Errorf("Claim record (-want +got):\n%s", diff)
			}
			if got.How != tt.how || got.Created != tt.created {
				t.Errorf("Claim how, created = %v, %v; want %v, %v", got.How, got.Created, tt.how, tt.created)
			}
			if wantLease := (Lease{Owner: tt.c.Owner, Attempt: want.Attempts}); got.Lease != wantLease {
				t.Errorf("Claim lease = %+v, want %+v", got.Lease, wantLease)
			}
		})
	}
}

// fenced lists, for the transitions an owner makes under its lease, every record state that
// is not the lease's own and what the write must answer.
var fenced = []struct {
	name string
	r    protocol.Record
	l    Lease
	err  error
}{
	{"taken over by another incarnation", theirs, la, ErrLost},
	{"given back", released, la, ErrLost},
	{"claimed again since (a later attempt)", moved, la, ErrLost},
	{"never claimed", unclaimed, la, ErrLost},
	{"the zero lease", running, Lease{}, ErrLost},
	{"finished", ended, la, ErrFinished},
	{"finished by someone else", with(ended, func(r *protocol.Record) { r.Owner = "b" }), la, ErrFinished},
}

func TestOwnerWritesAreFenced(t *testing.T) {
	writes := map[string]func(protocol.Record, Lease) (protocol.Record, error){
		"Dispatch": func(r protocol.Record, l Lease) (protocol.Record, error) {
			r, _, err := Dispatch(r, l, t1)
			return r, err
		},
		"Running": func(r protocol.Record, l Lease) (protocol.Record, error) {
			r, _, err := Running(r, l, t1)
			return r, err
		},
		"GiveBack": func(r protocol.Record, l Lease) (protocol.Record, error) { return GiveBack(r, l) },
		"Postpone": func(r protocol.Record, l Lease) (protocol.Record, error) { return Postpone(r, l) },
		"Fail": func(r protocol.Record, l Lease) (protocol.Record, error) {
			r, _, err := Fail(r, l, 5, "x", t1)
			return r, err
		},
		"Finish": func(r protocol.Record, l Lease) (protocol.Record, error) { return Finish(r, l, Succeeded(), t1) },
	}
	for name, write := range writes {
		for _, tt := range fenced {
			t.Run(name+"/"+tt.name, func(t *testing.T) {
				got, err := write(tt.r, tt.l)
				if !errors.Is(err, tt.err) {
					t.Errorf("%s on a record %s = %v, want %v", name, tt.name, err, tt.err)
				}
				if diff := cmp.Diff(tt.r, got); diff != "" {
					t.Errorf("%s changed a record it may not write (-want +got):\n%s", name, diff)
				}
			})
		}
	}
}

func TestDispatch(t *testing.T) {
	tests := []struct {
		name  string
		r     protocol.Record
		want  protocol.Record
		first bool
		err   error
	}{
		{name: "first launch", r: claimed, first: true, want: with(claimed, func(r *protocol.Record) {
			r.State, r.DispatchedAt, r.Deadline = protocol.StateDispatched, at(t1), at(t1.Add(time.Minute))
		})},
		{name: "adoption: kept as it was", r: running, want: running},
		{name: "flagged by a stop", r: with(claimed, func(r *protocol.Record) { r.Abort = true }), err: ErrAborted},
		{name: "flagged after dispatch", r: aborting, err: ErrAborted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, first, err := Dispatch(tt.r, la, t1)
			if !errors.Is(err, tt.err) {
				t.Fatalf("Dispatch error = %v, want %v", err, tt.err)
			}
			if tt.err != nil {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" || first != tt.first {
				t.Errorf("Dispatch first = %v, want %v; record (-want +got):\n%s", first, tt.first, diff)
			}
		})
	}
}

func TestRunning(t *testing.T) {
	got, changed, err := Running(dispatched, la, t1)
	want := with(dispatched, func(r *protocol.Record) { r.State, r.RunningAt = protocol.StateRunning, at(t1) })
	if err != nil || !changed {
		t.Fatalf("Running(dispatched) = %v, %v; want changed", changed, err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Running record (-want +got):\n%s", diff)
	}
	if got, changed, err := Running(running, la, t1); err != nil || changed || !cmp.Equal(got, running) {
		t.Errorf("Running(running) = %v, %v; want unchanged", changed, err)
	}
	// A stop's flag does not keep the owner from recording what its workload does.
	if _, changed, err := Running(with(dispatched, func(r *protocol.Record) { r.Abort = true }), la, t1); err != nil || !changed {
		t.Errorf("Running(flagged) = %v, %v; want changed", changed, err)
	}
}

func TestGiveBack(t *testing.T) {
	got, err := GiveBack(running, la)
	want := with(running, func(r *protocol.Record) { r.Released, r.Handovers = true, 1 })
	if err != nil {
		t.Fatalf("GiveBack: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("GiveBack (-want +got):\n%s", diff)
	}
}

// A build whose target was unreachable is given back with no failure and no handover counted.
func TestPostpone(t *testing.T) {
	failed := with(running, func(r *protocol.Record) { r.Failures = 4 })
	got, err := Postpone(failed, la)
	want := with(failed, func(r *protocol.Record) { r.Released = true })
	if err != nil {
		t.Fatalf("Postpone: %v", err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Postpone (-want +got):\n%s", diff)
	}
}

func TestFail(t *testing.T) {
	got, exhausted, err := Fail(running, la, 2, "boom", t1)
	if want := with(running, func(r *protocol.Record) { r.Released, r.Failures = true, 1 }); err != nil || exhausted || !cmp.Equal(want, got) {
		t.Errorf("Fail (1 of 2) = %v, %v; diff (-want +got):\n%s", exhausted, err, cmp.Diff(want, got))
	}
	twice := with(running, func(r *protocol.Record) { r.Failures = 1 })
	got, exhausted, err = Fail(twice, la, 2, "boom", t1)
	want := with(twice, func(r *protocol.Record) {
		r.Failures, r.State, r.Reason, r.FinishedAt = 2, protocol.StateFailed, protocol.ReasonDispatchExhausted, at(t1)
		r.Message = "gave up after 2 failed deliveries: boom"
	})
	if err != nil || !exhausted || !cmp.Equal(want, got) {
		t.Errorf("Fail (2 of 2) = %v, %v; diff (-want +got):\n%s", exhausted, err, cmp.Diff(want, got))
	}
	// A stop's flag wins over the exhaustion: the build was stopped.
	flagged := with(twice, func(r *protocol.Record) { r.Abort, r.AbortReason = true, "stop" })
	if got, _, _ := Fail(flagged, la, 2, "boom", t1); got.State != protocol.StateAborted {
		t.Errorf("Fail on a flagged build ended %s, want aborted", got.State)
	}
}

func TestFinish(t *testing.T) {
	code := 3
	tests := []struct {
		name string
		r    protocol.Record
		o    Outcome
		want func(*protocol.Record)
	}{
		{"succeeded", running, Succeeded(), func(r *protocol.Record) { r.State = protocol.StateSucceeded }},
		{"exit code", running, ExitedWith(3), func(r *protocol.Record) {
			r.State, r.Reason, r.ExitCode, r.Message = protocol.StateFailed, protocol.ReasonExitCode, &code, "exited with code 3"
		}},
		{"timed out", running, Outcome{State: protocol.StateTimedOut, Message: "late"}, func(r *protocol.Record) {
			r.State, r.Message = protocol.StateTimedOut, "late"
		}},
		{"a stop's flag turns a failure into aborted", aborting, ExitedWith(143), func(r *protocol.Record) {
			r.State, r.Message = protocol.StateAborted, "stop it"
		}},
		{"a stop's flag turns a timeout into aborted", aborting, Outcome{State: protocol.StateTimedOut}, func(r *protocol.Record) {
			r.State, r.Message = protocol.StateAborted, "stop it"
		}},
		{"a build that succeeded before the stop keeps its success", aborting, Succeeded(), func(r *protocol.Record) {
			r.State = protocol.StateSucceeded
		}},
		{"aborted takes the stop's reason", aborting, Outcome{State: protocol.StateAborted}, func(r *protocol.Record) {
			r.State, r.Message = protocol.StateAborted, "stop it"
		}},
		{"a routing rejection", with(claimed, func(r *protocol.Record) { r.Target, r.Workload = "", "" }),
			Outcome{State: protocol.StateRejected, Reason: protocol.ReasonNoEligible, Message: "none"}, func(r *protocol.Record) {
				r.State, r.Reason, r.Message = protocol.StateRejected, protocol.ReasonNoEligible, "none"
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Finish(tt.r, la, tt.o, t1)
			if err != nil {
				t.Fatalf("Finish: %v", err)
			}
			want := with(tt.r, func(r *protocol.Record) { r.FinishedAt = at(t1); tt.want(r) })
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("Finish (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReject(t *testing.T) {
	c := Claimant{Owner: "a", Replica: "ra", Seq: 7, Delivery: 1}
	rejectedNew := protocol.Record{ID: "b1", State: protocol.StateRejected, Reason: protocol.ReasonInvalidRequest, Message: "bad",
		Seq: 7, Delivery: 1, Replica: "ra", QueuedAt: t1, FinishedAt: at(t1)}
	tests := []struct {
		name   string
		r      protocol.Record
		exists bool
		c      Claimant
		want   protocol.Record
		err    error
	}{
		{name: "no record", r: protocol.Record{ID: "b1"}, want: rejectedNew},
		{name: "a stop came first", r: with(stopped, func(r *protocol.Record) { r.Seq = 7 }), exists: true,
			want: with(stopped, func(r *protocol.Record) {
				r.Seq, r.Delivery, r.Replica = 7, 1, "ra"
				// Rejected wins over the flag: the request could never have run.
				r.State, r.Reason, r.Message, r.FinishedAt = protocol.StateRejected, protocol.ReasonInvalidRequest, "bad", at(t1)
			})},
		{name: "made by the client (seq 0): another message", r: unclaimed, exists: true, err: ErrDuplicate},
		{name: "another message owns the build", r: running, exists: true, c: Claimant{Seq: 8}, err: ErrDuplicate},
		{name: "a redelivery of the rejected message", r: rejected, exists: true, err: ErrFinished},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cl := c
			if tt.c.Seq != 0 {
				cl = tt.c
			}
			got, err := Reject(tt.r, tt.exists, cl, "bad", t1)
			if !errors.Is(err, tt.err) {
				t.Fatalf("Reject error = %v, want %v", err, tt.err)
			}
			if tt.err != nil {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Reject (-want +got):\n%s", diff)
			}
		})
	}
}

func TestAbort(t *testing.T) {
	tests := []struct {
		name   string
		r      protocol.Record
		exists bool
		want   protocol.Record
		ended  bool
		err    error
	}{
		{name: "before its request: remembered, ended", r: protocol.Record{ID: "b1"}, ended: true, want: protocol.Record{ID: "b1", State: protocol.StateAborted,
			QueuedAt: t1, Abort: true, AbortReason: "why", Message: "why", FinishedAt: at(t1)}},
		{name: "queued, never routed: ended", r: unclaimed, exists: true, ended: true, want: with(unclaimed, func(r *protocol.Record) {
			r.State, r.Abort, r.AbortReason, r.Message, r.FinishedAt = protocol.StateAborted, true, "why", "why", at(t1)
		})},
		{name: "claimed with a target: flagged for its owner", r: claimed, exists: true,
			want: with(claimed, func(r *protocol.Record) { r.Abort, r.AbortReason = true, "why" })},
		{name: "running: flagged", r: running, exists: true,
			want: with(running, func(r *protocol.Record) { r.Abort, r.AbortReason = true, "why" })},
		{name: "owned by a replica that is gone: flagged for the next claim", r: theirs, exists: true,
			want: with(theirs, func(r *protocol.Record) { r.Abort, r.AbortReason = true, "why" })},
		{name: "finished", r: ended, exists: true, err: ErrFinished},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ended, err := Abort(tt.r, tt.exists, "why", t1)
			if !errors.Is(err, tt.err) {
				t.Fatalf("Abort error = %v, want %v", err, tt.err)
			}
			if tt.err != nil {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" || ended != tt.ended {
				t.Errorf("Abort ended = %v, want %v; record (-want +got):\n%s", ended, tt.ended, diff)
			}
		})
	}
}

// TestNoTwoOwners drives two incarnations through every interleaving of their claims over
// one record, with the liveness each would read, and checks the fencing rule: at no point
// do two leases both hold the record.
func TestNoTwoOwners(t *testing.T) {
	type step struct {
		who   string
		alive bool // what the claimant reads for the record's owner
	}
	seqs := [][]step{
		{{"a", false}, {"b", true}},                // b sees a alive: refused
		{{"a", false}, {"b", false}},               // a's key expired: b recovers it
		{{"a", false}, {"b", false}, {"a", false}}, // a comes back: it must claim afresh
		{{"a", false}, {"a", true}, {"b", true}},
	}
	for i, seq := range seqs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			r, exists := protocol.Record{ID: "b1"}, false
			leases := map[string]Lease{}
			for _, st := range seq {
				alive := st.alive && r.Owner != ""
				c, err := Claim(r, exists, Claimant{Owner: st.who, Seq: 1}, alive, t1)
				if err == nil {
					r, exists = c.Record, true
					leases[st.who] = c.Lease
				}
				holders := 0
				for _, l := range leases {
					if l.holds(r) == nil {
						holders++
					}
				}
				if holders > 1 {
					t.Fatalf("after %+v: %d leases hold the record %+v", st, holders, r)
				}
			}
		})
	}
}

// TestNothingFollowsAnEnd applies every event to every terminal state: each is refused with
// ErrFinished and leaves the record as it ended.
func TestNothingFollowsAnEnd(t *testing.T) {
	ends := map[string]protocol.Record{"succeeded": ended, "rejected": rejected}
	for _, st := range []protocol.State{protocol.StateFailed, protocol.StateAborted, protocol.StateTimedOut} {
		ends[string(st)] = with(ended, func(r *protocol.Record) { r.State = st })
	}
	events := map[string]func(protocol.Record) (protocol.Record, error){
		"Claim": func(r protocol.Record) (protocol.Record, error) {
			c, err := Claim(r, true, Claimant{Owner: "c", Seq: r.Seq}, false, t1)
			return c.Record, err
		},
		"Dispatch": func(r protocol.Record) (protocol.Record, error) { r, _, err := Dispatch(r, la, t1); return r, err },
		"Running":  func(r protocol.Record) (protocol.Record, error) { r, _, err := Running(r, la, t1); return r, err },
		"GiveBack": func(r protocol.Record) (protocol.Record, error) { return GiveBack(r, la) },
		"Fail":     func(r protocol.Record) (protocol.Record, error) { r, _, err := Fail(r, la, 1, "x", t1); return r, err },
		"Finish":   func(r protocol.Record) (protocol.Record, error) { return Finish(r, la, Succeeded(), t1) },
		"Reject": func(r protocol.Record) (protocol.Record, error) {
			return Reject(r, true, Claimant{Seq: r.Seq}, "bad", t1)
		},
		"Abort": func(r protocol.Record) (protocol.Record, error) {
			r, _, err := Abort(r, true, "why", t1)
			return r, err
		},
	}
	for sname, r := range ends {
		for ename, event := range events {
			got, err := event(r)
			if !errors.Is(err, ErrFinished) {
				t.Errorf("%s on a %s build = %v, want ErrFinished", ename, sname, err)
			}
			if diff := cmp.Diff(r, got); diff != "" {
				t.Errorf("%s changed a %s build (-want +got):\n%s", ename, sname, diff)
			}
		}
	}
}

func TestRefused(t *testing.T) {
	for _, err := range []error{ErrFinished, ErrDuplicate, ErrOwned, ErrLost, ErrAborted, fmt.Errorf("write: %w", ErrLost)} {
		if !Refused(err) {
			t.Errorf("Refused(%v) = false, want true", err)
		}
	}
	for _, err := range []error{nil, errors.New("timeout"), fmt.Errorf("write record: %w", errors.New("503"))} {
		if Refused(err) {
			t.Errorf("Refused(%v) = true, want false", err)
		}
	}
}
