package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"time"
)

// CheckTimeout bounds each readiness check: a probe must answer well inside the kubelet's
// own timeout, even when a dependency hangs rather than refuses.
const CheckTimeout = 2 * time.Second

// Check is one dependency readiness depends on. Check returns nil while the dependency is
// usable, else an error that says what is wrong.
type Check struct {
	Name  string
	Check func(ctx context.Context) error
}

// Server serves /metrics, /healthz and /readyz.
//
// /healthz answers 200 while the process serves at all: a liveness probe that fails only
// when the process is wedged, never because NATS or a cluster is down (restarting would not
// bring them back). /readyz runs every check at once and answers 200 when all pass, 503
// otherwise, one line per check ("[+]nats ok", "[-]consumer: …") in the style of the
// kube-apiserver's own endpoints.
type Server struct {
	addr    string
	checks  []Check
	log     *slog.Logger
	metrics http.Handler
	// Profiling adds Go's profiles under /debug/pprof/ (set before Run).
	Profiling bool

	mu    sync.Mutex
	bound net.Addr
}

// NewServer returns a server for addr (host:port; port 0 picks a free one) with the given
// metrics and readiness checks. It listens only when Run is called.
func NewServer(addr string, m *Metrics, checks []Check, log *slog.Logger) *Server {
	return &Server{addr: addr, checks: checks, log: log, metrics: m.Handler()}
}

// Handler is the server's routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.metrics)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	if s.Profiling {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	results := s.Ready(r.Context())
	var b strings.Builder
	ok := true
	for i, c := range s.checks {
		if err := results[i]; err != nil {
			ok = false
			fmt.Fprintf(&b, "[-]%s: %v\n", c.Name, err)
		} else {
			fmt.Fprintf(&b, "[+]%s ok\n", c.Name)
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
		b.WriteString("not ready\n")
	} else {
		b.WriteString("ready\n")
	}
	_, _ = w.Write([]byte(b.String()))
}

// Ready runs every check at once, each bounded by CheckTimeout, and returns their results in
// order.
func (s *Server) Ready(ctx context.Context) []error {
	results := make([]error, len(s.checks))
	var wg sync.WaitGroup
	for i, c := range s.checks {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, CheckTimeout)
			defer cancel()
			results[i] = c.Check(cctx)
		})
	}
	wg.Wait()
	return results
}

// Run listens and serves until ctx ends, then shuts the server down (in-flight scrapes get
// a few seconds). A port that cannot be bound is an error at once.
func (s *Server) Run(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.addr)
	if err != nil {
		return fmt.Errorf("BUILDFLEET_HTTP_ADDR: %w", err)
	}
	s.mu.Lock()
	s.bound = ln.Addr()
	s.mu.Unlock()
	s.log.Info("serving metrics and health", "addr", ln.Addr().String(), "paths", "/metrics /healthz /readyz")
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 5 * time.Second}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	defer stop()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics and health server: %w", err)
	}
	return nil
}

// Addr is the address the server listens on once Run has bound it, else nil.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bound
}
