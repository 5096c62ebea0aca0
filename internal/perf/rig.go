package perf

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/buildfleet/buildfleet/internal/kubetest"
	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// rig is what every measurement runs on: the test control plane, an embedded nats-server
// with JetStream, and the buildfleet binary started as replica processes.
type rig struct {
	o   Options
	dir string
	cp  *kubetest.ControlPlane
	ns  *server.Server
	nc  *nats.Conn
	js  jetstream.JetStream

	p1      float64  // P1's mean rate, which P2 runs at half of
	restore []func() // host settings to put back

	mu       sync.Mutex
	replicas []*replica
}

func newRig(ctx context.Context, o Options) (_ *rig, err error) {
	r := &rig{o: o}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	if r.dir, err = os.MkdirTemp("", "buildfleet-bench-"); err != nil {
		return nil, err
	}
	// Every followed log costs kwok an inotify instance: BUILDFLEET_LOG_LIVE=always (-env)
	// follows every running build's.
	restore, err := RaiseInotify(2*o.Hold + 1024)
	if err != nil {
		r.logf("%v", err)
	}
	r.restore = append(r.restore, restore)
	// Each runc node takes 5,000 pods: room for every phase's builds at once.
	nodes := max(2, (o.Hold+o.Dispatch+o.Latency+o.Handover)/4000+1)
	if r.cp, err = kubetest.Start(ctx, kubetest.Options{RuncNodes: nodes, KataNodes: 1}); err != nil {
		return nil, fmt.Errorf("start the test control plane: %w", err)
	}
	r.ns, err = server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: filepath.Join(r.dir, "nats"),
		NoSigs: true, NoLog: true, MaxPayload: 8 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("nats-server: %w", err)
	}
	go r.ns.Start()
	if !r.ns.ReadyForConnections(30 * time.Second) {
		return nil, errors.New("nats-server did not start")
	}
	if r.nc, err = nats.Connect(r.ns.ClientURL(), nats.MaxReconnects(-1)); err != nil {
		return nil, err
	}
	if r.js, err = jetstream.New(r.nc); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *rig) close() {
	r.mu.Lock()
	reps := r.replicas
	r.mu.Unlock()
	for _, p := range reps {
		p.kill()
	}
	if r.nc != nil {
		r.nc.Close()
	}
	if r.ns != nil {
		r.ns.Shutdown()
	}
	if r.cp != nil {
		r.cp.Stop()
	}
	if r.dir != "" {
		_ = os.RemoveAll(r.dir)
	}
	for _, f := range r.restore {
		f()
	}
}

