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

	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// procSample is what a process has used so far: CPU time and resident memory.
type procSample struct {
	cpu time.Duration
	rss int64
}

// sampleProc reads /proc for pid (Linux).
func sampleProc(tb testing.TB, pid int) procSample {
	tb.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// The fields after the command name (which is in parentheses and may hold spaces).
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	var rss int64
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			rss = kb << 10
		}
	}
	const ticks = 100 // USER_HZ
	return procSample{cpu: time.Duration(utime+stime) * time.Second / ticks, rss: rss}
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
	const limit = "/proc/sys/fs/inotify/max_user_instances"
	if old, err := os.ReadFile(limit); err == nil {
		if cur, _ := strconv.Atoi(strings.TrimSpace(string(old))); cur < 2*n+256 {
			if err := os.WriteFile(limit, []byte(strconv.Itoa(2*n+256)), 0o644); err != nil {
				b.Logf("cannot raise %s (%v): kwok serves at most %d follows", limit, err, cur)
			} else {
				b.Cleanup(func() { _ = os.WriteFile(limit, old, 0o644) })
			}
		}
	}
	results := map[string][2]procSample{} // mode → replica, apiserver usage while held
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
				"BUILDFLEET_LOG_LIVE="+strconv.FormatBool(live))
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
			results[mode] = [2]procSample{{cpu: r1.cpu - r0.cpu, rss: r1.rss}, {cpu: a1.cpu - a0.cpu, rss: a1.rss - apiBefore.rss}}
			b.ReportMetric(float64(r1.rss)/(1<<20), "replica-RSS-MiB")
			b.ReportMetric((r1.cpu-r0.cpu).Seconds()/20, "replica-cores")
			b.ReportMetric(float64(a1.rss-apiBefore.rss)/(1<<20), "apiserver-RSS-growth-MiB")
			b.ReportMetric((a1.cpu-a0.cpu).Seconds()/20, "apiserver-cores")
			r.cmd.Process.Kill()
		})
	}
	if l, e := results["live"], results["at-end"]; l[0].rss > 0 && e[0].rss > 0 {
		b.Logf("%d running builds: live/at-end replica RSS %.2f (%d vs %d MiB), replica CPU %s vs %s over 20s, apiserver CPU %s vs %s, apiserver RSS growth %d vs %d MiB",
			n, float64(l[0].rss)/float64(e[0].rss), l[0].rss>>20, e[0].rss>>20, l[0].cpu, e[0].cpu, l[1].cpu, e[1].cpu, l[1].rss>>20, e[1].rss>>20)
	}
}
