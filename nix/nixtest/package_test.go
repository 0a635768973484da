package nixtest

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Every Nix file of the repository parses (flake.nix, default.nix,
// nix/package.nix, the module, the examples, the test harness).
func TestNixFilesParse(t *testing.T) {
	root := repoRoot(t)
	var files []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".nix") {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"flake.nix", "default.nix", "nixos-module.nix", "nix/package.nix", "nix/source.nix"} {
		if !contains(files, filepath.Join(root, want)) {
			t.Errorf("%s missing", want)
		}
	}
	for _, f := range files {
		if _, err := nixInstantiate(t, "--parse", f); err != nil {
			t.Errorf("parse %s: %v", f, err)
		}
	}
}

// vendorHash is nixpkgs' goModules output hash: `go mod vendor` over the
// files nix/source.nix gives the build, as a NAR, sha256 in SRI form. This
// recomputes it from those files and fails when go.mod/go.sum (or an
// import) moved and nix/package.nix did not follow.
func TestVendorHash(t *testing.T) {
	if testing.Short() {
		t.Skip("go mod vendor: not in -short")
	}
	nixHash, err := exec.LookPath("nix-hash")
	if err != nil {
		needNix(t, "nix-hash not installed (apt-get install -y --no-install-recommends nix-bin)")
	}
	root := repoRoot(t)
	// The exact source the build sees.
	out, err := nixInstantiate(t, "--eval", "--strict", "--json", "-E", fmt.Sprintf(
		`let lib = import %s; s = import %s/nix/source.nix { inherit lib; }; in map (f: lib.removePrefix "${toString s.root}/" (toString f)) (lib.fileset.toList s.fileset)`,
		nixpkgsLib(t), root))
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	if err := json.Unmarshal(out, &files); err != nil {
		t.Fatal(err)
	}
	if !contains(files, "go.mod") || !contains(files, "go.sum") || !contains(files, "meshd/main.go") {
		t.Fatalf("nix/source.nix gives %d files without go.mod, go.sum or meshd/main.go", len(files))
	}
	src := filepath.Join(t.TempDir(), "src")
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(src, f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// As goModules runs it: no vendor directory yet, the local toolchain;
	// modules come from the module cache (or the module proxy).
	cmd := exec.Command("go", "mod", "vendor")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOFLAGS=", "GOTOOLCHAIN=local", "GOWORK=off", "GO111MODULE=on")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go mod vendor: %v\n%s", err, b)
	}
	b, err := exec.Command(nixHash, "--type", "sha256", filepath.Join(src, "vendor")).Output()
	if err != nil {
		t.Fatalf("nix-hash: %v", err)
	}
	sum, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(sum) != sha256.Size {
		t.Fatalf("nix-hash printed %q", b)
	}
	want := "sha256-" + base64.StdEncoding.EncodeToString(sum)

	pkg, err := os.ReadFile(filepath.Join(root, "nix", "package.nix"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*vendorHash = "([^"]*)";`).FindSubmatch(pkg)
	if m == nil {
		t.Fatal("nix/package.nix: no vendorHash line")
	}
	if got := string(m[1]); got != want {
		t.Fatalf("nix/package.nix vendorHash = %q, but go mod vendor hashes to %q: set it to the latter", got, want)
	}
}

// nix/package.nix, called as nixpkgs' callPackage would, with a
// buildGoModule that records its arguments (nix/nixtest/pkgs.nix).
func TestPackageExpression(t *testing.T) {
	root := repoRoot(t)
	eval := func(expr string) map[string]any {
		t.Helper()
		out, err := nixInstantiate(t, "--eval", "--strict", "--json", "-E", fmt.Sprintf(
			`let lib = import %s; pkgs = import %s/nix/nixtest/pkgs.nix { inherit lib; }; in %s`, nixpkgsLib(t), root, expr))
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	recorded := func(pkg string) string {
		return `let p = ` + pkg + `; a = p.buildGoModuleArgs; in { inherit (p) name goVersion; inherit (a) pname version subPackages ldflags vendorHash doCheck; src = "${a.src}";
			license = a.meta.license.spdxId; inherit (a.meta) mainProgram description homepage; linuxOnly = a.meta.platforms == lib.platforms.linux; }`
	}
	// pkgs whose default Go is older than go.mod's directive.
	oldGo := `(let p = pkgs // { go.version = "1.25.5"; buildGoModule = pkgs.recordGoModule "1.25.5"; } // extra; in p // { callPackage = lib.callPackageWith p; })`
	for _, tc := range []struct {
		name, expr, version, goVersion string
	}{
		{"callPackage", recorded(`pkgs.callPackage ` + root + `/nix/package.nix { }`), "0.1.0", "1.26.8"},
		{"version override", recorded(`pkgs.callPackage ` + root + `/nix/package.nix { version = "0.2.0-abc1234"; }`), "0.2.0-abc1234", "1.26.8"},
		{"default.nix", recorded(`import ` + root + `/default.nix { inherit pkgs; }`), "0.1.0", "1.26.8"},
		{"default Go too old: Go 1.26", recorded(`(let extra = { buildGo126Module = pkgs.recordGoModule "1.26.9"; }; in ` + oldGo + `).callPackage ` + root + `/nix/package.nix { }`), "0.1.0", "1.26.9"},
		{"default Go too old, no Go 1.26", recorded(`(let extra = { }; in ` + oldGo + `).callPackage ` + root + `/nix/package.nix { }`), "0.1.0", "1.25.5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := eval(tc.expr)
			if v["goVersion"] != tc.goVersion {
				t.Errorf("built with Go %v, want %s", v["goVersion"], tc.goVersion)
			}
			if v["name"] != "meshd-"+tc.version || v["pname"] != "meshd" || v["version"] != tc.version {
				t.Errorf("name %v pname %v version %v", v["name"], v["pname"], v["version"])
			}
			if got := fmt.Sprint(v["subPackages"]); got != "[meshd meshctl]" {
				t.Errorf("subPackages %s", got)
			}
			if !contains(anyStrings(v["ldflags"]), "-X main.version="+tc.version) {
				t.Errorf("ldflags %v: no -X main.version=%s", v["ldflags"], tc.version)
			}
			if v["license"] != "Apache-2.0" || v["mainProgram"] != "meshd" || v["linuxOnly"] != true || v["description"] == "" || v["homepage"] == "" {
				t.Errorf("meta: %v", v)
			}
			if !regexp.MustCompile(`^sha256-[A-Za-z0-9+/]{43}=$`).MatchString(fmt.Sprint(v["vendorHash"])) {
				t.Errorf("vendorHash %v: not an SRI sha256", v["vendorHash"])
			}
			if !strings.HasPrefix(fmt.Sprint(v["src"]), "/nix/store/") {
				t.Errorf("src %v", v["src"])
			}
		})
	}
	// The licence the package declares is the repository's.
	lic, err := os.ReadFile(filepath.Join(root, "LICENSE"))
	if err != nil || !strings.Contains(string(lic), "Apache License") || !strings.Contains(string(lic), "Version 2.0, January 2004") {
		t.Errorf("LICENSE is not the Apache License 2.0 (%v)", err)
	}
}

