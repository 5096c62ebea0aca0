package kube

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

func TestClassify(t *testing.T) {
	created := time.Date(2026, 11, 25, 10, 0, 0, 0, time.UTC)
	b := budgets{imagePull: time.Minute, pending: 5 * time.Minute}
	pod := func(phase corev1.PodPhase, edit func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "build-x", CreationTimestamp: metav1.NewTime(created)},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: ContainerName, Image: "img:1"}}},
			Status:     corev1.PodStatus{Phase: phase},
		}
		if edit != nil {
			edit(p)
		}
		return p
	}
	waiting := func(reason string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.NodeName = "n1"
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue,
				LastTransitionTime: metav1.NewTime(created.Add(10 * time.Second))}}
			p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: ContainerName,
				State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: "why"}}}}
		}
	}
	terminated := func(reason string, code int32, msg string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Status.StartTime = &metav1.Time{Time: created}
			p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: ContainerName,
				State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: reason, ExitCode: code, Message: msg}}}}
		}
	}
	podReason := func(reason, msg string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			terminated("Error", 137, "")(p)
			p.Status.Reason, p.Status.Message = reason, msg
		}
	}
	unscheduled := func(p *corev1.Pod) {
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionFalse,
			Reason: "Unschedulable", Message: "0/4 nodes are available"}}
	}
	cases := []struct {
		name    string
		pod     *corev1.Pod
		at      time.Duration // after creation
		running bool
		state   protocol.State // "" = not done
		reason  protocol.Reason
		msg     string
		recheck time.Duration // after creation; 0 = none
		sight   time.Duration // when the watch came back after a loss, after creation; 0 = never lost
	}{
		{name: "new", pod: pod("", nil), recheck: 5 * time.Minute},
		{name: "pending long", pod: pod(corev1.PodPending, nil), at: 5 * time.Minute, state: protocol.StateFailed, reason: protocol.ReasonUnschedulable, msg: "no node accepted"},
		{name: "unschedulable", pod: pod(corev1.PodPending, unscheduled), at: 4 * time.Minute, recheck: 5 * time.Minute},
		{name: "unschedulable long", pod: pod(corev1.PodPending, unscheduled), at: 6 * time.Minute, state: protocol.StateFailed, reason: protocol.ReasonUnschedulable, msg: "0/4 nodes"},
		{name: "creating long", pod: pod(corev1.PodPending, waiting("ContainerCreating")), at: 6 * time.Minute, state: protocol.StateFailed, reason: protocol.ReasonContainerError, msg: "ContainerCreating"},
		// The budgets count from the watch's return: nothing could be seen, scheduled or
		// pulled while the apiserver was away.
		{name: "pending long, the watch back late", pod: pod(corev1.PodPending, nil), at: 5 * time.Minute, sight: 2 * time.Minute, recheck: 7 * time.Minute},
		{name: "pending long after the watch came back", pod: pod(corev1.PodPending, nil), at: 7 * time.Minute, sight: 2 * time.Minute, state: protocol.StateFailed, reason: protocol.ReasonUnschedulable},
		{name: "pull failed, the watch back late", pod: pod(corev1.PodPending, waiting("ErrImagePull")), at: 70 * time.Second, sight: time.Minute, recheck: 2 * time.Minute},
		{name: "pull failing", pod: pod(corev1.PodPending, waiting("ImagePullBackOff")), at: 30 * time.Second, recheck: 70 * time.Second},
		{name: "pull failed", pod: pod(corev1.PodPending, waiting("ErrImagePull")), at: 70 * time.Second, state: protocol.StateFailed, reason: protocol.ReasonImagePull, msg: `image "img:1"`},
		{name: "bad image name", pod: pod(corev1.PodPending, waiting("InvalidImageName")), state: protocol.StateFailed, reason: protocol.ReasonImagePull},
		// Counted from scheduling (10s after creation here).
		{name: "config error", pod: pod(corev1.PodPending, waiting("CreateContainerConfigError")), at: time.Minute, recheck: 5*time.Minute + 10*time.Second},
		{name: "config error long", pod: pod(corev1.PodPending, waiting("CreateContainerConfigError")), at: 5*time.Minute + 10*time.Second, state: protocol.StateFailed, reason: protocol.ReasonContainerError},
		{name: "root image", pod: pod(corev1.PodPending, func(p *corev1.Pod) {
			waiting("CreateContainerConfigError")(p)
			p.Status.ContainerStatuses[0].State.Waiting.Message = "container has runAsNonRoot and image will run as root"
		}), state: protocol.StateFailed, reason: protocol.ReasonContainerError, msg: "run_as_user"},
		{name: "sidecar keeps the pod running", pod: pod(corev1.PodRunning, terminated("Error", 4, "")), running: true, state: protocol.StateFailed, reason: protocol.ReasonExitCode},
		{name: "sidecar, build done", pod: pod(corev1.PodRunning, terminated("Completed", 0, "")), running: true, state: protocol.StateSucceeded},
		{name: "running pod, build still pulling", pod: pod(corev1.PodRunning, waiting("ImagePullBackOff")), at: 30 * time.Second, recheck: 70 * time.Second},
		{name: "deleted while running", pod: pod(corev1.PodFailed, func(p *corev1.Pod) {
			terminated("Error", 143, "")(p)
			p.Status.ContainerStatuses[0].State.Terminated.FinishedAt = metav1.NewTime(created.Add(time.Minute))
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(time.Minute + 30*time.Second)}
			p.DeletionGracePeriodSeconds = new(int64(30))
		}), running: true, state: protocol.StateFailed, reason: protocol.ReasonPodLost},
		{name: "deleted, exited 0 on SIGTERM", pod: pod(corev1.PodSucceeded, func(p *corev1.Pod) {
			terminated("Completed", 0, "")(p)
			p.Status.ContainerStatuses[0].State.Terminated.FinishedAt = metav1.NewTime(created.Add(time.Minute + time.Second))
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(time.Minute + 30*time.Second)}
			p.DeletionGracePeriodSeconds = new(int64(30))
		}), running: true, state: protocol.StateFailed, reason: protocol.ReasonPodLost},
		{name: "deleted after it ended", pod: pod(corev1.PodSucceeded, func(p *corev1.Pod) {
			terminated("Completed", 0, "")(p)
			p.Status.ContainerStatuses[0].State.Terminated.FinishedAt = metav1.NewTime(created.Add(time.Minute))
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(2 * time.Minute)}
			p.DeletionGracePeriodSeconds = new(int64(30))
		}), running: true, state: protocol.StateSucceeded},
		{name: "terminating", pod: pod(corev1.PodRunning, func(p *corev1.Pod) {
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(time.Minute)}
		}), running: true},
		{name: "node lost", pod: pod(corev1.PodRunning, func(p *corev1.Pod) {
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(time.Minute)}
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.DisruptionTarget, Status: corev1.ConditionTrue, Reason: "DeletionByTaintManager"}}
		}), running: false, state: protocol.StateFailed, reason: protocol.ReasonEvicted, msg: "DeletionByTaintManager"},
		{name: "running", pod: pod(corev1.PodRunning, nil), running: true},
		{name: "unknown", pod: pod(corev1.PodUnknown, nil), running: true},
		{name: "succeeded", pod: pod(corev1.PodSucceeded, terminated("Completed", 0, "")), running: true, state: protocol.StateSucceeded},
		{name: "exit code", pod: pod(corev1.PodFailed, terminated("Error", 2, "make: *** [test] Error 2")), running: true, state: protocol.StateFailed, reason: protocol.ReasonExitCode, msg: "Error 2"},
		{name: "oom", pod: pod(corev1.PodFailed, terminated("OOMKilled", 137, "")), running: true, state: protocol.StateFailed, reason: protocol.ReasonOOMKilled},
		{name: "start error", pod: pod(corev1.PodFailed, terminated("StartError", 128, "exec: not found")), running: true, state: protocol.StateFailed, reason: protocol.ReasonContainerError, msg: "exec: not found"},
		// A sidecar failed the pod after the build had exited 0.
		{name: "failed exit 0", pod: pod(corev1.PodFailed, terminated("Completed", 0, "")), running: true, state: protocol.StateSucceeded},
		{name: "succeeded, then drained", pod: pod(corev1.PodSucceeded, func(p *corev1.Pod) {
			terminated("Completed", 0, "")(p)
			p.Status.ContainerStatuses[0].State.Terminated.FinishedAt = metav1.NewTime(created.Add(time.Minute))
			p.DeletionTimestamp = &metav1.Time{Time: created.Add(2 * time.Minute)}
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.DisruptionTarget, Status: corev1.ConditionTrue, Reason: "EvictionByEvictionAPI",
				LastTransitionTime: metav1.NewTime(created.Add(2 * time.Minute))}}
		}), running: true, state: protocol.StateSucceeded},
		{name: "build done before the deadline", pod: pod(corev1.PodFailed, func(p *corev1.Pod) {
			podReason("DeadlineExceeded", "too long")(p)
			p.Spec.ActiveDeadlineSeconds = new(int64(600))
			p.Status.ContainerStatuses[0].State.Terminated = &corev1.ContainerStateTerminated{Reason: "Completed", FinishedAt: metav1.NewTime(created.Add(time.Minute))}
		}), running: true, state: protocol.StateSucceeded},
		{name: "killed by the deadline", pod: pod(corev1.PodFailed, func(p *corev1.Pod) {
			podReason("DeadlineExceeded", "too long")(p)
			p.Spec.ActiveDeadlineSeconds = new(int64(600))
			p.Status.ContainerStatuses[0].State.Terminated = &corev1.ContainerStateTerminated{Reason: "Error", ExitCode: 0, FinishedAt: metav1.NewTime(created.Add(601 * time.Second))}
		}), running: true, state: protocol.StateTimedOut},
		{name: "evicted", pod: pod(corev1.PodFailed, podReason("Evicted", "low on memory")), running: true, state: protocol.StateFailed, reason: protocol.ReasonEvicted, msg: "low on memory"},
		{name: "deadline", pod: pod(corev1.PodFailed, podReason("DeadlineExceeded", "too long")), running: true, state: protocol.StateTimedOut, msg: "activeDeadlineSeconds"},
		{name: "preempted", pod: pod(corev1.PodFailed, func(p *corev1.Pod) {
			terminated("Error", 137, "")(p)
			p.Status.Conditions = []corev1.PodCondition{{Type: corev1.DisruptionTarget, Status: corev1.ConditionTrue, Reason: "PreemptionByScheduler", Message: "a higher priority pod"}}
		}), running: true, state: protocol.StateFailed, reason: protocol.ReasonEvicted, msg: "PreemptionByScheduler"},
		{name: "failed before start", pod: pod(corev1.PodFailed, nil), state: protocol.StateFailed, reason: protocol.ReasonContainerError},
	}
	for _, c := range cases {
		b := b
		if c.sight > 0 {
			b.since = created.Add(c.sight)
		}
		v := classify(c.pod, b, created.Add(c.at))
		if v.running != c.running {
			t.Errorf("%s: running = %v, want %v", c.name, v.running, c.running)
		}
		if v.done != (c.state != "") || v.outcome.State != c.state || v.outcome.Reason != c.reason {
			t.Errorf("%s: done %v %s/%s (%s), want %s/%s", c.name, v.done, v.outcome.State, v.outcome.Reason, v.outcome.Message, c.state, c.reason)
		}
		if !strings.Contains(v.outcome.Message, c.msg) {
			t.Errorf("%s: message %q, want it to mention %q", c.name, v.outcome.Message, c.msg)
		}
		var want time.Time
		if c.recheck > 0 {
			want = created.Add(c.recheck)
		}
		if !v.recheck.Equal(want) {
			t.Errorf("%s: recheck at %v, want %v", c.name, v.recheck, want)
		}
	}
}

