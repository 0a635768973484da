package main

import (
	"debug/elf"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// allCommands walks meshctl's tree: every command's path below meshctl.
func allCommands(c *cobra.Command, path []string, out *[][]string) {
	for _, sc := range c.Commands() {
		if !sc.IsAvailableCommand() && sc.Name() != "help" {
			continue
		}
		p := append(append([]string{}, path...), sc.Name())
		*out = append(*out, p)
		allCommands(sc, p, out)
	}
}

func TestHelpAtEveryLevel(t *testing.T) {
	var paths [][]string
	allCommands(newRoot(&env{Getenv: func(string) string { return "" }}), nil, &paths)
	if len(paths) < 25 {
		t.Fatalf("found only %d commands: %v", len(paths), paths)
	}
	paths = append(paths, nil) // meshctl itself
	for _, p := range paths {
		ours := len(p) == 0 || (p[0] != "completion" && p[0] != "help")
		for _, args := range [][]string{append(append([]string{}, p...), "--help"), append([]string{"help"}, p...)} {
			code, out, errs := ctlRun(t, "", args...)
			if code != exitOK || errs != "" {
				t.Errorf("meshctl %v: exit %d, stderr %q", args, code, errs)
				continue
			}
			if !strings.Contains(out, "Usage:") || !strings.Contains(out, "meshctl "+strings.Join(p, " ")) {
				t.Errorf("meshctl %v: no usage line:\n%s", args, out)
			}
			if ours && (!strings.Contains(out, "Examples:\n  meshctl ") || !strings.Contains(out, "Flags:")) {
				t.Errorf("meshctl %v: help without an example or flags:\n%s", args, out)
			}
		}
	}
	// A command's help shows its arguments and its own flags.
	_, out, _ := ctlRun(t, "", "help", "node", "remove")
	for _, want := range []string{"meshctl node remove NAME [flags]", "--force", "--wait", "--endpoints", "Aliases:\n  remove, rm"} {
		if !strings.Contains(out, want) {
			t.Errorf("node remove --help lacks %q:\n%s", want, out)
		}
	}
}

func TestUnknownCommandOrFlagIsUsageErrorWithHint(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"stauts"}, []string{`unknown command "stauts"`, "Did you mean this?\n\tstatus", "See 'meshctl --help'"}},
		{[]string{"node", "lst"}, []string{`unknown command "lst" for "meshctl node"`, "\tlist", "See 'meshctl node --help'"}},
		{[]string{"etcd", "roles", "aply"}, []string{"\tapply", "See 'meshctl etcd roles --help'"}},
		{[]string{"--bogus"}, []string{"unknown flag: --bogus", "See 'meshctl --help'"}},
		{[]string{"status", "--bogus"}, []string{"unknown flag: --bogus", "See 'meshctl status --help'"}},
		{[]string{"node", "remove", "-x", "w1"}, []string{"unknown shorthand flag: 'x'", "See 'meshctl node remove --help'"}},
		{[]string{"status", "-o", "xml"}, []string{`--output "xml": want table, wide, json or yaml`, "See 'meshctl status --help'"}},
		{[]string{"node"}, []string{"missing command: want groups, list, remove"}},
		{nil, []string{"missing command"}},
	} {
		code, out, errs := ctlRun(t, "http://127.0.0.1:1", tc.args...)
		if code != exitUsage || out != "" {
			t.Errorf("meshctl %v: exit %d (want %d), stdout %q", tc.args, code, exitUsage, out)
		}
		for _, w := range tc.want {
			if !strings.Contains(errs, w) {
				t.Errorf("meshctl %v: stderr lacks %q:\n%s", tc.args, w, errs)
			}
		}
	}
}

func TestCompletionScripts(t *testing.T) {
	for sh, want := range map[string]string{"bash": "__start_meshctl", "zsh": "#compdef meshctl", "fish": "complete -c meshctl"} {
		code, out, errs := ctlRun(t, "", "completion", sh)
		if code != exitOK || !strings.Contains(out, want) {
			t.Errorf("completion %s: exit %d, stderr %q, script lacks %q", sh, code, errs, want)
		}
	}
	// The scripts ask meshctl itself; it knows each command's flags and the
	// values of -o.
	_, out, _ := ctlRun(t, "", "__complete", "node", "remove", "--")
	if !strings.Contains(out, "--force") || !strings.Contains(out, "--wait") {
		t.Errorf("flag completion of node remove:\n%s", out)
	}
	_, out, _ = ctlRun(t, "", "__complete", "status", "-o", "")
	for _, f := range outputFormats {
		if !strings.Contains(out, f+"\n") {
			t.Errorf("completion of -o lacks %s:\n%s", f, out)
		}
	}
}

