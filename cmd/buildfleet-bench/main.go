// Command buildfleet-bench is `make bench`: every performance figure of buildfleet measured
// in one run on the test control plane (see internal/perf), printed as a table and as JSON.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/buildfleet/buildfleet/internal/perf"
)

func main() {
	perf.BareLoopProcess() // a paired round's bare loop runs as this program again
	o := perf.Defaults()
	flag.StringVar(&o.Binary, "binary", "bin/buildfleet", "the buildfleet binary the replicas run")
	flag.IntVar(&o.Dispatch, "dispatch", o.Dispatch, "B0/P1: pods of each round")
	flag.IntVar(&o.Rounds, "rounds", o.Rounds, "P1: rounds, each between two of B0")
	flag.IntVar(&o.Creates, "creates", o.Creates, "B0: concurrent creates of the bare loop (a replica's)")
	flag.IntVar(&o.Conns, "conns", o.Conns, "B0: connections the bare loop's creates go over (a replica's)")
	flag.IntVar(&o.Latency, "latency", o.Latency, "P2/P5: builds submitted at half P1's rate, then finishing")
	flag.Float64Var(&o.LatencyRate, "latency-rate", 0, "P2: builds/s they are submitted at (0: half P1's)")
	flag.IntVar(&o.Hold, "hold", o.Hold, "P3/P4: running builds one replica holds, then hands over")
	flag.IntVar(&o.Handover, "handover", o.Handover, "P4: a smaller handover before P3's (0: none)")
	flag.StringVar(&o.ProfileDir, "profiles", "", "save the replicas' profiles and logs here")
	flag.Func("only", "run only these phases, comma-separated: "+strings.Join(perf.Phases, ", "), func(v string) error {
		o.Only = append(o.Only, strings.Split(v, ",")...)
		return nil
	})
	flag.Func("env", "KEY=VALUE added to every replica's environment (repeatable)", func(v string) error {
		o.Env = append(o.Env, v)
		return nil
	})
	jsonOut := flag.String("json", "", "also write the JSON report to this file")
	quiet := flag.Bool("q", false, "no progress lines on stderr")
	flag.Parse()
	if !*quiet {
		o.Log = os.Stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep, err := perf.Run(ctx, o)
	rep.Table(os.Stdout)
	fmt.Println()
	if jerr := rep.JSON(os.Stdout); jerr != nil && err == nil {
		err = jerr
	}
	if *jsonOut != "" {
		if f, ferr := os.Create(*jsonOut); ferr != nil {
			err = ferr
		} else {
			_ = rep.JSON(f)
			f.Close()
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "buildfleet-bench:", err)
		os.Exit(1)
	}
	if missed := rep.Failed(); len(missed) > 0 {
		for _, x := range missed {
			fmt.Fprintf(os.Stderr, "buildfleet-bench: %s %s: %.2f %s, bound %s\n", x.ID, x.Name, x.Value, x.Unit, x.Target)
		}
		os.Exit(2)
	}
}
