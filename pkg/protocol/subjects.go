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

// Stream, consumer and bucket names.
func (l Layout) RequestStream() string    { return l.stem() + "_REQUESTS" }
func (l Layout) StopStream() string       { return l.stem() + "_STOPS" }
func (l Layout) EventStream() string      { return l.stem() + "_EVENTS" }
func (l Layout) DeadLetterStream() string { return l.stem() + "_DEADLETTER" }
func (l Layout) RecordBucket() string     { return l.stem() + "_BUILDS" }
func (l Layout) ReplicaBucket() string    { return l.stem() + "_REPLICAS" }

// WorkerConsumer is the durable pull consumer every replica shares for build requests.
func (l Layout) WorkerConsumer() string { return "workers" }

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
)
