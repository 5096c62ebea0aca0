package protocol

import (
	"fmt"
	"regexp"
	"strings"
)

// DefaultPrefix is the subject prefix and resource name stem used when none is configured.
const DefaultPrefix = "buildfleet"

// IDPattern restricts build ids: they become NATS subject tokens, KV keys, pod names and label
// values, so only lowercase letters, digits and inner dashes, 1 to 56 characters.
const IDPattern = `^[a-z0-9]([a-z0-9-]{0,54}[a-z0-9])?$`

// MaxIDLength is the longest build id IDPattern admits.
const MaxIDLength = 56

var idRE = regexp.MustCompile(IDPattern)

// ValidID reports whether id may name a build.
func ValidID(id string) bool { return idRE.MatchString(id) }

// Layout names every subject, stream, consumer and bucket of one buildfleet installation. Two
// installations on one NATS account use different prefixes.
type Layout struct {
	Prefix string
}

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9_-]{0,31}$`)

// NewLayout checks prefix and returns the layout it names.
func NewLayout(prefix string) (Layout, error) {
	if !prefixRE.MatchString(prefix) {
		return Layout{}, fmt.Errorf("prefix %q must match %s", prefix, prefixRE)
	}
	return Layout{Prefix: prefix}, nil
}

func (l Layout) stem() string { return strings.ToUpper(strings.ReplaceAll(l.Prefix, "-", "_")) }

// RequestSubject is where the request for build id is published.
func (l Layout) RequestSubject(id string) string { return l.Prefix + ".requests." + id }

// StopSubject is where a stop for build id is published.
func (l Layout) StopSubject(id string) string { return l.Prefix + ".stops." + id }

// EventSubject is where the lifecycle events of build id are published.
func (l Layout) EventSubject(id string) string { return l.Prefix + ".events." + id }

// AllEvents matches the events of every build.
func (l Layout) AllEvents() string { return l.Prefix + ".events.>" }

// DeadLetterSubject is where a message that can never succeed is kept, by kind (request, stop).
func (l Layout) DeadLetterSubject(kind string) string { return l.Prefix + ".deadletter." + kind }

// RunSubject is where an admitted build waits for, and is held by, the replica that runs it:
// one subject per target and tenant, so that the run stream's subject counts are the
// fleet's running builds by target and tenant.
func (l Layout) RunSubject(target, tenant string) string {
	return l.Prefix + ".run." + target + "." + tenant
}

// ParseRunSubject is the target and tenant of a RunSubject.
func (l Layout) ParseRunSubject(subject string) (target, tenant string, ok bool) {
	rest, ok := strings.CutPrefix(subject, l.Prefix+".run.")
	if !ok {
		return "", "", false
	}
	target, tenant, ok = strings.Cut(rest, ".")
	return target, tenant, ok && !strings.Contains(tenant, ".")
}

// AllRuns matches every admitted build.
func (l Layout) AllRuns() string { return l.Prefix + ".run.>" }

// QueueStatusSubject is where replicas answer what waits in their queue (buildfleet queue).
func (l Layout) QueueStatusSubject() string { return l.Prefix + ".queue.status" }

// Stream, consumer and bucket names.
func (l Layout) RequestStream() string    { return l.stem() + "_REQUESTS" }
func (l Layout) StopStream() string       { return l.stem() + "_STOPS" }
func (l Layout) RunStream() string        { return l.stem() + "_RUN" }
func (l Layout) EventStream() string      { return l.stem() + "_EVENTS" }
func (l Layout) DeadLetterStream() string { return l.stem() + "_DEADLETTER" }
func (l Layout) RecordBucket() string     { return l.stem() + "_BUILDS" }
func (l Layout) ReplicaBucket() string    { return l.stem() + "_REPLICAS" }

// WorkerConsumer is the durable pull consumer of the request stream: the queue. The replica
// pinned to its priority group (SchedulerGroup) holds what waits and admits builds from it
// in fair-share order; its lag (pending + held) is what waits.
func (l Layout) WorkerConsumer() string { return "workers" }

// SchedulerGroup is the priority group of WorkerConsumer: one replica at a time is pinned
// to it and schedules.
func (l Layout) SchedulerGroup() string { return "scheduler" }

// RunConsumer is the durable pull consumer every replica shares for admitted builds: a
// running build holds its message, so its MaxAckPending caps the fleet's running builds.
func (l Layout) RunConsumer() string { return "runners" }

// StopConsumer is the durable pull consumer every replica shares for stop requests.
func (l Layout) StopConsumer() string { return "stoppers" }

// Headers buildfleet sets on messages besides the standard ones.
const (
	HeaderMsgID         = "Nats-Msg-Id"
	HeaderRejectReason  = "Buildfleet-Reject-Reason"
	HeaderRejectMessage = "Buildfleet-Reject-Message"
	HeaderOrigSubject   = "Buildfleet-Original-Subject"
	HeaderOrigSequence  = "Buildfleet-Original-Sequence"
	HeaderDeliveries    = "Buildfleet-Deliveries"
	// HeaderBuild names the build a run message carries (its subject names target and
	// tenant instead).
	HeaderBuild = "Buildfleet-Build"
	// HeaderTarget and HeaderTenant are the scheduler's decision for a run message: the
	// target chosen ("" when it could not route the build: the runner decides, and rejects)
	// and the tenant counted.
	HeaderTarget = "Buildfleet-Target"
	HeaderTenant = "Buildfleet-Tenant"
	// HeaderChecked marks a run message whose request the scheduler validated: the runner
	// parses it without validating it again (only replicas may publish run messages).
	HeaderChecked = "Buildfleet-Checked"
)
