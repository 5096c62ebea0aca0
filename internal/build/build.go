// Package build is the pure domain of one build: what an executor is asked to run (Job), what
// it reports back (Outcome), how errors are classified (permanent or transient), and the rules
// for moving a build record between states. It imports neither NATS nor client-go.
package build

import (
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Job is what an executor needs to run one build on one target.
type Job struct {
	ID      string
	Image   string
	Command []string
	Steps   []protocol.Step
	Env     map[string]string
	// SecretRefs set variables from Kubernetes Secrets; only an executor that can read them
	// (kubernetes) runs such a job.
	SecretRefs  map[string]protocol.SecretRef
	Annotations map[string]string
	Pipeline    string
	JobName     string
	// Target is the routing decision the record holds.
	Target string
	// Workload is the deterministic name of the pod or process for this build.
	Workload string
	// Timeout is the build's whole budget; Deadline is when it runs out (zero before dispatch).
	Timeout  time.Duration
	Deadline time.Time
	// Attempt counts deliveries that reached the claim step; Adopt is set when an earlier
	// attempt already launched the workload (a redelivery after a crash or a handover).
	Attempt int
	Adopt   bool
	// TraceParent and TraceState are the W3C trace context the request arrived with, handed
	// to the workload so the build continues the producer's trace.
	TraceParent string
	TraceState  string
}

// WorkloadName is the deterministic pod or process name for a build id: the same id always
// gives the same name, so a second launch finds the first instead of duplicating it.
func WorkloadName(id string) string { return "build-" + id }

// NewJob derives the job for a request once it has been routed.
func NewJob(req protocol.BuildRequest, rec protocol.Record) Job {
	j := Job{
		ID:          req.ID,
		Image:       req.Image,
		Command:     req.Command,
		Steps:       req.Steps,
		Env:         req.Env,
		SecretRefs:  req.SecretRefs,
		Annotations: req.Annotations,
		Pipeline:    req.Pipeline,
		JobName:     req.Job,
		Target:      rec.Target,
		Workload:    WorkloadName(req.ID),
		Timeout:     time.Duration(rec.TimeoutSeconds) * time.Second,
		Attempt:     rec.Attempts,
		Adopt:       rec.DispatchedAt != nil,
	}
	if rec.Deadline != nil {
		j.Deadline = *rec.Deadline
	}
	return j
}

// Outcome is how a workload ended, as its executor saw it.
type Outcome struct {
	State    protocol.State // succeeded or failed
	Reason   protocol.Reason
	ExitCode *int
	Message  string
}

// Succeeded is the outcome of a workload that exited 0.
func Succeeded() Outcome { return Outcome{State: protocol.StateSucceeded} }

// ExitedWith is the outcome of a workload that exited with code.
func ExitedWith(code int) Outcome {
	if code == 0 {
		return Succeeded()
	}
	c := code
	return Outcome{State: protocol.StateFailed, Reason: protocol.ReasonExitCode, ExitCode: &c,
		Message: fmt.Sprintf("exited with code %d", code)}
}

// Failed is a failure outcome with a reason and a message.
func Failed(reason protocol.Reason, format string, args ...any) Outcome {
	return Outcome{State: protocol.StateFailed, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// Error classes. Classify errors once, where they enter from the outside world, and let the
// worker map each class to exactly one message settlement.

// PermanentError can never succeed on retry: the worker ends the build with Outcome (a
// rejection or a failure) and terminates the message.
type PermanentError struct {
	Outcome Outcome
	Err     error
}

func (e *PermanentError) Error() string {
	return fmt.Sprintf("permanent (%s/%s): %v", e.Outcome.State, e.Outcome.Reason, e.Err)
}
func (e *PermanentError) Unwrap() error { return e.Err }

// Permanent wraps err as a permanent error that ends the build with the given state and reason.
func Permanent(state protocol.State, reason protocol.Reason, err error) error {
	return &PermanentError{Outcome: Outcome{State: state, Reason: reason, Message: err.Error()}, Err: err}
}

// AsPermanent returns the permanent error in err's chain, if any. Any other error is transient:
// the worker retries it with backoff, until MaxDeliver unless it is Unavailable.
func AsPermanent(err error) (*PermanentError, bool) {
	var p *PermanentError
	ok := errors.As(err, &p)
	return p, ok
}

// UnavailableError is a transient error that says the target cannot be reached or cannot
// keep up right now (no connection, a timeout, 5xx, 429, an open breaker), and nothing about
// the build: the build waits it out without spending its delivery budget, so that an outage
// fails no build, and a workload whose end could not be seen is looked at again.
type UnavailableError struct{ Err error }

func (e *UnavailableError) Error() string { return e.Err.Error() }
func (e *UnavailableError) Unwrap() error { return e.Err }

// Unavailable marks err as an UnavailableError (nil stays nil).
func Unavailable(err error) error {
	if err == nil {
		return nil
	}
	return &UnavailableError{Err: err}
}

// IsUnavailable reports whether err's chain holds an UnavailableError.
func IsUnavailable(err error) bool {
	var u *UnavailableError
	return errors.As(err, &u)
}

// LogCursor is a position in a workload's output, in its executor's terms: Source names which
// output (a pod's container, one run of a local process), Pos where in it. The fleet keeps
// the cursor of the last line it stored, so that whichever replica reads on starts right
// after it.
type LogCursor struct {
	Source string `json:"src,omitempty"`
	Pos    string `json:"pos,omitempty"`
}

// MaxLogPiece is the longest piece of one line an executor passes on at once: a longer line
// comes in pieces, each ending on a whole UTF-8 character (PieceEnd). The fleet masks secrets
// piece by piece, so only a secret across two pieces of a line longer than this escapes.
const MaxLogPiece = 64 << 10

// PieceEnd is where a piece of at most n bytes of b ends: at n, or before a UTF-8 character
// that n would cut (b holds more than n bytes).
func PieceEnd(b []byte, n int) int {
	if n >= len(b) {
		return len(b)
	}
	for k := n; k > n-utf8.UTFMax && k > 0; k-- {
		if utf8.RuneStart(b[k]) {
			return k
		}
	}
	return n
}
