package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/fair"
	"github.com/buildfleet/buildfleet/internal/queue"
	"github.com/buildfleet/buildfleet/internal/routing"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// The scheduler is the queue's one reader: the replica the server pins to the request
// consumer's priority group holds every waiting request (up to the consumer's
// MaxAckPending, heartbeated like a running build's message) and admits them in fair-share
// order. Admitting a build publishes it to the run stream, on the subject of its target and
// tenant (deduplicated by build id), and only then acks its request: a scheduler that dies
// in between leaves the request to be admitted again, and the run stream drops the copy.
// The runners (every replica) pull admitted builds and hold them while they run, exactly as
// they once held requests.
//
// Nothing here is needed for safety: two schedulers at once (a paused one that wakes after
// the pin moved) admit a build at most twice, and the run stream's dedupe and the record's
// claim keep it to one run. What the pin buys is one consistent view for caps and shares.
const (
	scheduleBatch = 256                    // requests pulled at once
	admitAhead    = 2 * DefaultMaxBatch    // admitted builds no runner has taken yet, at most
	admitTick     = 250 * time.Millisecond // how often a full fleet is looked at again
	countsEvery   = 5 * time.Second        // how often an idle scheduler reads the counts (metrics)
	noTarget      = "_"                    // the subject token of a build without a target or tenant
	pinHeader     = "Nats-Pin-Id"          // on a delivery to the client the server pinned
)

type scheduler struct {
	w      *Worker
	policy *fair.Policy
	wake   chan struct{}
	// pinned says the server pinned the queue to this replica: set by a delivery that
	// carries the pin, cleared when a pull is refused for another replica's pin.
	pinned atomic.Bool

	mu     sync.Mutex
	queue  *fair.Queue
	waits  map[string]*waiting
	atOnce map[string]*waiting // the waits admitted out of turn (waiting.now set)
	counts runCounts           // as last read
	read   time.Time           // when
	// arrived counts the builds that came to wait; looked is what it was when the last
	// round began.
	arrived, looked uint64
}

// waiting is one waiting build: every delivery of a request for it (a duplicate submit after
// the dedupe window is a second request) is settled when it is admitted.
type waiting struct {
	id      string
	leases  []*queue.Lease
	req     protocol.BuildRequest
	tenant  string
	prio    int
	asked   int
	queued  time.Time // when the stream stored the first request
	arrived time.Time // when it came to the scheduler: its admission span starts here
	// now says why it is admitted at once, out of turn: "invalid" (the runner rejects it),
	// "rejected" (no target may ever run it), "stopped". "": it waits its turn.
	now string
	why string // why it could not start at the last round
}

// runCounts are the run stream's counts: admitted builds that have not ended.
type runCounts struct {
	total   int            // admitted, running or about to
	pending int            // admitted, not yet taken by a runner
	max     int            // the fleet's cap: the run consumer's MaxAckPending
	tenants map[string]int // by tenant
	targets map[string]int // by target
}

func newScheduler(w *Worker) *scheduler {
	p := w.cfg.Tenants
	if p == nil {
		p = &fair.Policy{}
	}
	return &scheduler{w: w, policy: p, wake: make(chan struct{}, 1), queue: fair.NewQueue(),
		waits: map[string]*waiting{}, atOnce: map[string]*waiting{}}
}

func (s *scheduler) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run pulls requests and admits them until ctx ends; then every request still waiting is
// given back for the next scheduler, and the pin released so that it takes over at once.
func (s *scheduler) run(ctx context.Context) error {
	var g errgroup.Group
	g.Go(func() error { return s.pull(ctx) })
	g.Go(func() error { return s.admit(ctx) })
	err := g.Wait()
	s.giveBack(ctx, s.pinned.Load())
	return err
}

func (s *scheduler) pull(ctx context.Context) error {
	w := s.w
	group := jetstream.FetchPriorityGroup(w.cfg.Layout.SchedulerGroup())
	failures := 0
	for ctx.Err() == nil {
		batch, err := w.res.Requests.Fetch(scheduleBatch, jetstream.FetchMaxWait(w.cfg.FetchWait), group)
		if err == nil {
			for msg := range batch.Messages() {
				s.arrive(ctx, msg)
			}
			err = batch.Error()
		}
		if errors.Is(err, jetstream.ErrPinIDMismatch) && s.pinned.Swap(false) {
			// The pin moved (this replica went too long without pulling): what waits here
			// goes to the new scheduler, so that one replica sees the whole queue again.
			w.log.Info("another replica schedules now; giving back what waits here")
			s.giveBack(ctx, false)
		}
		if err := w.fetched(ctx, w.res.Requests, "request", err, &failures); err != nil {
			return err
		}
	}
	return nil
}