func TestClassifyExitMessageKeepsTheEnd(t *testing.T) {
	log := strings.Repeat("x", 5000) + "THE ERROR"
	v := classify(&corev1.Pod{
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: ContainerName}}},
		Status: corev1.PodStatus{Phase: corev1.PodFailed, ContainerStatuses: []corev1.ContainerStatus{{Name: ContainerName,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 1, Message: log}}}}},
	}, budgets{}, time.Now())
	if !strings.HasSuffix(v.outcome.Message, "THE ERROR") || len(v.outcome.Message) > 2200 {
		t.Errorf("message of %d bytes ending %q; want the log's end, about 2 KiB", len(v.outcome.Message), v.outcome.Message[len(v.outcome.Message)-20:])
	}
}

// TestTrimKeepsWhatClassifyReads: classifying the trimmed pod gives what classifying the whole
// pod gives.
func TestTrimKeepsWhatClassifyReads(t *testing.T) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "build-x", Namespace: "ns", UID: "u", Labels: map[string]string{LabelTarget: "kata", "team": "ci"},
			Annotations:   map[string]string{AnnotationFinishedAt: "2026-11-25T10:00:00Z", "big": strings.Repeat("y", 1000)},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
		Spec: corev1.PodSpec{NodeName: "n", Containers: []corev1.Container{{Name: ContainerName, Image: "img", Env: []corev1.EnvVar{{Name: "A", Value: "b"}}}}},
		Status: corev1.PodStatus{Phase: corev1.PodFailed, Reason: "Evicted", Message: "m",
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady}, {Type: corev1.PodScheduled, Status: corev1.ConditionTrue}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: ContainerName, Image: "img", ImageID: "sha",
				State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 137}}}}},
	}
	obj, err := trim(p)
	if err != nil {
		t.Fatal(err)
	}
	tp := obj.(*corev1.Pod)
	if tp.ManagedFields != nil || tp.Annotations["big"] != "" || tp.Labels["team"] != "" || tp.Spec.Containers[0].Env != nil || len(tp.Status.Conditions) != 1 {
		t.Errorf("trim kept too much: %+v", tp)
	}
	b := budgets{imagePull: time.Minute, pending: time.Minute}
	now := time.Now()
	if got, want := classify(tp, b, now), classify(p, b, now); got.done != want.done || got.outcome.Reason != want.outcome.Reason || got.outcome.Message != want.outcome.Message {
		t.Errorf("trimmed pod classifies as %+v, whole pod as %+v", got, want)
	}
	if tp.Annotations[AnnotationFinishedAt] == "" || tp.Labels[LabelTarget] != "kata" {
		t.Errorf("trim dropped what the sweeper reads: %+v", tp.ObjectMeta)
	}
}

