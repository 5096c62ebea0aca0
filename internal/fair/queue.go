package fair

import (
	"cmp"
	"slices"
)

// Build is one waiting build as the queue orders it.
type Build struct {
	ID       string
	Tenant   string
	Priority int
	Seq      uint64 // arrival order (the request's stream sequence)
}

// before orders a tenant's builds: higher priority first, then older first.
func (b *Build) before(o *Build) bool {
	if b.Priority != o.Priority {
		return b.Priority > o.Priority
	}
	return b.Seq < o.Seq
}

// Usage is what the fleet runs now, by tenant, for Next.
type Usage struct {
	// Running counts each tenant's admitted builds that have not ended.
	Running map[string]int
	// Limits gives a tenant's limits.
	Limits func(tenant string) Limits
}

// Queue is the set of waiting builds, a line per tenant. It is not safe for concurrent use.
type Queue struct {
	lines map[string]*line
	byID  map[string]*Build
}

type line struct {
	builds []*Build // in Build.before order
}

// NewQueue returns an empty queue.
func NewQueue() *Queue {
	return &Queue{lines: map[string]*line{}, byID: map[string]*Build{}}
}

// Len is how many builds wait.
func (q *Queue) Len() int { return len(q.byID) }

// Has reports whether build id waits.
func (q *Queue) Has(id string) bool { _, ok := q.byID[id]; return ok }

// Add puts b in its tenant's line. A build already waiting is not added twice.
func (q *Queue) Add(b Build) {
	if q.Has(b.ID) {
		return
	}
	l := q.lines[b.Tenant]
	if l == nil {
		l = &line{}
		q.lines[b.Tenant] = l
	}
	p := &b
	i, _ := slices.BinarySearchFunc(l.builds, p, func(x, y *Build) int {
		if x.before(y) {
			return -1
		}
		return 1
	})
	l.builds = slices.Insert(l.builds, i, p)
	q.byID[b.ID] = p
}

// Remove takes build id out of the queue; it reports whether it waited.
func (q *Queue) Remove(id string) bool {
	b, ok := q.byID[id]
	if !ok {
		return false
	}
	delete(q.byID, id)
	l := q.lines[b.Tenant]
	if i := slices.Index(l.builds, b); i >= 0 {
		l.builds = slices.Delete(l.builds, i, i+1)
	}
	if len(l.builds) == 0 {
		delete(q.lines, b.Tenant)
	}
	return true
}

// Round is one pass of admissions over the queue: what it found could not start stays so
// for the rest of the round (a round only fills the fleet and its targets).
type Round struct {
	q       *Queue
	usage   Usage
	start   func(Build) (target string, ok bool)
	blocked map[*Build]bool
	done    map[string]bool // tenants with nothing that can start
}

// Round begins a round of admissions. start says whether a build may start now and on which
// target; it sees the effect of the admissions the round made (the caller updates what it
// reads), and usage.Running is updated by Next.
func (q *Queue) Round(usage Usage, start func(Build) (target string, ok bool)) *Round {
	return &Round{q: q, usage: usage, start: start, blocked: map[*Build]bool{}, done: map[string]bool{}}
}

// Next takes the next build to start out of the queue: from the tenant furthest below its
// share (the fewest running builds for its weight) among the tenants below their cap with a
// build that can start, ties going to the tenant whose candidate came first; within the
// tenant, the first build in priority-then-arrival order that can start. It counts the build
// as running for its tenant. ok is false when nothing can start.
func (r *Round) Next() (b Build, target string, ok bool) {
	type pick struct {
		b      *Build
		target string
		run    int
		weight int
	}
	var best *pick
	for tenant, l := range r.q.lines {
		if r.done[tenant] {
			continue
		}
		lim := r.usage.Limits(tenant)
		run := r.usage.Running[tenant]
		if lim.Cap > 0 && run >= lim.Cap {
			r.done[tenant] = true
			continue
		}
		if best != nil && !lessShare(run, lim.Weight, best.run, best.weight) && run*best.weight != best.run*lim.Weight {
			continue // cannot beat the best, whatever its candidate
		}
		cand, target := r.candidate(l)
		if cand == nil {
			r.done[tenant] = true
			continue
		}
		p := &pick{b: cand, target: target, run: run, weight: lim.Weight}
		if best == nil || lessShare(p.run, p.weight, best.run, best.weight) ||
			(p.run*best.weight == best.run*p.weight && p.b.Seq < best.b.Seq) {
			best = p
		}
	}
	if best == nil {
		return Build{}, "", false
	}
	chosen := *best.b
	r.q.Remove(chosen.ID)
	r.usage.Running[chosen.Tenant]++
	return chosen, best.target, true
}

// candidate is the first build of l that can start now, and its target.
func (r *Round) candidate(l *line) (*Build, string) {
	for _, b := range l.builds {
		if r.blocked[b] {
			continue
		}
		if target, ok := r.start(*b); ok {
			return b, target
		}
		r.blocked[b] = true
	}
	return nil, ""
}

// lessShare reports whether a running builds for weight wa is further below its share than
// b for wb: a/wa < b/wb.
func lessShare(a, wa, b, wb int) bool { return a*wb < b*wa }

// TenantView is one tenant's line, for people (buildfleet queue).
type TenantView struct {
	Tenant  string
	Waiting int
	// Head are the first builds of the line, in the order they would start.
	Head []Build
}

// View lists each tenant's line, busiest first, with up to head builds of each.
func (q *Queue) View(head int) []TenantView {
	out := make([]TenantView, 0, len(q.lines))
	for tenant, l := range q.lines {
		v := TenantView{Tenant: tenant, Waiting: len(l.builds)}
		for _, b := range l.builds[:min(head, len(l.builds))] {
			v.Head = append(v.Head, *b)
		}
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b TenantView) int {
		return cmp.Or(cmp.Compare(b.Waiting, a.Waiting), cmp.Compare(a.Tenant, b.Tenant))
	})
	return out
}
