package process

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestTailOf(t *testing.T) {
	lines := func(from, to int) string {
		var b strings.Builder
		for i := from; i <= to; i++ {
			b.WriteString("line ")
			b.WriteString(string(rune('a' + i%26)))
			b.WriteByte('\n')
		}
		return b.String()
	}
	tests := []struct {
		name string
		log  string
		cut  bool
		want string
	}{
		{"empty", "", false, ""},
		{"only blank", "\n\n", false, ""},
		{"short", "one\ntwo\n", false, "one\ntwo"},
		{"no final newline", "one\ntwo", false, "one\ntwo"},
		{"keeps the last 20 lines", lines(1, 30), false, strings.TrimSuffix(lines(11, 30), "\n")},
		{"drops a partial first line", "rtial\nwhole\n", true, "whole"},
		{"keeps a partial line that is all there is", "rtial line\n", true, "rtial line"},
		{"repairs invalid UTF-8", "ok \xff\n", false, "ok \uFFFD"},
	}
	for _, tt := range tests {
		if got := tailOf([]byte(tt.log), tt.cut); got != tt.want {
			t.Errorf("%s: tailOf(%q, %t) = %q, want %q", tt.name, tt.log, tt.cut, got, tt.want)
		}
	}
}

func TestLogTailBounds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "build.log")
	var b strings.Builder
	for i := range 100 {
		fmt.Fprintf(&b, "%03d %s\n", i, strings.Repeat("x", 196)) // 201 bytes a line
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	got := logTail(path)
	if len(got) > tailBytes {
		t.Errorf("logTail is %d bytes, want at most %d", len(got), tailBytes)
	}
	lines := strings.Split(got, "\n")
	if first, last := lines[0], lines[len(lines)-1]; !strings.HasPrefix(first, "090 ") || !strings.HasPrefix(last, "099 ") {
		t.Errorf("logTail lines run from %.4q to %.4q, want whole lines 090 to 099", first, last)
	}
	if got := logTail(filepath.Join(t.TempDir(), "missing")); got != "" {
		t.Errorf("logTail(missing) = %q, want \"\"", got)
	}
}
