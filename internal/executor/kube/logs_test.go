package kube_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/kubetest"
)

type read struct {
	text string
	at   build.LogCursor
}

// TestReadLogs reads a build container's log through the apiserver: live while it runs,
// then again from the cursor after every line, which gives exactly the lines after it, also
// among lines with one timestamp and within a line too long to take at once.
func TestReadLogs(t *testing.T) {
	e, _, ns := executor(t, "")
	cp := kubetest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	j := job("logs1", map[string]string{"sim.buildfleet.io/run-ms": "600000"})
	pl, err := cp.PodLog(ctx, ns, j.Workload)
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	long := "x" + strings.Repeat("é", 80000) // 160,001 bytes: three pieces, none cutting a character
	if err := pl.Print("one", "two"); err != nil {
		t.Fatal(err)
	}
	if err := pl.PrintBurst("b1", "b2", "b3"); err != nil {
		t.Fatal(err)
	}
	if err := e.Launch(ctx, j); err != nil {
		t.Fatal(err)
	}
	defer e.Kill(context.Background(), j)

	// Followed live: the lines printed later arrive too.
	var got []read
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- e.ReadLogs(fctx, j, build.LogCursor{}, true, func(line []byte, at build.LogCursor) error {
			got = append(got, read{string(line), at})
			if string(line) == "last\n" {
				stop()
			}
			return nil
		})
	}()
	if err := pl.Print(long, "last"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadLogs (follow) = %v; want it to run until cancelled", err)
	}
	var all strings.Builder
	for _, r := range got {
		all.WriteString(r.text)
	}
	want := "one\ntwo\nb1\nb2\nb3\n" + long + "\nlast\n"
	if all.String() != want {
		t.Fatalf("followed %d bytes in %d pieces; want the %d printed", all.Len(), len(got), len(want))
	}
	pieces := 0
	for _, r := range got {
		if strings.Contains(r.text, "é") {
			pieces++
		}
		if !utf8.ValidString(r.text) {
			t.Errorf("a piece of %d bytes cuts a character", len(r.text))
		}
	}
	if pieces < 3 {
		t.Errorf("the %d-byte line came in %d pieces; want at least 3 of at most %d bytes", len(long), pieces, build.MaxLogPiece)
	}
	for i, r := range got {
		var rest strings.Builder
		err := e.ReadLogs(ctx, j, r.at, false, func(line []byte, _ build.LogCursor) error {
			rest.WriteString(string(line))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var after strings.Builder
		for _, r := range got[i+1:] {
			after.WriteString(r.text)
		}
		if rest.String() != after.String() {
			t.Fatalf("from the cursor after piece %d (%q, %s) the log reads %.60q; want %.60q", i, r.text[:min(len(r.text), 10)], r.at.Pos, rest.String(), after.String())
		}
	}
}
