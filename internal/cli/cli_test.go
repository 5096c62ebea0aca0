package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/buildfleet/buildfleet/pkg/client"
	"github.com/buildfleet/buildfleet/pkg/protocol"
)

// syncBuffer is a bytes.Buffer safe for a writer and a reader in different goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// run calls the real Run with the given stdin and returns stdout, stderr and the exit code.
func run(t *testing.T, stdin string, args ...string) (string, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := Run(ctx, args, Stdio{In: strings.NewReader(stdin), Out: &out, Err: &errOut})
	code := ExitCode(err, &errOut)
	return out.String(), errOut.String(), code
}

func TestSubmitWaitExitCodes(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())

	out, errOut, code := run(t, "", "submit", "--wait", "--id", "cli-ok", "--env", "WHO=cli", "--", "sh", "-c", "echo hi $WHO")
	if code != 0 {
		t.Fatalf("submit --wait of a passing build: exit %d, stderr %q", code, errOut)
	}
	for _, state := range []string{"queued", "dispatched", "running", "succeeded"} {
		if !strings.Contains(out, state) {
			t.Errorf("progress output lacks %q:\n%s", state, out)
		}
	}
	_, _, code = run(t, "", "submit", "--wait", "--", "sh", "-c", "exit 7")
	if code != ExitFailed {
		t.Errorf("submit --wait of a failing build: exit %d, want %d", code, ExitFailed)
	}
	_, _, code = run(t, "", "submit", "--wait", "--timeout", "1s", "--", "sleep", "30")
	if code != ExitTimedOut {
		t.Errorf("submit --wait of a build that times out: exit %d, want %d", code, ExitTimedOut)
	}
	_, _, code = run(t, "", "submit", "--wait", "--target", "nowhere", "--", "true")
	if code != ExitRejected {
		t.Errorf("submit --wait of a build pinned to an unknown target: exit %d, want %d", code, ExitRejected)
	}

	req := `{"id":"from-stdin","image":"docker.io/library/alpine:3.20","steps":[{"name":"one","run":"echo one"},{"name":"two","run":"true"}]}`
	out, errOut, code = run(t, req, "submit", "--wait", "--json", "--file", "-")
	if code != 0 {
		t.Fatalf("submit --file -: exit %d, stderr %q", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last protocol.Event
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || last.Data.State != protocol.StateSucceeded {
		t.Errorf("--json last line = %q (%v); want a succeeded CloudEvent", lines[len(lines)-1], err)
	}

	out, _, code = run(t, "", "status", "cli-ok")
	var rec protocol.Record
	if code != 0 || json.Unmarshal([]byte(out), &rec) != nil || rec.State != protocol.StateSucceeded {
		t.Errorf("status cli-ok: exit %d, output %q; want the succeeded record", code, out)
	}
	_, errOut, code = run(t, "", "status", "never-submitted")
	if code != 1 || !strings.Contains(errOut, "not found") {
		t.Errorf("status of an unknown build: exit %d, stderr %q; want 1 and 'not found'", code, errOut)
	}
}

func TestSubmitRejectsBadInput(t *testing.T) {
	t.Setenv("BUILDFLEET_NATS_URL", "nats://127.0.0.1:1") // never reached: input is checked first
	for _, tc := range []struct {
		name, stdin string
		args        []string
		wantErr     string
	}{
		{"no command", "", []string{"submit"}, "no command"},
		{"bad env flag", "", []string{"submit", "--env", "NOEQUALS", "--", "true"}, "KEY=VALUE"},
		{"invalid JSON file", `{"id":"x","image":"busybox","command":["true"],"bogus":1}`, []string{"submit", "--file", "-"}, "/bogus"},
		{"file and command", `{}`, []string{"submit", "--file", "-", "--", "true"}, "not both"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := run(t, tc.stdin, tc.args...)
			if code == 0 || !strings.Contains(errOut, tc.wantErr) {
				t.Errorf("exit %d, stderr %q; want non-zero and %q", code, errOut, tc.wantErr)
			}
		})
	}
}

