package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// Cluster is one Kubernetes cluster as a replica sees it: one client, and one shared pod
// informer for each namespace its targets use, selected to this fleet's build pods and trimmed
// to the few fields the executor reads. Every build on the cluster is followed through it:
// no per-build polling and no per-build watch.
type Cluster struct {
	name   string
	client kubernetes.Interface
	// probe asks the apiserver whether it is ready, outside client's rate limiter: a burst
	// of pod creates must not make the replica look unready.
	probe rest.Interface
	fleet string
	log   *slog.Logger

	// creates bounds the pod creates in flight: a thousand builds arriving at once are
	// created faster through a few dozen requests at a time than all at once. Each slot is
	// one of the creators' clients, each its own connection, so the creates in flight are
	// spread evenly over them.
	creates chan kubernetes.Interface

	mu      sync.Mutex
	spaces  map[string]*space
	running bool
}

// DefaultMaxCreates is how many pod creates one replica has in flight per cluster.
const DefaultMaxCreates = 64

// DefaultCreateConns is how many connections of its own a replica's pod creates go over
// (Clusters.Get): DefaultMaxCreates/DefaultCreateConns creates on each. An apiserver serves
// each HTTP/2 connection's requests through one goroutine of its own: busy, it gives each
// connection a share, not each request, so the creates of one connection wait behind
// everyone else's, and the share one connection gets strays by ±20% from minute to minute
// (two identical bare create loops side by side, one connection each, on the benchmark's
// control plane: 0.77–1.29 of each other; sixteen each: 0.98–1.04). Several connections
// are also what spreads the creates over the apiservers behind a load balancer.
const DefaultCreateConns = 16

// acquire takes a create slot: the client that create goes over.
func (c *Cluster) acquire(ctx context.Context) (kubernetes.Interface, error) {
	select {
	case k := <-c.creates:
		return k, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func (c *Cluster) release(k kubernetes.Interface) { c.creates <- k }

// NewCluster returns the cluster reached through client. name is for logs (the kubeconfig
// context); fleet is the fleet's prefix, which selects its pods. Pods are created through
// creators, each given as many of the DefaultMaxCreates slots as the next (none: through
// client).
func NewCluster(name string, client kubernetes.Interface, fleet string, log *slog.Logger, creators ...kubernetes.Interface) *Cluster {
	if log == nil {
		log = slog.Default()
	}
	if len(creators) == 0 {
		creators = []kubernetes.Interface{client}
	}
	creates := make(chan kubernetes.Interface, DefaultMaxCreates)
	for i := range DefaultMaxCreates {
		creates <- creators[i%len(creators)]
	}
	return &Cluster{name: name, client: client, probe: client.Discovery().RESTClient(), fleet: fleet, log: log.With("cluster", name), spaces: map[string]*space{},
		creates: creates}
}

// Client is the cluster's client.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// space returns the informer of namespace ns, making it on first use. Executors are made
// before Run, which starts every informer.
func (c *Cluster) space(ns string) *space {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.spaces[ns]; ok {
		return s
	}
	if c.running {
		panic("kube: an executor was added to cluster " + c.name + " after it started")
	}
	selector := labels.Set{LabelManagedBy: ManagedBy, LabelFleet: FleetLabel(c.fleet)}.String()
	factory := informers.NewSharedInformerFactoryWithOptions(c.client, 0,
		informers.WithNamespace(ns),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = selector }),
		informers.WithTransform(trim))
	s := &space{
		cluster:   c,
		ns:        ns,
		informer:  factory.Core().V1().Pods().Informer(),
		watchers:  map[string][]*watcher{},
		retention: map[string]time.Duration{},
	}
	// A lost watch is noted, so that no pod's budget runs out on what a stale cache shows.
	if err := s.informer.SetWatchErrorHandlerWithContext(func(ctx context.Context, r *cache.Reflector, err error) {
		s.lostSight()
		cache.DefaultWatchErrorHandler(ctx, r, err)
	}); err != nil {
		panic(err) // only fails on an informer that has started, and this one has not
	}
	if _, err := s.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.changed,
		UpdateFunc: func(_, obj any) { s.changed(obj) },
		DeleteFunc: s.deleted,
	}); err != nil {
		panic(err) // only fails on an informer that has stopped, and this one has not started
	}
	c.spaces[ns] = s
	return s
}

// Run runs the informers and the sweepers that delete finished pods after their retention,
// until ctx ends.
func (c *Cluster) Run(ctx context.Context) error {
	c.mu.Lock()
	c.running = true
	spaces := make([]*space, 0, len(c.spaces))
	for _, s := range c.spaces {
		spaces = append(spaces, s)
	}
	c.mu.Unlock()
	g, ctx := errgroup.WithContext(ctx)
	for _, s := range spaces {
		g.Go(func() error {
			s.informer.RunWithContext(ctx)
			return nil
		})
		g.Go(func() error { return s.sweep(ctx) })
	}
	return g.Wait()
}