func (r *rig) logf(format string, args ...any) {
	if r.o.Log != nil {
		fmt.Fprintf(r.o.Log, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
}

// phase is one measurement's own corner of the rig: a namespace for its pods, a prefix for
// its subjects, streams and buckets (so nothing left of one phase reaches the next), and a
// targets file naming the namespace.
type phase struct {
	*rig
	name    string
	prefix  string
	kns     string // the replicas' pods
	bare    string // the bare loop's pods
	targets string
	// bareLoop is the bare loop in the bare namespace: the replicas' kubeconfig (admin: no
	// Role to grant per phase) and rate limits.
	bareLoop *bare
	cl       *client.Client
	seen     *seen
}

var targetsYAML = `default: runc
targets:
  - name: runc
    executor: kubernetes
    kubernetes:
      namespace: NAMESPACE
      node_selector: {dedicated: builds}
      pass_annotations: ["sim.buildfleet.io/"]
      resources: {default: micro}
`

func (r *rig) phase(ctx context.Context, name string) (*phase, error) {
	p := &phase{rig: r, name: name, prefix: "bench" + name, kns: "bench-" + name, bare: "bench-" + name + "-bare"}
	for _, ns := range []string{p.kns, p.bare} {
		if err := r.cp.CreateNamespace(ctx, ns, nil); err != nil {
			return nil, err
		}
	}
	p.targets = filepath.Join(r.dir, name+"-targets.yaml")
	if err := os.WriteFile(p.targets, []byte(strings.ReplaceAll(targetsYAML, "NAMESPACE", p.kns)), 0o600); err != nil {
		return nil, err
	}
	var err error
	if p.bareLoop, err = newBare(r.cp.AdminKubeconfig, p.bare, r.o.KubeQPS, r.o.KubeBurst, r.o.Conns); err != nil {
		return nil, err
	}
	if p.cl, err = client.New(r.nc, client.WithPrefix(p.prefix)); err != nil {
		return nil, err
	}
	if p.seen, err = r.watch(ctx, p); err != nil {
		return nil, err
	}
	return p, nil
}

// end deletes the phase's pods and waits until they are gone, so that the next phase's
// control plane is as empty as the first's.
func (p *phase) end(ctx context.Context) error {
	p.mu.Lock()
	reps := p.replicas
	p.replicas = nil
	p.mu.Unlock()
	for _, rep := range reps {
		rep.kill()
	}
	p.seen.stop()
	for _, ns := range []string{p.kns, p.bare} {
		pods := p.cp.Client().CoreV1().Pods(ns)
		grace := int64(0)
		// A collection of thousands outlasts the apiserver's request timeout (which goes on
		// deleting): the delete is sent again until none is left.
		err := poll(ctx, 10*time.Minute, "the pods of "+ns+" deleted", func() bool {
			l, err := pods.List(ctx, metav1.ListOptions{Limit: 1})
			if err == nil && len(l.Items) > 0 {
				_ = pods.DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &grace}, metav1.ListOptions{})
			}
			return err == nil && len(l.Items) == 0
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// scheduled waits until the scheduler has bound every pod of the phase, so that one round's
// backlog does not slow the next.
func (p *phase) scheduled(ctx context.Context) error {
	return poll(ctx, 5*time.Minute, "every pod of "+p.name+" scheduled", func() bool {
		for _, ns := range []string{p.kns, p.bare} {
			l, err := p.cp.Client().CoreV1().Pods(ns).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=", Limit: 1})
			if err != nil || len(l.Items) > 0 {
				return false
			}
		}
		return true
	})
}

// seen is when the benchmark saw each thing happen: lifecycle events, pods created and
// ending, and records changing owner. Everything is stamped as it arrives.
type seen struct {
	mu      sync.Mutex
	changed *sync.Cond
	events  map[string]map[protocol.State]time.Time // build → state → first seen
	counts  map[protocol.State]int
	added   map[string]time.Time   // pod → first seen
	addedIn map[string][]time.Time // namespace → when each of its pods was first seen
	ended   map[string]time.Time   // pod → seen Succeeded or Failed
	owner   map[string]string      // build → replica that last claimed it
	owns    map[string]int         // replica → builds it last claimed
	stops   []func()
}

func (r *rig) watch(ctx context.Context, p *phase) (*seen, error) {
	s := &seen{events: map[string]map[protocol.State]time.Time{}, counts: map[protocol.State]int{},
		added: map[string]time.Time{}, addedIn: map[string][]time.Time{}, ended: map[string]time.Time{}, owner: map[string]string{}, owns: map[string]int{}}
	s.changed = sync.NewCond(&s.mu)
	layout := protocol.Layout{Prefix: p.prefix}
	sub, err := r.nc.Subscribe(layout.AllEvents(), func(m *nats.Msg) {
		now := time.Now()
		id := m.Subject[strings.LastIndexByte(m.Subject, '.')+1:]
		st := protocol.State(strings.TrimPrefix(m.Header.Get(nats.MsgIdHdr), id+"."))
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.events[id] == nil {
			s.events[id] = map[protocol.State]time.Time{}
		}
		if _, dup := s.events[id][st]; !dup {
			s.events[id][st] = now
			s.counts[st]++
			s.changed.Broadcast()
		}
	})
	if err != nil {
		return nil, err
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		return nil, err
	}
	s.stops = append(s.stops, func() { _ = sub.Unsubscribe() })

	note := func(obj any) {
		pod, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		now := time.Now()
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.added[pod.Name]; !ok {
			s.added[pod.Name] = now
			s.addedIn[pod.Namespace] = append(s.addedIn[pod.Namespace], now)
			s.changed.Broadcast()
		}
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			if _, ok := s.ended[pod.Name]; !ok {
				s.ended[pod.Name] = now
				s.changed.Broadcast()
			}
		}
	}
	for _, ns := range []string{p.kns, p.bare} {
		f := informers.NewSharedInformerFactoryWithOptions(r.cp.Client(), 0, informers.WithNamespace(ns))
		inf := f.Core().V1().Pods().Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: note, UpdateFunc: func(_, obj any) { note(obj) },
		}); err != nil {
			return nil, err
		}
		stop := make(chan struct{})
		f.Start(stop)
		s.stops = append(s.stops, func() { close(stop); f.Shutdown() })
		if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			s.stop()
			return nil, errors.New("pod informer did not sync")
		}
	}
	return s, nil
}

// watchOwners follows the phase's build records, noting which replica owns each.
func (p *phase) watchOwners(ctx context.Context) error {
	kv, err := p.js.KeyValue(ctx, protocol.Layout{Prefix: p.prefix}.RecordBucket())
	if err != nil {
		return err
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return err
	}
	s := p.seen
	go func() {
		for e := range w.Updates() {
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var rec protocol.Record
			if err := json.Unmarshal(e.Value(), &rec); err != nil || rec.Owner == "" || rec.Released {
				continue
			}
			s.mu.Lock()
			if prev, ok := s.owner[e.Key()]; ok {
				s.owns[prev]--
			}
			s.owner[e.Key()] = rec.Replica
			s.owns[rec.Replica]++
			s.changed.Broadcast()
			s.mu.Unlock()
		}
	}()
	s.mu.Lock()
	s.stops = append(s.stops, func() { _ = w.Stop() })
	s.mu.Unlock()
	return nil
}

func (s *seen) stop() {
	for _, f := range s.stops {
		f()
	}
}

// await waits until cond (called with s.mu held) holds, or the timeout passes.
func (s *seen) await(ctx context.Context, within time.Duration, what string, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.changed.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for !cond() {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: not within %s", what, within)
		}
		s.changed.Wait()
	}
	return nil
}