func TestStopAndWatchThroughCLI(t *testing.T) {
	f := newFleet(t)
	f.start(f.settings("a"), nil)
	t.Setenv("BUILDFLEET_NATS_URL", f.srv.ClientURL())
	if _, errOut, code := run(t, "", "submit", "--id", "cli-stop", "--", "sleep", "60"); code != 0 {
		t.Fatalf("submit: exit %d %s", code, errOut)
	}
	f.awaitState("cli-stop", protocol.StateRunning, 20*time.Second)
	if out, errOut, code := run(t, "", "stop", "--reason", "enough", "cli-stop"); code != 0 || !strings.Contains(out, "cli-stop") {
		t.Fatalf("stop: exit %d, %q %q", code, out, errOut)
	}
	out, _, code := run(t, "", "watch", "cli-stop")
	if code != ExitAborted || !strings.Contains(out, "aborted") || !strings.Contains(out, "enough") {
		t.Errorf("watch cli-stop: exit %d, output:\n%s\nwant exit %d and the aborted event with its reason", code, out, ExitAborted)
	}
}

func TestRouteExplains(t *testing.T) {
	targets := filepath.Join(t.TempDir(), "targets.yaml")
	if err := os.WriteFile(targets, []byte(`default: runc
targets:
  - name: kata
    executor: process
    weight: 10
    isolated: true
    exclude: ["rhel6"]
  - name: runc
    executor: process
    weight: 90
    max_running: 50
policy:
  isolate:
    - name: forks
      pipeline: "github.com/*/fork-*"
  tenants:
    from: [pipeline-owner]
    limits:
      - {name: bob, weight: 2, cap: 10, max_priority: 3}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("BUILDFLEET_TARGETS_FILE", targets)
	out, _, code := run(t, "", "route", "--image", "registry.example/team/app:1", "--pipeline", "github.com/bob/fork-app", "--annotation", "buildfleet.io/target=runc")
	if code != ExitRejected || !strings.Contains(out, `policy "forks" requires an isolated target (pipeline "github.com/bob/fork-app")`) {
		t.Errorf("route of a fork's build pinned to runc: exit %d, output:\n%s\nwant rejected, naming the policy", code, out)
	}
	out, _, code = run(t, "", "route", "--image", "registry.example/team/app:1", "--pipeline", "github.com/bob/fork-app")
	if code != 0 || !strings.Contains(out, "target kata") {
		t.Errorf("route of a fork's build: exit %d, output:\n%s\nwant kata", code, out)
	}
	out, _, code = run(t, "", "route", "--image", "registry.example/team/arya-rhel6:latest", "--annotation", "buildfleet.io/target=kata")
	if code != ExitRejected || !strings.Contains(out, "excluded_image") {
		t.Errorf("route of an excluded image pinned to kata: exit %d, output:\n%s", code, out)
	}
	out, _, code = run(t, "", "route", "--image", "registry.example/team/arya-rhel6:latest", "--pipeline", "github.com/bob/app",
		"--annotation", "buildfleet.io/priority=9")
	if code != 0 || !strings.Contains(out, "target runc") || !strings.Contains(out, "rhel6") {
		t.Errorf("route of an excluded image: exit %d, output:\n%s\nwant runc, saying why kata was dropped", code, out)
	}
	if want := "tenant bob (weight 2, cap 10), priority 3 (asked 9; the tenant's max_priority is 3); target runc runs at most 50 builds at once"; !strings.Contains(out, want) {
		t.Errorf("route output:\n%s\nwant %q", out, want)
	}
	if _, errOut, code := run(t, "", "route", "--image", "x", "--annotation", "buildfleet.io/priority=high"); code != ExitUsage || !strings.Contains(errOut, "not an integer") {
		t.Errorf("route with a bad priority: exit %d, %q", code, errOut)
	}
	_, errOut, code := run(t, "", "route")
	if code != ExitUsage || !strings.Contains(errOut, "--image") {
		t.Errorf("route without --image: exit %d, %q", code, errOut)
	}
	// The example the deploy folder ships is a valid file.
	t.Setenv("BUILDFLEET_TARGETS_FILE", "../../deploy/targets.example.yaml")
	out, errOut, code = run(t, "", "route", "--image", "registry.example/team/app:1")
	if code != 0 || !strings.Contains(out, "target ") {
		t.Errorf("route with deploy/targets.example.yaml: exit %d, output %q %q", code, out, errOut)
	}
}

func TestBadSettingStopsAtStartNamingTheField(t *testing.T) {
	for _, tc := range []struct{ env, value string }{
		{"BUILDFLEET_ACK_WAIT", "soon"},
		{"BUILDFLEET_CONCURRENCY", "0"},
		{"BUILDFLEET_PREFIX", "Bad Prefix"},
	} {
		t.Run(tc.env, func(t *testing.T) {
			t.Setenv(tc.env, tc.value)
			_, errOut, code := run(t, "", "worker")
			if code == 0 || !strings.Contains(errOut, tc.env) {
				t.Errorf("worker with %s=%q: exit %d, stderr %q; want an error naming %s", tc.env, tc.value, code, errOut, tc.env)
			}
		})
	}
	t.Run("kubernetes options", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "targets.yaml")
		body := "targets:\n  - name: k\n    executor: kubernetes\n    weight: 1\n    kubernetes:\n      namespace: Builds\n      retention: soon\n"
		if err := os.WriteFile(bad, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Setenv("BUILDFLEET_TARGETS_FILE", bad)
		_, errOut, code := run(t, "", "route", "--image", "busybox")
		if code == 0 || !strings.Contains(errOut, "targets[0].kubernetes.retention") {
			t.Errorf("bad kubernetes options: exit %d, stderr %q; want the field path", code, errOut)
		}
	})
	t.Run("no cluster", func(t *testing.T) {
		good := filepath.Join(t.TempDir(), "targets.yaml")
		body := "targets:\n  - name: k\n    executor: kubernetes\n    weight: 1\n    kubernetes: {context: nowhere}\n"
		if err := os.WriteFile(good, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Setenv("BUILDFLEET_TARGETS_FILE", good)
		t.Setenv("KUBECONFIG", filepath.Join(t.TempDir(), "missing"))
		_, errOut, code := run(t, "", "worker")
		if code == 0 || !strings.Contains(errOut, `context "nowhere"`) {
			t.Errorf("a target on an unknown kubeconfig context: exit %d, stderr %q", code, errOut)
		}
	})
	t.Run("targets file", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "targets.yaml")
		if err := os.WriteFile(bad, []byte("targets:\n  - name: a\n    executor: process\n    wieght: 3\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Setenv("BUILDFLEET_TARGETS_FILE", bad)
		t.Setenv("BUILDFLEET_NATS_URL", "nats://127.0.0.1:1")
		_, errOut, code := run(t, "", "route", "--image", "busybox")
		if code == 0 || !strings.Contains(errOut, "wieght") {
			t.Errorf("bad targets file: exit %d, stderr %q; want the unknown field named", code, errOut)
		}
	})
}

// TestDev runs `buildfleet dev` (embedded JetStream, one worker) and a build through it.
func TestDev(t *testing.T) {
	t.Setenv("BUILDFLEET_SCRATCH_DIR", t.TempDir())
	dataDir := t.TempDir()
	if last := devBuild(t, dataDir, protocol.BuildRequest{ID: "dev-1", Image: "busybox", Command: []string{"true"}}); last != protocol.StateSucceeded {
		t.Errorf("build on dev ended %q, want succeeded", last)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "jetstream")); err != nil {
		t.Errorf("no JetStream file store under the data dir: %v", err)
	}
}

// TestDevKubernetes runs `buildfleet dev` with a targets file of kubernetes targets and the
// worker's kubeconfig: the build runs as a pod on the test control plane.
func TestDevKubernetes(t *testing.T) {
	f := newKubeFleet(t, "10m")
	t.Setenv("BUILDFLEET_TARGETS_FILE", f.targets)
	if last := devBuild(t, t.TempDir(), sim("dev-kube", nil)); last != protocol.StateSucceeded {
		t.Errorf("build on dev ended %q, want succeeded", last)
	}
	if _, err := f.pod("dev-kube"); err != nil {
		t.Errorf("the dev build left no pod: %v", err)
	}
}

// devBuild runs `buildfleet dev` until req has ended, and returns how it ended.
func devBuild(t *testing.T, dataDir string, req protocol.BuildRequest) protocol.State {
	t.Helper()
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, []string{"dev", "--listen", "127.0.0.1:-1", "--data-dir", dataDir}, Stdio{In: strings.NewReader(""), Out: &out, Err: &errOut})
	}()
	defer func() {
		if t.Failed() {
			t.Logf("dev stderr:\n%s", errOut.String())
		}
	}()
	urlRE := regexp.MustCompile(`nats://127\.0\.0\.1:\d+`)
	waitFor(t, 20*time.Second, "dev prints its NATS address", func() bool { return urlRE.MatchString(out.String()) })
	if !strings.Contains(out.String(), "submit") {
		t.Errorf("dev output does not say how to submit:\n%s", out.String())
	}
	nc, err := nats.Connect(urlRE.FindString(out.String()))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	cl, err := client.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "dev's worker provisioned JetStream", func() bool {
		_, err = cl.Submit(context.Background(), req)
		return err == nil
	})
	wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer wcancel()
	var last protocol.State
	for ev, err := range cl.Watch(wctx, req.ID) {
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		last = ev.Data.State
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("dev returned %v after cancel, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("dev did not stop")
	}
	return last
}