// Name is the cluster's name: its kubeconfig context, or "in-cluster".
func (c *Cluster) Name() string { return c.name }

// Check reports whether the cluster is usable, for readiness: the apiserver answers its own
// /readyz (which every authenticated user may read), and every informer has listed its pods.
func (c *Cluster) Check(ctx context.Context) error {
	if err := c.probe.Get().AbsPath("/readyz").Do(ctx).Error(); err != nil {
		return fmt.Errorf("apiserver of %s: %w", c.name, err)
	}
	if !c.Ready() {
		return fmt.Errorf("cluster %s: the pod informers have not listed their pods yet", c.name)
	}
	return nil
}

// Ready reports whether every informer has listed its pods once.
func (c *Cluster) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.spaces {
		if !s.informer.HasSynced() {
			return false
		}
	}
	return true
}

// space is one namespace of a cluster: its informer, and the builds being followed in it.
type space struct {
	cluster  *Cluster
	ns       string
	informer cache.SharedIndexInformer

	mu       sync.Mutex
	watchers map[string][]*watcher // by pod name: a session, a log follow, a second delivery
	// retention is how long a finished pod of each target is kept.
	retention map[string]time.Duration
	// blind is set while the informer has lost its watch (a list or watch failed) until its
	// next event shows it back; sighted is when it last came back.
	blind   bool
	sighted time.Time
}

// watcher is one interest in a pod: the informer calls wake on every change of it, and on
// its deletion, which it marks gone with the pod's final known state.
type watcher struct {
	wake func() // called with space.mu held: it must not block
	gone bool
	last *corev1.Pod
}

// follow registers interest in pod name; stop ends it, after which wake is not called again.
func (s *space) follow(name string, wake func()) (w *watcher, stop func()) {
	w = &watcher{wake: wake}
	s.mu.Lock()
	s.watchers[name] = append(s.watchers[name], w)
	s.mu.Unlock()
	return w, func() {
		s.mu.Lock()
		ws := slices.DeleteFunc(s.watchers[name], func(x *watcher) bool { return x == w })
		if len(ws) == 0 {
			delete(s.watchers, name)
		} else {
			s.watchers[name] = ws
		}
		s.mu.Unlock()
	}
}

// followNudged is follow for a loop that waits: a change of the pod, or its deletion, leaves
// a nudge in the channel (one at most; the loop reads the latest state anyway).
func (s *space) followNudged(name string) (w *watcher, nudge <-chan struct{}, stop func()) {
	nudge, wake := nudger()
	w, stop = s.follow(name, wake)
	return w, nudge, stop
}

// nudger is a wake for a loop that waits on nudge: one nudge at most is left waiting.
func nudger() (nudge <-chan struct{}, wake func()) {
	ch := make(chan struct{}, 1)
	return ch, func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (s *space) changed(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.see()
	for _, w := range s.watchers[p.Name] {
		w.wake()
	}
}

func (s *space) deleted(obj any) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.see()
	for _, w := range s.watchers[p.Name] {
		if !w.gone {
			w.gone, w.last = true, p
			w.wake()
		}
	}
}

// lostSight notes that the informer's list or watch failed: what its cache holds may be stale
// until it delivers again.
func (s *space) lostSight() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.blind = true
}

// see notes an event from the informer: a lost watch is back. s.mu is held.
func (s *space) see() {
	if s.blind {
		s.blind, s.sighted = false, time.Now()
	}
}

// sawLive notes that the apiserver answered a direct read: a lost watch may not have
// delivered again yet (nothing changed), but the cluster can be seen.
func (s *space) sawLive() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.see()
}

// sightSince is the earliest a pod's budget may start: now while the watch is lost (so none
// runs out), else when it last came back (zero if it never went).
func (s *space) sightSince(now time.Time) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.blind {
		return now
	}
	return s.sighted
}

// deletion says whether the pod w follows was deleted, and its last known state then.
func (s *space) deletion(w *watcher) (gone bool, last *corev1.Pod) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return w.gone, w.last
}

// get returns the cached pod called name.
func (s *space) get(name string) (*corev1.Pod, bool) {
	obj, ok, err := s.informer.GetStore().GetByKey(s.ns + "/" + name)
	if err != nil || !ok {
		return nil, false
	}
	p, ok := obj.(*corev1.Pod)
	return p, ok
}

