package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/buildfleet/buildfleet/internal/natstest"
)

// TestNATSSecurity runs the real worker binary and the real CLI against a nats-server that
// requires each kind of authentication, and TLS with client certificates: with the settings a
// build runs to its end; without them the client is refused.
func TestNATSSecurity(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	nkeySeed, nkeyPub := newNKey(t)
	creds, trust := newOperatorCreds(t)
	ca, srvTLS, clientCert, clientKey := newTLS(t)
	for _, tc := range []struct {
		name   string
		server func(*server.Options)
		env    []string
	}{
		{"user and password", func(o *server.Options) { o.Username, o.Password = "builder", "pw-1234" },
			[]string{"BUILDFLEET_NATS_USER=builder", "BUILDFLEET_NATS_PASSWORD=pw-1234"}},
		{"token", func(o *server.Options) { o.Authorization = "tok-5678" },
			[]string{"BUILDFLEET_NATS_TOKEN=tok-5678"}},
		{"nkey seed", func(o *server.Options) { o.Nkeys = []*server.NkeyUser{{Nkey: nkeyPub}} },
			[]string{"BUILDFLEET_NATS_NKEY_SEED=" + write("user.nk", nkeySeed)}},
		{"creds file", trust, []string{"BUILDFLEET_NATS_CREDS=" + write("user.creds", creds)}},
		{"TLS with a client certificate", func(o *server.Options) {
			o.TLS, o.TLSVerify, o.TLSConfig = true, true, srvTLS
		}, []string{"BUILDFLEET_NATS_TLS_CA=" + write("ca.pem", ca), "BUILDFLEET_NATS_TLS_CERT=" + write("client.pem", clientCert),
			"BUILDFLEET_NATS_TLS_KEY=" + write("client-key.pem", clientKey)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := natstest.StartWith(t, tc.server)
			worker := exec.Command(binary, "worker")
			worker.Env = append([]string{"PATH=" + os.Getenv("PATH"), "BUILDFLEET_NATS_URL=" + srv.ClientURL(),
				"BUILDFLEET_REPLICA=secure", "BUILDFLEET_SCRATCH_DIR=" + t.TempDir(), "BUILDFLEET_HTTP_ADDR=127.0.0.1:0"}, tc.env...)
			var logs syncBuffer
			worker.Stderr = &logs
			if err := worker.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = worker.Process.Kill(); _ = worker.Wait() })

			t.Setenv("BUILDFLEET_NATS_URL", srv.ClientURL())
			_, errOut, code := run(t, "", "status", "nothing")
			if code == 0 || !strings.Contains(strings.ToLower(errOut), "cannot reach nats") {
				t.Errorf("a client without the settings: exit %d, stderr %q; want refused", code, errOut)
			}
			for _, kv := range tc.env {
				k, v, _ := strings.Cut(kv, "=")
				t.Setenv(k, v)
			}
			// The worker provisions the layout once it is in; submit waits for nothing else.
			deadline := time.Now().Add(30 * time.Second)
			for {
				out, errOut, code := run(t, "", "submit", "--wait", "--", "true")
				if code == 0 && strings.Contains(out, "succeeded") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("submit --wait: exit %d, stderr %q, out %q\nworker:\n%s", code, errOut, out, logs.String())
				}
				time.Sleep(200 * time.Millisecond)
			}
			for _, kv := range tc.env {
				if _, v, _ := strings.Cut(kv, "="); !strings.HasPrefix(v, dir) && strings.Contains(logs.String(), v) {
					t.Errorf("the worker logged a secret setting (%s)", kv[:strings.IndexByte(kv, '=')])
				}
			}
		})
	}
}

func newNKey(t *testing.T) (seed []byte, pub string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ = kp.Seed()
	pub, _ = kp.PublicKey()
	return seed, pub
}

