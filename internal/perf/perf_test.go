package perf

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/buildfleet/buildfleet/internal/kubetest"
)

func TestMain(m *testing.M) {
	BareLoopProcess() // a paired round's bare loop runs as this test binary again
	os.Exit(m.Run())
}

// TestBenchSmall runs the whole benchmark at a small size, so that it cannot rot: every
// figure is measured, the table and the JSON say the same, and no phase fails. The bounds
// (P1/B0, P3's RSS, P4's takeover times) are for `make bench` at full size on a quiet
// machine, so they are reported here, not asserted.
func TestBenchSmall(t *testing.T) {
	if _, err := kubetest.FindBin(); err != nil {
		t.Skip(err)
	}
	if !built() {
		if os.Getenv(kubetest.EnvRequire) != "" {
			t.Fatal(kubetest.ErrNotBuilt)
		}
		t.Skip(kubetest.ErrNotBuilt)
	}
	bin := filepath.Join(t.TempDir(), "buildfleet")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/buildfleet").CombinedOutput(); err != nil {
		t.Fatalf("build buildfleet: %v\n%s", err, out)
	}
	o := Defaults()
	o.Binary = bin
	o.Dispatch, o.Rounds, o.Latency, o.Hold, o.Handover = 100, 1, 60, 100, 50
	o.ProfileDir = t.TempDir()
	o.Log = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rep, err := Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	var table, js bytes.Buffer
	rep.Table(&table)
	if err := rep.JSON(&js); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", table.String())
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("the JSON report does not decode: %v", err)
	}
	ids := map[string]int{}
	for _, x := range back.Results {
		ids[x.ID]++
		if !strings.Contains(table.String(), "| "+x.ID+" | "+x.Name+" |") {
			t.Errorf("%s %q is in the JSON but not the table", x.ID, x.Name)
		}
	}
	for _, id := range []string{"B0", "P1", "P1/B0", "B0/B0", "P2", "P3", "P4", "P5"} {
		if ids[id] == 0 {
			t.Errorf("no %s figure in the report", id)
		}
	}
	positive := map[string]bool{"B0": true, "P1": true, "P1/B0": true, "B0/B0": true, "P3": true, "P4": true}
	for _, x := range back.Results {
		if positive[x.ID] && x.Value <= 0 && x.Unit != "" {
			t.Errorf("%s %s = %v %s: want a positive figure", x.ID, x.Name, x.Value, x.Unit)
		}
	}
	// Four replicas handed over: 50 builds by SIGTERM then SIGKILL, 100 the same way.
	if n := ids["P4"]; n < 4 {
		t.Errorf("%d P4 figures, want a SIGTERM and a SIGKILL takeover at each size", n)
	}
	for _, prof := range []string{"a-heap.pprof", "a-goroutine.pprof"} {
		if st, err := os.Stat(filepath.Join(o.ProfileDir, prof)); err != nil || st.Size() == 0 {
			t.Errorf("profile %s not saved: %v", prof, err)
		}
	}
}

func built() bool {
	bin, err := kubetest.FindBin()
	if err != nil {
		return false
	}
	for _, b := range kubetest.Binaries {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return false
		}
	}
	return true
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// A size the bench cannot measure with is refused before anything starts, by its flag.
func TestOptionsRefuseBadSizes(t *testing.T) {
	if err := Defaults().Validate(); err != nil {
		t.Fatalf("the defaults: %v", err)
	}
	for flag, set := range map[string]func(*Options){
		"-rounds":   func(o *Options) { o.Rounds = 0 },
		"-dispatch": func(o *Options) { o.Dispatch = -1 },
		"-creates":  func(o *Options) { o.Creates = 0 },
		"-handover": func(o *Options) { o.Handover = -1 },
		"-conns":    func(o *Options) { o.Conns = 0 },
		"-latency-rate": func(o *Options) {
			o.Only = []string{"latency"} // no P1 measured to take half of
		},
	} {
		o := Defaults()
		set(&o)
		if err := o.Validate(); err == nil || !strings.Contains(err.Error(), flag) {
			t.Errorf("%s: got %v, want an error naming the flag", flag, err)
		}
	}
	o := Defaults()
	o.Handover = 0 // none
	if err := o.Validate(); err != nil {
		t.Errorf("-handover 0: %v", err)
	}
	o = Defaults()
	o.Only, o.LatencyRate = []string{"latency"}, 50
	if err := o.Validate(); err != nil {
		t.Errorf("-only latency -latency-rate 50: %v", err)
	}
}
