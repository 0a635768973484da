package sandbox

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// ErrPreflight is returned (wrapped) when the machine cannot run a sandbox.
var ErrPreflight = errors.New("cannot run the sandbox here")

// Preflight checks what a sandbox needs: root, /dev/net/tun (userspace
// WireGuard), iproute2, nsenter, haproxy and a meshd binary. It returns the
// meshd binary's path, and one error naming everything missing with how to
// get it.
func Preflight(o Options) (meshd string, err error) {
	var errs []error
	if os.Geteuid() != 0 {
		errs = append(errs, errors.New("not root: network namespaces need root (run with sudo)"))
	}
	if fi, err := os.Stat("/dev/net/tun"); err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		errs = append(errs, errors.New("no /dev/net/tun: userspace WireGuard needs the tun device (modprobe tun, or give the container --device /dev/net/tun)"))
	}
	for _, t := range []struct{ bin, pkg string }{{"ip", "iproute2"}, {"nsenter", "util-linux"}} {
		if _, err := exec.LookPath(t.bin); err != nil {
			errs = append(errs, fmt.Errorf("%s not found: apt-get install %s", t.bin, t.pkg))
		}
	}
	hap := o.HAProxyBinary
	if hap == "" {
		hap = "haproxy"
	}
	if _, err := exec.LookPath(hap); err != nil {
		errs = append(errs, fmt.Errorf("haproxy not found (%s): apt-get install --no-install-recommends haproxy", hap))
	}
	meshd, merr := findMeshd(o.MeshdBinary)
	if merr != nil {
		errs = append(errs, merr)
	}
	if len(errs) > 0 {
		return "", fmt.Errorf("%w: %w", ErrPreflight, errors.Join(errs...))
	}
	return meshd, nil
}

// findMeshd resolves the meshd binary: the given path, else "meshd" next
// to the running executable (bin/meshctl next to bin/meshd), else PATH.
func findMeshd(given string) (string, error) {
	if given != "" {
		p, err := exec.LookPath(given)
		if err != nil {
			return "", fmt.Errorf("meshd binary %q: %w", given, err)
		}
		return filepath.Abs(p)
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "meshd")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	p, err := exec.LookPath("meshd")
	if err != nil {
		return "", errors.New("meshd binary not found next to this executable or on PATH: go build -o bin/ ./meshd ./meshctl")
	}
	return filepath.Abs(p)
}
