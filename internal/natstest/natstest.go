// Package natstest starts real, in-process nats-servers with JetStream for tests.
package natstest

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Server is a running nats-server that a test can restart on the same port and store.
type Server struct {
	mu   sync.Mutex
	srv  *server.Server
	opts server.Options
}

// Start runs a nats-server with JetStream and a file store in a temporary directory, on a
// free loopback port, until the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t, nil)
}

// StartWith is Start with options that edit may change first (authentication, TLS).
func StartWith(t testing.TB, edit func(*server.Options)) *Server {
	t.Helper()
	s := &Server{opts: server.Options{
		Host:      "127.0.0.1",
		Port:      server.RANDOM_PORT,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoSigs:    true,
		NoLog:     true,
	}}
	if edit != nil {
		edit(&s.opts)
	}
	s.start(t)
	s.opts.Port = s.srv.Addr().(*net.TCPAddr).Port // a restart comes back on the same port
	t.Cleanup(s.Shutdown)
	return s
}

func (s *Server) start(t testing.TB) {
	t.Helper()
	if err := s.launch(); err != nil {
		t.Fatal(err)
	}
}

// launch starts the server and waits until it takes clients. A cluster member's JetStream
// may still wait for its peers then.
func (s *Server) launch() error {
	opts := s.opts
	srv, err := server.NewServer(&opts)
	if err != nil {
		return fmt.Errorf("nats-server: %w", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(30 * time.Second) {
		return fmt.Errorf("nats-server %s did not start", opts.ServerName)
	}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	return nil
}

// SetLogger sends the server's log to l (debug and trace off), for tests that read it.
func (s *Server) SetLogger(l server.Logger) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.srv.SetLogger(l, false, false)
}

// ClientURL is where clients connect.
func (s *Server) ClientURL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv.ClientURL()
}

// Shutdown stops the server; Restart brings it back.
func (s *Server) Shutdown() {
	s.mu.Lock()
	srv := s.srv
	s.mu.Unlock()
	srv.Shutdown()
	srv.WaitForShutdown()
}

// Restart starts the server again on the same port with the same store, after Shutdown.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.start(t)
}

// Connect opens a connection to s that reconnects for ever and closes when the test ends.
func Connect(t testing.TB, s *Server) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// StartCluster runs n nats-servers with JetStream as one cluster on loopback ports, each
// with its own file store, until the test ends, and waits until JetStream has a meta leader.
// Each can be shut down and restarted on its ports.
func StartCluster(t testing.TB, n int) []*Server {
	t.Helper()
	client, route := freePorts(t, n), freePorts(t, n)
	routes := make([]*url.URL, n)
	for i := range n {
		routes[i] = &url.URL{Scheme: "nats", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(route[i]))}
	}
	servers := make([]*Server, n)
	for i := range n {
		s := &Server{opts: server.Options{
			ServerName: fmt.Sprintf("n%d", i),
			Host:       "127.0.0.1",
			Port:       client[i],
			JetStream:  true,
			StoreDir:   t.TempDir(),
			NoSigs:     true,
			NoLog:      true,
			Cluster:    server.ClusterOpts{Name: "buildfleet-test", Host: "127.0.0.1", Port: route[i]},
			Routes:     routes,
		}}
		servers[i] = s
	}
	// Started together: a JetStream cluster forms once a quorum is up.
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			if err := s.launch(); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	for _, s := range servers {
		t.Cleanup(s.Shutdown)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !hasMetaLeader(servers) {
		if time.Now().After(deadline) {
			t.Fatal("the JetStream cluster did not form within 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return servers
}

func hasMetaLeader(servers []*Server) bool {
	for _, s := range servers {
		s.mu.Lock()
		leader := s.srv != nil && s.srv.JetStreamIsLeader()
		s.mu.Unlock()
		if leader {
			return true
		}
	}
	return false
}

// Name is the server's name in the cluster.
func (s *Server) Name() string { return s.opts.ServerName }

// URLs joins the servers' client URLs, for a client of the whole cluster.
func URLs(servers []*Server) string {
	urls := make([]string, len(servers))
	for i, s := range servers {
		urls[i] = fmt.Sprintf("nats://127.0.0.1:%d", s.opts.Port)
	}
	return strings.Join(urls, ",")
}

func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	var ls []net.Listener
	for i := range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// Healthy reports whether the server answers its health check as a Kubernetes probe would
// (/healthz: JetStream enabled and every stream and consumer it holds current).
func (s *Server) Healthy() bool {
	s.mu.Lock()
	srv := s.srv
	s.mu.Unlock()
	return srv != nil && srv.Healthz(nil).Status == "ok"
}
