// Package sandboxtest holds test helpers for tests that run a sandbox:
// building the module's meshd binary and skipping where a sandbox cannot
// run.
package sandboxtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// BuildMeshd builds this module's meshd into the test's temporary
// directory and returns its path (the Go build cache makes repeats cheap).
func BuildMeshd(t testing.TB) string { return Build(t, "meshd") }

// Build builds one of this module's commands ("meshd", "meshctl") into the
// test's temporary directory and returns its path.
func Build(t testing.TB, cmdName string) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..", "..")
	out := filepath.Join(t.TempDir(), cmdName)
	cmd := exec.Command("go", "build", "-o", out, "./"+cmdName)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", cmdName, err, b)
	}
	return out
}

// Missing skips the test for want of what msg names, or fails it when
// MESHD_REQUIRE_ALL is set: CI (.ci/run) sets it, so a test that must run
// there can never pass by skipping.
func Missing(t testing.TB, format string, a ...any) {
	t.Helper()
	if os.Getenv("MESHD_REQUIRE_ALL") != "" {
		t.Fatalf("MESHD_REQUIRE_ALL is set, but "+format, a...)
	}
	t.Skipf(format, a...)
}

// Need skips the test unless the machine can run a sandbox (root,
// /dev/net/tun, haproxy, iproute2, nsenter, wg), and returns a freshly
// built meshd.
func Need(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "sandbox tests need root (network namespaces); CI runs them as root")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		Missing(t, "sandbox tests need /dev/net/tun (userspace WireGuard)")
	}
	for _, b := range []string{"haproxy", "ip", "nsenter", "wg"} {
		if _, err := exec.LookPath(b); err != nil {
			Missing(t, "sandbox tests need %s: apt-get install --no-install-recommends haproxy iproute2 util-linux wireguard-tools", b)
		}
	}
	return BuildMeshd(t)
}
