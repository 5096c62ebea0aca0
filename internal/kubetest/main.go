package kubetest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// EnvRequire makes a missing control plane fail the tests instead of skipping them; `make
// test` (and so CI) sets it after building the control plane.
const EnvRequire = "BUILDFLEET_REQUIRE_CLUSTER"

var shared struct {
	once sync.Once
	cp   *ControlPlane
	err  error
}

// RunMain runs a package's tests and stops the control plane that Need started, if any.
// Call it from TestMain.
func RunMain(m *testing.M) int {
	code := m.Run()
	if shared.cp != nil {
		shared.cp.Stop()
	}
	return code
}

// Need returns the package's control plane, starting it on first use. Without built
// binaries the test is skipped with the command that builds them, unless EnvRequire is set.
func Need(t testing.TB) *ControlPlane {
	t.Helper()
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		var log *os.File
		if os.Getenv("BUILDFLEET_CLUSTER_LOG") != "" {
			log = os.Stderr
		}
		shared.cp, shared.err = Start(ctx, Options{Log: log})
		if shared.err != nil && !errors.Is(shared.err, ErrNotBuilt) {
			// Ports are picked free and then handed to the processes: another test
			// package starting its own control plane may take one in between. Once more.
			shared.cp, shared.err = Start(ctx, Options{Log: log})
		}
	})
	switch {
	case errors.Is(shared.err, ErrNotBuilt) && os.Getenv(EnvRequire) == "":
		t.Skipf("%v; set %s=1 to make this a failure", shared.err, EnvRequire)
	case shared.err != nil:
		t.Fatalf("start the test control plane: %v", shared.err)
	}
	return shared.cp
}

// Namespace creates a namespace with the given labels and returns its name.
func (cp *ControlPlane) Namespace(t testing.TB, name string, labels map[string]string) string {
	t.Helper()
	if err := cp.CreateNamespace(context.Background(), name, labels); err != nil {
		t.Fatal(err)
	}
	return name
}

// String describes the control plane for logs.
func (cp *ControlPlane) String() string {
	return fmt.Sprintf("control plane at %s (pids %v)", cp.URL, cp.Pids())
}
