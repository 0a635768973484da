package hetzner_test

import (
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/hetzner"
)

var update = flag.Bool("update", false, "rewrite golden files")

func testCloudInit(role string) hetzner.CloudInit {
	return hetzner.CloudInit{Cluster: "prod", Name: "worker-1", Role: role, WireGuardPort: 51820,
		NixChannel: hetzner.DefaultNixChannel, InfectURL: hetzner.DefaultInfectURL, InfectSHA256: hetzner.DefaultInfectSHA256}
}

func TestCloudInitGolden(t *testing.T) {
	for _, role := range []string{"worker", "ingress", "control"} {
		t.Run(role, func(t *testing.T) {
			got, err := testCloudInit(role).Render()
			if err != nil {
				t.Fatal(err)
			}
			golden := filepath.Join("testdata", "cloud-init-"+role+".yaml")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("cloud-init (-golden +got), rerun with -update if intended:\n%s", diff)
			}
		})
	}
}

// cloudConfig is the part of cloud-config this test checks.
type cloudConfig struct {
	WriteFiles []struct {
		Path        string `json:"path"`
		Permissions string `json:"permissions"`
		Content     string `json:"content"`
	} `json:"write_files"`
	Runcmd []string `json:"runcmd"`
}

// TestCloudInitIsValid parses the rendered cloud-config as YAML and the
// NixOS file it writes as Nix (with nix-instantiate when installed).
func TestCloudInitIsValid(t *testing.T) {
	ud, err := testCloudInit("ingress").Render()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ud, "#cloud-config\n") {
		t.Fatal("user data does not start with #cloud-config")
	}
	var cc cloudConfig
	if err := yaml.UnmarshalStrict([]byte(ud), &cc, yaml.DisallowUnknownFields); err != nil {
		t.Fatalf("not YAML: %v", err)
	}
	if len(cc.WriteFiles) != 2 || cc.WriteFiles[0].Path != "/etc/nixos/meshd-host.nix" || cc.WriteFiles[1].Path != "/etc/nixos/meshd-role.nix" {
		t.Fatalf("write_files = %+v", cc.WriteFiles)
	}
	nix := cc.WriteFiles[0].Content
	for _, want := range []string{`allowedUDPPorts = [ 51820 ]`, `node = "worker-1"`, `groups = [ "frontends" ]`, `cluster = "prod"`} {
		if !strings.Contains(nix, want) {
			t.Errorf("host.nix lacks %q:\n%s", want, nix)
		}
	}
	// The pinned script is downloaded to a file, and run only if its
	// sha256 matches.
	if len(cc.Runcmd) != 2 || !strings.Contains(cc.Runcmd[0], "-o /root/nixos-infect '"+hetzner.DefaultInfectURL+"'") ||
		!strings.Contains(hetzner.DefaultInfectURL, "/nixos-infect/7563801d3ae68c975e4027f4e31a3906dca95f30/") {
		t.Fatalf("runcmd does not fetch the pinned script: %q", cc.Runcmd)
	}
	infect := cc.Runcmd[1]
	if !regexp.MustCompile(`^echo '[0-9a-f]{64}  /root/nixos-infect' \| sha256sum -c - && PROVIDER=hetznercloud NIX_CHANNEL=nixos-26\.05 NIXOS_IMPORT=\./meshd-host\.nix bash /root/nixos-infect `).MatchString(infect) {
		t.Errorf("runcmd does not check the sha256 before running nixos-infect with the import: %q", infect)
	}

	role := cc.WriteFiles[1].Content
	for _, want := range []string{`nodeName = lib.mkDefault "worker-1"`, `consume = lib.mkDefault [ "frontends" ]`, `listenPort = lib.mkDefault 51820`} {
		if !strings.Contains(role, want) {
			t.Errorf("meshd-role.nix lacks %q:\n%s", want, role)
		}
	}

	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		t.Skip("nix-instantiate not installed: Nix syntax not checked (apt-get install nix-bin)")
	}
	dir := t.TempDir()
	f := filepath.Join(dir, "meshd-host.nix")
	for i, c := range cc.WriteFiles {
		p := filepath.Join(dir, filepath.Base(c.Path))
		if err := os.WriteFile(p, []byte(c.Content), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "--store", "dummy://", "--parse", p)
		cmd.Env = append(os.Environ(), "NIX_CONFIG=build-users-group =")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nix-instantiate --parse %s: %v\n%s", cc.WriteFiles[i].Path, err, out)
		}
	}
	// Evaluate both as module functions with a stub lib (the meshd module
	// is absent here, so imports is []).
	expr := `let lib = { mkDefault = x: x; }; m = import ` + f + ` { inherit lib; }; r = import ` + filepath.Join(dir, "meshd-role.nix") + ` { inherit lib; }; in
		{ inherit (m) imports; udp = m.networking.firewall.allowedUDPPorts; json = m.environment.etc."meshd/provisioned.json".text; consume = r.services.meshd.settings.consume; }`
	cmd := exec.Command(bin, "--store", "dummy://", "--eval", "--strict", "--json", "-E", expr)
	cmd.Env = append(os.Environ(), "NIX_CONFIG=build-users-group =")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nix-instantiate --eval: %v\n%s", err, out)
	}
	want := `{"consume":["frontends"],"imports":[],"json":"{\"cluster\":\"prod\",\"groups\":[\"frontends\"],\"node\":\"worker-1\",\"role\":\"ingress\",\"wireguardPort\":51820}","udp":[51820]}`
	if got := strings.TrimSpace(string(out)); got != want {
		t.Errorf("evaluated host.nix:\n got %s\nwant %s", got, want)
	}
}

func TestCloudInitRejectsUnsafeInput(t *testing.T) {
	for name, mutate := range map[string]func(*hetzner.CloudInit){
		"quote in name":     func(c *hetzner.CloudInit) { c.Name = `a"b` },
		"shell in URL":      func(c *hetzner.CloudInit) { c.InfectURL = "https://x/$(reboot)" },
		"http URL":          func(c *hetzner.CloudInit) { c.InfectURL = "http://example.com/nixos-infect" },
		"no sha256":         func(c *hetzner.CloudInit) { c.InfectSHA256 = "" },
		"sha256 injection":  func(c *hetzner.CloudInit) { c.InfectSHA256 = "00' /etc/passwd; reboot; echo '" },
		"channel injection": func(c *hetzner.CloudInit) { c.NixChannel = "nixos-26.05 bash -c id;" },
		"cluster newline":   func(c *hetzner.CloudInit) { c.Cluster = "a\nb" },
		"port":              func(c *hetzner.CloudInit) { c.WireGuardPort = 70000 },
	} {
		ci := testCloudInit("worker")
		mutate(&ci)
		if _, err := ci.Render(); err == nil {
			t.Errorf("%s: rendered", name)
		}
	}
}
