// Package config loads what a buildfleet process is told at start: its settings from the
// environment (BUILDFLEET_*) and its routing table from a YAML targets file. Both are
// validated once, and every problem is reported by the name the operator wrote — the
// environment variable or the file and field — so a bad deployment stops at start with a
// message that says what to fix.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/buildfleet/buildfleet/internal/build"
	"github.com/buildfleet/buildfleet/internal/logs"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// EnvPrefix starts the name of every environment variable buildfleet reads.
const EnvPrefix = "BUILDFLEET"

// Settings are one process's settings, read from the environment. The defaults work for
// `buildfleet dev`.
//
// Every field's envconfig tag holds the full variable name, prefix included, and Load passes
// no prefix to envconfig: given a prefix, envconfig falls back to the unprefixed name
// (NATS_URL, LOG_LEVEL) when the prefixed one is unset, and those names are too common to
// be read by accident.
type Settings struct {
	// NATSURL is the NATS server URL, or a comma-separated list of them.
	NATSURL string `envconfig:"BUILDFLEET_NATS_URL" default:"nats://127.0.0.1:4222"`
	// How the process authenticates to NATS: at most one of a credentials file (a user JWT
	// and its NKey seed, for decentralised auth), a user and password, a token, or an NKey
	// seed file. None: no authentication.
	NATSCreds    string `envconfig:"BUILDFLEET_NATS_CREDS"`
	NATSUser     string `envconfig:"BUILDFLEET_NATS_USER"`
	NATSPassword string `envconfig:"BUILDFLEET_NATS_PASSWORD"`
	NATSToken    string `envconfig:"BUILDFLEET_NATS_TOKEN"`
	NATSNKeySeed string `envconfig:"BUILDFLEET_NATS_NKEY_SEED"`
	// NATSTLSCA is a PEM file of the CAs that sign the servers' certificates (empty: the
	// system's). NATSTLSCert and NATSTLSKey are the client certificate and key, for servers
	// that verify clients. Setting any of them, or a tls:// URL, makes the connection TLS.
	NATSTLSCA   string `envconfig:"BUILDFLEET_NATS_TLS_CA"`
	NATSTLSCert string `envconfig:"BUILDFLEET_NATS_TLS_CERT"`
	NATSTLSKey  string `envconfig:"BUILDFLEET_NATS_TLS_KEY"`
	// Prefix names the installation's subjects, streams and buckets (see protocol.Layout).
	Prefix string `envconfig:"BUILDFLEET_PREFIX" default:"buildfleet"`
	// Replica names this process in records and events; Load defaults it to the hostname,
	// which is the pod name in a Deployment.
	Replica string `envconfig:"BUILDFLEET_REPLICA"`
	// TargetsFile is the path of the targets file; empty means DefaultTargets().
	TargetsFile string `envconfig:"BUILDFLEET_TARGETS_FILE"`
	// Concurrency is how many builds one replica holds at once.
	Concurrency int `envconfig:"BUILDFLEET_CONCURRENCY" default:"64"`
	// AckWait is how long a delivered request may go without a progress signal before
	// JetStream redelivers it to another replica.
	AckWait time.Duration `envconfig:"BUILDFLEET_ACK_WAIT" default:"30s"`
	// LivenessTTL is how long a replica's liveness key outlives its last renewal (renewed
	// every fifth of it). A replica that has not renewed within 60% of it stands its builds
	// down, and a replica process is killed by 80% of it; only once the key is gone may
	// another replica take over builds it did not hand over. So a crashed replica's builds
	// are taken over after the longer of AckWait and LivenessTTL.
	LivenessTTL time.Duration `envconfig:"BUILDFLEET_LIVENESS_TTL" default:"15s"`
	// SecretEnvPatterns name, as shell patterns matched ignoring case, the build variables
	// whose values are secrets: they are masked in everything the fleet publishes or logs
	// (a request can name more in secret_env).
	SecretEnvPatterns []string `envconfig:"BUILDFLEET_SECRET_ENV_PATTERNS" default:"*_TOKEN,*_SECRET,*_PASSWORD,*_KEY,*_CREDENTIALS,TOKEN,SECRET,PASSWORD,*_PASSWD,*_API_KEY,*_PRIVATE_KEY"`
	// MaxDeliver is how many times a request is delivered before it is dead-lettered.
	MaxDeliver int `envconfig:"BUILDFLEET_MAX_DELIVER" default:"5"`
	// MaxAckPending caps the builds running across the whole fleet (the run consumer's
	// MaxAckPending).
	MaxAckPending int `envconfig:"BUILDFLEET_MAX_ACK_PENDING" default:"1000"`
	// QueueHold is how many waiting builds the scheduler holds and orders by fair share
	// (the request consumer's MaxAckPending); more wait in the stream in arrival order.
	QueueHold int `envconfig:"BUILDFLEET_QUEUE_HOLD" default:"10000"`
	// DuplicateWindow is how long the request stream remembers message ids to drop
	// re-published requests.
	DuplicateWindow time.Duration `envconfig:"BUILDFLEET_DUPLICATE_WINDOW" default:"10m"`
	// EventsMaxAge is how long lifecycle events are kept.
	EventsMaxAge time.Duration `envconfig:"BUILDFLEET_EVENTS_MAX_AGE" default:"168h"`
	// LogRetention is how long build output is kept after it was printed.
	LogRetention time.Duration `envconfig:"BUILDFLEET_LOG_RETENTION" default:"168h"`
	// LogMaxBytes caps what is kept of one build's output: its first quarter and its last
	// three quarters; the middle of a longer log is cut, and its last chunk says how much.
	LogMaxBytes int64 `envconfig:"BUILDFLEET_LOG_MAX_BYTES" default:"16777216"`
	// LogStreamMaxBytes caps the log stream as a whole (the oldest output goes first); 0
	// leaves it to LogRetention alone.
	LogStreamMaxBytes int64 `envconfig:"BUILDFLEET_LOG_STREAM_MAX_BYTES" default:"0"`
	// LogLive says when a running build's output is followed as it comes: "wanted" while
	// someone follows its log (buildfleet logs -f), "always" (a pods/log stream per running
	// build), "never". All of it is stored when the build ends or is let go, whichever.
	LogLive string `envconfig:"BUILDFLEET_LOG_LIVE" default:"wanted"`
	// LogFlush is how long a quiet build's output waits to be published with more.
	LogFlush time.Duration `envconfig:"BUILDFLEET_LOG_FLUSH" default:"500ms"`
	// RecordTTL is how long a build record lives after its last write.
	RecordTTL time.Duration `envconfig:"BUILDFLEET_RECORD_TTL" default:"168h"`
	// DeadLetterMaxAge is how long dead-lettered messages are kept.
	DeadLetterMaxAge time.Duration `envconfig:"BUILDFLEET_DEADLETTER_MAX_AGE" default:"720h"`
	// StreamReplicas is the JetStream replica count of every stream and bucket.
	StreamReplicas int `envconfig:"BUILDFLEET_STREAM_REPLICAS" default:"1"`
	// DrainTimeout bounds the handover of held builds at shutdown.
	DrainTimeout time.Duration `envconfig:"BUILDFLEET_DRAIN_TIMEOUT" default:"20s"`
	// RetryMin and RetryMax bound the backoff between attempts of a transient failure.
	RetryMin time.Duration `envconfig:"BUILDFLEET_RETRY_MIN" default:"1s"`
	RetryMax time.Duration `envconfig:"BUILDFLEET_RETRY_MAX" default:"1m"`
	// BuildTimeout is a build's timeout when neither the request nor the target sets one.
	BuildTimeout time.Duration `envconfig:"BUILDFLEET_BUILD_TIMEOUT" default:"1h"`
	// MaxBuildTimeout caps the timeout a request may ask for, unless the target sets its own.
	MaxBuildTimeout time.Duration `envconfig:"BUILDFLEET_MAX_BUILD_TIMEOUT" default:"6h"`
	// ScratchDir holds the process executor's working directories; Load defaults it to
	// $TMPDIR/buildfleet.
	ScratchDir string `envconfig:"BUILDFLEET_SCRATCH_DIR"`
	// BreakerFailures consecutive transient launch failures on a target open its circuit
	// breaker for BreakerCooldown: new builds route around it meanwhile.
	BreakerFailures int           `envconfig:"BUILDFLEET_BREAKER_FAILURES" default:"5"`
	BreakerCooldown time.Duration `envconfig:"BUILDFLEET_BREAKER_COOLDOWN" default:"30s"`
	// KubeQPS and KubeBurst bound the requests a replica sends to each Kubernetes cluster
	// (client-go's rate limiter); the defaults let one replica dispatch hundreds of pods a
	// second. The cluster's kubeconfig comes from KUBECONFIG or the in-cluster config.
	KubeQPS   float32 `envconfig:"BUILDFLEET_KUBE_QPS" default:"200"`
	KubeBurst int     `envconfig:"BUILDFLEET_KUBE_BURST" default:"400"`
	// HTTPAddr is where a replica serves /metrics, /healthz and /readyz (host:port; port 0
	// picks a free one); empty turns the server off.
	HTTPAddr string `envconfig:"BUILDFLEET_HTTP_ADDR" default:":9090"`
	// Profiling also serves Go's profiles (/debug/pprof/) on HTTPAddr: heap, goroutines,
	// CPU. Off by default: a profile shows the process's memory, so keep the port private.
	Profiling bool `envconfig:"BUILDFLEET_PPROF" default:"false"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `envconfig:"BUILDFLEET_LOG_LEVEL" default:"info"`
	// DevListen is where `buildfleet dev` serves its embedded NATS server.
	DevListen string `envconfig:"BUILDFLEET_DEV_LISTEN" default:"127.0.0.1:4222"`
	// DevDataDir is where `buildfleet dev` keeps its JetStream data.
	DevDataDir string `envconfig:"BUILDFLEET_DEV_DATA_DIR" default:".buildfleet"`
}

// Bounds the settings are validated against.
const (
	MinAckWait        = time.Second
	MinLivenessTTL    = time.Second
	MinMaxDeliver     = 2
	MaxConcurrency    = 100_000
	MaxQueueHold      = 1_000_000
	MaxStreamReplicas = 5
)

// Load reads the settings from the environment, fills the defaults that depend on the host
// (Replica, ScratchDir) and validates them. Of values that do not parse, the first is
// reported; of values that parse but are invalid, all are.
func Load() (Settings, error) {
	var s Settings
	if err := envconfig.Process("", &s); err != nil {
		return Settings{}, parseError(err)
	}
	if s.Replica == "" {
		host, err := os.Hostname()
		if err != nil {
			return Settings{}, fmt.Errorf("BUILDFLEET_REPLICA: not set, and the hostname is unknown: %w", err)
		}
		s.Replica = host
	}
	if s.ScratchDir == "" {
		s.ScratchDir = filepath.Join(os.TempDir(), "buildfleet")
	}
	if err := s.Validate(); err != nil {
		return Settings{}, err
	}
	return s, nil
}

// parseError restates envconfig's error for a value that does not parse so that it leads
// with the variable's name.
func parseError(err error) error {
	var pe *envconfig.ParseError
	if !errors.As(err, &pe) {
		return fmt.Errorf("reading %s_* environment: %w", EnvPrefix, err)
	}
	kind := pe.TypeName
	switch kind {
	case "time.Duration":
		kind = "duration (e.g. 30s, 10m, 1h)"
	}
	return fmt.Errorf("%s: cannot parse %q as %s", pe.KeyName, pe.Value, kind)
}

// Validate reports every invalid setting, each led by its variable's name.
func (s Settings) Validate() error {
	var p problems
	if strings.TrimSpace(s.NATSURL) == "" {
		p.add("BUILDFLEET_NATS_URL", "must not be empty")
	}
	s.validateNATSAuth(&p)
	if _, err := protocol.NewLayout(s.Prefix); err != nil {
		p.add("BUILDFLEET_PREFIX", "%v", err)
	}
	switch {
	case s.Replica == "":
		p.add("BUILDFLEET_REPLICA", "must not be empty")
	case strings.ContainsFunc(s.Replica, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		p.add("BUILDFLEET_REPLICA", "must not contain spaces or control characters (got %q)", s.Replica)
	}
	if s.Concurrency < 1 || s.Concurrency > MaxConcurrency {
		p.add("BUILDFLEET_CONCURRENCY", "must be between 1 and %d (got %d)", MaxConcurrency, s.Concurrency)
	}
	if s.AckWait < MinAckWait {
		p.add("BUILDFLEET_ACK_WAIT", "must be at least %v (got %v)", MinAckWait, s.AckWait)
	}
	if s.LivenessTTL < MinLivenessTTL {
		p.add("BUILDFLEET_LIVENESS_TTL", "must be at least %v (got %v)", MinLivenessTTL, s.LivenessTTL)
	}
	if err := build.CheckSecretPatterns(s.SecretEnvPatterns); err != nil {
		p.add("BUILDFLEET_SECRET_ENV_PATTERNS", "%v", err)
	}
	if s.MaxDeliver < MinMaxDeliver {
		p.add("BUILDFLEET_MAX_DELIVER", "must be at least %d (got %d)", MinMaxDeliver, s.MaxDeliver)
	}
	if s.MaxAckPending < 1 {
		p.add("BUILDFLEET_MAX_ACK_PENDING", "must be at least 1 (got %d)", s.MaxAckPending)
	}
	if s.QueueHold < 1 || s.QueueHold > MaxQueueHold {
		p.add("BUILDFLEET_QUEUE_HOLD", "must be between 1 and %d (got %d)", MaxQueueHold, s.QueueHold)
	}
	if s.DuplicateWindow <= s.AckWait {
		p.add("BUILDFLEET_DUPLICATE_WINDOW", "must be longer than BUILDFLEET_ACK_WAIT (got %v, ack wait %v)", s.DuplicateWindow, s.AckWait)
	}
	p.positive("BUILDFLEET_EVENTS_MAX_AGE", s.EventsMaxAge)
	p.positive("BUILDFLEET_DEADLETTER_MAX_AGE", s.DeadLetterMaxAge)
	p.positive("BUILDFLEET_LOG_RETENTION", s.LogRetention)
	if s.LogMaxBytes < logs.MinMaxBytes {
		p.add("BUILDFLEET_LOG_MAX_BYTES", "must be at least %d (got %d)", logs.MinMaxBytes, s.LogMaxBytes)
	}
	if s.LogStreamMaxBytes != 0 && s.LogStreamMaxBytes < 4*s.LogMaxBytes {
		p.add("BUILDFLEET_LOG_STREAM_MAX_BYTES", "must be 0 (no cap) or at least 4 × BUILDFLEET_LOG_MAX_BYTES (got %d)", s.LogStreamMaxBytes)
	}
	p.positive("BUILDFLEET_LOG_FLUSH", s.LogFlush)
	if _, err := logs.ParseFollow(s.LogLive); err != nil {
		p.add("BUILDFLEET_LOG_LIVE", "%v", err)
	}
	switch {
	case s.RecordTTL <= 0:
		p.positive("BUILDFLEET_RECORD_TTL", s.RecordTTL)
	case s.RecordTTL < s.DuplicateWindow:
		// Past the duplicate window only the record recognises a re-published request.
		p.add("BUILDFLEET_RECORD_TTL", "must be at least BUILDFLEET_DUPLICATE_WINDOW (got %v, window %v)", s.RecordTTL, s.DuplicateWindow)
	case s.RecordTTL <= s.MaxBuildTimeout:
		// A record expiring under a running build would lose its target, lease and stop flag.
		p.add("BUILDFLEET_RECORD_TTL", "must be longer than BUILDFLEET_MAX_BUILD_TIMEOUT (got %v, max build timeout %v)", s.RecordTTL, s.MaxBuildTimeout)
	}
	if s.StreamReplicas < 1 || s.StreamReplicas > MaxStreamReplicas {
		p.add("BUILDFLEET_STREAM_REPLICAS", "must be between 1 and %d (got %d)", MaxStreamReplicas, s.StreamReplicas)
	}
	p.positive("BUILDFLEET_DRAIN_TIMEOUT", s.DrainTimeout)
	p.positive("BUILDFLEET_RETRY_MIN", s.RetryMin)
	if s.RetryMax < s.RetryMin {
		p.add("BUILDFLEET_RETRY_MAX", "must be at least BUILDFLEET_RETRY_MIN (got %v, min %v)", s.RetryMax, s.RetryMin)
	}
	p.positive("BUILDFLEET_BUILD_TIMEOUT", s.BuildTimeout)
	if s.MaxBuildTimeout < s.BuildTimeout {
		p.add("BUILDFLEET_MAX_BUILD_TIMEOUT", "must be at least BUILDFLEET_BUILD_TIMEOUT (got %v, build timeout %v)", s.MaxBuildTimeout, s.BuildTimeout)
	}
	if s.BreakerFailures < 1 {
		p.add("BUILDFLEET_BREAKER_FAILURES", "must be at least 1 (got %d)", s.BreakerFailures)
	}
	p.positive("BUILDFLEET_BREAKER_COOLDOWN", s.BreakerCooldown)
	if s.KubeQPS <= 0 {
		p.add("BUILDFLEET_KUBE_QPS", "must be positive (got %v)", s.KubeQPS)
	}
	if s.KubeBurst < 1 {
		p.add("BUILDFLEET_KUBE_BURST", "must be at least 1 (got %d)", s.KubeBurst)
	}
	if s.ScratchDir == "" {
		p.add("BUILDFLEET_SCRATCH_DIR", "must not be empty")
	}
	if _, ok := logLevels[strings.ToLower(s.LogLevel)]; !ok {
		p.add("BUILDFLEET_LOG_LEVEL", "must be debug, info, warn or error (got %q)", s.LogLevel)
	}
	if s.HTTPAddr != "" {
		if _, port, err := net.SplitHostPort(s.HTTPAddr); err != nil || port == "" {
			p.add("BUILDFLEET_HTTP_ADDR", "must be host:port or :port, or empty to serve nothing (got %q)", s.HTTPAddr)
		}
	}
	if _, _, err := net.SplitHostPort(s.DevListen); err != nil {
		p.add("BUILDFLEET_DEV_LISTEN", "must be host:port (got %q)", s.DevListen)
	}
	if s.DevDataDir == "" {
		p.add("BUILDFLEET_DEV_DATA_DIR", "must not be empty")
	}
	return errors.Join(p...)
}

// validateNATSAuth checks that at most one way to authenticate is chosen, whole, and that
// the files it names can be read.
func (s Settings) validateNATSAuth(p *problems) {
	var chosen []string
	if s.NATSCreds != "" {
		chosen = append(chosen, "BUILDFLEET_NATS_CREDS")
	}
	if s.NATSUser != "" || s.NATSPassword != "" {
		chosen = append(chosen, "BUILDFLEET_NATS_USER")
		if s.NATSUser == "" {
			p.add("BUILDFLEET_NATS_USER", "must be set with BUILDFLEET_NATS_PASSWORD")
		}
	}
	if s.NATSToken != "" {
		chosen = append(chosen, "BUILDFLEET_NATS_TOKEN")
	}
	if s.NATSNKeySeed != "" {
		chosen = append(chosen, "BUILDFLEET_NATS_NKEY_SEED")
	}
	if len(chosen) > 1 {
		p.add(chosen[1], "choose one way to authenticate to NATS (also set: %s)", strings.Join(slices.Delete(slices.Clone(chosen), 1, 2), ", "))
	}
	if (s.NATSTLSCert == "") != (s.NATSTLSKey == "") {
		p.add("BUILDFLEET_NATS_TLS_CERT", "must be set together with BUILDFLEET_NATS_TLS_KEY")
	}
	for _, f := range []struct{ name, path string }{
		{"BUILDFLEET_NATS_CREDS", s.NATSCreds}, {"BUILDFLEET_NATS_NKEY_SEED", s.NATSNKeySeed},
		{"BUILDFLEET_NATS_TLS_CA", s.NATSTLSCA}, {"BUILDFLEET_NATS_TLS_CERT", s.NATSTLSCert}, {"BUILDFLEET_NATS_TLS_KEY", s.NATSTLSKey},
	} {
		if f.path == "" {
			continue
		}
		if fh, err := os.Open(f.path); err != nil {
			p.add(f.name, "cannot read %s: %v", f.path, errors.Unwrap(err))
		} else {
			fh.Close()
		}
	}
}

var logLevels = map[string]slog.Level{
	"debug": slog.LevelDebug,
	"info":  slog.LevelInfo,
	"warn":  slog.LevelWarn,
	"error": slog.LevelError,
}

// SlogLevel is the slog level LogLevel names (case-insensitively); info if it names none.
func (s Settings) SlogLevel() slog.Level {
	if l, ok := logLevels[strings.ToLower(s.LogLevel)]; ok {
		return l
	}
	return slog.LevelInfo
}

// problems collects validation errors, each led by the name of what is wrong.
type problems []error

func (p *problems) add(name, format string, args ...any) {
	*p = append(*p, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
}

func (p *problems) positive(name string, d time.Duration) {
	if d <= 0 {
		p.add(name, "must be positive (got %v)", d)
	}
}
