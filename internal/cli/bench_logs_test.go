package cli

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/buildfleet/buildfleet/internal/perf"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// sampleProc reads what process pid has used so far.
func sampleProc(tb testing.TB, pid int) perf.Usage {
	tb.Helper()
	u, err := perf.ProcUsage(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return u
}

// BenchmarkKubeLogsHeld measures what following build output costs: one replica (the real
// binary) holds BUILDFLEET_BENCH_LOG_BUILDS (default 1,000) running builds on the test
// control plane, each pod with output, first with live logs (a pods/log stream per running
// build), then with logs read at the end (BUILDFLEET_LOG_LIVE=false). It reports the
// replica's RSS and its CPU while the builds are held for 20s, the apiserver's CPU over the
// same 20s and how much its RSS grew from before the builds were submitted, and the
// live/at-end ratio. kwok serves the logs, as a kubelet would; each
// follow costs it an inotify instance, so the benchmark raises the host's limit (root).
func BenchmarkKubeLogsHeld(b *testing.B) {
	n := 1000
	if v := os.Getenv("BUILDFLEET_BENCH_LOG_BUILDS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			b.Fatalf("BUILDFLEET_BENCH_LOG_BUILDS=%q: want a positive number", v)
		}
	}
	restore, err := perf.RaiseInotify(2*n + 256)
	if err != nil {
		b.Log(err)
	}
	b.Cleanup(restore)
	results := map[string][2]perf.Usage{} // mode → replica, apiserver usage while held
	// Both fleets are made here, so that neither's clean-up (deleting 1,000 pods) falls in
	// the other's measurement.
	fleets := map[bool]*kubeFleet{true: newKubeFleet(b, "10m"), false: newKubeFleet(b, "10m")}
	for _, live := range []bool{false, true} {
		mode := map[bool]string{true: "live", false: "at-end"}[live]
		b.Run(mode, func(b *testing.B) {
			f := fleets[live]
			f.t = b
			r := f.startBinary("held-"+mode, "BUILDFLEET_TARGETS_FILE="+f.targets, "KUBECONFIG="+f.cp.WorkerKubeconfig,
				"BUILDFLEET_LOG_LEVEL=warn", "BUILDFLEET_CONCURRENCY="+strconv.Itoa(n+64),
				"BUILDFLEET_MAX_ACK_PENDING="+strconv.Itoa(2*n), "BUILDFLEET_ACK_WAIT=60s",
				"BUILDFLEET_LOG_LIVE="+map[bool]string{true: "always", false: "never"}[live])
			ctx := context.Background()
			apiBefore := sampleProc(b, f.cp.APIServerPID())
			var g errgroup.Group
			g.SetLimit(32)
			for i := range n {
				g.Go(func() error {
					id := fmt.Sprintf("held-%s-%d", mode, i)
					pl, err := f.cp.PodLog(ctx, f.ns, "build-"+id)
					if err != nil {
						return err
					}
					defer pl.Close()
					lines := make([]string, 20)
					for j := range lines {
						lines[j] = fmt.Sprintf("%s line %d of the build's output so far", id, j+1)
					}
					if err := pl.Print(lines...); err != nil {
						return err
					}
					_, err = f.cl.Submit(ctx, sim(id, map[string]string{"run-ms": "3600000", protocol.AnnotationTarget: "runc"}))
					return err
				})
			}
			if err := g.Wait(); err != nil {
				b.Fatal(err)
			}
			waitFor(b, 10*time.Minute, "every build running", func() bool {
				kv, err := f.js.KeyValue(ctx, "BUILDFLEET_BUILDS")
				if err != nil {
					return false
				}
				running := 0
				keys, err := kv.ListKeys(ctx)
				if err != nil {
					return false
				}
				for k := range keys.Keys() {
					if e, err := kv.Get(ctx, k); err == nil && strings.Contains(string(e.Value()), `"state":"running"`) {
						running++
					}
				}
				return running == n
			})
			if live {
				// Every build's output is in its log: the follows are all open.
				waitFor(b, 5*time.Minute, "every build's output shipped", func() bool {
					st, err := f.js.Stream(ctx, "BUILDFLEET_LOGS")
					if err != nil {
						return false
					}
					info, err := st.Info(ctx, jetstream.WithSubjectFilter("buildfleet.logs.>"))
					return err == nil && len(info.State.Subjects) == n
				})
			}
			pid, api := r.cmd.Process.Pid, f.cp.APIServerPID()
			r0, a0 := sampleProc(b, pid), sampleProc(b, api)
			b.ResetTimer()
			time.Sleep(20 * time.Second) // the window the usage is measured over
			b.StopTimer()
			r1, a1 := sampleProc(b, pid), sampleProc(b, api)
			results[mode] = [2]perf.Usage{{CPU: r1.CPU - r0.CPU, RSS: r1.RSS}, {CPU: a1.CPU - a0.CPU, RSS: a1.RSS - apiBefore.RSS}}
			b.ReportMetric(float64(r1.RSS)/(1<<20), "replica-RSS-MiB")
			b.ReportMetric((r1.CPU-r0.CPU).Seconds()/20, "replica-cores")
			b.ReportMetric(float64(a1.RSS-apiBefore.RSS)/(1<<20), "apiserver-RSS-growth-MiB")
			b.ReportMetric((a1.CPU-a0.CPU).Seconds()/20, "apiserver-cores")
			r.cmd.Process.Kill()
		})
	}
	if l, e := results["live"], results["at-end"]; l[0].RSS > 0 && e[0].RSS > 0 {
		b.Logf("%d running builds: live/at-end replica RSS %.2f (%d vs %d MiB), replica CPU %s vs %s over 20s, apiserver CPU %s vs %s, apiserver RSS growth %d vs %d MiB",
			n, float64(l[0].RSS)/float64(e[0].RSS), l[0].RSS>>20, e[0].RSS>>20, l[0].CPU, e[0].CPU, l[1].CPU, e[1].CPU, l[1].RSS>>20, e[1].RSS>>20)
	}
}
