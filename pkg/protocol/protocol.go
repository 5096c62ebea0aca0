// Package protocol holds buildfleet's wire contract: the build request, the stop request, the
// lifecycle event and the build record, the subjects they travel on, and the validation that
// every producer and every replica applies. The JSON Schemas in schemas/ are the source of
// truth; these types round-trip with them.
package protocol

import (
	"encoding/json"
	"time"
)

// BuildRequest asks the fleet to run one build. Producers publish it on RequestSubject(id) with
// the header Nats-Msg-Id set to the build id, so a retried publish is a no-op.
type BuildRequest struct {
	// ID is chosen by the caller and is the dedupe key. It appears in subjects, KV keys and pod
	// names, so it is restricted to lowercase letters, digits and inner dashes (see IDPattern).
	ID string `json:"id"`
	// Image is the container image reference the build runs in.
	Image string `json:"image"`
	// Command is the argv of the build. Either Command or Steps must be set.
	Command []string `json:"command,omitempty"`
	// Steps are shell snippets run in order with /bin/sh -c; the first failing step ends the build.
	Steps []Step `json:"steps,omitempty"`
	// Env is added to the build's environment.
	Env map[string]string `json:"env,omitempty"`
	// SecretEnv names variables of Env whose values are secrets, besides those the fleet's
	// patterns already treat as secret (*_TOKEN, *_PASSWORD, …): their values are masked in
	// everything the fleet publishes or logs.
	SecretEnv []string `json:"secret_env,omitempty"`
	// SecretRefs set variables from Kubernetes Secrets in the build's namespace, so that their
	// values never travel through NATS. Only kubernetes targets that allow the Secret can run
	// such a build. A name may not be in both Env and SecretRefs.
	SecretRefs map[string]SecretRef `json:"secret_refs,omitempty"`
	// Annotations carry per-build options (target pin, resource class, …); see the Annotation* keys.
	Annotations map[string]string `json:"annotations,omitempty"`
	// Pipeline and Job name the build's origin; they become labels on the workload.
	Pipeline string `json:"pipeline,omitempty"`
	Job      string `json:"job,omitempty"`
	// TimeoutSeconds asks for a build timeout below the target's maximum; 0 means the default.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// SecretRef names one key of a Kubernetes Secret.
type SecretRef struct {
	// Secret is the Secret's name in the build's namespace.
	Secret string `json:"secret"`
	// Key is the key within it.
	Key string `json:"key"`
}

// Step is one shell snippet of a multi-step build.
type Step struct {
	// Name labels the step in logs and messages, 1 to 63 characters.
	Name string `json:"name"`
	// Run is the snippet given to /bin/sh -c; it must not be empty.
	Run string `json:"run"`
}

// Annotation keys a build request may carry.
const (
	// AnnotationTarget pins the build to a named target.
	AnnotationTarget = "buildfleet.io/target"
	// AnnotationResources picks a resource class (micro, low, high, turbo) or asks for an
	// explicit size ("cpu=4,memory=8Gi"), capped by the target's maximum.
	AnnotationResources = "buildfleet.io/resources"
	// AnnotationTerminationGrace asks for a longer grace period (a Go duration such as 90s)
	// when a Kubernetes build is killed, up to the target's maximum.
	AnnotationTerminationGrace = "buildfleet.io/termination-grace"
	// AnnotationPriority orders a build among its tenant's waiting builds (0 to
	// MaxPriority, higher first), capped by the operator per tenant.
	AnnotationPriority = "buildfleet.io/priority"
	// AnnotationTenant names the build's tenant when the operator derives tenants from it.
	AnnotationTenant = "buildfleet.io/tenant"
)

// MaxPriority is the highest priority a request may ask for.
const MaxPriority = 100

// StopRequest asks the fleet to abort a build. It travels on its own stream so that it is never
// stuck behind queued build requests.
type StopRequest struct {
	// ID is the build to abort (see IDPattern).
	ID string `json:"id"`
	// Reason says why, for humans; it becomes the aborted event's message.
	Reason string `json:"reason,omitempty"`
}

// State is where a build is in its lifecycle.
type State string

// The lifecycle states. Every build ends in exactly one terminal state.
const (
	StateQueued     State = "queued"
	StateDispatched State = "dispatched"
	StateRunning    State = "running"
	StateSucceeded  State = "succeeded"
	StateFailed     State = "failed"
	StateAborted    State = "aborted"
	StateTimedOut   State = "timed_out"
	StateRejected   State = "rejected"
)

// Terminal reports whether no transition may follow s.
func (s State) Terminal() bool {
	switch s {
	case StateSucceeded, StateFailed, StateAborted, StateTimedOut, StateRejected:
		return true
	}
	return false
}

// Reason explains a failed or rejected build.
type Reason string

// Failure reasons (with StateFailed).
const (
	ReasonImagePull         Reason = "image_pull"
	ReasonUnschedulable     Reason = "unschedulable"
	ReasonOOMKilled         Reason = "oom_killed"
	ReasonEvicted           Reason = "evicted"
	ReasonExitCode          Reason = "exit_code"
	ReasonContainerError    Reason = "container_error"
	ReasonPodLost           Reason = "pod_lost"
	ReasonDispatchExhausted Reason = "dispatch_exhausted"
)

// Rejection reasons (with StateRejected).
const (
	ReasonInvalidRequest Reason = "invalid_request"
	ReasonNoEligible     Reason = "no_eligible_target"
	ReasonUnknownTarget  Reason = "unknown_target"
	ReasonExcludedImage  Reason = "excluded_image"
	ReasonTargetRemoved  Reason = "target_removed"
	ReasonLaunchRefused  Reason = "launch_refused"
)

// EventData is the payload of a lifecycle event.
type EventData struct {
	// BuildID equals the envelope's Subject.
	BuildID string `json:"build_id"`
	// State is the state the build entered; the envelope's Type ends with it.
	State State `json:"state"`
	// Reason is required with StateFailed (a failure reason) and StateRejected (a rejection
	// reason).
	Reason Reason `json:"reason,omitempty"`
	// ExitCode is required when Reason is ReasonExitCode; a pointer so that 0 survives omitempty.
	ExitCode *int   `json:"exit_code,omitempty"`
	Message  string `json:"message,omitempty"`
	Target   string `json:"target,omitempty"`
	Workload string `json:"workload,omitempty"`
	Attempt  int    `json:"attempt,omitempty"`
}

// Event is a lifecycle event in a CloudEvents 1.0 structured-mode JSON envelope. It is
// published on EventSubject(build id) with Nats-Msg-Id EventMsgID(build id, state).
type Event struct {
	SpecVersion     string    `json:"specversion"`
	ID              string    `json:"id"`
	Source          string    `json:"source"`
	Type            string    `json:"type"`
	Subject         string    `json:"subject"`
	Time            time.Time `json:"time"`
	DataContentType string    `json:"datacontenttype"`
	DataSchema      string    `json:"dataschema,omitempty"`
	Data            EventData `json:"data"`
}

// CloudEvents constants used in every event.
const (
	CloudEventsVersion = "1.0"
	EventTypePrefix    = "io.buildfleet.build."
	EventDataSchema    = "https://buildfleet.io/schemas/build-event.v1.json#/$defs/data" // the payload, not the envelope
)

// NewEvent builds the envelope for one transition. source names the emitter (a replica or a client).
func NewEvent(source string, at time.Time, d EventData) Event {
	return Event{
		SpecVersion:     CloudEventsVersion,
		ID:              EventMsgID(d.BuildID, d.State),
		Source:          source,
		Type:            EventTypePrefix + string(d.State),
		Subject:         d.BuildID,
		Time:            at.UTC(),
		DataContentType: "application/json",
		DataSchema:      EventDataSchema,
		Data:            d,
	}
}

// EventMsgID is the dedupe id of the event for state s of build id: replicas that race on the
// same transition publish it once.
func EventMsgID(id string, s State) string { return id + "." + string(s) }

// Record is the build record kept in the JetStream KV bucket, one key per build. It is only
// ever written by compare-and-set on its revision.
type Record struct {
	ID       string `json:"id"`
	State    State  `json:"state"`
	Reason   Reason `json:"reason,omitempty"`
	ExitCode *int   `json:"exit_code,omitempty"`
	Message  string `json:"message,omitempty"`

	// Target is the routing decision, recorded before launch so redeliveries and stops go to it.
	Target   string `json:"target,omitempty"`
	Workload string `json:"workload,omitempty"` // pod or process name on the target
	Cluster  string `json:"cluster,omitempty"`

	// Attempts counts deliveries of the request that reached the claim step. Of those,
	// Handovers ended with a graceful handover to another replica (no cost to the retry
	// budget) and Failures with a transient failure or a vanished replica (BUILDFLEET_MAX_DELIVER
	// of them end the build as failed/dispatch_exhausted).
	Attempts  int `json:"attempts"`
	Handovers int `json:"handovers,omitempty"`
	Failures  int `json:"failures,omitempty"`
	// Owner is the incarnation of the replica that owns the build: its liveness key. Only
	// the owner writes the build's progress, each write fenced by Owner and Attempts; a
	// delivery takes the build over only when the owner gave it back (Released) or its
	// liveness key is gone.
	Owner string `json:"owner,omitempty"`
	// Released says the owner gave the build back on purpose (a handover or a counted
	// failure); a claim that finds it unset, with the owner gone, counts a crash.
	Released bool `json:"released,omitempty"`
	// Delivery is the server's delivery count of the request message that claimed the
	// build last, for people: it decides nothing.
	Delivery uint64 `json:"delivery,omitempty"`
	// Seq is the request stream sequence that owns the build; other copies are duplicates.
	Seq uint64 `json:"seq,omitempty"`
	// Replica names the owner's replica, for people.
	Replica string `json:"replica,omitempty"`

	Abort       bool   `json:"abort,omitempty"`
	AbortReason string `json:"abort_reason,omitempty"`

	TimeoutSeconds int        `json:"timeout_seconds,omitempty"`
	QueuedAt       time.Time  `json:"queued_at"`
	DispatchedAt   *time.Time `json:"dispatched_at,omitempty"`
	RunningAt      *time.Time `json:"running_at,omitempty"`
	FinishedAt     *time.Time `json:"finished_at,omitempty"`
	Deadline       *time.Time `json:"deadline,omitempty"`
}

// EventFromRecord is the lifecycle event for the state rec is in now. Its time is the record's
// timestamp for that state, so publishing it twice gives the same event.
func EventFromRecord(source string, rec Record) Event {
	return EventForState(source, rec, rec.State)
}

// EventForState is the event for a state rec has reached, now or earlier (queued, dispatched,
// running, or its current state), built from the record as a replica re-announces it.
func EventForState(source string, rec Record, s State) Event {
	d := EventData{BuildID: rec.ID, State: s, Target: rec.Target, Workload: rec.Workload, Attempt: rec.Attempts}
	at := rec.QueuedAt
	switch {
	case s == rec.State && s.Terminal():
		d.Reason, d.ExitCode, d.Message = rec.Reason, rec.ExitCode, rec.Message
		if rec.FinishedAt != nil {
			at = *rec.FinishedAt
		}
	case s == StateRunning && rec.RunningAt != nil:
		at = *rec.RunningAt
	case s == StateDispatched && rec.DispatchedAt != nil:
		at = *rec.DispatchedAt
	}
	if s == StateQueued {
		d.Target, d.Workload = "", ""
	}
	return NewEvent(source, at, d)
}

// Marshal encodes v once; the wire types never fail to encode.
func Marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic("protocol: encoding a wire type failed: " + err.Error())
	}
	return b
}

