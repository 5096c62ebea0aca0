package config

import (
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/buildfleet/buildfleet/internal/build"
)

// envNames returns the variable name of every Settings field.
func envNames(t *testing.T) []string {
	t.Helper()
	var names []string
	for f := range reflect.TypeFor[Settings]().Fields() {
		name := f.Tag.Get("envconfig")
		if !strings.HasPrefix(name, EnvPrefix+"_") {
			t.Fatalf("Settings.%s: envconfig tag %q must be the full variable name, %s_ included", f.Name, name, EnvPrefix)
		}
		names = append(names, name)
	}
	return names
}

// clearEnv unsets every BUILDFLEET_ variable, and the unprefixed names envconfig could fall
// back to, for the duration of the test.
func clearEnv(t *testing.T) {
	t.Helper()
	names := envNames(t)
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, EnvPrefix+"_") {
			names = append(names, k)
		}
	}
	for _, n := range names {
		for _, k := range []string{n, strings.TrimPrefix(n, EnvPrefix+"_")} {
			t.Setenv(k, "") // restores the old value after the test
			os.Unsetenv(k)
		}
	}
}

func defaults(t *testing.T) Settings {
	t.Helper()
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	return Settings{
		NATSURL:     "nats://127.0.0.1:4222",
		Prefix:      "buildfleet",
		Replica:     host,
		Concurrency: 64,
		AckWait:     30 * time.Second,
		LivenessTTL: 15 * time.Second,
		// The default names exactly the patterns the build package masks by default.
		SecretEnvPatterns: build.DefaultSecretPatterns,
		MaxDeliver:        5,
		MaxAckPending:     1000,
		QueueHold:         10000,
		DuplicateWindow:   10 * time.Minute,
		EventsMaxAge:      168 * time.Hour,
		LogRetention:      168 * time.Hour,
		LogMaxBytes:       16 << 20,
		LogLive:           "wanted",
		LogFlush:          500 * time.Millisecond,
		RecordTTL:         168 * time.Hour,
		DeadLetterMaxAge:  720 * time.Hour,
		StreamReplicas:    1,
		DrainTimeout:      20 * time.Second,
		RetryMin:          time.Second,
		RetryMax:          time.Minute,
		BuildTimeout:      time.Hour,
		MaxBuildTimeout:   6 * time.Hour,
		ScratchDir:        filepath.Join(os.TempDir(), "buildfleet"),
		BreakerFailures:   5,
		BreakerCooldown:   30 * time.Second,
		KubeQPS:           200,
		KubeBurst:         400,
		HTTPAddr:          ":9090",
		LogLevel:          "info",
		DevListen:         "127.0.0.1:4222",
		DevDataDir:        ".buildfleet",
	}
}

func TestLoadDefaults(t *testing.T) {
	clearEnv(t)
	got, err := Load()
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	if diff := cmp.Diff(defaults(t), got); diff != "" {
		t.Errorf("Load() mismatch (-want +got):\n%s", diff)
	}
	if got.SlogLevel() != slog.LevelInfo {
		t.Errorf("SlogLevel() = %v, want %v", got.SlogLevel(), slog.LevelInfo)
	}
}

// exclusiveAuth are the NATS authentication variables that TestLoadOverrides cannot set
// beside BUILDFLEET_NATS_CREDS: TestNATSAuthSettings sets each.
var exclusiveAuth = []string{"BUILDFLEET_NATS_USER", "BUILDFLEET_NATS_PASSWORD", "BUILDFLEET_NATS_TOKEN", "BUILDFLEET_NATS_NKEY_SEED"}

