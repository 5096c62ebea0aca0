package kube

import (
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// budgets bound how long a pod may fail to pull its image and how long it may stay pending.
type budgets struct {
	imagePull time.Duration
	pending   time.Duration
	// since is when the replica last began to see the cluster again after losing its watch
	// (zero: never lost): a budget counts from no earlier, since nothing could be seen
	// meanwhile, nor scheduled or pulled while the apiserver was away.
	since time.Time
}

// from is when a budget that would start at t starts.
func (b budgets) from(t time.Time) time.Time {
	if b.since.After(t) {
		return b.since
	}
	return t
}

// verdict is what a pod's status says about its build.
type verdict struct {
	// running is set once the build container has started.
	running bool
	// done is set when the build has ended; outcome says how.
	done    bool
	outcome build.Outcome
	// recheck, when set, is when a budget runs out if nothing changes before then.
	recheck time.Time
	// overBudget is set when done says a budget ran out: a judgement of time, which the
	// apiserver itself must confirm before it stands (a cache can be stale).
	overBudget bool
}

// Waiting reasons the kubelet reports for the build container.
var (
	pullFailed   = map[string]bool{"ErrImagePull": true, "ImagePullBackOff": true, "RegistryUnavailable": true, "SignatureValidationFailed": true}
	pullHopeless = map[string]bool{"InvalidImageName": true, "ErrImageNeverPull": true}
	startFailed  = map[string]bool{"CreateContainerConfigError": true, "CreateContainerError": true, "RunContainerError": true, "StartError": true, "CrashLoopBackOff": true}
)

// classify reads a pod's real status into the build's states and reasons. It is pure: now is
// passed in, and the pending budgets produce a recheck time rather than a timer. The build
// container decides, not the pod's phase: a sidecar can keep a pod running after the build
// has ended.
func classify(p *corev1.Pod, b budgets, now time.Time) verdict {
	c := buildContainer(p)
	started := p.Status.StartTime != nil
	// Kubernetes took the pod away (an eviction through the API, a drain, preemption, an
	// unreachable node), whatever the build did on its way out.
	if o, ok := disrupted(p); ok && (p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodFailed) {
		if t := finishedBefore(c, condition(p, corev1.DisruptionTarget).LastTransitionTime.Time); t != nil {
			return verdict{running: true, done: true, outcome: containerOutcome(t)} // it had ended already
		}
		return verdict{running: started, done: true, outcome: o}
	}
	// Someone deleted the pod (a stop, a person): the kubelet moves a deleted pod to a
	// terminal phase before it goes, and a build that ended because of the deletion did
	// not succeed or fail on its own.
	if p.DeletionTimestamp != nil && endedByDeletion(p, c) {
		return verdict{running: started, done: true, outcome: lost("pod %s/%s was deleted while the build ran", p.Namespace, p.Name)}
	}
	switch p.Status.Phase {
	case corev1.PodSucceeded:
		return verdict{running: true, done: true, outcome: build.Succeeded()}
	case corev1.PodFailed:
		return verdict{running: started, done: true, outcome: failedOutcome(p, c)}
	}
	if c != nil && c.State.Terminated != nil {
		return verdict{running: true, done: true, outcome: containerOutcome(c.State.Terminated)}
	}
	if c != nil && c.State.Running != nil {
		return verdict{running: true}
	}
	if p.Status.Phase == corev1.PodUnknown || (p.Status.Phase == corev1.PodRunning && c == nil) {
		// Unknown means the node stopped reporting; the deadlines still bound the build.
		return verdict{running: true}
	}
	// Pending (or not reported yet).
	if c != nil && c.State.Waiting != nil {
		w := c.State.Waiting
		switch {
		case pullHopeless[w.Reason]:
			return done(build.Failed(protocol.ReasonImagePull, "image %q: %s: %s", imageOf(p), w.Reason, w.Message))
		case pullFailed[w.Reason]:
			at := b.from(scheduledAt(p)).Add(b.imagePull)
			if !now.Before(at) {
				return overBudget(build.Failed(protocol.ReasonImagePull, "image %q could not be pulled for %s: %s: %s",
					imageOf(p), b.imagePull, w.Reason, w.Message))
			}
			return verdict{recheck: at}
		case w.Reason == "CreateContainerConfigError" && strings.Contains(w.Message, "runAsNonRoot"):
			return done(build.Failed(protocol.ReasonContainerError,
				"image %q runs as root, which the target's restricted security forbids (give the target run_as_user, or security: baseline): %s", imageOf(p), w.Message))
		case startFailed[w.Reason]:
			at := startBy(p, b)
			if !now.Before(at) {
				return overBudget(build.Failed(protocol.ReasonContainerError, "the build container did not start within %s: %s: %s", b.pending, w.Reason, w.Message))
			}
			return verdict{recheck: at}
		}
	}
	at := startBy(p, b)
	if now.Before(at) {
		return verdict{recheck: at}
	}
	if !scheduled(p) {
		msg := "no node accepted the pod"
		if cond := condition(p, corev1.PodScheduled); cond != nil && cond.Message != "" {
			msg = cond.Message
		}
		return overBudget(build.Failed(protocol.ReasonUnschedulable, "not scheduled within %s: %s", b.pending, msg))
	}
	why := "still pending"
	if c != nil && c.State.Waiting != nil {
		why = strings.TrimSpace(c.State.Waiting.Reason + ": " + c.State.Waiting.Message)
	}
	return overBudget(build.Failed(protocol.ReasonContainerError, "the build container did not start within %s: %s", b.pending, why))
}

func done(o build.Outcome) verdict { return verdict{done: true, outcome: o} }

func overBudget(o build.Outcome) verdict { return verdict{done: true, outcome: o, overBudget: true} }

// disrupted is the outcome of a pod Kubernetes itself took away (eviction through the API,
// preemption, node pressure, a taint), which it marks with the DisruptionTarget condition.
func disrupted(p *corev1.Pod) (build.Outcome, bool) {
	c := condition(p, corev1.DisruptionTarget)
	if c == nil || c.Status != corev1.ConditionTrue {
		return build.Outcome{}, false
	}
	return build.Failed(protocol.ReasonEvicted, "the pod was evicted (%s): %s", c.Reason, c.Message), true
}

// finishedBefore returns the build container's termination if it finished before at.
func finishedBefore(c *corev1.ContainerStatus, at time.Time) *corev1.ContainerStateTerminated {
	if c == nil || c.State.Terminated == nil || c.State.Terminated.FinishedAt.IsZero() || at.IsZero() {
		return nil
	}
	if t := c.State.Terminated; t.FinishedAt.Time.Before(at) {
		return t
	}
	return nil
}

// failedOutcome says why a Failed pod failed, most specific cause first. A build container
// that had ended on its own before the pod failed (a sidecar kept the pod going) decides.
// (A DisruptionTarget pod never gets here: classify settles it first.)
func failedOutcome(p *corev1.Pod, c *corev1.ContainerStatus) build.Outcome {
	switch p.Status.Reason {
	case "DeadlineExceeded":
		if p.Status.StartTime != nil && p.Spec.ActiveDeadlineSeconds != nil {
			deadline := p.Status.StartTime.Add(time.Duration(*p.Spec.ActiveDeadlineSeconds) * time.Second)
			if t := finishedBefore(c, deadline); t != nil {
				return containerOutcome(t)
			}
		}
		// activeDeadlineSeconds: the build's own timeout, enforced by the kubelet.
		return build.Outcome{State: protocol.StateTimedOut, Message: "the pod's activeDeadlineSeconds passed: " + p.Status.Message}
	case "Evicted", "Preempting", "Terminated", "NodeShutdown", "NodeAffinity":
		return build.Failed(protocol.ReasonEvicted, "the pod was evicted (%s): %s", p.Status.Reason, p.Status.Message)
	}
	if c == nil || c.State.Terminated == nil {
		msg := p.Status.Message
		if msg == "" {
			msg = "the pod failed before its build container ran"
		}
		if p.Status.Reason != "" {
			msg = p.Status.Reason + ": " + msg
		}
		return build.Failed(protocol.ReasonContainerError, "%s", msg)
	}
	// The build container's own end: with no pod-level reason, another container (a
	// sidecar) failed the pod, and the build's exit code is the build's result.
	return containerOutcome(c.State.Terminated)
}

// containerOutcome says how the build ended from its container's termination.
func containerOutcome(t *corev1.ContainerStateTerminated) build.Outcome {
	switch {
	case t.Reason == "OOMKilled":
		return build.Failed(protocol.ReasonOOMKilled, "the build ran out of memory (exit code %d)", t.ExitCode)
	case t.Reason == "StartError" || t.Reason == "ContainerCannotRun":
		return build.Failed(protocol.ReasonContainerError, "the build container could not start: %s: %s", t.Reason, t.Message)
	case t.ExitCode == 0:
		return build.Succeeded()
	}
	o := build.ExitedWith(int(t.ExitCode))
	if msg := strings.TrimSpace(t.Message); msg != "" {
		o.Message = fmt.Sprintf("exited with code %d: %s", t.ExitCode, tail(msg, 2048))
	}
	return o
}

// endedByDeletion says whether a deleted pod's build ended because of the deletion: its
// container finished after the deletion was asked for (or cannot say when it finished). A
// pod still terminating has not ended yet.
func endedByDeletion(p *corev1.Pod, c *corev1.ContainerStatus) bool {
	terminal := p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
	if c == nil || c.State.Terminated == nil {
		return terminal
	}
	finished := c.State.Terminated.FinishedAt
	if finished.IsZero() {
		return true
	}
	asked := p.DeletionTimestamp.Time
	if g := p.DeletionGracePeriodSeconds; g != nil {
		asked = asked.Add(-time.Duration(*g) * time.Second)
	}
	return !finished.Time.Before(asked)
}

func lost(format string, args ...any) build.Outcome {
	return build.Failed(protocol.ReasonPodLost, format, args...)
}

// startBy is when a pod that has not started runs out of its pending budget: counted from
// its scheduling once it has a node (so a slow but working image pull is not cut short by
// time spent waiting for a node), else from its creation.
func startBy(p *corev1.Pod, b budgets) time.Time {
	if scheduled(p) {
		return b.from(scheduledAt(p)).Add(b.pending)
	}
	return b.from(p.CreationTimestamp.Time).Add(b.pending)
}

// tail keeps the last n bytes of s, the end of a log being where the error is.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

func buildContainer(p *corev1.Pod) *corev1.ContainerStatus {
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == ContainerName {
			return &p.Status.ContainerStatuses[i]
		}
	}
	return nil
}

func condition(p *corev1.Pod, t corev1.PodConditionType) *corev1.PodCondition {
	for i := range p.Status.Conditions {
		if p.Status.Conditions[i].Type == t {
			return &p.Status.Conditions[i]
		}
	}
	return nil
}

func scheduled(p *corev1.Pod) bool {
	if p.Spec.NodeName != "" {
		return true
	}
	c := condition(p, corev1.PodScheduled)
	return c != nil && c.Status == corev1.ConditionTrue
}

// scheduledAt is when the image pull could start: when the pod was bound to a node.
func scheduledAt(p *corev1.Pod) time.Time {
	if c := condition(p, corev1.PodScheduled); c != nil && c.Status == corev1.ConditionTrue && !c.LastTransitionTime.IsZero() {
		return c.LastTransitionTime.Time
	}
	return p.CreationTimestamp.Time
}

func imageOf(p *corev1.Pod) string {
	for _, c := range p.Spec.Containers {
		if c.Name == ContainerName {
			return c.Image
		}
	}
	return ""
}
