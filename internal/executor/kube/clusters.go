package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/flowcontrol"
)

// ClientOptions set how hard a replica may drive each cluster's apiserver.
type ClientOptions struct {
	QPS   float32
	Burst int
	// Kubeconfig is the kubeconfig file; empty means $KUBECONFIG or ~/.kube/config.
	Kubeconfig string
}

// Clusters holds one Cluster per kubeconfig context the targets name, so targets on the same
// cluster share a client and informers.
type Clusters struct {
	fleet string
	opts  ClientOptions
	log   *slog.Logger
	byCtx map[string]*Cluster
}

// NewClusters returns an empty set of clusters for the fleet with prefix fleet.
func NewClusters(fleet string, opts ClientOptions, log *slog.Logger) *Clusters {
	return &Clusters{fleet: fleet, opts: opts, log: log, byCtx: map[string]*Cluster{}}
}

// Get returns the cluster of kubeconfig context name, connecting on first use. An empty name
// means the in-cluster config when running in a pod, else the kubeconfig's current context.
func (cs *Clusters) Get(name string) (*Cluster, error) {
	if c, ok := cs.byCtx[name]; ok {
		return c, nil
	}
	rc, label, err := cs.restConfig(name)
	if err != nil {
		return nil, err
	}
	// "" and the name of the current context are one cluster: one client, one informer per
	// namespace, one sweeper (two would each apply the other's targets' retention wrongly).
	for _, c := range cs.byCtx {
		if c.name == label {
			cs.byCtx[name] = c
			return c, nil
		}
	}
	// One budget for all of the replica's requests to the cluster, whichever connection
	// they go over.
	rc.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(cs.opts.QPS, cs.opts.Burst)
	rc.UserAgent = "buildfleet"
	// Protobuf costs the apiserver less than JSON to decode creates and to encode watch
	// events, and the apiserver is what dispatch waits on.
	rc.ContentType = runtime.ContentTypeProtobuf
	rc.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", label, err)
	}
	// Pod creates go over connections of their own (DefaultCreateConns says why): a dialer
	// of its own gives a client a transport, so a connection, of its own.
	creators := make([]kubernetes.Interface, DefaultCreateConns)
	for i := range creators {
		cc := rest.CopyConfig(rc)
		cc.Dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		if creators[i], err = kubernetes.NewForConfig(cc); err != nil {
			return nil, fmt.Errorf("cluster %s: %w", label, err)
		}
	}
	c := NewCluster(label, client, cs.fleet, cs.log, creators...)
	pc := rest.CopyConfig(rc)
	pc.RateLimiter = flowcontrol.NewFakeAlwaysRateLimiter()
	probe, err := kubernetes.NewForConfig(pc)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", label, err)
	}
	c.probe = probe.Discovery().RESTClient()
	cs.byCtx[name] = c
	return c, nil
}

func (cs *Clusters) restConfig(name string) (*rest.Config, string, error) {
	if name == "" && cs.opts.Kubeconfig == "" {
		rc, err := rest.InClusterConfig()
		if err == nil {
			return rc, "in-cluster", nil
		}
		if !errors.Is(err, rest.ErrNotInCluster) {
			return nil, "", fmt.Errorf("in-cluster config: %w", err)
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if cs.opts.Kubeconfig != "" {
		rules.ExplicitPath = cs.opts.Kubeconfig
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: name})
	rc, err := cc.ClientConfig()
	if err != nil {
		if name == "" {
			return nil, "", fmt.Errorf("no Kubernetes cluster configured: not running in a pod, and the kubeconfig (KUBECONFIG or ~/.kube/config) has no usable current context: %w", err)
		}
		return nil, "", fmt.Errorf("kubeconfig context %q: %w", name, err)
	}
	label := name
	if label == "" {
		raw, _ := cc.RawConfig()
		label = raw.CurrentContext
	}
	return rc, label, nil
}

// Run runs every cluster's informers until ctx ends.
func (cs *Clusters) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, c := range cs.Each() {
		g.Go(func() error { return c.Run(ctx) })
	}
	return g.Wait()
}

// Each returns every cluster once, by name.
func (cs *Clusters) Each() []*Cluster {
	clusters := cs.unique()
	out := make([]*Cluster, 0, len(clusters))
	for _, name := range slices.Sorted(maps.Keys(clusters)) {
		out = append(out, clusters[name])
	}
	return out
}

// Len is the number of clusters.
func (cs *Clusters) Len() int { return len(cs.unique()) }

func (cs *Clusters) unique() map[string]*Cluster {
	out := map[string]*Cluster{}
	for _, c := range cs.byCtx {
		out[c.name] = c
	}
	return out
}
