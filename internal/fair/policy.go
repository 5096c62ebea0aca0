// Package fair decides who goes first when the fleet or a target is full: every build
// belongs to a tenant (derived from its request by the operator's Policy); each tenant has a
// weight, an optional cap on running builds and a highest priority its builds may ask for;
// the next build to start comes from the tenant furthest below its share (Queue.Next), and
// within a tenant the highest priority, then the oldest, goes first. It is pure: no NATS, no
// Kubernetes, no clock.
package fair

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// DefaultTenant is the tenant of a build that no Source names, unless Policy.Fallback says
// otherwise.
const DefaultTenant = "default"

// MaxTenantLength bounds a tenant name (it becomes a NATS subject token and a metric label).
const MaxTenantLength = 64

// Source is one way to name a build's tenant; a Policy tries its sources in order.
type Source struct {
	// Annotation: the value of this annotation of the request.
	Annotation string
	// PipelineOwner: the owner of the request's pipeline, the first path segment after an
	// optional host ("acme" of "github.com/acme/web", of "acme/web" and of "acme").
	PipelineOwner bool
}

func (s Source) String() string {
	if s.PipelineOwner {
		return "pipeline-owner"
	}
	return "annotation:" + s.Annotation
}

// ParseSource reads a source as the targets file writes it: "pipeline-owner" or
// "annotation:<key>".
func ParseSource(s string) (Source, error) {
	switch {
	case s == "pipeline-owner":
		return Source{PipelineOwner: true}, nil
	case strings.HasPrefix(s, "annotation:") && len(s) > len("annotation:"):
		return Source{Annotation: strings.TrimPrefix(s, "annotation:")}, nil
	}
	return Source{}, fmt.Errorf(`%q is not a tenant source: want "pipeline-owner" or "annotation:<key>"`, s)
}

// Limits are one tenant's share of the fleet.
type Limits struct {
	// Weight is the tenant's share relative to the other tenants' (at least 1).
	Weight int
	// Cap is the most builds of the tenant that run at once, fleet-wide (0: no cap of its
	// own).
	Cap int
	// MaxPriority is the highest priority its builds may ask for (0 to
	// protocol.MaxPriority); a higher ask is lowered to it.
	MaxPriority int
}

// MaxWeight bounds a tenant's weight, so that shares compare without overflow.
const MaxWeight = 1_000_000

// Policy derives tenants and priorities from requests. The zero Policy puts every build in
// DefaultTenant with weight 1, no cap and no priorities: one FIFO queue.
type Policy struct {
	// From lists the sources tried in order; the first that yields a name wins.
	From []Source
	// Fallback is the tenant of a build no source names ("": DefaultTenant).
	Fallback string
	// Default are the limits of a tenant Tenants does not list (zero: weight 1).
	Default Limits
	// Tenants are the limits of the tenants the operator names.
	Tenants map[string]Limits
}

// Tenant is the tenant req counts against, as a subject-safe token: letters, digits, '_'
// and '-', starting with a letter or digit (other characters become '_').
func (p *Policy) Tenant(req protocol.BuildRequest) string {
	for _, s := range p.From {
		var name string
		if s.PipelineOwner {
			name = PipelineOwner(req.Pipeline)
		} else {
			name = req.Annotations[s.Annotation]
		}
		if t := Token(name); t != "" {
			return t
		}
	}
	if p.Fallback != "" {
		return Token(p.Fallback)
	}
	return DefaultTenant
}

// Limits are tenant's limits.
func (p *Policy) Limits(tenant string) Limits {
	if l, ok := p.Tenants[tenant]; ok {
		return l
	}
	l := p.Default
	if l.Weight < 1 {
		l.Weight = 1
	}
	return l
}

// Priority is the priority req asks for (its AnnotationPriority, 0 without), lowered to the
// tenant's MaxPriority; asked is what it asked for. A value that is not an integer from 0 to
// protocol.MaxPriority is an error (the request schema refuses it too).
func (p *Policy) Priority(req protocol.BuildRequest, tenant string) (prio, asked int, err error) {
	v, ok := req.Annotations[protocol.AnnotationPriority]
	if !ok {
		return 0, 0, nil
	}
	asked, err = strconv.Atoi(v)
	if err != nil || asked < 0 || asked > protocol.MaxPriority || strconv.Itoa(asked) != v {
		return 0, 0, fmt.Errorf("annotation %s: %q is not an integer from 0 to %d", protocol.AnnotationPriority, v, protocol.MaxPriority)
	}
	return min(asked, p.Limits(tenant).MaxPriority), asked, nil
}

// PipelineOwner is the owner of a pipeline name: its first path segment, after a host if
// the first segment is one (it has a dot and more segments follow).
func PipelineOwner(pipeline string) string {
	parts := strings.Split(strings.Trim(pipeline, "/"), "/")
	if len(parts) >= 3 && strings.Contains(parts[0], ".") {
		return parts[1]
	}
	return parts[0]
}

// Token makes name a tenant token: characters other than ASCII letters, digits, '_' and '-'
// become '_', a leading '_' or '-' is dropped, and it is cut to MaxTenantLength. "" stays "".
func Token(name string) string {
	b := []byte(strings.TrimLeft(name, "_-"))
	if len(b) > MaxTenantLength {
		b = b[:MaxTenantLength]
	}
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	if len(b) > 0 && (b[0] == '_' || b[0] == '-') {
		return Token(string(b)) // a leading character that was replaced
	}
	return string(b)
}
