// Package perf is buildfleet's one benchmark program (`make bench`): on the test control
// plane (kubetest) and an embedded nats-server it measures, in one run,
//
//	B0  the bare client-go create loop: pods/s
//	P1  one replica's dispatch throughput, and P1/B0, in each of several rounds
//	B0/B0 two bare loops side by side: how far a paired round of P1/B0 strays by itself
//	P2  submit → pod-created latency at half of P1's rate, and the bare create's at that rate
//	P3  RSS, heap and CPU of one replica holding N running builds
//	P4  SIGTERM and SIGKILL takeover times of a replica's running builds
//	P5  pod phase change → lifecycle event latency while builds finish
//
// and prints a table and JSON. The replicas are the real buildfleet binary, each its own
// process, run with the shipped sizing (Shipped).
package perf

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/buildfleet/buildfleet/internal/executor/kube"
)

// Sizing is how a replica is sized in deploy/base: the figures the benchmark runs with and
// deploy's tests hold the manifests to.
type Sizing struct {
	// Concurrency is BUILDFLEET_CONCURRENCY: the running builds one replica holds.
	Concurrency int `json:"concurrency"`
	// MaxAckPending is BUILDFLEET_MAX_ACK_PENDING: the running builds of the whole fleet.
	MaxAckPending int `json:"max_ack_pending"`
	// GoMemLimit is GOMEMLIMIT, and MemoryLimit the container's memory limit.
	GoMemLimit  string `json:"gomemlimit"`
	MemoryLimit string `json:"memory_limit"`
}

// Shipped is deploy/base's sizing.
var Shipped = Sizing{Concurrency: 10000, MaxAckPending: 200000, GoMemLimit: "210MiB", MemoryLimit: "256Mi"}

func (s Sizing) env() []string {
	return []string{
		"BUILDFLEET_CONCURRENCY=" + strconv.Itoa(s.Concurrency),
		"BUILDFLEET_MAX_ACK_PENDING=" + strconv.Itoa(s.MaxAckPending),
		"GOMEMLIMIT=" + s.GoMemLimit,
	}
}

// Options size the run.
type Options struct {
	// Binary is the buildfleet binary the replicas run.
	Binary string
	// Dispatch is the builds of each P1 round and pods of each B0 round; Rounds how many
	// rounds of P1 run, each between two of B0.
	Dispatch, Rounds int
	// Creates is the bare loop's concurrent creates, and Conns the connections they go over:
	// a replica's (kube.DefaultMaxCreates, kube.DefaultCreateConns), so that both meet the
	// apiserver alike.
	Creates, Conns int
	// Latency is the builds of P2, which then finish for P5, submitted at LatencyRate
	// builds/s (0: half of P1's, which the dispatch phase measures first).
	Latency     int
	LatencyRate float64
	// Hold is the running builds of P3, then handed over for P4.
	Hold int
	// Handover is a smaller P4 run before P3's (0: none).
	Handover int
	// KubeQPS and KubeBurst are the client rate limits of the bare loop and the replicas.
	KubeQPS   float32
	KubeBurst int
	// ProfileDir, when set, receives the replicas' profiles (P1 CPU, P3 heap and goroutines,
	// P4 the adopters' CPU) and their logs.
	ProfileDir string
	// Only, when not empty, runs only these phases: "dispatch" (B0, P1), "noise" (B0/B0),
	// "latency" (P2, P5), "handover" (P4 at the small size), "hold" (P3, P4 at the large
	// size).
	Only []string
	// Env is added to every replica's environment (KEY=VALUE), after the shipped sizing.
	Env []string
	// Log receives progress lines; nil: none.
	Log io.Writer
}

// Defaults are the sizes of `make bench`.
func Defaults() Options {
	return Options{Dispatch: 2000, Rounds: 3, Creates: kube.DefaultMaxCreates, Conns: kube.DefaultCreateConns, Latency: 1000, Hold: 10000, Handover: 1000,
		KubeQPS: 5000, KubeBurst: 10000}
}

// Result is one figure of the run.
type Result struct {
	ID     string  `json:"id"`
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Unit   string  `json:"unit"`
	Target string  `json:"target,omitempty"` // what the figure must be, when it has a bound
	Met    *bool   `json:"met,omitempty"`
}

// Report is a run's figures and where they were measured.
type Report struct {
	Machine Machine  `json:"machine"`
	Options Sizes    `json:"sizes"`
	Sizing  Sizing   `json:"sizing"`
	Results []Result `json:"results"`
}

// Sizes are the run's sizes, as reported.
type Sizes struct {
	Dispatch int `json:"dispatch"`
	Rounds   int `json:"rounds"`
	Creates  int `json:"creates"`
	Conns    int `json:"conns"`
	Latency  int `json:"latency"`
	Hold     int `json:"hold"`
	Handover int `json:"handover"`
}

// Machine says what the run ran on.
type Machine struct {
	CPU   string `json:"cpu"`
	Cores int    `json:"cores"`
	MemGi int    `json:"memory_gib"`
	Go    string `json:"go"`
	OS    string `json:"os"`
}

func machine() Machine {
	m := Machine{Cores: runtime.NumCPU(), Go: runtime.Version(), OS: runtime.GOOS + "/" + runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			m.MemGi = (kb + 1<<19) >> 20
		}
	}
	return m
}