// replica is one buildfleet worker process.
type replica struct {
	name string
	cmd  *exec.Cmd
	addr string // its /metrics, /readyz and /debug/pprof
	done chan struct{}
	err  error
}

// start runs a replica of phase p with the shipped sizing, env overriding it, and waits
// until it is ready.
func (p *phase) start(ctx context.Context, name string, env ...string) (*replica, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	rep := &replica{name: name, addr: "127.0.0.1:" + strconv.Itoa(port), done: make(chan struct{})}
	cmd := exec.Command(p.o.Binary, "worker")
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + p.dir,
		"KUBECONFIG=" + p.cp.AdminKubeconfig,
		"BUILDFLEET_NATS_URL=" + p.ns.ClientURL(),
		"BUILDFLEET_PREFIX=" + p.prefix,
		"BUILDFLEET_REPLICA=" + name,
		"BUILDFLEET_TARGETS_FILE=" + p.targets,
		"BUILDFLEET_SCRATCH_DIR=" + filepath.Join(p.dir, "scratch-"+name),
		"BUILDFLEET_HTTP_ADDR=" + rep.addr,
		"BUILDFLEET_PPROF=true",
		"BUILDFLEET_LOG_LEVEL=warn",
		"BUILDFLEET_KUBE_QPS=" + strconv.FormatFloat(float64(p.o.KubeQPS), 'f', -1, 32),
		"BUILDFLEET_KUBE_BURST=" + strconv.Itoa(p.o.KubeBurst),
	}, append(append(Shipped.env(), p.o.Env...), env...)...)
	logDir := p.dir // kept with the profiles, when they are
	if p.o.ProfileDir != "" {
		logDir = p.o.ProfileDir
	}
	logf, err := os.Create(filepath.Join(logDir, p.name+"-"+name+".log"))
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	rep.cmd = cmd
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() {
		rep.err = cmd.Wait()
		logf.Close()
		close(rep.done)
	}()
	p.mu.Lock()
	p.replicas = append(p.replicas, rep)
	p.mu.Unlock()
	err = poll(ctx, 60*time.Second, "replica "+name+" ready", func() bool {
		select {
		case <-rep.done:
			return true
		default:
		}
		resp, err := http.Get("http://" + rep.addr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	select {
	case <-rep.done:
		return nil, fmt.Errorf("replica %s exited at start (%v); its log: %s", name, rep.err, tail(logf.Name()))
	default:
	}
	return rep, err
}

func (rep *replica) signal(sig syscall.Signal) error { return rep.cmd.Process.Signal(sig) }

func (rep *replica) kill() {
	_ = rep.cmd.Process.Kill()
	<-rep.done
}

// metrics scrapes the replica's /metrics: each unlabelled sample by name.
func (rep *replica) metrics() (map[string]float64, error) {
	resp, err := http.Get("http://" + rep.addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
			out[name] = v
		}
	}
	return out, sc.Err()
}

// profile saves the replica's named profile (heap, goroutine) under dir.
func (rep *replica) profile(dir, name string) error {
	resp, err := http.Get("http://" + rep.addr + "/debug/pprof/" + name)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("profile %s: %s", name, resp.Status)
	}
	file, _, _ := strings.Cut(name, "?")
	f, err := os.Create(filepath.Join(dir, rep.name+"-"+file+".pprof"))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// Usage is what a process has used so far: CPU time and resident memory.
type Usage struct {
	CPU time.Duration
	RSS int64
}

// ProcUsage reads pid's usage from /proc (Linux).
func ProcUsage(pid int) (Usage, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Usage{}, err
	}
	// The fields after the command name (which is in parentheses and may hold spaces).
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Usage{}, err
	}
	var rss int64
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			rss = kb << 10
		}
	}
	const ticks = 100 // USER_HZ
	return Usage{CPU: time.Duration(utime+stime) * time.Second / ticks, RSS: rss}, nil
}

// RaiseInotify raises the host's inotify instances to at least n and returns what puts the
// old limit back. kwok serves each followed pod log with an inotify instance, as a kubelet
// would: without room for them the follows fail and are retried, which is the kwok host's
// limit, not the replica's. Raising it needs root; the error says how many follows kwok can
// serve instead.
func RaiseInotify(n int) (restore func(), err error) {
	const limit = "/proc/sys/fs/inotify/max_user_instances"
	old, err := os.ReadFile(limit)
	if err != nil {
		return func() {}, nil // not Linux: nothing to raise
	}
	cur, _ := strconv.Atoi(strings.TrimSpace(string(old)))
	if cur >= n {
		return func() {}, nil
	}
	if err := os.WriteFile(limit, []byte(strconv.Itoa(n)), 0o644); err != nil {
		return func() {}, fmt.Errorf("cannot raise %s (%v): kwok serves at most %d log follows", limit, err, cur)
	}
	return func() { _ = os.WriteFile(limit, old, 0o644) }, nil
}

func poll(ctx context.Context, within time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not within %s", what, within)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}
