package desired

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPureDependencies fails if the pure computation pulls in netlink,
// wgctrl or wireguard-go: meshctl uses it and must not link the data
// plane, and it must build and test anywhere. (etcd's client comes in
// through pkg/registry, which meshctl links anyway.)
func TestPureDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Skipf("go list unavailable: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/vishvananda/", "golang.zx2c4.com/", "github.com/mdlayher/"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("pkg/overlay/desired depends on %s", dep)
			}
		}
	}
}