func TestGlobalFlagsAnywhereAndOutputFormats(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	st, _ := json.Marshal(registry.Status{Node: "worker001", Revision: 1, Seen: 1, UpdatedAt: time.Now(), Version: "1.4.2"})
	// A live node: its entry and status on its lease (status exits 1 for
	// a node without a leased entry).
	lease, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, registry.NodeKey("worker001"), `{"name":"worker001","ipv4":"","services":[]}`, clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, registry.StatusKey("worker001"), string(st), clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	ep := srv.Endpoint()
	// No MESHCTL_ENDPOINTS: the flag after the command is what reaches etcd.
	code, out, errs := ctlRun(t, "", "status", "--endpoints", ep, "-o", "yaml")
	if code != exitOK {
		t.Fatalf("status --endpoints after the command: exit %d: %s", code, errs)
	}
	var so statusOut
	if err := yaml.Unmarshal([]byte(out), &so); err != nil || len(so.Nodes) != 1 || so.Nodes[0].Node != "worker001" || so.Nodes[0].Version != "1.4.2" {
		t.Errorf("status -o yaml: %v %+v\n%s", err, so, out)
	}
	code, out, errs = ctlRun(t, "", "status", "-o", "wide", "--endpoints="+ep, "--command-timeout", "10s")
	if code != exitOK || !strings.Contains(out, "VERSION") || !strings.Contains(out, "1.4.2") {
		t.Errorf("status -o wide: exit %d, stderr %q:\n%s", code, errs, out)
	}
	code, out, _ = ctlRun(t, "", "status", "--endpoints", ep)
	if code != exitOK || strings.Contains(out, "VERSION") {
		t.Errorf("status (table) shows the wide columns:\n%s", out)
	}
	code, out, errs = ctlRun(t, "", "node", "list", "-o", "wide", "--endpoints", ep)
	if code != exitOK || !strings.Contains(out, "PUBLIC KEY") {
		t.Errorf("node list -o wide: exit %d, stderr %q:\n%s", code, errs, out)
	}
	code, out, errs = ctlRun(t, "", "app", "list", "--endpoints", ep, "-o", "yaml")
	if code != exitOK || strings.TrimSpace(out) != "[]" {
		t.Errorf("app list -o yaml on an empty registry: exit %d, stderr %q: %q", code, errs, out)
	}

	// meshctl version: its own version, then the cluster's.
	code, out, errs = ctlRun(t, ep, "version")
	if code != exitOK || !strings.Contains(out, "meshctl "+version) || !strings.Contains(out, "worker001") || !strings.Contains(out, "1.4.2") {
		t.Errorf("version: exit %d, stderr %q:\n%s", code, errs, out)
	}
	code, out, _ = ctlRun(t, ep, "version", "-o", "json")
	var vo versionOut
	if err := json.Unmarshal([]byte(out), &vo); err != nil || code != exitOK || vo.Client.Version != version ||
		len(vo.Nodes) != 1 || vo.Nodes[0] != (nodeVersion{Node: "worker001", Version: "1.4.2"}) {
		t.Errorf("version -o json: exit %d, %v %+v", code, err, vo)
	}
}

func TestVersionWithoutEtcd(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version", "--client"}} {
		code, out, errs := ctlRun(t, "http://127.0.0.1:1", args...)
		if code != exitOK || !strings.HasPrefix(out, "meshctl "+version) || errs != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
	b := buildInfo{Version: "v1.2.0", Revision: "0123456789abcdef0123", Modified: true, GoVersion: "go1.26.8"}
	if got, want := b.String(), "v1.2.0 (0123456789ab, modified) go1.26.8"; got != want {
		t.Errorf("buildInfo.String() = %q, want %q", got, want)
	}
}

// closedEndpoint is a loopback address nothing listens on.
func closedEndpoint(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr
}

// With etcd unreachable a command gives up after the default 5 s request
// timeout and names the endpoint and what to check; version still prints
// meshctl's own.
func TestUnreachableEtcdNamesEndpoint(t *testing.T) {
	ep := closedEndpoint(t)
	start := time.Now()
	code, _, errs := ctlRun(t, ep, "status")
	took := time.Since(start)
	if code != exitFailed {
		t.Errorf("status: exit %d, want %d", code, exitFailed)
	}
	want := "etcd at " + ep + " did not answer within 5s: is etcd running, are --endpoints and --cacert/--cert/--key right?"
	if !strings.Contains(errs, want) {
		t.Errorf("status stderr %q lacks %q", errs, want)
	}
	if took < 4*time.Second || took > 30*time.Second {
		t.Errorf("status gave up after %v, want about 5s", took)
	}
	code, out, errs := ctlRun(t, "", "version", "--endpoints", ep, "--command-timeout", "500ms")
	if code != exitFailed || !strings.HasPrefix(out, "meshctl "+version) || !strings.Contains(errs, "cluster unreachable") || !strings.Contains(errs, ep) {
		t.Errorf("version with etcd down: exit %d, stdout %q, stderr %q", code, out, errs)
	}
}

// meshctl does not link package testing: no package of this module on its
// import graph imports it, and it does not embed the test helpers.
// hcloud-go v2.52.0 (pinned, see go.mod) imports it from hcloud/testing.go,
// an upstream non-test file; that is the one importer tolerated.
func TestMeshctlDoesNotLinkTesting(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command:", err)
	}
	out, err := exec.Command(gobin, "list", "-deps", "-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	tolerated := map[string]bool{"github.com/hetznercloud/hcloud-go/v2/hcloud": true}
	var pkgs int
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		pkgs++
		if f[0] == "github.com/meshd/meshd/pkg/etcdtest" {
			t.Errorf("meshctl links pkg/etcdtest (test helpers)")
		}
		for _, imp := range f[1:] {
			if imp == "testing" && !tolerated[f[0]] {
				t.Errorf("%s imports testing and is linked into meshctl", f[0])
			}
		}
	}
	if pkgs < 50 {
		t.Fatalf("go list found only %d packages:\n%s", pkgs, out)
	}

	// hcloud-go ships hcloud/testing.go, an ordinary file of package
	// hcloud that imports testing for a test helper meshctl never calls.
	// The linker drops what nothing reaches: the binary must hold no
	// function of package testing but its initializer.
	bin := filepath.Join(t.TempDir(), "meshctl")
	if out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	var funcs int
	for _, s := range syms {
		if elf.ST_TYPE(s.Info) != elf.STT_FUNC {
			continue
		}
		funcs++
		if strings.HasPrefix(s.Name, "testing.") && s.Name != "testing.init" {
			t.Errorf("meshctl's binary holds %s", s.Name)
		}
	}
	if funcs < 1000 {
		t.Fatalf("only %d function symbols in %s: is the symbol table stripped?", funcs, bin)
	}
}
