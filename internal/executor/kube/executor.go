package kube

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
	"github.com/buildfleet/buildfleet/pkg/tracing"
)

// lostAfter is how long a pod this replica created or adopted may be missing from the
// informer's cache before the apiserver is asked directly whether it still exists.
const lostAfter = 10 * time.Second

// Executor runs the builds of one target as pods on its cluster.
type Executor struct {
	cluster *Cluster
	space   *space
	target  string
	opts    Options
	budgets budgets
}

// New returns the executor of target on cluster. It registers the target's namespace with
// the cluster, so it must be called before the cluster's Run.
func New(c *Cluster, target string, o Options) *Executor {
	s := c.space(o.Namespace)
	s.setRetention(target, o.retention())
	return &Executor{
		cluster: c,
		space:   s,
		target:  target,
		opts:    o,
		budgets: budgets{imagePull: time.Duration(o.ImagePullTimeout), pending: time.Duration(o.PendingTimeout)},
	}
}

// confirm checks a budget that ran out on the cached pod against the apiserver itself: a
// cache whose watch is lost shows an old state, and nothing is scheduled or pulled while the
// apiserver is away. Unanswered, the namespace counts as unseen (its budgets start again
// once it is seen) and the pod is looked at again shortly; answered, the fresh pod decides.
func (e *Executor) confirm(ctx context.Context, workload string, v verdict) verdict {
	p, err := e.cluster.client.CoreV1().Pods(e.opts.Namespace).Get(ctx, workload, metav1.GetOptions{})
	switch {
	case err == nil:
		e.space.sawLive()
		return classify(p, e.budgetsNow(), time.Now())
	case apierrors.IsNotFound(err):
		return verdict{recheck: time.Now().Add(lostAfter)} // its deletion is on the way, or it was never cached
	case ctx.Err() != nil:
		return v
	}
	e.space.lostSight()
	return verdict{recheck: time.Now().Add(time.Second)}
}

// budgetsNow are the target's budgets, counted from no earlier than the namespace's watch
// was last seen back.
func (e *Executor) budgetsNow() budgets {
	b := e.budgets
	b.since = e.space.sightSince(time.Now())
	return b
}

// Launch creates the build's pod. Its name comes from the build id, so a second launch of the
// same build finds the first pod (AlreadyExists) instead of making a duplicate. A launch that
// adopts a dispatched build never creates a pod: if the pod is gone, so is the build.
func (e *Executor) Launch(ctx context.Context, job build.Job) (err error) {
	pods := e.cluster.client.CoreV1().Pods(e.opts.Namespace)
	op := "create pod"
	if job.Adopt {
		op = "get pod"
	}
	ctx, span := tracing.Tracer(ctx).Start(ctx, op, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(
		attribute.String("k8s.cluster.name", e.cluster.name),
		attribute.String("k8s.namespace.name", e.opts.Namespace),
		attribute.String("k8s.pod.name", job.Workload)))
	defer func() {
		if err != nil {
			tracing.Fail(span, err)
		}
		span.End()
	}()
	if job.Adopt {
		// The informer's cache shows this fleet's pods: one found there exists (a deletion
		// it has not seen yet is found by Track). Only a pod it does not show is asked for.
		if p, ok := e.space.get(job.Workload); ok && p.Labels[LabelBuild] == job.ID {
			return nil
		}
		_, err := pods.Get(ctx, job.Workload, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return build.Permanent(protocol.StateFailed, protocol.ReasonPodLost,
				fmt.Errorf("pod %s/%s of this dispatched build no longer exists", e.opts.Namespace, job.Workload))
		case err != nil:
			return unreachable(fmt.Errorf("looking up pod %s/%s: %w", e.opts.Namespace, job.Workload, err))
		}
		return nil
	}
	pod, err := Pod(job, e.cluster.fleet, e.opts)
	if err != nil {
		return err
	}
	k, err := e.cluster.acquire(ctx)
	if err != nil {
		return err
	}
	_, err = k.CoreV1().Pods(e.opts.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	e.cluster.release(k)
	if apierrors.IsAlreadyExists(err) {
		return e.same(ctx, job) // an earlier attempt created it: the same build, if its labels say so
	}
	if err != nil {
		return classifyCreate(err, "creating pod %s/%s", e.opts.Namespace, job.Workload)
	}
	return nil
}

// same checks that the pod found under the build's name is this fleet's pod of this build,
// and not another fleet's that happens to share the namespace and the build id.
func (e *Executor) same(ctx context.Context, job build.Job) error {
	p, err := e.cluster.client.CoreV1().Pods(e.opts.Namespace).Get(ctx, job.Workload, metav1.GetOptions{})
	if err != nil {
		return unreachable(fmt.Errorf("looking up existing pod %s/%s: %w", e.opts.Namespace, job.Workload, err))
	}
	if p.Labels[LabelBuild] != job.ID || p.Labels[LabelFleet] != FleetLabel(e.cluster.fleet) {
		return build.Permanent(protocol.StateRejected, protocol.ReasonLaunchRefused,
			fmt.Errorf("pod %s/%s exists but belongs to build %q of fleet %q", e.opts.Namespace, job.Workload, p.Labels[LabelBuild], p.Labels[LabelFleet]))
	}
	return nil
}

// classifyCreate classifies an apiserver error once, where it enters. Only a refusal of the
// pod itself is permanent (launch_refused): a spec the apiserver finds invalid, or one an
// admission check (Pod Security, a policy webhook) refuses; it would be refused again. Whatever says the
// target is unwell rather than the pod (a token that expired, RBAC, a namespace or
// RuntimeClass that is missing, a quota, 5xx, 429, timeouts) is transient: the build is
// retried with backoff, and the target's breaker opens if it keeps happening, so new builds
// route around it.
func classifyCreate(err error, format string, args ...any) error {
	err = fmt.Errorf(format+": %w", append(args, err)...)
	msg := err.Error()
	switch {
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err), apierrors.IsRequestEntityTooLargeError(err),
		apierrors.IsForbidden(err) && strings.Contains(msg, "violates PodSecurity"),
		apierrors.IsForbidden(err) && strings.Contains(msg, "admission webhook") && strings.Contains(msg, "denied the request"):
		return build.Permanent(protocol.StateRejected, protocol.ReasonLaunchRefused, err)
	}
	return unreachable(err)
}