// newOperatorCreds makes an operator, a system account, an account with JetStream and a user
// of it: the user's creds file, and what a server needs to trust them.
func newOperatorCreds(t *testing.T) ([]byte, func(*server.Options)) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	okp, err := nkeys.CreateOperator()
	must(err)
	opub, _ := okp.PublicKey()
	oc := jwt.NewOperatorClaims(opub)
	account := func(js bool) (nkeys.KeyPair, string, string) {
		kp, err := nkeys.CreateAccount()
		must(err)
		pub, _ := kp.PublicKey()
		ac := jwt.NewAccountClaims(pub)
		if js {
			ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
		}
		tok, err := ac.Encode(okp)
		must(err)
		return kp, pub, tok
	}
	_, spub, sjwt := account(false)
	akp, apub, ajwt := account(true)
	oc.SystemAccount = spub
	ukp, err := nkeys.CreateUser()
	must(err)
	upub, _ := ukp.PublicKey()
	ujwt, err := jwt.NewUserClaims(upub).Encode(akp)
	must(err)
	useed, _ := ukp.Seed()
	creds, err := jwt.FormatUserConfig(ujwt, useed)
	must(err)
	return creds, func(o *server.Options) {
		resolver := &server.MemAccResolver{}
		must(resolver.Store(spub, sjwt))
		must(resolver.Store(apub, ajwt))
		o.TrustedOperators = []*jwt.OperatorClaims{oc}
		o.AccountResolver = resolver
		o.SystemAccount = spub
	}
}

// newTLS makes a CA, a server certificate for 127.0.0.1 and a client certificate: the CA and
// client files as PEM, and the server's TLS configuration that requires a client certificate.
func newTLS(t *testing.T) (caPEM []byte, srv *tls.Config, certPEM, keyPEM []byte) {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey := key()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "buildfleet test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, usage x509.ExtKeyUsage) (*ecdsa.PrivateKey, []byte) {
		k := key()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "buildfleet test"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return k, der
	}
	pemOf := func(kind string, der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}) }
	keyPEMOf := func(k *ecdsa.PrivateKey) []byte {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pemOf("EC PRIVATE KEY", der)
	}
	srvKey, srvDER := leaf(2, x509.ExtKeyUsageServerAuth)
	srvCert, err := tls.X509KeyPair(pemOf("CERTIFICATE", srvDER), keyPEMOf(srvKey))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	cliKey, cliDER := leaf(3, x509.ExtKeyUsageClientAuth)
	return pemOf("CERTIFICATE", caDER),
		&tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12},
		pemOf("CERTIFICATE", cliDER), keyPEMOf(cliKey)
}

// violations collects the permission violations a nats-server logs.
type violations struct {
	mu    sync.Mutex
	lines []string
}

func (v *violations) record(format string, args ...any) {
	if line := fmt.Sprintf(format, args...); strings.Contains(line, "Violation") {
		v.mu.Lock()
		v.lines = append(v.lines, line)
		v.mu.Unlock()
	}
}
func (v *violations) Noticef(format string, args ...any) { v.record(format, args...) }
func (v *violations) Warnf(format string, args ...any)   { v.record(format, args...) }
func (v *violations) Fatalf(format string, args ...any)  { v.record(format, args...) }
func (v *violations) Errorf(format string, args ...any)  { v.record(format, args...) }
func (v *violations) Debugf(format string, args ...any)  {}
func (v *violations) Tracef(format string, args ...any)  {}

func (v *violations) take() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := v.lines
	v.lines = nil
	return out
}

