// Package natstest starts real, in-process nats-servers with JetStream for tests.
package natstest

import (
	"net"
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
	opts := s.opts
	srv, err := server.NewServer(&opts)
	if err != nil {
		t.Fatalf("nats-server: %v", err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
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