// unreachable marks err build.Unavailable when it says the target cannot take work right
// now, rather than anything about the pod: the apiserver could not be reached or could not
// keep up (no connection, a connection cut, a timeout, 5xx, 429), or it refused the fleet
// itself (401, 403: a token being rotated, RBAC that a restarted apiserver has not loaded
// yet, or that an operator has to fix, a quota that is full). A build waits that out without
// spending its delivery budget, and the target's breaker opens meanwhile. A refusal of the
// pod itself was made permanent before (classifyCreate).
func unreachable(err error) error {
	var status apierrors.APIStatus
	var opErr *net.OpError
	var netErr net.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &status):
		switch code := status.Status().Code; {
		case code >= 500, code == http.StatusTooManyRequests, code == http.StatusRequestTimeout,
			code == http.StatusUnauthorized, code == http.StatusForbidden:
		default:
			return err
		}
	// A dial or a connection that failed, or a request that timed out; not every error a
	// client call returns (a *url.Error is a net.Error too, a bad certificate or a failing
	// credential plugin among them: those want an operator, and count).
	case errors.As(err, &opErr), errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, context.DeadlineExceeded):
	default:
		return err
	}
	return build.Unavailable(err)
}

// Wait follows the pod through the cluster's informer until the build ends, and classifies
// how it ended from the pod's real status (Track says how).
func (e *Executor) Wait(ctx context.Context, job build.Job, running func()) (build.Outcome, error) {
	nudge, wake := nudger()
	t := e.Track(job, wake)
	defer t.Stop()
	if err := e.space.synced(ctx); err != nil {
		return build.Outcome{}, err
	}
	return build.Follow(ctx, t, nudge, running)
}

// Track follows the build's pod through the cluster's informer, calling wake on every
// change of it: no goroutine, timer or watch of its own, so that a replica holds ten
// thousand running builds cheaply. A pod deleted while followed, by anyone but this
// executor, ends the build as failed/pod_lost: never as a success.
func (e *Executor) Track(job build.Job, wake func()) build.Tracking {
	t := &tracking{e: e, ns: e.opts.Namespace, workload: job.Workload}
	t.w, t.stop = e.space.follow(job.Workload, wake)
	return t
}

// tracking is one build's pod being followed (Track).
type tracking struct {
	e            *Executor
	ns, workload string
	w            *watcher
	stop         func()
	missingSince time.Time // when the pod was first found missing from the cache
}

// syncWait is how soon a look is made again while the informer has not listed its pods.
const syncWait = 100 * time.Millisecond