func anyStrings(v any) []string {
	var out []string
	l, _ := v.([]any)
	for _, e := range l {
		out = append(out, fmt.Sprint(e))
	}
	return out
}

// flake.nix's outputs, called with nixpkgs' real lib and the test pkgs as
// its nixpkgs input: the packages, the overlay, and the module whose
// package defaults to the flake's (evaluated through the harness with the
// worker example). checks need lib.nixosSystem (all of NixOS): only their
// names are checked here.
func TestFlakeOutputs(t *testing.T) {
	root := repoRoot(t)
	flake := fmt.Sprintf(`(let
		lib = import %[1]s;
		pkgs = import %[2]s/nix/nixtest/pkgs.nix { inherit lib; };
		nixpkgs = { inherit lib; legacyPackages = { x86_64-linux = pkgs; aarch64-linux = pkgs; }; };
		self = (import %[2]s/flake.nix).outputs { inherit self nixpkgs; } // { shortRev = "abc1234"; };
	in self)`, nixpkgsLib(t), root)
	out, err := nixInstantiate(t, "--eval", "--strict", "--json", "-E", fmt.Sprintf(`let
		lib = import %[1]s;
		pkgs = import %[2]s/nix/nixtest/pkgs.nix { inherit lib; };
		flake = %[3]s;
		overlaid = lib.fix (final: pkgs // flake.overlays.default final pkgs);
	in {
		inputs = builtins.attrNames (import %[2]s/flake.nix).inputs;
		packages = builtins.mapAttrs (_: ps: builtins.mapAttrs (_: p: p.name) ps) flake.packages;
		default = "${flake.packages.x86_64-linux.default}";
		overlay = overlaid.meshd.name;
		checks = builtins.attrNames flake.checks.x86_64-linux;
		devShells = builtins.attrNames flake.devShells;
		modules = builtins.attrNames flake.nixosModules;
	}`, nixpkgsLib(t), root, flake))
	if err != nil {
		t.Fatal(err)
	}
	var v struct {
		Inputs   []string                     `json:"inputs"`
		Packages map[string]map[string]string `json:"packages"`
		Default  string                       `json:"default"`
		Overlay  string                       `json:"overlay"`
		Checks   []string                     `json:"checks"`
		DevShell []string                     `json:"devShells"`
		Modules  []string                     `json:"modules"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatal(err)
	}
	const name = "meshd-0.1.0-abc1234"
	for _, system := range []string{"x86_64-linux", "aarch64-linux"} {
		if p := v.Packages[system]; p["default"] != name || p["meshd"] != name {
			t.Errorf("packages.%s = %v, want default and meshd named %s", system, p, name)
		}
	}
	if v.Overlay != name {
		t.Errorf("overlays.default gives meshd %q", v.Overlay)
	}
	if fmt.Sprint(v.Inputs) != "[nixpkgs]" || fmt.Sprint(v.Modules) != "[default meshd]" ||
		fmt.Sprint(v.Checks) != "[ingress monitoring package service worker]" || fmt.Sprint(v.DevShell) != "[aarch64-linux x86_64-linux]" {
		t.Errorf("inputs %v nixosModules %v checks %v devShells %v", v.Inputs, v.Modules, v.Checks, v.DevShell)
	}

	// The flake's module: the worker example with the flake's package.
	r, err := evalConfiguration(t, fmt.Sprintf(`{ imports = [ %s.nixosModules.default %s ]; }`, flake, filepath.Join(root, "nix", "examples", "worker.nix")))
	if err != nil {
		t.Fatal(err)
	}
	if r.Meshd.Package != v.Default {
		t.Errorf("the flake's module runs %s, want the flake's package %s", r.Meshd.Package, v.Default)
	}
	if !strings.HasPrefix(r.Services["meshd"].value("ExecStart"), v.Default+"/bin/meshd ") {
		t.Errorf("ExecStart=%s", r.Services["meshd"].value("ExecStart"))
	}
}