func TestSweeperExpiry(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	s := &space{retention: map[string]time.Duration{"t": time.Minute}}
	mk := func(phase corev1.PodPhase, target, mark string, finished time.Time) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{LabelTarget: target}, CreationTimestamp: metav1.NewTime(finished.Add(-time.Hour))},
			Status: corev1.PodStatus{Phase: phase, ContainerStatuses: []corev1.ContainerStatus{{Name: ContainerName,
				State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{FinishedAt: metav1.NewTime(finished)}}}}},
		}
		if mark != "" {
			p.Annotations = map[string]string{AnnotationFinishedAt: mark}
		}
		return p
	}
	cases := []struct {
		name string
		pod  *corev1.Pod
		want bool
	}{
		{"marked, kept", mk(corev1.PodSucceeded, "t", now.Add(-30*time.Second).Format(time.RFC3339Nano), now), false},
		{"marked, expired", mk(corev1.PodSucceeded, "t", now.Add(-2*time.Minute).Format(time.RFC3339Nano), now), true},
		{"marked, removed target: default retention", mk(corev1.PodFailed, "gone", now.Add(-2*time.Minute).Format(time.RFC3339), now), false},
		{"bad mark", mk(corev1.PodFailed, "t", "yesterday", now.Add(-48*time.Hour)), false},
		{"unmarked, recent", mk(corev1.PodSucceeded, "t", "", now.Add(-time.Hour)), false},
		{"unmarked, a day old", mk(corev1.PodFailed, "t", "", now.Add(-25*time.Hour)), true},
		{"unmarked, running", mk(corev1.PodRunning, "t", "", now.Add(-48*time.Hour)), false},
	}
	for _, c := range cases {
		if got := s.expired(c.pod, now); got != c.want {
			t.Errorf("%s: expired = %v, want %v", c.name, got, c.want)
		}
	}
}