// arrive takes one delivered request into the queue.
func (s *scheduler) arrive(ctx context.Context, msg jetstream.Msg) {
	w := s.w
	l, err := queue.NewLease(msg)
	if err != nil {
		w.log.Error("message without JetStream metadata; leaving it to AckWait", "err", err)
		return
	}
	if ctx.Err() != nil {
		_ = l.Nak(0) // arrived while shutting down: the next scheduler has it
		return
	}
	w.leases.Add(l)
	if msg.Headers().Get(pinHeader) != "" {
		s.pinned.Store(true)
	}
	wt := &waiting{id: subjectID(msg.Subject()), leases: []*queue.Lease{l}, queued: now(), arrived: time.Now()}
	if md, err := msg.Metadata(); err == nil {
		wt.queued = md.Timestamp
	}
	req, err := decodeRequest(msg, false)
	switch {
	case err != nil:
		wt.now = "invalid"
	default:
		wt.req = req
		wt.tenant = s.policy.Tenant(req)
		wt.prio, wt.asked, err = s.policy.Priority(req, wt.tenant)
		if err != nil {
			wt.now = "invalid"
			break
		}
		// What no target may ever run is rejected by the runner at once: it takes no turn.
		var rej *routing.Rejection
		if _, err := w.cfg.Routes.Choose(routeRequest(req), nil); errors.As(err, &rej) {
			wt.now = "rejected"
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if have, ok := s.waits[wt.id]; ok {
		// Another delivery of a build that waits: the same request redelivered (the old
		// delivery is the server's no longer) or a second request for the build.
		for i, old := range have.leases {
			if old.Stream == l.Stream {
				w.leases.Remove(old)
				have.leases[i] = l
				return
			}
		}
		have.leases = append(have.leases, l)
		return
	}
	s.waits[wt.id] = wt
	s.arrived++
	if wt.now == "" {
		s.queue.Add(fair.Build{ID: wt.id, Tenant: wt.tenant, Priority: wt.prio, Seq: l.Stream})
	} else {
		s.atOnce[wt.id] = wt
	}
	s.poke()
}

// stopped admits a waiting build at once: its runner finds it stopped and ends it.
func (s *scheduler) stopped(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if wt, ok := s.waits[id]; ok && wt.now == "" {
		wt.now = "stopped"
		s.queue.Remove(id)
		s.atOnce[id] = wt
		s.poke()
	}
}

func (s *scheduler) admit(ctx context.Context) error {
	tick := time.NewTicker(admitTick)
	defer tick.Stop()
	var failingSince time.Time // while NATS is away, say so once a minute, not every tick
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.wake:
		case <-tick.C:
		}
		for ctx.Err() == nil {
			n, err := s.round(ctx)
			if err != nil {
				if ctx.Err() == nil && (failingSince.IsZero() || time.Since(failingSince) > time.Minute) {
					s.w.log.Warn("admitting builds failed; trying again", "err", err)
					failingSince = time.Now()
				}
				break
			}
			if !failingSince.IsZero() {
				s.w.log.Info("admitting builds again")
				failingSince = time.Time{}
			}
			if n == 0 {
				break
			}
		}
	}
}

// admission is one build let start, on target. first and now are read when it was picked,
// under the lock: more deliveries may join wt meanwhile, and a stop may mark it.
type admission struct {
	wt     *waiting
	target string
	first  *queue.Lease
	now    string
}

func pick(wt *waiting, target string) admission {
	return admission{wt: wt, target: target, first: wt.leases[0], now: wt.now}
}