// existing returns the path of a new empty file named name.
func existing(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestNATSAuthSettings(t *testing.T) {
	seed := existing(t, "user.nk")
	for _, tc := range []struct {
		env  map[string]string
		want func(Settings) bool
	}{
		{map[string]string{"BUILDFLEET_NATS_USER": "u", "BUILDFLEET_NATS_PASSWORD": "p"},
			func(s Settings) bool { return s.NATSUser == "u" && s.NATSPassword == "p" }},
		{map[string]string{"BUILDFLEET_NATS_TOKEN": "t"}, func(s Settings) bool { return s.NATSToken == "t" }},
		{map[string]string{"BUILDFLEET_NATS_NKEY_SEED": seed}, func(s Settings) bool { return s.NATSNKeySeed == seed }},
	} {
		clearEnv(t)
		for k, v := range tc.env {
			t.Setenv(k, v)
		}
		if got, err := Load(); err != nil || !tc.want(got) {
			t.Errorf("Load() with %v = %v; settings %+v", tc.env, err, got)
		}
	}
}

func TestLoadOverrides(t *testing.T) {
	clearEnv(t)
	creds, ca, cert, key := existing(t, "user.creds"), existing(t, "ca.pem"), existing(t, "cert.pem"), existing(t, "key.pem")
	env := map[string]string{
		"BUILDFLEET_NATS_URL":             "nats://a:4222,nats://b:4222",
		"BUILDFLEET_NATS_CREDS":           creds,
		"BUILDFLEET_NATS_TLS_CA":          ca,
		"BUILDFLEET_NATS_TLS_CERT":        cert,
		"BUILDFLEET_NATS_TLS_KEY":         key,
		"BUILDFLEET_PREFIX":               "ci-east",
		"BUILDFLEET_REPLICA":              "worker-7f9c",
		"BUILDFLEET_TARGETS_FILE":         "/etc/buildfleet/targets.yaml",
		"BUILDFLEET_CONCURRENCY":          "200",
		"BUILDFLEET_ACK_WAIT":             "1m",
		"BUILDFLEET_LIVENESS_TTL":         "20s",
		"BUILDFLEET_SECRET_ENV_PATTERNS":  "*_TOKEN,MY_*",
		"BUILDFLEET_MAX_DELIVER":          "10",
		"BUILDFLEET_MAX_ACK_PENDING":      "5000",
		"BUILDFLEET_QUEUE_HOLD":           "20000",
		"BUILDFLEET_DUPLICATE_WINDOW":     "30m",
		"BUILDFLEET_EVENTS_MAX_AGE":       "24h",
		"BUILDFLEET_LOG_RETENTION":        "72h",
		"BUILDFLEET_LOG_MAX_BYTES":        "1048576",
		"BUILDFLEET_LOG_STREAM_MAX_BYTES": "1073741824",
		"BUILDFLEET_LOG_FLUSH":            "2s",
		"BUILDFLEET_LOG_LIVE":             "never",
		"BUILDFLEET_RECORD_TTL":           "48h",
		"BUILDFLEET_DEADLETTER_MAX_AGE":   "1000h",
		"BUILDFLEET_STREAM_REPLICAS":      "3",
		"BUILDFLEET_DRAIN_TIMEOUT":        "45s",
		"BUILDFLEET_RETRY_MIN":            "500ms",
		"BUILDFLEET_RETRY_MAX":            "30s",
		"BUILDFLEET_BUILD_TIMEOUT":        "2h",
		"BUILDFLEET_MAX_BUILD_TIMEOUT":    "12h",
		"BUILDFLEET_SCRATCH_DIR":          "/var/lib/buildfleet",
		"BUILDFLEET_LOG_LEVEL":            "DEBUG",
		"BUILDFLEET_KUBE_QPS":             "50.5",
		"BUILDFLEET_BREAKER_FAILURES":     "3",
		"BUILDFLEET_BREAKER_COOLDOWN":     "1m",
		"BUILDFLEET_KUBE_BURST":           "80",
		"BUILDFLEET_HTTP_ADDR":            "127.0.0.1:0",
		"BUILDFLEET_PPROF":                "true",
		"BUILDFLEET_DEV_LISTEN":           ":14222",
		"BUILDFLEET_DEV_DATA_DIR":         "/tmp/bf",
	}
	for _, n := range envNames(t) {
		if _, ok := env[n]; !ok && !slices.Contains(exclusiveAuth, n) {
			t.Errorf("%s is not overridden by this test", n)
		}
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	got, err := Load()
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	want := Settings{
		NATSURL:           "nats://a:4222,nats://b:4222",
		NATSCreds:         creds,
		NATSTLSCA:         ca,
		NATSTLSCert:       cert,
		NATSTLSKey:        key,
		Prefix:            "ci-east",
		Replica:           "worker-7f9c",
		TargetsFile:       "/etc/buildfleet/targets.yaml",
		Concurrency:       200,
		AckWait:           time.Minute,
		LivenessTTL:       20 * time.Second,
		SecretEnvPatterns: []string{"*_TOKEN", "MY_*"},
		MaxDeliver:        10,
		MaxAckPending:     5000,
		QueueHold:         20000,
		DuplicateWindow:   30 * time.Minute,
		EventsMaxAge:      24 * time.Hour,
		LogRetention:      72 * time.Hour,
		LogMaxBytes:       1 << 20,
		LogStreamMaxBytes: 1 << 30,
		LogLive:           "never",
		LogFlush:          2 * time.Second,
		RecordTTL:         48 * time.Hour,
		DeadLetterMaxAge:  1000 * time.Hour,
		StreamReplicas:    3,
		DrainTimeout:      45 * time.Second,
		RetryMin:          500 * time.Millisecond,
		RetryMax:          30 * time.Second,
		BuildTimeout:      2 * time.Hour,
		MaxBuildTimeout:   12 * time.Hour,
		ScratchDir:        "/var/lib/buildfleet",
		BreakerFailures:   3,
		BreakerCooldown:   time.Minute,
		KubeQPS:           50.5,
		KubeBurst:         80,
		HTTPAddr:          "127.0.0.1:0",
		Profiling:         true,
		LogLevel:          "DEBUG",
		DevListen:         ":14222",
		DevDataDir:        "/tmp/bf",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Load() mismatch (-want +got):\n%s", diff)
	}
	if got.SlogLevel() != slog.LevelDebug {
		t.Errorf("SlogLevel() = %v, want %v", got.SlogLevel(), slog.LevelDebug)
	}
}

// TestLoadIgnoresUnprefixed guards against envconfig's fallback to unprefixed names: a
// NATS_URL meant for the nats CLI must not point the worker elsewhere.
func TestLoadIgnoresUnprefixed(t *testing.T) {
	clearEnv(t)
	t.Setenv("NATS_URL", "nats://elsewhere:4222")
	t.Setenv("LOG_LEVEL", "verbose")
	t.Setenv("ACK_WAIT", "1ms")
	got, err := Load()
	if err != nil {
		t.Fatalf("Load() = %v", err)
	}
	if got.NATSURL != "nats://127.0.0.1:4222" || got.LogLevel != "info" || got.AckWait != 30*time.Second {
		t.Errorf("Load() read unprefixed variables: %+v", got)
	}
}

func TestLoadBadValues(t *testing.T) {
	tests := []struct {
		env  map[string]string
		want string // the whole line for this problem
	}{
		// Values that do not parse.
		{map[string]string{"BUILDFLEET_CONCURRENCY": "abc"}, `BUILDFLEET_CONCURRENCY: cannot parse "abc" as int`},
		{map[string]string{"BUILDFLEET_ACK_WAIT": "30"}, `BUILDFLEET_ACK_WAIT: cannot parse "30" as duration (e.g. 30s, 10m, 1h)`},
		{map[string]string{"BUILDFLEET_MAX_DELIVER": ""}, `BUILDFLEET_MAX_DELIVER: cannot parse "" as int`},
		{map[string]string{"BUILDFLEET_STREAM_REPLICAS": "99999999999999999999"}, `BUILDFLEET_STREAM_REPLICAS: cannot parse "99999999999999999999" as int`},
		// Values that parse but are invalid.
		{map[string]string{"BUILDFLEET_NATS_URL": " "}, `BUILDFLEET_NATS_URL: must not be empty`},
		{map[string]string{"BUILDFLEET_PREFIX": "Build.Fleet"}, `BUILDFLEET_PREFIX: prefix "Build.Fleet" must match ^[a-z][a-z0-9_-]{0,31}$`},
		{map[string]string{"BUILDFLEET_REPLICA": "my replica"}, `BUILDFLEET_REPLICA: must not contain spaces or control characters (got "my replica")`},
		{map[string]string{"BUILDFLEET_CONCURRENCY": "0"}, `BUILDFLEET_CONCURRENCY: must be between 1 and 100000 (got 0)`},
		{map[string]string{"BUILDFLEET_CONCURRENCY": "100001"}, `BUILDFLEET_CONCURRENCY: must be between 1 and 100000 (got 100001)`},
		{map[string]string{"BUILDFLEET_ACK_WAIT": "10ms"}, `BUILDFLEET_ACK_WAIT: must be at least 1s (got 10ms)`},
		{map[string]string{"BUILDFLEET_LIVENESS_TTL": "500ms"}, `BUILDFLEET_LIVENESS_TTL: must be at least 1s (got 500ms)`},
		{map[string]string{"BUILDFLEET_SECRET_ENV_PATTERNS": "*_TOKEN,["}, `BUILDFLEET_SECRET_ENV_PATTERNS: "[" is not a shell pattern such as *_TOKEN`},
		{map[string]string{"BUILDFLEET_MAX_DELIVER": "1"}, `BUILDFLEET_MAX_DELIVER: must be at least 2 (got 1)`},
		{map[string]string{"BUILDFLEET_NATS_USER": "u", "BUILDFLEET_NATS_PASSWORD": "p", "BUILDFLEET_NATS_TOKEN": "t"},
			`BUILDFLEET_NATS_TOKEN: choose one way to authenticate to NATS (also set: BUILDFLEET_NATS_USER)`},
		{map[string]string{"BUILDFLEET_NATS_PASSWORD": "p"}, `BUILDFLEET_NATS_USER: must be set with BUILDFLEET_NATS_PASSWORD`},
		{map[string]string{"BUILDFLEET_NATS_TLS_CERT": "/dev/null"}, `BUILDFLEET_NATS_TLS_CERT: must be set together with BUILDFLEET_NATS_TLS_KEY`},
		{map[string]string{"BUILDFLEET_NATS_TLS_CA": "/nonexistent/ca.pem"}, `BUILDFLEET_NATS_TLS_CA: cannot read /nonexistent/ca.pem: no such file or directory`},
		{map[string]string{"BUILDFLEET_MAX_ACK_PENDING": "0"}, `BUILDFLEET_MAX_ACK_PENDING: must be at least 1 (got 0)`},
		{map[string]string{"BUILDFLEET_QUEUE_HOLD": "0"}, `BUILDFLEET_QUEUE_HOLD: must be between 1 and 1000000 (got 0)`},
		{map[string]string{"BUILDFLEET_DUPLICATE_WINDOW": "30s"}, `BUILDFLEET_DUPLICATE_WINDOW: must be longer than BUILDFLEET_ACK_WAIT (got 30s, ack wait 30s)`},
		{map[string]string{"BUILDFLEET_EVENTS_MAX_AGE": "0s"}, `BUILDFLEET_EVENTS_MAX_AGE: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_LOG_RETENTION": "0s"}, `BUILDFLEET_LOG_RETENTION: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_LOG_MAX_BYTES": "1000"}, `BUILDFLEET_LOG_MAX_BYTES: must be at least 262144 (got 1000)`},
		{map[string]string{"BUILDFLEET_LOG_STREAM_MAX_BYTES": "1000000"}, `BUILDFLEET_LOG_STREAM_MAX_BYTES: must be 0 (no cap) or at least 4 × BUILDFLEET_LOG_MAX_BYTES (got 1000000)`},
		{map[string]string{"BUILDFLEET_LOG_FLUSH": "0s"}, `BUILDFLEET_LOG_FLUSH: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_DEADLETTER_MAX_AGE": "-1h"}, `BUILDFLEET_DEADLETTER_MAX_AGE: must be positive (got -1h0m0s)`},
		{map[string]string{"BUILDFLEET_RECORD_TTL": "0s"}, `BUILDFLEET_RECORD_TTL: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_RECORD_TTL": "5m"}, `BUILDFLEET_RECORD_TTL: must be at least BUILDFLEET_DUPLICATE_WINDOW (got 5m0s, window 10m0s)`},
		{map[string]string{"BUILDFLEET_RECORD_TTL": "6h"}, `BUILDFLEET_RECORD_TTL: must be longer than BUILDFLEET_MAX_BUILD_TIMEOUT (got 6h0m0s, max build timeout 6h0m0s)`},
		{map[string]string{"BUILDFLEET_STREAM_REPLICAS": "6"}, `BUILDFLEET_STREAM_REPLICAS: must be between 1 and 5 (got 6)`},
		{map[string]string{"BUILDFLEET_DRAIN_TIMEOUT": "0s"}, `BUILDFLEET_DRAIN_TIMEOUT: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_RETRY_MIN": "0s"}, `BUILDFLEET_RETRY_MIN: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_RETRY_MIN": "2m"}, `BUILDFLEET_RETRY_MAX: must be at least BUILDFLEET_RETRY_MIN (got 1m0s, min 2m0s)`},
		{map[string]string{"BUILDFLEET_BUILD_TIMEOUT": "0s"}, `BUILDFLEET_BUILD_TIMEOUT: must be positive (got 0s)`},
		{map[string]string{"BUILDFLEET_BUILD_TIMEOUT": "7h"}, `BUILDFLEET_MAX_BUILD_TIMEOUT: must be at least BUILDFLEET_BUILD_TIMEOUT (got 6h0m0s, build timeout 7h0m0s)`},
		{map[string]string{"BUILDFLEET_LOG_LEVEL": "trace"}, `BUILDFLEET_LOG_LEVEL: must be debug, info, warn or error (got "trace")`},
		{map[string]string{"BUILDFLEET_LOG_LIVE": "true"}, `BUILDFLEET_LOG_LIVE: must be wanted, always or never (got "true")`},
		{map[string]string{"BUILDFLEET_DEV_LISTEN": "4222"}, `BUILDFLEET_DEV_LISTEN: must be host:port (got "4222")`},
		{map[string]string{"BUILDFLEET_DEV_DATA_DIR": ""}, `BUILDFLEET_DEV_DATA_DIR: must not be empty`},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			_, err := Load()
			if err == nil {
				t.Fatalf("Load() with %v = nil error, want %q", tc.env, tc.want)
			}
			lines := strings.Split(err.Error(), "\n")
			if len(lines) != 1 || lines[0] != tc.want {
				t.Errorf("Load() with %v = %q, want %q", tc.env, err, tc.want)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	s := defaults(t)
	s.AckWait = 10 * time.Millisecond
	s.LivenessTTL = 0
	s.Concurrency = 0
	s.LogLevel = "loud"
	s.Replica = ""
	s.ScratchDir = ""
	s.KubeQPS = 0
	s.HTTPAddr = "9090"
	err := s.Validate()
	if err == nil {
		t.Fatal("Validate() = nil, want errors")
	}
	var got []string
	for line := range strings.Lines(err.Error()) {
		name, _, _ := strings.Cut(line, ":")
		got = append(got, name)
	}
	want := []string{"BUILDFLEET_REPLICA", "BUILDFLEET_CONCURRENCY", "BUILDFLEET_ACK_WAIT", "BUILDFLEET_LIVENESS_TTL", "BUILDFLEET_KUBE_QPS", "BUILDFLEET_SCRATCH_DIR", "BUILDFLEET_LOG_LEVEL", "BUILDFLEET_HTTP_ADDR"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Validate() named variables mismatch (-want +got):\n%s\nerror: %v", diff, err)
	}
}

func TestSlogLevel(t *testing.T) {
	for level, want := range map[string]slog.Level{
		"debug": slog.LevelDebug, "info": slog.LevelInfo, "Warn": slog.LevelWarn, "ERROR": slog.LevelError, "": slog.LevelInfo,
	} {
		if got := (Settings{LogLevel: level}).SlogLevel(); got != want {
			t.Errorf("SlogLevel(%q) = %v, want %v", level, got, want)
		}
	}
}
