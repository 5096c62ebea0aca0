// Package kubetest starts a real Kubernetes control plane for tests: etcd, kube-apiserver
// (RBAC on, Pod Security admission on), kube-scheduler and kwok, built from Go modules by
// test/cluster/build.sh into test/bin. kwok simulates the nodes (Kata and ordinary runc ones)
// and drives build pods through the stages in stages.yaml. Every process it starts is
// stopped by its pid when the control plane stops.
package kubetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

//go:embed stages.yaml
var stages []byte

// Node labels and taints of the simulated nodes.
const (
	// LabelKata marks a node that runs Kata Containers, as the kata-deploy daemonset does.
	LabelKata = "katacontainers.io/kata-runtime"
	// LabelPool and its values name the two node pools. Kata nodes are also tainted
	// pool=kata:NoSchedule, so only pods of the kata RuntimeClass (which tolerates it) land
	// there.
	LabelPool = "buildfleet.test/pool"
	PoolKata  = "kata"
	PoolRunc  = "runc"
	// Dedicated marks every node as a build node, labelled and tainted dedicated=builds, the
	// way build nodes are set apart; a target's node selector dedicated: builds tolerates it.
	LabelDedicated = "dedicated"
	Dedicated      = "builds"
	// RuntimeClassKata is the RuntimeClass of VM-isolated pods.
	RuntimeClassKata = "kata"
	// UserWorker is the plain (non-admin) user whose token WorkerKubeconfig carries.
	UserWorker = "buildfleet-worker"
)

// Options shape the control plane.
type Options struct {
	// Bin holds etcd, kube-apiserver, kube-scheduler and kwok; FindBin when empty.
	Bin string
	// KataNodes and RuncNodes are the simulated nodes of each pool (2 each when zero).
	KataNodes, RuncNodes int
	// Log receives the processes' output; discarded when nil.
	Log *os.File
}

// ControlPlane is a running control plane.
type ControlPlane struct {
	// Dir holds the data, certificates and kubeconfigs; it is removed by Stop.
	Dir string
	// URL is the apiserver's address.
	URL string
	// Admin is a rest config with an admin (system:masters) token.
	Admin *rest.Config
	// AdminKubeconfig and WorkerKubeconfig are kubeconfig files for the admin and for the
	// plain user UserWorker, who may do only what RBAC grants it.
	AdminKubeconfig  string
	WorkerKubeconfig string
	// Nodes are the names of the simulated nodes, by pool.
	Nodes map[string][]string
	// WorkerToken is the bearer token of UserWorker, for kubeconfigs of several clusters.
	WorkerToken string

	opts      Options
	procs     []*exec.Cmd
	apiArgs   []string
	apiserver *exec.Cmd
	// holder keeps the apiserver's port while it is stopped (see StopAPIServer).
	holder net.Listener
	owned  bool
}

// FindBin returns test/bin of the repository the working directory is in, or
// $BUILDFLEET_TEST_BIN.
func FindBin() (string, error) {
	if b := os.Getenv("BUILDFLEET_TEST_BIN"); b != "" {
		return b, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "test", "cluster", "build.sh")); err == nil {
			return filepath.Join(dir, "test", "bin"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("kubetest: test/cluster/build.sh not found above the working directory")
		}
		dir = parent
	}
}

// Binaries are the programs the control plane runs.
var Binaries = []string{"etcd", "kube-apiserver", "kube-scheduler", "kwok"}

// ErrNotBuilt says the control plane's binaries are missing.
var ErrNotBuilt = errors.New("the test control plane is not built: run `make test` or test/cluster/build.sh")

// Start starts a control plane and waits until it can run pods on every node.
func Start(ctx context.Context, o Options) (cp *ControlPlane, err error) {
	if o.Bin == "" {
		if o.Bin, err = FindBin(); err != nil {
			return nil, err
		}
	}
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(o.Bin, b)); err != nil {
			return nil, fmt.Errorf("%w (%s missing)", ErrNotBuilt, b)
		}
	}
	if o.KataNodes == 0 {
		o.KataNodes = 2
	}
	if o.RuncNodes == 0 {
		o.RuncNodes = 2
	}
	dir, err := os.MkdirTemp("", "buildfleet-kube-")
	if err != nil {
		return nil, err
	}
	cp = &ControlPlane{Dir: dir, owned: true, Nodes: map[string][]string{}, opts: o}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, cp.logTails())
			cp.Stop()
			cp = nil
		}
	}()
	if err := cp.start(ctx, o); err != nil {
		return nil, err
	}
	return cp, nil
}