// TestNATSAccounts runs a worker, a producer and a subscriber against a nats-server with
// deploy/nats's accounts, each as its role's user: everything each role does goes through
// without a single permission violation, and what a role must not do is refused.
func TestNATSAccounts(t *testing.T) {
	for _, role := range []string{"WORKER", "PRODUCER", "SUBSCRIBER", "SYSTEM"} {
		t.Setenv("NATS_"+role+"_PASSWORD", "pw-"+strings.ToLower(role))
	}
	accounts, err := server.ProcessConfigFile("../../deploy/nats/accounts.conf")
	if err != nil {
		t.Fatalf("deploy/nats/accounts.conf: %v", err)
	}
	srv := natstest.StartWith(t, func(o *server.Options) {
		base := *o
		*o = *accounts
		o.Host, o.Port, o.JetStream, o.StoreDir, o.NoSigs, o.NoLog = base.Host, base.Port, true, base.StoreDir, true, false
	})
	var v violations
	srv.SetLogger(&v)
	as := func(role string) {
		t.Setenv("BUILDFLEET_NATS_USER", role)
		t.Setenv("BUILDFLEET_NATS_PASSWORD", "pw-"+role)
	}
	t.Setenv("BUILDFLEET_NATS_URL", srv.ClientURL())
	worker := exec.Command(binary, "worker")
	worker.Env = []string{"PATH=" + os.Getenv("PATH"), "BUILDFLEET_NATS_URL=" + srv.ClientURL(), "BUILDFLEET_REPLICA=w",
		"BUILDFLEET_SCRATCH_DIR=" + t.TempDir(), "BUILDFLEET_HTTP_ADDR=127.0.0.1:0",
		"BUILDFLEET_NATS_USER=worker", "BUILDFLEET_NATS_PASSWORD=pw-worker"}
	var logs syncBuffer
	worker.Stderr = &logs
	if err := worker.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = worker.Process.Kill(); _ = worker.Wait() })

	as("producer")
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, errOut, code := run(t, "", "submit", "--wait", "--id", "acct-1", "--", "true")
		if code == 0 && strings.Contains(out, "succeeded") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("producer: submit --wait: exit %d, stderr %q\nworker:\n%s", code, errOut, logs.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, errOut, code := run(t, "", "submit", "--id", "acct-2", "--", "sleep", "30"); code != 0 {
		t.Fatalf("producer: submit: exit %d, %s", code, errOut)
	}
	if _, errOut, code := run(t, "", "submit", "--id", "acct-3", "--", "sh", "-c", "echo hello from acct-3"); code != 0 {
		t.Fatalf("producer: submit: exit %d, %s", code, errOut)
	}
	if _, errOut, code := run(t, "", "stop", "acct-2"); code != 0 {
		t.Fatalf("producer: stop: exit %d, %s", code, errOut)
	}
	if _, errOut, code := run(t, "", "status", "acct-1"); code != 0 {
		t.Errorf("producer: status: exit %d, %s", code, errOut)
	}

	if out, errOut, code := run(t, "", "logs", "acct-1"); code != 0 || out != "" {
		t.Errorf("producer: logs: exit %d, out %q, stderr %q; want the (empty) output", code, out, errOut)
	}

	as("subscriber")
	if out, errOut, code := run(t, "", "logs", "-f", "acct-3"); code != 0 || out != "hello from acct-3\n" {
		t.Errorf("subscriber: logs -f acct-3: exit %d, out %q, stderr %q; want the build's output", code, out, errOut)
	}
	if out, errOut, code := run(t, "", "watch", "acct-2"); code != ExitAborted || !strings.Contains(out, "aborted") {
		t.Errorf("subscriber: watch acct-2: exit %d, out %q, stderr %q; want the build's abort", code, out, errOut)
	}
	if _, errOut, code := run(t, "", "status", "acct-1"); code != 0 {
		t.Errorf("subscriber: status: exit %d, %s", code, errOut)
	}
	if got := v.take(); len(got) > 0 {
		t.Errorf("permission violations while each role did its work:\n%s", strings.Join(got, "\n"))
	}

	// What a role must not do: a subscriber publishes no request, the producer writes no
	// build output, and neither the producer nor the worker may delete a stream.
	for _, tc := range []struct {
		role string
		do   func(context.Context, jetstream.JetStream) error
	}{
		{"subscriber", func(ctx context.Context, js jetstream.JetStream) error {
			_, err := js.Publish(ctx, "buildfleet.requests.acct-3", []byte(`{}`))
			return err
		}},
		{"producer", func(ctx context.Context, js jetstream.JetStream) error {
			return js.DeleteStream(ctx, "BUILDFLEET_REQUESTS")
		}},
		{"producer", func(ctx context.Context, js jetstream.JetStream) error { // forge a build's output
			_, err := js.Publish(ctx, "buildfleet.logs.acct-1", []byte(`{}`))
			return err
		}},
		{"worker", func(ctx context.Context, js jetstream.JetStream) error {
			return js.DeleteStream(ctx, "BUILDFLEET_REQUESTS")
		}},
	} {
		nc, err := nats.Connect(srv.ClientURL(), nats.UserInfo(tc.role, "pw-"+tc.role), nats.ErrorHandler(func(*nats.Conn, *nats.Subscription, error) {}))
		if err != nil {
			t.Fatal(err)
		}
		js, _ := jetstream.New(nc)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		if err := tc.do(ctx, js); err == nil {
			t.Errorf("%s: a forbidden operation succeeded", tc.role)
		}
		cancel()
		nc.Close()
	}
	if got := v.take(); len(got) == 0 {
		t.Errorf("the refused operations left no permission violation in the server's log")
	}
}
