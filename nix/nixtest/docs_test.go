package nixtest

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the generated sections of docs/nixos.md")

// Every option of the module, submodule options included, has a
// description and an example.
func TestEveryOptionDocumented(t *testing.T) {
	r := evalExample(t, "worker")
	if len(r.Options) < 40 {
		t.Fatalf("only %d options found: the options walk is broken", len(r.Options))
	}
	seen := map[string]bool{}
	for _, o := range r.Options {
		if seen[o.Name] {
			t.Errorf("option %s listed twice", o.Name)
		}
		seen[o.Name] = true
		if o.Description == nil || strings.TrimSpace(*o.Description) == "" {
			t.Errorf("option %s has no description", o.Name)
		}
		if o.Example == nil || strings.TrimSpace(*o.Example) == "" {
			t.Errorf("option %s has no example", o.Name)
		}
	}
	for _, name := range []string{"services.meshd.enable", "services.meshd.package", "services.meshd.nodeName",
		"services.meshd.openFirewall", "services.meshd.etcd.keyFile", "services.meshd.instances.<name>.port",
		"services.meshd.secrets.<name>.action", "services.meshd.settings.etcd.endpoints",
		"services.meshd.settings.instances.*.check.unit", "services.meshd.settings.overlay.listenPort",
		"services.meshd.settings.leaseTTL", "services.meshd.settings.consume"} {
		if !seen[name] {
			t.Errorf("option %s missing from the walk", name)
		}
	}
}

// docs/nixos.md carries the option reference and the example
// configurations; both are generated from the module and nix/examples, so
// the documentation shows exactly what the tests evaluate.
// `go test ./nix/nixtest -run TestDocs -update` rewrites them.
func TestDocsUpToDate(t *testing.T) {
	root := repoRoot(t)
	docPath := filepath.Join(root, "docs", "nixos.md")
	doc, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	r := evalExample(t, "worker")
	sections := map[string]string{"options": optionsMarkdown(r.Options)}
	for _, name := range []string{"worker", "ingress", "service", "monitoring", "app-pod"} {
		b, err := os.ReadFile(filepath.Join(root, "nix", "examples", name+".nix"))
		if err != nil {
			t.Fatal(err)
		}
		sections["example "+name] = "```nix\n" + string(b) + "```\n"
	}
	got := string(doc)
	for name, body := range sections {
		re := regexp.MustCompile(`(?s)(<!-- BEGIN GENERATED ` + regexp.QuoteMeta(name) + ` -->\n)(.*?)(<!-- END GENERATED ` + regexp.QuoteMeta(name) + ` -->)`)
		m := re.FindStringSubmatch(got)
		if m == nil {
			t.Errorf("docs/nixos.md has no generated section %q", name)
			continue
		}
		if m[2] != body {
			if !*update {
				t.Errorf("docs/nixos.md section %q is out of date: run go test ./nix/nixtest -run TestDocsUpToDate -update", name)
			}
			got = re.ReplaceAllLiteralString(got, m[1]+body+m[3])
		}
	}
	if *update && got != string(doc) {
		if err := os.WriteFile(docPath, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// optionsMarkdown renders the option reference.
func optionsMarkdown(opts []optionDoc) string {
	var b strings.Builder
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
	code := func(s string) string {
		s = strings.TrimSpace(s)
		if strings.Contains(s, "\n") {
			return "\n\n  ```nix\n  " + strings.ReplaceAll(s, "\n", "\n  ") + "\n  ```"
		}
		return "`` " + s + " ``"
	}
	for _, o := range opts {
		fmt.Fprintf(&b, "### `%s`\n\n%s\n\n", o.Name, str(o.Description))
		fmt.Fprintf(&b, "- Type: %s\n", o.Type)
		if o.Default != nil {
			fmt.Fprintf(&b, "- Default: %s\n", code(*o.Default))
		} else {
			b.WriteString("- Default: none (must be set)\n")
		}
		fmt.Fprintf(&b, "- Example: %s\n\n", code(str(o.Example)))
	}
	return b.String()
}