// round admits what may start now; it reports how many builds it admitted.
func (s *scheduler) round(ctx context.Context) (int, error) {
	s.mu.Lock()
	idle := len(s.waits) == 0
	stale := time.Since(s.read) > countsEvery
	arrived := s.arrived
	s.mu.Unlock()
	if idle && !stale {
		return 0, nil
	}
	counts, err := s.readCounts(ctx)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.counts, s.read = counts, time.Now()
	var picks []admission
	for _, wt := range s.atOnce {
		picks = append(picks, pick(wt, ""))
	}
	room := min(counts.max-counts.total, admitAhead-counts.pending)
	if room > 0 && s.queue.Len() > 0 {
		running := maps.Clone(counts.tenants)
		targets := maps.Clone(counts.targets) // counts stay as read, for status and metrics
		r := s.queue.Round(fair.Usage{Running: running, Limits: s.policy.Limits}, func(b fair.Build) (string, bool) {
			return s.route(s.waits[b.ID], targets)
		})
		for len(picks) < room {
			b, target, ok := r.Next()
			if !ok {
				break
			}
			targets[target]++
			picks = append(picks, pick(s.waits[b.ID], target))
		}
	}
	s.observe()
	s.looked = arrived
	s.mu.Unlock()
	if len(picks) == 0 {
		return 0, nil
	}
	return s.publish(ctx, picks), nil
}

// route is where wt may start now given the targets' running counts, or why it may not.
func (s *scheduler) route(wt *waiting, running map[string]int) (string, bool) {
	w := s.w
	dec, err := w.cfg.Routes.Choose(routeRequest(wt.req), func(target string) string {
		if why := w.breakers.unavailable(target); why != "" {
			return why
		}
		if c := w.cfg.Targets[target].MaxRunning; c > 0 && running[target] >= c {
			return fmt.Sprintf("full, %d of %d running", running[target], c)
		}
		return ""
	})
	if err != nil {
		wt.why = strings.Join(dec.Explanation, "; ")
		return "", false
	}
	wt.why = ""
	return dec.Target, true
}

// publish admits picks: each goes to the run stream, then its requests are acked. One that
// could not be published waits again. It returns how many were admitted.
func (s *scheduler) publish(ctx context.Context, picks []admission) int {
	w := s.w
	futures := make([]jetstream.PubAckFuture, len(picks))
	spans := make([]trace.Span, len(picks))
	for i, p := range picks {
		// The admission is the request's process span, from its arrival on; the run
		// message carries it, so that the runner's span is its child.
		first := p.first.Msg()
		sctx, span := tracing.StartProcessSince(ctx, w.tracer, first, w.cfg.Layout.RequestSubject("{id}"), w.cfg.Layout.WorkerConsumer(), p.wt.arrived,
			tracing.AttrBuildID.String(p.wt.id), tracing.AttrTenant.String(p.wt.tenant), tracing.AttrPriority.Int(p.wt.prio),
			tracing.AttrTarget.String(p.target))
		if p.now != "" {
			span.SetAttributes(attribute.String("buildfleet.admitted", p.now))
		}
		spans[i] = span
		m := s.runMsg(p)
		tracing.Inject(sctx, m.Header)
		f, err := w.js.PublishMsgAsync(m)
		if err != nil {
			w.log.Warn("admitting a build failed; it waits", "build", p.wt.id, "err", err)
			continue
		}
		futures[i] = f
	}
	var acks errgroup.Group
	acks.SetLimit(32)
	admitted := 0
	for i, p := range picks {
		var err error
		if futures[i] == nil {
			err = errors.New("not published")
		} else {
			select {
			case <-futures[i].Ok():
			case err = <-futures[i].Err():
			case <-ctx.Done():
				err = ctx.Err()
			}
		}
		if err != nil {
			tracing.Fail(spans[i], err)
			spans[i].End()
			if futures[i] != nil {
				w.log.Warn("admitting a build failed; it waits", "build", p.wt.id, "err", err)
			}
			s.mu.Lock()
			// It waits again, unless it was given back meanwhile (the pin moved).
			if s.waits[p.wt.id] == p.wt && p.wt.now == "" {
				s.queue.Add(fair.Build{ID: p.wt.id, Tenant: p.wt.tenant, Priority: p.wt.prio, Seq: p.first.Stream})
			}
			s.mu.Unlock()
			continue
		}
		spans[i].End()
		admitted++
		s.mu.Lock()
		if s.waits[p.wt.id] == p.wt { // not given back meanwhile (its leases are settled then)
			delete(s.waits, p.wt.id)
			delete(s.atOnce, p.wt.id)
		}
		leases := p.wt.leases
		s.mu.Unlock()
		if p.now == "" {
			w.metrics.BuildsAdmitted.WithLabelValues(p.wt.tenant).Inc()
			w.metrics.QueueWait.WithLabelValues(p.wt.tenant).Observe(seconds(now().Sub(p.wt.queued)))
		}
		for _, l := range leases {
			acks.Go(func() error {
				sctx, cancel := settleCtx(ctx)
				defer cancel()
				// A request whose ack is lost comes back and is admitted again: the run
				// stream drops the copy (or its runner finds the build owned or ended).
				if err := l.Ack(sctx); err != nil && !errors.Is(err, queue.ErrSettled) {
					w.log.Warn("settling an admitted request failed", "build", p.wt.id, "err", err)
				}
				w.leases.Remove(l)
				return nil
			})
		}
	}
	_ = acks.Wait()
	return admitted
}

