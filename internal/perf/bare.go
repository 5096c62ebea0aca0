package perf

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/executor/kube"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// bareSpec is a bare create loop: the pods a replica would make for the builds named
// prefix00000… (N at most), created in namespace with creates at once over conns
// connections, by clients with the replicas' rate limits.
type bareSpec struct {
	Kubeconfig string  `json:"kubeconfig"`
	Namespace  string  `json:"namespace"`
	Prefix     string  `json:"prefix"`
	N          int     `json:"n"`
	Creates    int     `json:"creates"`
	Conns      int     `json:"conns"`
	QPS        float32 `json:"qps"`
	Burst      int     `json:"burst"`
}

// bare is the loop's clients, each over a connection of its own, and the target's pod
// options in its namespace (parsed once: the loop times nothing but the creates).
type bare struct {
	conns []*kubernetes.Clientset
	opts  kube.Options
}

// newBare connects a bare loop as a replica connects (kube.Clusters.Get): protobuf, one
// rate limiter, conns connections for its creates.
func newBare(kubeconfig, namespace string, qps float32, burst, conns int) (*bare, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	rc.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(qps, burst)
	rc.ContentType = "application/vnd.kubernetes.protobuf" // as the worker's clients do
	b := &bare{}
	for range max(conns, 1) {
		c := rest.CopyConfig(rc)
		c.Dial = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		k, err := kubernetes.NewForConfig(c)
		if err != nil {
			return nil, err
		}
		b.conns = append(b.conns, k)
	}
	b.opts, err = kube.ParseOptions([]byte(`{"namespace": "` + namespace + `", "node_selector": {"dedicated": "builds"}, "resources": {"default": "micro"}, "pass_annotations": ["sim.buildfleet.io/"]}`))
	return b, err
}

// create makes the bare loop's pod for build id: the pod a replica would make for it.
func (b *bare) create(ctx context.Context, id string) error {
	return b.createOn(ctx, b.conns[0], id)
}

