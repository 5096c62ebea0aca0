package routing

import (
	"errors"
	"fmt"
	"strings"

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// Request is what the router needs to know about a build.
type Request struct {
	BuildID string
	Image   string
	// Pin is the target named by the annotation protocol.AnnotationTarget; "" means none.
	Pin string
	// Annotations, Pipeline and Job are the request's, for the isolation policy.
	Annotations map[string]string
	Pipeline    string
	Job         string
	// RequireIsolation keeps the build off every non-isolated target, pinned ones included,
	// whatever the table's isolation policy says.
	RequireIsolation bool
}

// Rule says which routing rule produced a decision.
type Rule string

// The routing rules, in the order Choose tries them.
const (
	RulePin      Rule = "pin"
	RuleWeighted Rule = "weighted"
	RuleDefault  Rule = "default"
	// RuleAdmitted: the scheduler chose the target when it admitted the build (by weight or
	// default, among the targets with room), and the runner checked it like a pin.
	RuleAdmitted Rule = "admitted"
)

// Decision is where a build goes and why.
type Decision struct {
	Target string
	Rule   Rule
	// Isolation names the policy rule that required an isolated target, if one did.
	Isolation string
	// Explanation has one human-readable line per step Choose took: what was dropped and
	// why, the weights considered, the pick. When Choose fails, the error states the verdict.
	Explanation []string
}

// Rejection is returned, as an error, when no target may ever run the build as requested:
// retrying cannot help, so the build is rejected with Reason.
type Rejection struct {
	Reason      protocol.Reason
	Message     string
	Explanation []string
}

// Error implements error.
func (r *Rejection) Error() string { return fmt.Sprintf("%s: %s", r.Reason, r.Message) }

// ErrUnavailable is returned, wrapped, when the only targets that may run the build are
// unavailable right now (their breaker is open). It is transient: retry later.
var ErrUnavailable = errors.New("no eligible target is available right now")

// Choose picks the target for req. unavailable says why a target cannot take a build right
// now ("breaker open", "full (10 of 10 running)"; "" when it can); it may be nil. The error is a *Rejection (permanent) or wraps ErrUnavailable (transient). The
// returned Decision carries the explanation even when the error is not nil.
//
// The rules, in order, once the isolation policy has said whether the build requires an
// isolated target:
//  1. A pin names the target: it is used if it exists, does not exclude the image and
//     satisfies isolation; otherwise the build is rejected.
//  2. Targets that exclude the image, that are not isolated when isolation is required, or
//     that are unavailable are dropped.
//  3. The remaining targets with weight > 0 are chosen from by weight, using a stable hash of
//     the build id: the same id lands on the same target for as long as the table and the
//     set of available targets are unchanged.
//  4. Otherwise the default target, if it is eligible.
func (t *Table) Choose(req Request, unavailable func(target string) string) (Decision, error) {
	c := chooser{t: t, req: req, unavailable: unavailable}
	c.isolation()
	if req.Pin != "" {
		return c.pinned()
	}
	return c.unpinned()
}

// chooser holds the state of one Choose call and collects its explanation.
type chooser struct {
	t           *Table
	req         Request
	unavailable func(string) string
	lines       []string
	rule        string // the isolation rule that matched
}

func (c *chooser) explain(format string, args ...any) {
	c.lines = append(c.lines, fmt.Sprintf(format, args...))
}

// whyUnavailable is why target name cannot take the build now, "" if it can.
func (c *chooser) whyUnavailable(name string) string {
	if c.unavailable == nil {
		return ""
	}
	return c.unavailable(name)
}

// decide returns a decision carrying the explanation so far.
func (c *chooser) decide(target string, rule Rule) (Decision, error) {
	return Decision{Target: target, Rule: rule, Isolation: c.rule, Explanation: c.lines}, nil
}

func (c *chooser) reject(reason protocol.Reason, format string, args ...any) (Decision, error) {
	msg := fmt.Sprintf(format, args...)
	return Decision{Explanation: c.lines}, &Rejection{Reason: reason, Message: msg, Explanation: c.lines}
}

// byRule names the isolation rule that applies, for messages.
func (c *chooser) byRule() string {
	if c.rule == "" {
		return ""
	}
	return fmt.Sprintf(" (isolation required by policy %q)", c.rule)
}

func (c *chooser) retryLater(format string, args ...any) (Decision, error) {
	return Decision{Explanation: c.lines}, fmt.Errorf(format+": %w", append(args, ErrUnavailable)...)
}

// excludedBy returns the first of tg's patterns that matches the image, or "".
func (c *chooser) excludedBy(tg Target) (string, bool) {
	for _, re := range tg.Exclude {
		if re.MatchString(c.req.Image) {
			return patternText(re), true
		}
	}
	return "", false
}

func (c *chooser) pinned() (Decision, error) {
	pin := c.req.Pin
	c.explain("pinned to %q by annotation %s", pin, protocol.AnnotationTarget)
	i, ok := c.t.byName[pin]
	if !ok {
		return c.reject(protocol.ReasonUnknownTarget, "pinned target %q does not exist (targets: %s)", pin, c.t.names())
	}
	tg := c.t.targets[i]
	if p, ok := c.excludedBy(tg); ok {
		c.explain("target %q: excluded, image matches %q", pin, p)
		return c.reject(protocol.ReasonExcludedImage, "image %s is excluded on pinned target %q (matches %q)", c.req.Image, pin, p)
	}
	if c.req.RequireIsolation && !tg.Isolated {
		c.explain("target %q: not isolated, and the build requires isolation", pin)
		return c.reject(protocol.ReasonNoEligible, "build requires an isolated target%s but pinned target %q is not isolated", c.byRule(), pin)
	}
	if why := c.whyUnavailable(pin); why != "" {
		c.explain("target %q: unavailable (%s)", pin, why)
		return c.retryLater("pinned target %q", pin)
	}
	c.explain("target %q: eligible", pin)
	c.explain("chose %q (rule %s)", pin, RulePin)
	return c.decide(pin, RulePin)
}

// weighted is a target that survived rule 2, with its weight.
type weighted struct {
	name   string
	weight int
}

func (c *chooser) unpinned() (Decision, error) {
	var (
		pool  []weighted
		total int
		// waiting is set when a target that could take the build is only unavailable: then
		// the build must wait rather than be rejected.
		waiting bool
		// why records, per target, why it cannot take the build (for the rejection message).
		why []string
	)
	def := c.t.defaultTarget
	for _, tg := range c.t.targets {
		if p, ok := c.excludedBy(tg); ok {
			c.explain("target %q: excluded, image matches %q", tg.Name, p)
			why = append(why, fmt.Sprintf("%s excludes it (%q)", tg.Name, p))
			continue
		}
		if c.req.RequireIsolation && !tg.Isolated {
			c.explain("target %q: dropped, not isolated and the build requires isolation", tg.Name)
			why = append(why, tg.Name+" is not isolated")
			continue
		}
		if busy := c.whyUnavailable(tg.Name); busy != "" {
			c.explain("target %q: unavailable (%s)", tg.Name, busy)
			why = append(why, tg.Name+" is unavailable")
			if tg.Weight > 0 || tg.Name == def {
				waiting = true
			}
			continue
		}
		if tg.Weight == 0 {
			c.explain("target %q: eligible, weight 0 (pinned or default traffic only)", tg.Name)
			if tg.Name != def {
				why = append(why, tg.Name+" has weight 0 and is not the default")
			}
			continue
		}
		c.explain("target %q: eligible, weight %d", tg.Name, tg.Weight)
		pool = append(pool, weighted{tg.Name, tg.Weight})
		total += tg.Weight
	}

	if total > 0 {
		h := hashID(c.req.BuildID) % uint64(total)
		r := int(h)
		for _, w := range pool {
			if r < w.weight {
				c.explain("weighted choice among %s: hash of build id %q mod %d = %d, chose %q (rule %s)",
					describe(pool), c.req.BuildID, total, h, w.name, RuleWeighted)
				return c.decide(w.name, RuleWeighted)
			}
			r -= w.weight
		}
		panic("routing: weighted walk ran past the total weight")
	}
	c.explain("no eligible target with weight > 0")

	if def == "" {
		c.explain("no default target")
	} else {
		switch ok, unavail := c.defaultEligible(def); {
		case ok && !unavail:
			c.explain("chose default target %q (rule %s)", def, RuleDefault)
			return c.decide(def, RuleDefault)
		case ok:
			c.explain("default target %q is unavailable", def)
		default:
			c.explain("default target %q is not eligible", def)
		}
	}
	if waiting {
		return c.retryLater("image %s", c.req.Image)
	}
	reason := "no targets"
	if len(why) > 0 {
		reason = strings.Join(why, "; ")
	}
	return c.reject(protocol.ReasonNoEligible, "no eligible target for image %s%s: %s", c.req.Image, c.byRule(), reason)
}

// defaultEligible reports whether the default target may take the build (ok) and whether it
// is only unavailable right now. Its reasons were already explained by the scan in unpinned.
func (c *chooser) defaultEligible(def string) (ok, unavailable bool) {
	tg := c.t.targets[c.t.byName[def]]
	if _, excluded := c.excludedBy(tg); excluded {
		return false, false
	}
	if c.req.RequireIsolation && !tg.Isolated {
		return false, false
	}
	return true, c.whyUnavailable(def) != ""
}

func describe(pool []weighted) string {
	parts := make([]string, len(pool))
	for i, w := range pool {
		parts[i] = fmt.Sprintf("%s (%d)", w.name, w.weight)
	}
	return strings.Join(parts, ", ")
}

func (t *Table) names() string {
	names := make([]string, len(t.targets))
	for i, tg := range t.targets {
		names[i] = tg.Name
	}
	return strings.Join(names, ", ")
}

// hashID maps a build id to a well-mixed 64-bit value that is the same in every process and
// every release (unlike hash/maphash, which is seeded per process). FNV-1a alone is a poor fit:
// multiplication only carries upward, so its low bits see few input bits (bit 0 is the parity
// of the bytes' low bits), and the modulo by a small total weight reads mostly those bits. The
// splitmix64 finalizer spreads every input bit over the whole word. The function must never
// change, or builds redelivered across an upgrade would move to another target.
func hashID(id string) uint64 {
	const (
		offset64 = 14695981039346656037
		prime64  = 1099511628211
	)
	x := uint64(offset64)
	for i := 0; i < len(id); i++ {
		x ^= uint64(id[i])
		x *= prime64
	}
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