// runMsg is the run stream's copy of p's request: its body and headers (trace context
// included), named by build id for the stream's dedupe, with the scheduler's decision.
func (s *scheduler) runMsg(p admission) *nats.Msg {
	w := s.w
	first := p.first.Msg()
	target, tenant := p.target, p.wt.tenant
	if target == "" {
		target = noTarget
	}
	if tenant == "" {
		tenant = noTarget
	}
	m := queue.Copy(first, w.cfg.Layout.RunSubject(target, tenant))
	m.Header.Set(protocol.HeaderMsgID, p.wt.id)
	m.Header.Set(protocol.HeaderBuild, p.wt.id)
	m.Header.Set(protocol.HeaderTarget, p.target)
	m.Header.Set(protocol.HeaderTenant, p.wt.tenant)
	m.Header.Set(protocol.HeaderOrigSubject, first.Subject())
	m.Header.Set(protocol.HeaderOrigSequence, fmt.Sprint(p.first.Stream))
	m.Header.Del(protocol.HeaderChecked) // a producer's copy is never trusted
	if p.now != "invalid" {
		m.Header.Set(protocol.HeaderChecked, "1")
	}
	return m
}

// readCounts reads the run stream's subject counts and the run consumer's state.
func (s *scheduler) readCounts(ctx context.Context) (runCounts, error) {
	w := s.w
	info, err := w.res.RunStream.Info(ctx, jetstream.WithSubjectFilter(w.cfg.Layout.AllRuns()))
	if err != nil {
		return runCounts{}, fmt.Errorf("run stream: %w", err)
	}
	ci, err := w.res.Runs.Info(ctx)
	if err != nil {
		return runCounts{}, fmt.Errorf("run consumer: %w", err)
	}
	c := runCounts{total: int(info.State.Msgs), pending: int(ci.NumPending), max: ci.Config.MaxAckPending,
		tenants: map[string]int{}, targets: map[string]int{}}
	if c.max <= 0 {
		c.max = int(^uint(0) >> 1)
	}
	for subject, n := range info.State.Subjects {
		target, tenant, ok := w.cfg.Layout.ParseRunSubject(subject)
		if !ok {
			continue
		}
		c.targets[target] += int(n)
		c.tenants[tenant] += int(n)
	}
	return c, nil
}

// observe exports the counts as metrics; s.mu is held.
func (s *scheduler) observe() {
	m := s.w.metrics
	for name, t := range s.w.cfg.Targets {
		m.TargetRunning.WithLabelValues(name).Set(float64(s.counts.targets[name]))
		m.TargetCap.WithLabelValues(name).Set(float64(t.MaxRunning))
	}
	m.TenantRunning.Reset()
	for tenant, n := range s.counts.tenants {
		if tenant != noTarget {
			m.TenantRunning.WithLabelValues(tenant).Set(float64(n))
		}
	}
	m.TenantWaiting.Reset()
	for _, v := range s.queue.View(0) {
		m.TenantWaiting.WithLabelValues(v.Tenant).Set(float64(v.Waiting))
	}
}