func (cp *ControlPlane) start(ctx context.Context, o Options) error {
	ports, err := freePorts(5)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort, kwokPort, schedPort := ports[0], ports[1], ports[2], ports[3], ports[4]
	path := func(name string) string { return filepath.Join(cp.Dir, name) }
	adminToken, workerToken := token(), token()
	cp.WorkerToken = workerToken

	// Service account signing key.
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	tokens := fmt.Sprintf("%s,admin,admin,\"system:masters\"\n%s,%s,%s\n", adminToken, workerToken, UserWorker, UserWorker)
	stagesPath := path("stages.yaml")
	// Every pod's log is an empty file unless a test gives it one (PodLog).
	if err := os.MkdirAll(path("podlogs"), 0o750); err != nil {
		return err
	}
	if err := os.WriteFile(path("podlogs/empty.log"), nil, 0o640); err != nil {
		return err
	}
	kwokConfig := slices.Concat(stages, []byte(fmt.Sprintf(`
---
apiVersion: kwok.x-k8s.io/v1alpha1
kind: ClusterLogs
metadata:
  name: empty
spec:
  logs:
  - logsFile: %q
    follow: true
`, path("podlogs/empty.log"))))
	for name, data := range map[string][]byte{"sa.key": keyPEM, "sa.pub": pubPEM, "tokens.csv": []byte(tokens), "stages.yaml": kwokConfig} {
		if err := os.WriteFile(path(name), data, 0o600); err != nil {
			return err
		}
	}
	cp.URL = fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	cp.AdminKubeconfig, cp.WorkerKubeconfig = path("admin.kubeconfig"), path("worker.kubeconfig")
	if err := WriteKubeconfig(cp.AdminKubeconfig, Context{Name: "test", Server: cp.URL, User: "admin", Token: adminToken}); err != nil {
		return err
	}
	if err := WriteKubeconfig(cp.WorkerKubeconfig, Context{Name: "test", Server: cp.URL, User: UserWorker, Token: workerToken}); err != nil {
		return err
	}
	cp.Admin = &rest.Config{
		Host:            cp.URL,
		BearerToken:     adminToken,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             200,
		Burst:           400,
	}

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	if _, err := cp.run(o, "etcd",
		"--name", "default",
		"--data-dir", path("etcd"),
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL,
		"--unsafe-no-fsync", "--log-level", "warn"); err != nil {
		return err
	}
	cp.apiArgs = []string{
		"--etcd-servers", etcdURL,
		"--secure-port", strconv.Itoa(apiPort), "--bind-address", "127.0.0.1",
		"--cert-dir", path("certs"),
		"--token-auth-file", path("tokens.csv"),
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", path("sa.pub"),
		"--service-account-signing-key-file", path("sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/12",
		"--disable-admission-plugins", "ServiceAccount",
		"--allow-privileged=true",
		"--max-requests-inflight", "2000", "--max-mutating-requests-inflight", "1000",
		"--enable-priority-and-fairness=false",
		// Pod logs are served by kwok, as a kubelet would, at the nodes' InternalIP.
		"--kubelet-preferred-address-types", "InternalIP",
		"--v", "0"}
	if cp.apiserver, err = cp.run(o, "kube-apiserver", cp.apiArgs...); err != nil {
		return err
	}
	if err := cp.waitReady(ctx); err != nil {
		return err
	}
	if _, err := cp.run(o, "kube-scheduler",
		"--kubeconfig", cp.AdminKubeconfig, "--leader-elect=false",
		"--secure-port", strconv.Itoa(schedPort), "--bind-address", "127.0.0.1",
		"--kube-api-qps", "500", "--kube-api-burst", "1000", "--v", "0"); err != nil {
		return err
	}
	if err := cp.installLogsCRD(ctx); err != nil {
		return err
	}
	if _, err := cp.run(o, "kwok",
		"--kubeconfig", cp.AdminKubeconfig,
		"--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
		"--config", stagesPath,
		// kwok serves the nodes' kubelet API (pod logs) over TLS at 127.0.0.1, with the
		// apiserver's own certificate: the apiserver does not verify kubelets it has no CA
		// for.
		"--cidr", "10.0.0.1/16", "--node-ip", "127.0.0.1", "--node-port", strconv.Itoa(kwokPort),
		"--server-address", fmt.Sprintf("127.0.0.1:%d", kwokPort),
		"--tls-cert-file", path("certs/apiserver.crt"), "--tls-private-key-file", path("certs/apiserver.key"),
		"--enable-crds", "Logs",
		"--v", "ERROR"); err != nil {
		return err
	}
	return cp.populate(ctx, o)
}

// run starts one of the binaries in its own process group.
func (cp *ControlPlane) run(o Options, name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(filepath.Join(o.Bin, name), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if o.Log != nil {
		cmd.Stdout, cmd.Stderr = o.Log, o.Log
	} else {
		// Kept for the error a failed start returns.
		// Appended to: a restarted apiserver keeps the first one's lines.
		f, err := os.OpenFile(filepath.Join(cp.Dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, err
		}
		defer f.Close() // the child holds its own descriptor
		cmd.Stdout, cmd.Stderr = f, f
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cp.procs = append(cp.procs, cmd)
	return cmd, nil
}

// StopAPIServer stops the kube-apiserver (SIGTERM, then SIGKILL after 5s), as an outage
// does; etcd, the scheduler and kwok keep running and reconnect once StartAPIServer brings
// it back on the same address.
//
// While it is stopped its port is held by a listener that resets every connection, as a
// crashed apiserver behind a live load balancer does: a freed port is soon taken by some
// other test's server (seen: a plain HTTP server answered the clients of this one).
func (cp *ControlPlane) StopAPIServer() error {
	if cp.apiserver == nil {
		return nil
	}
	stopProcess(cp.apiserver)
	cp.procs = slices.DeleteFunc(cp.procs, func(c *exec.Cmd) bool { return c == cp.apiserver })
	cp.apiserver = nil
	ln, err := net.Listen("tcp", strings.TrimPrefix(cp.URL, "https://"))
	if err != nil {
		return fmt.Errorf("kubetest: holding the apiserver's port: %w", err)
	}
	cp.holder = ln
	go resetAll(ln)
	return nil
}

// resetAll accepts every connection on ln and resets it at once, until ln is closed.
func resetAll(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // a reset, not an orderly close
		}
		_ = c.Close()
	}
}

// StartAPIServer starts the kube-apiserver StopAPIServer stopped, and waits until it is
// ready.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	if cp.apiserver != nil {
		return errors.New("kubetest: the kube-apiserver is running")
	}
	if cp.holder != nil {
		_ = cp.holder.Close()
		cp.holder = nil
	}
	var err error
	if cp.apiserver, err = cp.run(cp.opts, "kube-apiserver", cp.apiArgs...); err != nil {
		return err
	}
	return cp.waitReady(ctx)
}