// An apiserver that cannot be reached, cannot keep up or refuses the fleet is Unavailable
// (the build waits, its budget untouched); what the apiserver says about the pod is not.
func TestUnreachable(t *testing.T) {
	refused := &url.Error{Op: "Get", URL: "https://127.0.0.1:1/api", Err: &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}}
	pods := schema.GroupResource{Resource: "pods"}
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"connection refused", fmt.Errorf("creating pod: %w", refused), true},
		{"connection cut", fmt.Errorf("creating pod: %w", io.ErrUnexpectedEOF), true},
		{"client timeout", fmt.Errorf("creating pod: %w", context.DeadlineExceeded), true},
		{"503", apierrors.NewServiceUnavailable("down"), true},
		{"500", apierrors.NewInternalError(errors.New("etcd")), true},
		{"429", apierrors.NewTooManyRequests("slow down", 1), true},
		{"504", apierrors.NewTimeoutError("slow", 1), true},
		{"forbidden", apierrors.NewForbidden(pods, "build-x", errors.New("RBAC")), true},
		{"unauthorized", apierrors.NewUnauthorized("token expired"), true},
		{"invalid", apierrors.NewInvalid(schema.GroupKind{Kind: "Pod"}, "build-x", nil), false},
		{"not found", apierrors.NewNotFound(pods, "build-x"), false},
		{"quota", apierrors.NewForbidden(pods, "build-x", errors.New("exceeded quota")), true},
		{"other", errors.New("no such namespace"), false},
		{"bad certificate", &url.Error{Op: "Get", URL: "https://127.0.0.1:1/api", Err: x509.UnknownAuthorityError{}}, false},
		{"credential plugin", &url.Error{Op: "Get", URL: "https://127.0.0.1:1/api", Err: errors.New("exec plugin: exit status 1")}, false},
	}
	for _, c := range cases {
		err := unreachable(c.err)
		if got := build.IsUnavailable(err); got != c.want {
			t.Errorf("%s: unavailable %v, want %v (%v)", c.name, got, c.want, err)
		}
		if !errors.Is(err, c.err) {
			t.Errorf("%s: the cause is lost: %v", c.name, err)
		}
	}
	if unreachable(nil) != nil {
		t.Error("unreachable(nil) is not nil")
	}
}