// giveBack hands every waiting request back to the server at once and, with unpin, releases
// the pin, so that another replica schedules them without waiting for AckWait or the pin's
// TTL. Only the pinned replica unpins: unpinning is not asked of the holder, it moves the pin
// away from whoever has it.
func (s *scheduler) giveBack(ctx context.Context, unpin bool) {
	w := s.w
	s.mu.Lock()
	waits := s.waits
	s.waits, s.atOnce = map[string]*waiting{}, map[string]*waiting{}
	s.queue = fair.NewQueue()
	s.mu.Unlock()
	for _, wt := range waits {
		for _, l := range wt.leases {
			_ = l.Nak(0)
			w.leases.Remove(l)
		}
	}
	if !unpin {
		return
	}
	sctx, cancel := settleCtx(ctx)
	defer cancel()
	stream, err := w.js.Stream(sctx, w.cfg.Layout.RequestStream())
	if err == nil {
		err = stream.UnpinConsumer(sctx, w.cfg.Layout.WorkerConsumer(), w.cfg.Layout.SchedulerGroup())
	}
	if err != nil {
		w.log.Info("releasing the scheduler pin failed; another replica takes it after its TTL", "err", err)
	}
}

// status is what this replica holds waiting, for buildfleet queue.
func (s *scheduler) status(head int) protocol.QueueStatus {
	unread := 0
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	if info, err := s.w.res.Requests.Info(ctx); err == nil {
		unread = int(info.NumPending)
	}
	cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.counts
	st := protocol.QueueStatus{Replica: s.w.cfg.Replica, Scheduling: len(s.waits) > 0, Waiting: len(s.waits),
		Current: s.looked == s.arrived || len(s.waits) == 0, Unread: unread, Running: c.total, MaxRunning: c.max}
	full := c.total >= c.max
	at := now()
	for _, v := range s.queue.View(head) {
		lim := s.policy.Limits(v.Tenant)
		ts := protocol.TenantStatus{Tenant: v.Tenant, Waiting: v.Waiting, Running: c.tenants[v.Tenant],
			Weight: lim.Weight, Cap: lim.Cap, MaxPriority: lim.MaxPriority}
		for _, b := range v.Head {
			wt := s.waits[b.ID]
			wb := protocol.WaitingBuild{ID: b.ID, Priority: b.Priority, WaitedSeconds: seconds(at.Sub(wt.queued)), Why: wt.why}
			if wt.asked != wt.prio {
				wb.Asked = wt.asked
			}
			ts.Next = append(ts.Next, wb)
		}
		switch {
		case lim.Cap > 0 && ts.Running >= lim.Cap:
			ts.Why = fmt.Sprintf("at its cap: %d of %d running", ts.Running, lim.Cap)
		case full:
			ts.Why = fmt.Sprintf("the fleet is full: %d of %d running", c.total, c.max)
		case len(ts.Next) > 0 && ts.Next[0].Why != "":
			ts.Why = "no eligible target can take its next build now"
		default:
			ts.Why = "waits its turn: tenants further below their share go first"
		}
		st.Tenants = append(st.Tenants, ts)
	}
	for name, t := range s.w.cfg.Targets {
		st.Targets = append(st.Targets, protocol.TargetStatus{Target: name, Running: c.targets[name], MaxRunning: t.MaxRunning})
	}
	return st
}

// routeRequest is req as the router sees it.
func routeRequest(req protocol.BuildRequest) routing.Request {
	return routing.Request{
		BuildID:     req.ID,
		Image:       req.Image,
		Pin:         req.Annotations[protocol.AnnotationTarget],
		Annotations: req.Annotations,
		Pipeline:    req.Pipeline,
		Job:         req.Job,
	}
}

// answerQueueStatus answers buildfleet queue with this replica's status until ctx ends. A
// request may ask for {"head": N} builds of each tenant (default 5).
func (w *Worker) answerQueueStatus(ctx context.Context) error {
	sub, err := w.js.Conn().Subscribe(w.cfg.Layout.QueueStatusSubject(), func(m *nats.Msg) {
		var q struct {
			Head int `json:"head"`
		}
		_ = json.Unmarshal(m.Data, &q)
		if q.Head <= 0 {
			q.Head = 5
		}
		_ = m.Respond(protocol.Marshal(w.sched.status(min(q.Head, 1000))))
	})
	if err != nil {
		// Only buildfleet queue goes without; the replica runs on.
		w.log.Warn("answering queue status requests is not possible", "err", err)
		<-ctx.Done()
		return nil
	}
	<-ctx.Done()
	_ = sub.Unsubscribe()
	return nil
}