// logTails returns the last lines each process logged, for the error of a failed start.
func (cp *ControlPlane) logTails() string {
	var b strings.Builder
	for _, name := range Binaries {
		data, err := os.ReadFile(filepath.Join(cp.Dir, name+".log"))
		if err != nil || len(data) == 0 {
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(data)), "\n")
		fmt.Fprintf(&b, "\n--- %s (last lines):\n%s", name, strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

// Stop stops every process the control plane started, by pid, newest first, and removes its
// directory.
func (cp *ControlPlane) Stop() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		stopProcess(cp.procs[i])
	}
	cp.procs = nil
	if cp.holder != nil {
		_ = cp.holder.Close()
		cp.holder = nil
	}
	if cp.owned {
		_ = os.RemoveAll(cp.Dir)
	}
}

// stopProcess stops p's process group: SIGTERM, then SIGKILL after 5s.
func stopProcess(p *exec.Cmd) {
	_ = syscall.Kill(-p.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-p.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

// Pids are the process ids of the running control-plane processes.
func (cp *ControlPlane) Pids() []int {
	out := make([]int, len(cp.procs))
	for i, p := range cp.procs {
		out[i] = p.Process.Pid
	}
	return out
}

// Client is an admin client.
func (cp *ControlPlane) Client() *kubernetes.Clientset {
	return kubernetes.NewForConfigOrDie(cp.Admin)
}

func (cp *ControlPlane) waitReady(ctx context.Context) error {
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, Timeout: 2 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, cp.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+cp.Admin.BearerToken)
		resp, err := c.Do(req)
		if err == nil {
			body := new(bytes.Buffer)
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, body.String())
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-apiserver not ready after 60s: %s", last)
}

// populate creates the kata RuntimeClass and the nodes, and waits until kwok has made every
// node Ready and its not-ready taint is gone.
func (cp *ControlPlane) populate(ctx context.Context, o Options) error {
	c := cp.Client()
	_, err := c.NodeV1().RuntimeClasses().Create(ctx, &nodev1.RuntimeClass{
		ObjectMeta: metav1.ObjectMeta{Name: RuntimeClassKata},
		Handler:    "kata",
		Overhead: &nodev1.Overhead{PodFixed: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("250m"),
			corev1.ResourceMemory: resource.MustParse("160Mi"),
		}},
		Scheduling: &nodev1.Scheduling{
			NodeSelector: map[string]string{LabelKata: "true"},
			Tolerations: []corev1.Toleration{{
				Key: LabelPool, Operator: corev1.TolerationOpEqual, Value: PoolKata, Effect: corev1.TaintEffectNoSchedule,
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create RuntimeClass kata: %w", err)
	}
	var names []string
	for pool, n := range map[string]int{PoolKata: o.KataNodes, PoolRunc: o.RuncNodes} {
		for i := range n {
			name := fmt.Sprintf("%s-%d", pool, i)
			if err := cp.createNode(ctx, c, name, pool); err != nil {
				return err
			}
			cp.Nodes[pool] = append(cp.Nodes[pool], name)
			names = append(names, name)
		}
	}
	return cp.untaint(ctx, c, names)
}

func (cp *ControlPlane) createNode(ctx context.Context, c kubernetes.Interface, name, pool string) error {
	labels := map[string]string{
		"kubernetes.io/hostname": name,
		"kubernetes.io/os":       "linux",
		"kubernetes.io/arch":     "amd64",
		"type":                   "kwok",
		LabelPool:                pool,
		LabelDedicated:           Dedicated,
	}
	if pool == PoolKata {
		labels[LabelKata] = "true"
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("2000"),
		corev1.ResourceMemory: resource.MustParse("8Ti"),
		corev1.ResourcePods:   resource.MustParse("5000"),
	}
	_, err := c.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:        name,
			Labels:      labels,
			Annotations: map[string]string{"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
		},
		Spec:   corev1.NodeSpec{Taints: nodeTaints(pool)},
		Status: corev1.NodeStatus{Capacity: capacity, Allocatable: capacity},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	return nil
}

func nodeTaints(pool string) []corev1.Taint {
	t := []corev1.Taint{{Key: LabelDedicated, Value: Dedicated, Effect: corev1.TaintEffectNoSchedule}}
	if pool == PoolKata {
		t = append(t, corev1.Taint{Key: LabelPool, Value: PoolKata, Effect: corev1.TaintEffectNoSchedule})
	}
	return t
}

// untaint waits for kwok to make the nodes Ready, then removes the not-ready taint that
// admission put on them (no node lifecycle controller runs here to do it).
func (cp *ControlPlane) untaint(ctx context.Context, c kubernetes.Interface, names []string) error {
	deadline := time.Now().Add(60 * time.Second)
	pending := map[string]bool{}
	for _, n := range names {
		pending[n] = true
	}
	for len(pending) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("nodes not ready after 60s: %v", pending)
		}
		for n := range pending {
			node, err := c.CoreV1().Nodes().Get(ctx, n, metav1.GetOptions{})
			if err != nil || !nodeReady(node) {
				continue
			}
			var keep []corev1.Taint
			for _, t := range node.Spec.Taints {
				if !strings.HasPrefix(t.Key, "node.kubernetes.io/") {
					keep = append(keep, t)
				}
			}
			if len(keep) != len(node.Spec.Taints) {
				node.Spec.Taints = keep
				if _, err := c.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
					continue // a conflict with kwok's status update: try again
				}
			}
			delete(pending, n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	out := make([]int, n)
	for i := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out[i] = l.Addr().(*net.TCPAddr).Port
	}
	return out, nil
}

func token() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Context is one context of a kubeconfig: a server, and a user with a bearer token.
type Context struct {
	Name, Server, User, Token string
}

// WriteKubeconfig writes a kubeconfig with a cluster, a user and a context for each of
// contexts (the first is the current one), trusting the servers' certificates unverified.
func WriteKubeconfig(path string, contexts ...Context) error {
	if len(contexts) == 0 {
		return errors.New("kubetest: a kubeconfig needs a context")
	}
	var clusters, users, ctxs strings.Builder
	for _, c := range contexts {
		fmt.Fprintf(&clusters, "- name: %s\n  cluster:\n    server: %s\n    insecure-skip-tls-verify: true\n", c.Name, c.Server)
		fmt.Fprintf(&users, "- name: %s-%s\n  user:\n    token: %s\n", c.Name, c.User, c.Token)
		fmt.Fprintf(&ctxs, "- name: %s\n  context:\n    cluster: %s\n    user: %s-%s\n", c.Name, c.Name, c.Name, c.User)
	}
	kc := fmt.Sprintf("apiVersion: v1\nkind: Config\nclusters:\n%susers:\n%scontexts:\n%scurrent-context: %s\n",
		clusters.String(), users.String(), ctxs.String(), contexts[0].Name)
	return os.WriteFile(path, []byte(kc), 0o600)
}

// CreateNamespace creates a namespace with labels (Pod Security labels, say).
func (cp *ControlPlane) CreateNamespace(ctx context.Context, name string, labels map[string]string) error {
	_, err := cp.Client().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	return nil
}

// Unreachable is a rest config for an apiserver address nothing listens on.
func Unreachable() *rest.Config {
	ports, err := freePorts(1)
	if err != nil {
		panic(err)
	}
	return &rest.Config{
		Host:            fmt.Sprintf("https://127.0.0.1:%d", ports[0]),
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		Timeout:         2 * time.Second,
	}
}

// APIServerPID is the running kube-apiserver's process id, 0 while it is stopped: for
// benchmarks that measure what the apiserver spends.
func (cp *ControlPlane) APIServerPID() int {
	if cp.apiserver == nil {
		return 0
	}
	return cp.apiserver.Process.Pid
}