// Look classifies the pod as the informer's cache shows it, asking the apiserver only when a
// budget ran out on the cached state, or when the pod has been missing from the cache for
// lostAfter.
func (t *tracking) Look(ctx context.Context) (build.Look, error) {
	e := t.e
	now := time.Now()
	if !e.space.informer.HasSynced() {
		return build.Look{Next: now.Add(syncWait)}, nil
	}
	pod, ok := e.space.get(t.workload)
	if gone, last := e.space.deletion(t.w); gone {
		if last != nil {
			if v := classify(last, e.budgetsNow(), now); v.done {
				return build.Look{Done: true, Outcome: v.outcome}, nil // it had ended before it was deleted
			}
			if o, ok := disrupted(last); ok {
				return build.Look{Done: true, Outcome: o}, nil // evicted through the API, preempted, or taken off its node
			}
		}
		return build.Look{Done: true, Outcome: build.Failed(protocol.ReasonPodLost, "%v: pod %s/%s was deleted while the build ran", errLost, t.ns, t.workload)}, nil
	}
	if !ok {
		// Not in the cache: the informer has not seen the new pod yet, or it vanished while
		// no one was watching. Past lostAfter, ask the apiserver.
		if t.missingSince.IsZero() {
			t.missingSince = now
		}
		if now.Sub(t.missingSince) >= lostAfter {
			_, err := e.cluster.client.CoreV1().Pods(t.ns).Get(ctx, t.workload, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return build.Look{Done: true, Outcome: build.Failed(protocol.ReasonPodLost, "%v: pod %s/%s does not exist", errLost, t.ns, t.workload)}, nil
			}
			t.missingSince = now
		}
		return build.Look{Next: t.missingSince.Add(lostAfter)}, nil
	}
	t.missingSince = time.Time{}
	v := classify(pod, e.budgetsNow(), now)
	if v.overBudget {
		v = e.confirm(ctx, t.workload, v)
	}
	return build.Look{Done: v.done, Outcome: v.outcome, Running: v.running, Next: v.recheck}, nil
}

// Stop ends the following.
func (t *tracking) Stop() { t.stop() }

// Kill deletes the build's pod by name on its target's cluster, and only if it is this
// fleet's pod of this build (by UID precondition): a pod of another fleet that shares the
// namespace and the name is never touched. A pod already gone is not an error.
func (e *Executor) Kill(ctx context.Context, job build.Job) error {
	uid, ok, err := e.own(ctx, job)
	if err != nil || !ok {
		return err
	}
	err = e.cluster.client.CoreV1().Pods(e.opts.Namespace).Delete(ctx, job.Workload, metav1.DeleteOptions{
		Preconditions: &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return unreachable(fmt.Errorf("deleting pod %s/%s: %w", e.opts.Namespace, job.Workload, err))
	}
	return nil
}

// own returns the UID of the build's pod if it exists and is this fleet's pod of this build:
// from the informer, which sees only this fleet's pods, or else from the apiserver.
func (e *Executor) own(ctx context.Context, job build.Job) (types.UID, bool, error) {
	if p, ok := e.space.get(job.Workload); ok && p.Labels[LabelBuild] == job.ID {
		return p.UID, true, nil
	}
	p, err := e.cluster.client.CoreV1().Pods(e.opts.Namespace).Get(ctx, job.Workload, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return "", false, nil
	case err != nil:
		return "", false, unreachable(fmt.Errorf("looking up pod %s/%s: %w", e.opts.Namespace, job.Workload, err))
	case p.Labels[LabelBuild] != job.ID || p.Labels[LabelFleet] != FleetLabel(e.cluster.fleet):
		return "", false, nil
	}
	return p.UID, true, nil
}

// Release leaves the pod running for the replica that adopts the build.
func (e *Executor) Release(context.Context, build.Job) error { return nil }

// Cleanup marks the pod finished, and the sweepers delete it once the target's retention has
// passed, so that its logs stay readable for a while. With no retention it is deleted now, and
// so is a pod that has not ended (a build that failed its image-pull or pending budget): left
// alone, it could still start and run a build already reported failed.
func (e *Executor) Cleanup(ctx context.Context, job build.Job) error {
	if e.opts.retention() == 0 || e.space.synced(ctx) != nil {
		return e.Kill(ctx, job)
	}
	// A pod still pending or running (if only a sidecar runs) is not kept but deleted.
	p, ok := e.space.get(job.Workload)
	if !ok || (p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed) {
		return e.Kill(ctx, job)
	}
	// The UID in the patch is a precondition: only this very pod is marked.
	patch := fmt.Appendf(nil, `{"metadata":{"uid":%q,"annotations":{%q:%q}}}`, p.UID, AnnotationFinishedAt, time.Now().UTC().Format(time.RFC3339Nano))
	_, err := e.cluster.client.CoreV1().Pods(e.opts.Namespace).Patch(ctx, job.Workload, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return unreachable(fmt.Errorf("marking pod %s/%s finished: %w", e.opts.Namespace, job.Workload, err))
	}
	return nil
}

// Reruns is false: an adopted build's pod is followed, never made again.
func (e *Executor) Reruns() bool { return false }
