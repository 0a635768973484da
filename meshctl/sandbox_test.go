package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

func TestSandboxUsage(t *testing.T) {
	for _, args := range [][]string{
		{"sandbox", "--nodes", "1"},
		{"sandbox", "--nodes", "1000"},
		{"sandbox", "extra"},
		{"sandbox", "--bogus"},
	} {
		if code, _, stderr := ctlRun(t, "", args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d (usage); stderr %q", args, code, exitUsage, stderr)
		}
	}
	code, out, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", fmt.Sprintf("mdtu%d", os.Getpid()%100000))
	if code != exitOK || !strings.Contains(out, "nothing left") {
		t.Errorf("--clean with nothing to clean: exit %d, out %q, err %q", code, out, stderr)
	}
	if code, _, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", "Bad-Name"); code != exitFailed || !strings.Contains(stderr, "sandbox name") {
		t.Errorf("--clean with a bad name: exit %d, err %q", code, stderr)
	}
}

// TestSandboxCheck is `meshctl sandbox --check` end to end: 3 nodes, every
// check passes, exit 0, and nothing is left behind.
func TestSandboxCheck(t *testing.T) {
	meshd := sandboxtest.Need(t)
	tag := fmt.Sprintf("mdtm%d", os.Getpid()%100000)
	code, out, stderr := ctlRun(t, "", "sandbox", "--check", "--name", tag, "--meshd", meshd, "--nodes", "3")
	t.Log("\n" + out)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"all 3 nodes passed", "n3 joined", "removed every namespace"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tag+"-") {
			t.Errorf("namespace %s left behind", e.Name())
		}
	}
}

// TestSandboxCrashLeftovers kills a running `meshctl sandbox` with
// SIGKILL: while it runs, a second run of the same name is refused as
// running; after the crash its meshd processes die with it, a new run is
// refused with the cleanup command, and --clean removes every namespace
// and process.
func TestSandboxCrashLeftovers(t *testing.T) {
	meshd := sandboxtest.Need(t)
	meshctl := sandboxtest.Build(t, "meshctl")
	tag := fmt.Sprintf("mdtk%d", os.Getpid()%100000)
	cmd := exec.Command(meshctl, "sandbox", "--name", tag, "--meshd", meshd, "--nodes", "2", "--etcd-addr", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		ctlRun(t, "", "sandbox", "--clean", "--name", tag)
	})
	var meshdPids []int
	sc := bufio.NewScanner(stdout)
	up := false
	for sc.Scan() {
		line := sc.Text()
		if _, rest, ok := strings.Cut(line, "meshd pid "); ok {
			pid, _ := strconv.Atoi(strings.TrimSuffix(strings.Fields(rest)[0], ","))
			meshdPids = append(meshdPids, pid)
		}
		if strings.Contains(line, "The sandbox is up") {
			up = true
			break
		}
	}
	if !up || len(meshdPids) != 2 {
		t.Fatalf("sandbox did not come up (meshd pids %v)", meshdPids)
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()

	if code, _, stderr := ctlRun(t, "", "sandbox", "--check", "--name", tag, "--meshd", meshd); code != exitFailed || !strings.Contains(stderr, "is running in process") {
		t.Errorf("second run while the first is up: exit %d, %q", code, stderr)
	}
	if code, _, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", tag); code != exitFailed || !strings.Contains(stderr, "is running in process") {
		t.Errorf("--clean while it is up: exit %d, %q", code, stderr)
	}

	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range meshdPids {
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if syscall.Kill(pid, 0) == nil {
			t.Errorf("meshd %d outlived the killed meshctl", pid)
		}
	}
	code, _, stderr := ctlRun(t, "", "sandbox", "--check", "--name", tag, "--meshd", meshd)
	if code != exitFailed || !strings.Contains(stderr, "meshctl sandbox --clean --name "+tag) {
		t.Errorf("run over leftovers: exit %d, %q", code, stderr)
	}
	var left []int
	for _, ns := range []string{tag + "-hub", tag + "-n1", tag + "-n2"} {
		out, _ := exec.Command("ip", "netns", "pids", ns).Output()
		for _, f := range strings.Fields(string(out)) {
			p, _ := strconv.Atoi(f)
			left = append(left, p)
		}
	}
	code, out, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", tag)
	if code != exitOK || !strings.Contains(out, "removed namespace "+tag+"-hub") {
		t.Errorf("--clean: exit %d, out %q, err %q", code, out, stderr)
	}
	if !strings.Contains(out, "removed directory") {
		t.Errorf("--clean did not remove the crashed run's work directory: %q", out)
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tag+"-") {
			t.Errorf("namespace %s left after --clean", e.Name())
		}
	}
	for _, parent := range []string{os.TempDir(), "/dev/shm"} {
		if dirs, _ := filepath.Glob(filepath.Join(parent, "meshd-sandbox-"+tag+"-*")); len(dirs) > 0 {
			t.Errorf("work or run directories left after --clean: %v", dirs)
		}
	}
	for _, p := range left {
		for syscall.Kill(p, 0) == nil && time.Now().Before(deadline.Add(5*time.Second)) {
			time.Sleep(50 * time.Millisecond)
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); err == nil && !strings.Contains(string(b), ") Z ") {
			t.Errorf("process %d from the crashed sandbox survived --clean", p)
		}
	}
}
