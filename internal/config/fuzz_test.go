package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzParseTargets feeds the targets file parser arbitrary bytes: it must never panic, every
// problem it reports must lead with the file's name, and a file it accepts must make a routing table.
func FuzzParseTargets(f *testing.F) {
	seeds, err := filepath.Glob("testdata/*.yaml")
	if err != nil || len(seeds) == 0 {
		f.Fatalf("no seeds in testdata (err %v)", err)
	}
	for _, seed := range seeds {
		data, err := os.ReadFile(seed)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		targets, err := ParseTargets(data, "targets.yaml")
		if err != nil {
			for line := range strings.Lines(err.Error()) {
				// Each problem leads with the file; a problem may go on in indented lines.
				if !strings.HasPrefix(line, "targets.yaml") && !strings.HasPrefix(line, " ") {
					t.Fatalf("ParseTargets(%q): a problem that does not name the file: %q", data, line)
				}
			}
			return
		}
		if err := targets.Validate(); err != nil {
			t.Fatalf("ParseTargets(%q) accepted targets that do not validate: %v", data, err)
		}
		if _, err := targets.Table(); err != nil {
			t.Fatalf("ParseTargets(%q) accepted targets that make no routing table: %v", data, err)
		}
	})
}

// settingNames are the variables FuzzSettings sets, by index.
var settingNames = []string{
	"BUILDFLEET_NATS_URL", "BUILDFLEET_PREFIX", "BUILDFLEET_REPLICA", "BUILDFLEET_CONCURRENCY",
	"BUILDFLEET_ACK_WAIT", "BUILDFLEET_LIVENESS_TTL", "BUILDFLEET_MAX_DELIVER", "BUILDFLEET_MAX_ACK_PENDING",
	"BUILDFLEET_DUPLICATE_WINDOW", "BUILDFLEET_RECORD_TTL", "BUILDFLEET_STREAM_REPLICAS", "BUILDFLEET_RETRY_MIN",
	"BUILDFLEET_RETRY_MAX", "BUILDFLEET_BUILD_TIMEOUT", "BUILDFLEET_MAX_BUILD_TIMEOUT", "BUILDFLEET_KUBE_QPS",
	"BUILDFLEET_KUBE_BURST", "BUILDFLEET_HTTP_ADDR", "BUILDFLEET_LOG_LEVEL", "BUILDFLEET_DEV_LISTEN",
}

// FuzzSettings sets two variables to arbitrary values: Load must never panic, every problem
// must lead with the name of a variable, and settings it accepts must validate.
func FuzzSettings(f *testing.F) {
	f.Add(uint8(3), "64", uint8(4), "30s")
	f.Add(uint8(4), "1ms", uint8(5), "0s")
	f.Add(uint8(15), "-1", uint8(17), "9090")
	f.Add(uint8(1), "UPPER", uint8(2), "a b")
	f.Add(uint8(9), "1h", uint8(14), "2h")
	f.Fuzz(func(t *testing.T, i uint8, a string, j uint8, b string) {
		if strings.ContainsRune(a, 0) || strings.ContainsRune(b, 0) {
			return // an environment cannot hold a NUL byte
		}
		t.Setenv("BUILDFLEET_REPLICA", "r")
		t.Setenv("BUILDFLEET_SCRATCH_DIR", t.TempDir())
		t.Setenv(settingNames[int(i)%len(settingNames)], a)
		t.Setenv(settingNames[int(j)%len(settingNames)], b)
		s, err := Load()
		if err != nil {
			for line := range strings.Lines(err.Error()) {
				if !strings.HasPrefix(line, "BUILDFLEET_") {
					t.Fatalf("Load with %q, %q: a problem that names no variable: %q", a, b, line)
				}
			}
			return
		}
		if err := s.Validate(); err != nil {
			t.Fatalf("Load accepted settings that do not validate: %v", err)
		}
		if s.AckWait < MinAckWait || s.LivenessTTL < MinLivenessTTL || s.Concurrency < 1 || s.RetryMax < s.RetryMin ||
			s.RecordTTL <= s.MaxBuildTimeout || s.DuplicateWindow <= s.AckWait || s.BuildTimeout <= time.Duration(0) {
			t.Fatalf("Load accepted out-of-bounds settings: %+v", s)
		}
	})
}
