package worker

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestTakeoversAreSummedUp: builds taken from a replica are reported as a running total,
// once per report that has something new, at warning level for a recovery; a replica quiet
// for takeoverQuietReports reports is forgotten, so that its next build is a first again.
func TestTakeoversAreSummedUp(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(&out, nil))
	var tk takeovers
	lines := func() []string {
		s := strings.TrimSpace(out.String())
		out.Reset()
		if s == "" {
			return nil
		}
		return strings.Split(s, "\n")
	}

	if !tk.note(takeoverRecovery, "inc-a", "a") {
		t.Fatal("the first build taken from a is not a first")
	}
	for range 9_999 {
		if tk.note(takeoverRecovery, "inc-a", "a") {
			t.Fatal("a later build taken from a is a first")
		}
	}
	if !tk.note(takeoverHandover, "inc-b", "b") {
		t.Fatal("the first build handed over by b is not a first")
	}
	tk.report(log)
	got := lines()
	if len(got) != 2 {
		t.Fatalf("report logged %d lines, want 2 (one for each replica):\n%s", len(got), strings.Join(got, "\n"))
	}
	for _, want := range []string{"level=WARN msg=\"took over builds of another replica\" from=a how=recovery builds=10000 since_last_report=10000",
		"level=INFO msg=\"took over builds of another replica\" from=b how=handover builds=1 since_last_report=1"} {
		if !strings.Contains(strings.Join(got, "\n"), want) {
			t.Errorf("report = %q, want a line with %q", got, want)
		}
	}

	tk.note(takeoverRecovery, "inc-a", "a")
	tk.report(log)
	if got := lines(); len(got) != 1 || !strings.Contains(got[0], "from=a how=recovery builds=10001 since_last_report=1") {
		t.Errorf("second report = %q, want one line for a: 10001 in all, 1 new", got)
	}
	for range takeoverQuietReports {
		tk.report(log)
	}
	if got := lines(); len(got) != 0 {
		t.Errorf("reports with nothing new logged %q, want nothing", got)
	}
	if !tk.note(takeoverRecovery, "inc-a", "a") {
		t.Error("a build taken from a after it went quiet is not a first: a was not forgotten")
	}
	if len(tk.m) != 1 {
		t.Errorf("%d tallies held, want 1 (b was forgotten, a counted anew)", len(tk.m))
	}
}
