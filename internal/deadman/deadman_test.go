package deadman

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// The switch is tested in a child process (this test binary, re-run): it must kill the
// child while the child is stopped, and must not once disarmed or moved later.
func TestMain(m *testing.M) {
	switch os.Getenv("DEADMAN_CHILD") {
	case "arm":
		var s Switch
		if err := s.Set(time.Now().Add(300 * time.Millisecond)); err != nil {
			os.Exit(3)
		}
		os.Stdout.WriteString("armed\n")
		time.Sleep(time.Minute)
		os.Exit(0)
	case "disarm":
		var s Switch
		_ = s.Set(time.Now().Add(200 * time.Millisecond))
		if err := s.Set(time.Time{}); err != nil {
			os.Exit(3)
		}
		time.Sleep(600 * time.Millisecond)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func child(t *testing.T, mode string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DEADMAN_CHILD="+mode)
	return cmd
}

func TestKillsAStoppedProcess(t *testing.T) {
	cmd := child(t, "arm")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := out.Read(buf); err != nil || string(buf) != "armed\n" {
		t.Fatalf("child said %q, %v", buf, err)
	}
	// Stopped, it cannot act on its own deadline: the kernel must.
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended %v (%v), want killed by SIGKILL", cmd.ProcessState, err)
	}
}

func TestDisarmed(t *testing.T) {
	if out, err := child(t, "disarm").CombinedOutput(); err != nil {
		t.Fatalf("disarmed child: %v\n%s", err, out)
	}
}
