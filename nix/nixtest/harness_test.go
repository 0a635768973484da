package nixtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
)

// evalResult is what nix/nixtest/harness.nix returns.
type evalResult struct {
	Services map[string]unit `json:"services"`
	Targets  map[string]unit `json:"targets"`
	Firewall struct {
		Enable          bool  `json:"enable"`
		AllowedUDPPorts []int `json:"allowedUDPPorts"`
		AllowedTCPPorts []int `json:"allowedTCPPorts"`
		Interfaces      map[string]struct {
			AllowedTCPPorts []int `json:"allowedTCPPorts"`
			AllowedUDPPorts []int `json:"allowedUDPPorts"`
		} `json:"interfaces"`
	} `json:"firewall"`
	DHCPCDDenyInterfaces    []string `json:"dhcpcdDenyInterfaces"`
	NetworkManagerUnmanaged []string `json:"networkmanagerUnmanaged"`
	NetworkdNetworks        map[string]struct {
		MatchConfig map[string]any `json:"matchConfig"`
		LinkConfig  map[string]any `json:"linkConfig"`
	} `json:"networkdNetworks"`
	Users map[string]struct {
		IsSystemUser bool   `json:"isSystemUser"`
		Group        string `json:"group"`
	} `json:"users"`
	Groups     []string `json:"groups"`
	Prometheus []struct {
		JobName       string `json:"job_name"`
		StaticConfigs []struct {
			Targets []string          `json:"targets"`
			Labels  map[string]string `json:"labels"`
		} `json:"static_configs"`
	} `json:"prometheusScrapeConfigs"`
	SystemPackages []string `json:"systemPackages"`
	KernelModules  []string `json:"kernelModules"`
	Tmpfiles       []string `json:"tmpfiles"`
	Warnings       []string `json:"warnings"`
	Checks         []struct {
		Name string `json:"name"`
		Text string `json:"text"`
	} `json:"checks"`
	Meshd *struct {
		SettingsJSON string `json:"settingsJSON"`
		ConfigFile   string `json:"configFile"`
		Package      string `json:"package"`
		// BuildGoModuleArgs: what the default package passed to
		// buildGoModule (nil when the package came from elsewhere).
		BuildGoModuleArgs map[string]any `json:"buildGoModuleArgs"`
	} `json:"meshd"`
	Options []optionDoc `json:"options"`
}

// unit is one systemd service or target as NixOS would generate it.
type unit struct {
	WantedBy         []string       `json:"wantedBy"`
	Wants            []string       `json:"wants"`
	After            []string       `json:"after"`
	Before           []string       `json:"before"`
	Requires         []string       `json:"requires"`
	BindsTo          []string       `json:"bindsTo"`
	PartOf           []string       `json:"partOf"`
	ReloadIfChanged  bool           `json:"reloadIfChanged"`
	RestartIfChanged bool           `json:"restartIfChanged"`
	ServiceConfig    map[string]any `json:"serviceConfig"`
	UnitText         string         `json:"unitText"`
}

// optionDoc is one option of services.meshd, submodule options included.
type optionDoc struct {
	Name        string  `json:"name"`
	Description *string `json:"description"`
	Example     *string `json:"example"`
	Default     *string `json:"default"`
	Type        string  `json:"type"`
}

// values returns a serviceConfig entry as strings, the way systemd sees it
// (one per line NixOS writes; nil when unset).
func (u unit) values(key string) []string {
	v, ok := u.ServiceConfig[key]
	if !ok {
		return nil
	}
	var out []string
	var add func(any)
	add = func(x any) {
		switch x := x.(type) {
		case []any:
			for _, e := range x {
				add(e)
			}
		case bool:
			out = append(out, fmt.Sprint(x))
		case float64:
			out = append(out, fmt.Sprint(int64(x)))
		default:
			out = append(out, fmt.Sprint(x))
		}
	}
	add(v)
	return out
}

// value returns a single-valued serviceConfig entry ("" when unset).
func (u unit) value(key string) string { return strings.Join(u.values(key), " ") }

// repoRoot is the repository's top directory.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "nixos-module.nix")); err != nil {
		t.Fatalf("repository root not found from the test directory: %v", err)
	}
	return root
}