// QueueStatus is what one replica answers on Layout.QueueStatusSubject: the fleet's running
// builds as the run stream counts them, and what the replica holds waiting (only the
// scheduling replica holds any), per tenant, with why it waits. buildfleet queue merges
// the answers.
type QueueStatus struct {
	Replica    string `json:"replica"`
	Scheduling bool   `json:"scheduling"` // this replica holds the queue now
	Waiting    int    `json:"waiting"`    // builds held waiting here
	// Unread are requests in the queue the scheduler does not hold yet (it holds at most
	// BUILDFLEET_QUEUE_HOLD): they wait in arrival order. Every replica reports it.
	Unread int `json:"unread,omitempty"`
	// Current says every build held here was looked at by the scheduler since it arrived:
	// the reasons given are up to date.
	Current bool `json:"current"`
	// Running and MaxRunning are the fleet's admitted builds that have not ended, and its
	// cap (the run consumer's MaxAckPending).
	Running    int            `json:"running"`
	MaxRunning int            `json:"max_running"`
	Tenants    []TenantStatus `json:"tenants,omitempty"`
	Targets    []TargetStatus `json:"targets,omitempty"`
}

// TenantStatus is one tenant's place in the queue.
type TenantStatus struct {
	Tenant      string `json:"tenant"`
	Waiting     int    `json:"waiting"`
	Running     int    `json:"running"`
	Weight      int    `json:"weight"`
	Cap         int    `json:"cap,omitempty"` // 0: none of its own
	MaxPriority int    `json:"max_priority,omitempty"`
	// Why says why its next build has not started.
	Why string `json:"why,omitempty"`
	// Next are its first waiting builds, in the order they would start.
	Next []WaitingBuild `json:"next,omitempty"`
}

// WaitingBuild is one waiting build.
type WaitingBuild struct {
	ID       string `json:"id"`
	Priority int    `json:"priority"`
	// Asked is the priority the request asked for, when the tenant's max lowered it.
	Asked int `json:"asked,omitempty"`
	// WaitedSeconds is how long it has waited since it was queued.
	WaitedSeconds float64 `json:"waited_seconds"`
	Why           string  `json:"why,omitempty"`
}

// TargetStatus is one target's running builds against its cap.
type TargetStatus struct {
	Target     string `json:"target"`
	Running    int    `json:"running"`
	MaxRunning int    `json:"max_running,omitempty"` // 0: none
}
