package kubetest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// kwok serves a pod's log from a file in the container runtime's log format, named by a
// kwok.x-k8s.io Logs object of the pod's name (kwok --enable-crds=Logs).
var (
	crdGVR  = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	logsGVR = schema.GroupVersionResource{Group: "kwok.x-k8s.io", Version: "v1alpha1", Resource: "logs"}
)

// installLogsCRD defines kwok's Logs resource (its schema loosened to what kwok reads) and
// waits until it is served.
func (cp *ControlPlane) installLogsCRD(ctx context.Context) error {
	dc, err := dynamic.NewForConfig(cp.Admin)
	if err != nil {
		return err
	}
	open := map[string]any{"type": "object", "x-kubernetes-preserve-unknown-fields": true}
	crd := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
		"metadata": map[string]any{"name": "logs.kwok.x-k8s.io"},
		"spec": map[string]any{
			"group": "kwok.x-k8s.io", "scope": "Namespaced",
			"names": map[string]any{"kind": "Logs", "listKind": "LogsList", "plural": "logs", "singular": "logs"},
			"versions": []any{map[string]any{
				"name": "v1alpha1", "served": true, "storage": true,
				"schema":       map[string]any{"openAPIV3Schema": map[string]any{"type": "object", "properties": map[string]any{"spec": open, "status": open}}},
				"subresources": map[string]any{"status": map[string]any{}},
			}},
		},
	}}
	if _, err := dc.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("define kwok's Logs resource: %w", err)
	}
	for {
		if _, err := dc.Resource(logsGVR).List(ctx, metav1.ListOptions{Limit: 1}); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kwok's Logs resource was not served: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// PodLog is the output of one pod's build container, as the container runtime would have
// written it: each line printed is served through the apiserver's pods/log, live.
type PodLog struct {
	mu   sync.Mutex
	f    *os.File
	last time.Time
}

// PodLog makes pod's container output a file of the control plane's, empty until the test
// prints to it. Make it before the pod: kwok picks its Logs objects up through a watch.
func (cp *ControlPlane) PodLog(ctx context.Context, namespace, pod string) (*PodLog, error) {
	dir := filepath.Join(cp.Dir, "podlogs")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, namespace+"_"+pod+".log")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, err
	}
	dc, err := dynamic.NewForConfig(cp.Admin)
	if err != nil {
		f.Close()
		return nil, err
	}
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
		"metadata": map[string]any{"name": pod, "namespace": namespace},
		"spec":     map[string]any{"logs": []any{map[string]any{"logsFile": path, "follow": true}}},
	}}
	if _, err := dc.Resource(logsGVR).Namespace(namespace).Create(ctx, obj, metav1.CreateOptions{}); err != nil {
		f.Close()
		return nil, fmt.Errorf("kwok Logs for pod %s/%s: %w", namespace, pod, err)
	}
	return &PodLog{f: f}, nil
}

// Print appends lines to the container's output, each stamped with the time now (later than
// the line before, as a runtime's are). A line may not contain a newline.
func (l *PodLog) Print(lines ...string) error { return l.print(false, lines) }

// PrintBurst appends lines all stamped with one time, as lines a runtime read at once can
// be.
func (l *PodLog) PrintBurst(lines ...string) error { return l.print(true, lines) }

func (l *PodLog) print(burst bool, lines []string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	stamp := time.Time{}
	for _, line := range lines {
		t := time.Now().UTC()
		if !t.After(l.last) {
			t = l.last.Add(time.Nanosecond)
		}
		if burst && !stamp.IsZero() {
			t = stamp
		}
		stamp, l.last = t, t
		fmt.Fprintf(&b, "%s stdout F %s\n", t.Format(time.RFC3339Nano), line)
	}
	_, err := l.f.WriteString(b.String())
	return err
}

// Close closes the file; what was printed stays served.
func (l *PodLog) Close() error { return l.f.Close() }