// nixInstantiate runs nix-instantiate offline (dummy store, no build users)
// and returns stdout, or stderr as the error.
func nixInstantiate(t testing.TB, args ...string) ([]byte, error) {
	t.Helper()
	bin, err := exec.LookPath("nix-instantiate")
	if err != nil {
		needNix(t, "nix-instantiate not installed (apt-get install -y --no-install-recommends nix-bin)")
	}
	cmd := exec.Command(bin, append([]string{"--store", "dummy://"}, args...)...)
	cmd.Env = append(os.Environ(),
		"NIX_CONFIG=build-users-group =",
		"XDG_CACHE_HOME="+t.TempDir(),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// needNix skips a test that needs Nix tooling which is missing, or fails
// it when MESHD_REQUIRE_NIX is set (CI: these tests must run there).
func needNix(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("MESHD_REQUIRE_NIX") != "" {
		t.Fatalf("%s, and MESHD_REQUIRE_NIX is set", why)
	}
	t.Skip(why)
}

// nixpkgsLib is the directory of nixpkgs' real lib (see
// ../shared/nixpkgs-lib/README.md); MESHD_NIXPKGS_LIB overrides it.
func nixpkgsLib(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("MESHD_NIXPKGS_LIB")
	if dir == "" {
		dir = filepath.Join(repoRoot(t), "..", "shared", "nixpkgs-lib", "lib")
		if _, err := os.Stat(dir); err != nil {
			dir = "/work/shared/nixpkgs-lib/lib"
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "modules.nix")); err != nil {
		needNix(t, fmt.Sprintf("nixpkgs lib not found at %s (set MESHD_NIXPKGS_LIB to a nixpkgs checkout's lib/): %v", dir, err))
	}
	return dir
}

// evalConfiguration evaluates a configuration through nix/nixtest/harness.nix
// with nixpkgs' real lib. conf is a Nix expression: a path to a module
// file or an inline module.
func evalConfiguration(t testing.TB, conf string) (*evalResult, error) {
	t.Helper()
	root := repoRoot(t)
	out, err := nixInstantiate(t, "--eval", "--strict", "--json",
		filepath.Join(root, "nix", "nixtest", "harness.nix"),
		"--arg", "lib", "import "+nixpkgsLib(t), "--arg", "configuration", conf)
	if err != nil {
		return nil, err
	}
	var r evalResult
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("decode harness output: %w", err)
	}
	return &r, nil
}

// evalExample evaluates nix/examples/<name>.nix and fails the test on error.
func evalExample(t testing.TB, name string) *evalResult {
	t.Helper()
	r, err := evalConfiguration(t, filepath.Join(repoRoot(t), "nix", "examples", name+".nix"))
	if err != nil {
		t.Fatalf("evaluate example %s: %v", name, err)
	}
	return r
}

// inline wraps module attributes into a configuration that imports the
// module, for tests of single options.
func inline(t testing.TB, body string) string {
	return fmt.Sprintf("{ ... }: { imports = [ %s ]; networking.hostName = \"node1\"; %s }",
		filepath.Join(repoRoot(t), "nixos-module.nix"), body)
}

var meshdBuild struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// meshdBinary builds ./meshd once per test binary.
func meshdBinary(t testing.TB) string {
	t.Helper()
	meshdBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "nixtest-meshd-")
		if err != nil {
			meshdBuild.err = err
			return
		}
		meshdBuild.dir = dir
		meshdBuild.path = filepath.Join(dir, "meshd")
		cmd := exec.Command("go", "build", "-o", meshdBuild.path, "./meshd")
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			meshdBuild.err = fmt.Errorf("go build ./meshd: %w\n%s", err, out)
		}
	})
	if meshdBuild.err != nil {
		t.Fatal(meshdBuild.err)
	}
	return meshdBuild.path
}

// checkConfig runs `meshd --check-config` on a JSON text with the given
// environment (nil: an empty one, as in a Nix build sandbox).
func checkConfig(t testing.TB, jsonText string, env []string) (string, error) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "meshd.json")
	if err := os.WriteFile(f, []byte(jsonText), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(meshdBinary(t), "--check-config", "--config", f)
	cmd.Env = append([]string{"PATH=/usr/bin:/bin"}, env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func TestMain(m *testing.M) {
	if os.Getenv(etcdHelperEnv) != "" {
		if err := runEtcdHelper(); err != nil {
			fmt.Fprintln(os.Stderr, "etcd helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	code := m.Run()
	if meshdBuild.dir != "" {
		os.RemoveAll(meshdBuild.dir)
	}
	os.Exit(code)
}

// sorted returns a sorted copy.
func sorted(s []string) []string {
	c := append([]string(nil), s...)
	sort.Strings(c)
	return c
}

func contains[T comparable](s []T, v T) bool {
	for _, e := range s {
		if e == v {
			return true
		}
	}
	return false
}