func (b *bare) createOn(ctx context.Context, k *kubernetes.Clientset, id string) error {
	job := build.NewJob(sim(id, parked), protocol.Record{Target: "runc", TimeoutSeconds: 3600})
	pod, err := kube.Pod(job, "bare", b.opts)
	if err != nil {
		return err
	}
	_, err = k.CoreV1().Pods(b.opts.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	return err
}

// loop creates a pod for each id with creates at once; it returns when each create
// returned, in the order they did.
func (b *bare) loop(ctx context.Context, ids []string, creates int) ([]time.Time, error) {
	at, _, err := b.timed(ctx, ids, creates)
	return at, err
}

// timed is loop, and also returns when each create was sent, in the same order.
func (b *bare) timed(ctx context.Context, ids []string, creates int) ([]time.Time, []time.Time, error) {
	ch := make(chan string)
	type span struct{ sent, returned time.Time }
	done := make(chan span, len(ids))
	g, gctx := errgroup.WithContext(ctx)
	for w := range creates {
		k := b.conns[w%len(b.conns)]
		g.Go(func() error {
			for id := range ch {
				sent := time.Now()
				if err := b.createOn(gctx, k, id); err != nil {
					return err
				}
				done <- span{sent, time.Now()}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(ch)
		for _, id := range ids {
			select {
			case ch <- id:
			case <-gctx.Done():
				return nil
			}
		}
		return nil
	})
	err := g.Wait()
	close(done)
	at := make([]time.Time, 0, len(ids))
	sent := make([]time.Time, 0, len(ids))
	for s := range done {
		at = append(at, s.returned)
		sent = append(sent, s.sent)
	}
	if err != nil {
		return at, sent, fmt.Errorf("bare loop: %w", err)
	}
	return at, sent, nil
}

// envBareLoop, set to a bareSpec's JSON, makes a benchmark process (cmd/buildfleet-bench,
// or perf's test binary) the bare loop of a paired round instead (BareLoopProcess).
const envBareLoop = "BUILDFLEET_BENCH_BARE_LOOP"

// BareLoopProcess runs the bare loop and exits when this process was started as one (by a
// paired round, with envBareLoop set); otherwise it returns at once. The benchmark's main
// and its test binary call it first. Once connected the loop says "ready" on stderr, goes
// on a line on stdin and stops when stdin ends; then it writes when each create returned,
// one Unix nanosecond a line, to stdout.
func BareLoopProcess() {
	spec := os.Getenv(envBareLoop)
	if spec == "" {
		return
	}
	if err := bareLoopProcess(spec); err != nil {
		fmt.Fprintln(os.Stderr, "bare loop:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func bareLoopProcess(spec string) error {
	var s bareSpec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		return fmt.Errorf("%s: %w", envBareLoop, err)
	}
	b, err := newBare(s.Kubeconfig, s.Namespace, s.QPS, s.Burst, s.Conns)
	if err != nil {
		return err
	}
	// Connected first, then told when to go: a line on stdin.
	if _, err := b.conns[0].CoreV1().Namespaces().Get(context.Background(), s.Namespace, metav1.GetOptions{}); err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "ready")
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return fmt.Errorf("waiting to go: %w", err)
	}
	// It goes until its stdin ends (or its N pods are made): the creates that were in
	// flight then are not counted.
	ctx, stop := context.WithCancel(context.Background())
	var stopped atomic.Bool
	go func() {
		_, _ = io.Copy(io.Discard, in)
		stopped.Store(true)
		stop()
	}()
	at, sent, err := b.timed(ctx, names(s.Prefix, s.N), s.Creates)
	if err != nil && !stopped.Load() {
		return err
	}
	w := bufio.NewWriter(os.Stdout)
	for i, t := range at {
		fmt.Fprintln(w, t.UnixNano(), sent[i].UnixNano())
	}
	return w.Flush()
}

// bareProcess is a bare loop running as its own process, as a replica does.
type bareProcess struct {
	cmd   *exec.Cmd
	out   *os.File
	ready *bufio.Reader // its stderr: "ready" once connected, then any error
	start io.WriteCloser
	sent  []time.Time // when each create was sent, in the order wait returns them
}

// startBare starts the bare loop of spec as a process of its own: this program again, with
// envBareLoop set.
func (r *rig) startBare(s bareSpec) (*bareProcess, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	spec, err := json.Marshal(s)
	if err != nil {
		return nil, err
	}
	out, err := os.CreateTemp(r.dir, "bare-*.out")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), envBareLoop+"="+string(spec))
	cmd.Stdout = out
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, err
	}
	bp := &bareProcess{cmd: cmd, out: out, ready: bufio.NewReader(stderr), start: stdin}
	if line, err := bp.ready.ReadString('\n'); err != nil || line != "ready\n" {
		_ = cmd.Process.Kill()
		rest, _ := io.ReadAll(bp.ready)
		_ = cmd.Wait()
		out.Close()
		return nil, fmt.Errorf("bare loop process did not start: %s%s", line, rest)
	}
	return bp, nil
}

// run tells the connected loop to go.
func (b *bareProcess) run() error {
	_, err := io.WriteString(b.start, "go\n")
	return err
}

// end tells the loop to stop, and returns when each of its creates returned.
func (b *bareProcess) end() ([]time.Time, error) {
	if err := b.start.Close(); err != nil {
		b.stop()
		return nil, err
	}
	return b.wait()
}

// stop ends a loop that is not to finish.
func (b *bareProcess) stop() {
	_ = b.cmd.Process.Kill()
	_, _ = b.wait()
}

// wait waits for the loop's end and returns when each of its creates returned.
func (b *bareProcess) wait() ([]time.Time, error) {
	defer b.out.Close()
	msg, _ := io.ReadAll(b.ready) // read to its end before Wait closes it
	if err := b.cmd.Wait(); err != nil {
		return nil, fmt.Errorf("bare loop process: %w: %s", err, msg)
	}
	if _, err := b.out.Seek(0, 0); err != nil {
		return nil, err
	}
	var at []time.Time
	b.sent = b.sent[:0]
	sc := bufio.NewScanner(b.out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			return nil, fmt.Errorf("bare loop process wrote %q", sc.Text())
		}
		end, err1 := strconv.ParseInt(f[0], 10, 64)
		sent, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bare loop process wrote %q", sc.Text())
		}
		at = append(at, time.Unix(0, end))
		b.sent = append(b.sent, time.Unix(0, sent))
	}
	return at, sc.Err()
}