func (r *Report) add(id, name string, v float64, unit string) {
	r.Results = append(r.Results, Result{ID: id, Name: name, Value: v, Unit: unit})
}

// bound adds a figure with the bound it must keep (ok says it did).
func (r *Report) bound(id, name string, v float64, unit, target string, ok bool) {
	r.Results = append(r.Results, Result{ID: id, Name: name, Value: v, Unit: unit, Target: target, Met: &ok})
}

// Failed lists the figures that missed their bound.
func (r *Report) Failed() []Result {
	var out []Result
	for _, x := range r.Results {
		if x.Met != nil && !*x.Met {
			out = append(out, x)
		}
	}
	return out
}

// Run measures everything, in order: B0 and P1, B0/B0, P2 and P5, P4 at the small size, P3
// and P4 at the large one. A phase that fails ends the run with what was measured so far.
func Run(ctx context.Context, o Options) (*Report, error) {
	rep := &Report{Machine: machine(), Sizing: Shipped,
		Options: Sizes{o.Dispatch, o.Rounds, o.Creates, o.Conns, o.Latency, o.Hold, o.Handover}}
	if err := o.Validate(); err != nil {
		return rep, err
	}
	if o.ProfileDir != "" {
		if err := os.MkdirAll(o.ProfileDir, 0o755); err != nil {
			return rep, err
		}
	}
	r, err := newRig(ctx, o)
	if err != nil {
		return rep, err
	}
	defer r.close()
	steps := []struct {
		name string
		run  func(context.Context, *Report) error
	}{
		{"dispatch", r.dispatch},
		{"noise", r.noise},
		{"latency", r.latency},
		{"handover", func(ctx context.Context, rep *Report) error { return r.hold(ctx, rep, "small", o.Handover, false) }},
		{"hold", func(ctx context.Context, rep *Report) error { return r.hold(ctx, rep, "large", o.Hold, true) }},
	}
	for _, step := range steps {
		if !o.runs(step.name) || step.name == "handover" && o.Handover == 0 {
			continue
		}
		if err := step.run(ctx, rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// Phases are the names Options.Only may list.
var Phases = []string{"dispatch", "noise", "latency", "handover", "hold"}

// Validate checks the options a person may have typed.
func (o Options) Validate() error {
	for _, name := range o.Only {
		if !slices.Contains(Phases, name) {
			return fmt.Errorf("no phase %q: the phases are %s", name, strings.Join(Phases, ", "))
		}
	}
	for _, n := range []struct {
		flag string
		v    int
	}{{"dispatch", o.Dispatch}, {"rounds", o.Rounds}, {"creates", o.Creates}, {"conns", o.Conns}, {"latency", o.Latency}, {"hold", o.Hold}} {
		if n.v < 1 {
			return fmt.Errorf("-%s must be at least 1 (got %d)", n.flag, n.v)
		}
	}
	if o.LatencyRate < 0 {
		return fmt.Errorf("-latency-rate must be 0 (half of P1's) or more (got %v)", o.LatencyRate)
	}
	if o.LatencyRate == 0 && o.runs("latency") && !o.runs("dispatch") {
		return errors.New("the latency phase submits at half of P1's rate, which the dispatch phase measures: run it too, or give -latency-rate")
	}
	if o.Handover < 0 {
		return fmt.Errorf("-handover must be 0 (none) or more (got %d)", o.Handover)
	}
	for _, kv := range o.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return fmt.Errorf("replica environment %q is not KEY=VALUE", kv)
		}
	}
	return nil
}

func (o Options) runs(phase string) bool { return len(o.Only) == 0 || slices.Contains(o.Only, phase) }

// Table writes the report as a Markdown table, with the machine and sizes above it.
func (r *Report) Table(w io.Writer) {
	m := r.Machine
	fmt.Fprintf(w, "machine: %s, %d cores, %d GiB, %s %s\n", m.CPU, m.Cores, m.MemGi, m.Go, m.OS)
	s := r.Options
	fmt.Fprintf(w, "sizes: dispatch %d × %d rounds (bare loop %d creates at once over %d connections), latency %d, hold %d, handover %d\n",
		s.Dispatch, s.Rounds, s.Creates, s.Conns, s.Latency, s.Hold, s.Handover)
	z := r.Sizing
	fmt.Fprintf(w, "replica: BUILDFLEET_CONCURRENCY=%d BUILDFLEET_MAX_ACK_PENDING=%d GOMEMLIMIT=%s (limit %s)\n\n",
		z.Concurrency, z.MaxAckPending, z.GoMemLimit, z.MemoryLimit)
	fmt.Fprintln(w, "| | figure | value | bound |")
	fmt.Fprintln(w, "|---|---|---:|---|")
	for _, x := range r.Results {
		bound := x.Target
		if x.Met != nil {
			bound += map[bool]string{true: " ✓", false: " ✗ missed"}[*x.Met]
		}
		fmt.Fprintf(w, "| %s | %s | %s %s | %s |\n", x.ID, x.Name, format(x.Value), x.Unit, bound)
	}
}

func format(v float64) string {
	switch {
	case v >= 100 || v == float64(int64(v)):
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
}

// JSON writes the report as one JSON document.
func (r *Report) JSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// ms is d in milliseconds.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