// synced waits until the informer has listed the namespace once.
func (s *space) synced(ctx context.Context) error {
	if s.informer.HasSynced() {
		return nil
	}
	if !cache.WaitForCacheSync(ctx.Done(), s.informer.HasSynced) {
		return fmt.Errorf("pods of namespace %s on cluster %s not listed yet: %w", s.ns, s.cluster.name, context.Cause(ctx))
	}
	return nil
}

// setRetention records how long the finished pods of target are kept.
func (s *space) setRetention(target string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.retention[target] = d
}

// sweepEvery bounds how often finished pods are looked for.
const (
	minSweep = time.Second
	maxSweep = time.Minute
)

// sweep deletes finished pods once their target's retention has passed. Every replica sweeps,
// so a pod whose build finished on a replica that has gone is still deleted.
func (s *space) sweep(ctx context.Context) error {
	s.mu.Lock()
	every := maxSweep
	for _, d := range s.retention {
		every = min(every, max(d/2, minSweep))
	}
	s.mu.Unlock()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		for _, obj := range s.informer.GetStore().List() {
			p, ok := obj.(*corev1.Pod)
			if !ok || p.DeletionTimestamp != nil || !s.expired(p, time.Now()) {
				continue
			}
			err := s.cluster.client.CoreV1().Pods(s.ns).Delete(ctx, p.Name, metav1.DeleteOptions{
				Preconditions: &metav1.Preconditions{UID: &p.UID},
			})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) && ctx.Err() == nil {
				s.cluster.log.Warn("deleting a finished build pod failed; retrying on the next sweep", "pod", p.Name, "namespace", s.ns, "err", err)
			}
		}
	}
}

// orphanAfter is how long a pod that ended but was never marked finished (its build's
// Cleanup failed) is kept before the sweepers delete it anyway. Long enough that no build can
// still be waiting to be adopted: that would take the whole fleet being down for a day.
const orphanAfter = 24 * time.Hour

// expired says whether a finished pod has been kept long enough.
func (s *space) expired(p *corev1.Pod, now time.Time) bool {
	mark, marked := p.Annotations[AnnotationFinishedAt]
	if !marked {
		return orphaned(p, now)
	}
	at, err := time.Parse(time.RFC3339, mark)
	if err != nil {
		return false
	}
	s.mu.Lock()
	keep, ok := s.retention[p.Labels[LabelTarget]]
	s.mu.Unlock()
	if !ok {
		keep = DefaultRetention // a target since removed from the file
	}
	return now.Sub(at) >= keep
}

// trim keeps only what the executor reads of a pod, so that ten thousand followed pods cost
// little memory: names and marks, the node, and the status.
func trim(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:                       p.Name,
			Namespace:                  p.Namespace,
			UID:                        p.UID,
			ResourceVersion:            p.ResourceVersion,
			CreationTimestamp:          p.CreationTimestamp,
			DeletionTimestamp:          p.DeletionTimestamp,
			DeletionGracePeriodSeconds: p.DeletionGracePeriodSeconds,
			Labels: map[string]string{LabelTarget: p.Labels[LabelTarget], LabelBuild: p.Labels[LabelBuild],
				LabelFleet: p.Labels[LabelFleet]},
		},
		Spec: corev1.PodSpec{NodeName: p.Spec.NodeName, ActiveDeadlineSeconds: p.Spec.ActiveDeadlineSeconds},
		Status: corev1.PodStatus{
			Phase:     p.Status.Phase,
			Reason:    p.Status.Reason,
			Message:   p.Status.Message,
			StartTime: p.Status.StartTime,
		},
	}
	if at, ok := p.Annotations[AnnotationFinishedAt]; ok {
		out.Annotations = map[string]string{AnnotationFinishedAt: at}
	}
	for _, c := range p.Spec.Containers {
		if c.Name == ContainerName {
			out.Spec.Containers = []corev1.Container{{Name: c.Name, Image: c.Image}}
		}
	}
	for _, t := range []corev1.PodConditionType{corev1.PodScheduled, corev1.DisruptionTarget} {
		if c := condition(p, t); c != nil {
			out.Status.Conditions = append(out.Status.Conditions, *c)
		}
	}
	if c := buildContainer(p); c != nil {
		out.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: c.Name, State: c.State}}
	}
	return out, nil
}

// errLost is the cause of a pod_lost failure.
var errLost = errors.New("the build's pod disappeared")

// orphaned says whether an unmarked pod ended more than orphanAfter ago.
func orphaned(p *corev1.Pod, now time.Time) bool {
	if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
		return false
	}
	ended := p.CreationTimestamp.Time
	if c := buildContainer(p); c != nil && c.State.Terminated != nil && !c.State.Terminated.FinishedAt.IsZero() {
		ended = c.State.Terminated.FinishedAt.Time
	}
	return now.Sub(ended) >= orphanAfter
}
