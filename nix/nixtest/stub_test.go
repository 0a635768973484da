package nixtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The stub lib must behave like nixpkgs' module system wherever the module
// relies on it; otherwise the checks above prove nothing. Each case is a
// documented nixpkgs behaviour.
func TestStubLibMatchesNixpkgsSemantics(t *testing.T) {
	root := repoRoot(t)
	shared := filepath.Join(t.TempDir(), "shared.nix")
	if err := os.WriteFile(shared, []byte(`{ lib, ... }: { options.s = lib.mkOption { type = lib.types.int; default = 1; }; }`), 0o644); err != nil {
		t.Fatal(err)
	}
	str := `options.a = lib.mkOption { type = lib.types.str; default = "default"; };`
	for _, tc := range []struct {
		name    string
		modules []string // bodies of { lib, ... }: { ... } modules
		expr    string   // over `config`
		want    string   // JSON, or
		wantErr string
	}{
		{"default applies", []string{str}, "config.a", `"default"`, ""},
		{"mkDefault beats the option default", []string{str, `config.a = lib.mkDefault "mkDefault";`}, "config.a", `"mkDefault"`, ""},
		{"a plain definition beats mkDefault", []string{str, `config.a = lib.mkDefault "mkDefault";`, `config.a = "plain";`}, "config.a", `"plain"`, ""},
		{"mkForce beats a plain definition", []string{str, `config.a = lib.mkForce "forced";`, `config.a = "plain";`}, "config.a", `"forced"`, ""},
		{"conflicting strings", []string{str, `config.a = "x";`, `config.a = "y";`}, "config.a", "", "The option `a' has conflicting definition values"},
		{"equal strings merge", []string{str, `config.a = "x";`, `config.a = "x";`}, "config.a", `"x"`, ""},
		{"mkIf false drops a definition", []string{str, `config = lib.mkIf false { a = "dropped"; };`}, "config.a", `"default"`, ""},
		{"mkIf inside mkMerge", []string{str, `config = lib.mkMerge [ (lib.mkIf false { a = "no"; }) (lib.mkIf true { a = "yes"; }) ];`}, "config.a", `"yes"`, ""},
		{"mkIf needs a bool", []string{str, `config.a = lib.mkIf "true" "x";`}, "config.a", "", "called with a non-Boolean condition"},
		{"lists concatenate", []string{`options.l = lib.mkOption { type = lib.types.listOf lib.types.int; default = [ ]; };`, `config.l = [ 1 2 ];`, `config.l = [ 3 ];`}, "config.l", `[1,2,3]`, ""},
		{"list elements are type checked", []string{`options.l = lib.mkOption { type = lib.types.listOf lib.types.port; };`, `config.l = [ 70000 ];`}, "config.l", "", "is not of type `16 bit unsigned integer"},
		{"type error names the option", []string{str, `config.a = 5;`}, "config.a", "", "A definition for option `a' is not of type `string'"},
		{"undefined option without default", []string{`options.b = lib.mkOption { type = lib.types.str; };`}, "config.b", "", "The option `b' is used but not defined."},
		{"undeclared option is reported", []string{str, `config.typo = 1;`}, "unmatched", `[["typo"]]`, ""},
		{"submodule gets its attribute name", []string{`options.m = lib.mkOption { type = lib.types.attrsOf (lib.types.submodule ({ name, ... }: { options.n = lib.mkOption { type = lib.types.str; default = name; }; })); };`,
			`config.m.first = { };`}, "config.m", `{"first":{"n":"first"}}`, ""},
		{"submodule rejects unknown options", []string{`options.m = lib.mkOption { type = lib.types.submodule { options.n = lib.mkOption { type = lib.types.int; default = 0; }; }; };`,
			`config.m.x = 1;`}, "config.m", "", "The option `m.x' does not exist."},
		{"freeform merges recursively", []string{`options.f = lib.mkOption { type = lib.types.submodule { freeformType = json; }; default = { }; };`,
			`config.f.a.b = 1;`, `config.f.a.c = "x";`}, "config.f", `{"a":{"b":1,"c":"x"}}`, ""},
		{"freeform beside typed options", []string{`options.f = lib.mkOption { type = lib.types.submodule { freeformType = json; options.t = lib.mkOption { type = lib.types.int; default = 7; }; }; default = { }; };`,
			`config.f.other = [ 1 ];`, `config.f.other = [ 2 ];`}, "config.f", `{"other":[1,2],"t":7}`, ""},
		{"attrsOf drops mkIf false entries", []string{`options.s = lib.mkOption { type = lib.types.attrsOf lib.types.int; default = { }; };`,
			`config.s = { a = 1; b = lib.mkIf false 2; };`}, "config.s", `{"a":1}`, ""},
		{"imports of one file count once", []string{`imports = [ ` + shared + ` ];`, `imports = [ ` + shared + ` ];`}, "config.s", `1`, ""},
		{"nullOr mixes null and a value", []string{`options.n = lib.mkOption { type = lib.types.nullOr lib.types.int; default = null; };`, `config.n = 3;`}, "config.n", `3`, ""},
		{"enum", []string{`options.e = lib.mkOption { type = lib.types.enum [ "a" "b" ]; };`, `config.e = "c";`}, "config.e", "", "is not of type `one of \"a\", \"b\"'"},
		{"strMatching", []string{`options.p = lib.mkOption { type = lib.types.strMatching "[a-z]+"; };`, `config.p = "A";`}, "config.p", "", "is not of type `string matching the pattern [a-z]+'"},
		{"mkEnableOption", []string{`options.x.enable = lib.mkEnableOption "x";`}, "[ config.x.enable options.x.enable.description options.x.enable.example ]", `[false,"Whether to enable x.",true]`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mods []string
			for _, m := range tc.modules {
				mods = append(mods, "({ lib, ... }: let json = ((import "+root+"/nix/stub/pkgs.nix { inherit lib; }).formats.json { }).type; in { "+m+" })")
			}
			expr := fmt.Sprintf(`let lib = import %s/nix/stub/lib.nix; r = lib.evalModules { modules = [ %s ]; }; config = r.config; options = r.options; unmatched = r.unmatched; in %s`,
				root, strings.Join(mods, " "), tc.expr)
			out, err := nixInstantiate(t, "--eval", "--strict", "--json", "-E", expr)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %s, %v\nwant an error containing %q", out, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(string(out)); got != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}
