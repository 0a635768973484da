package haproxycfg

import (
	"regexp"
	"strings"
	"testing"

	"github.com/meshd/meshd/pkg/registry"
)

// lineShapes is every line Render may produce. A fuzzed snapshot must
// never produce anything else.
var lineShapes = regexp.MustCompile(`^(` + strings.Join([]string{
	`# Rendered by meshd( for node [A-Za-z0-9][A-Za-z0-9._-]*)?\. Do not edit: meshd rewrites this file\.`,
	`# structure [0-9a-f]{16}`,
	``, `global`, `defaults`,
	`    master-worker`,
	`    stats socket (/[A-Za-z0-9/._-]+|unix@/[A-Za-z0-9/._-]+|ipv4@[0-9.]+:[0-9]+) mode 660 level admin expose-fd listeners`,
	`    hard-stop-after [0-9]+m?s`,
	`    mworker-max-reloads [0-9]+`,
	`    mode tcp`, `    timeout (connect 5s|client 50s|server 50s)`, `    retries 3`, `    option redispatch 1`, `    default-server inter 2s fastinter 500ms downinter 500ms rise 2 fall 3`,
	`# (frontends|backends|services)/[A-Za-z0-9][A-Za-z0-9._-]* \(nix-infra: listener tcp-in-[a-z]+-[A-Za-z0-9._-]+, backend [A-Za-z0-9._-]+\)`,
	`frontend fe_[a-z]+_[A-Za-z0-9._-]+`,
	`    bind 127\.0\.0\.1:[0-9]{1,5}`,
	`    default_backend be_[a-z]+_[A-Za-z0-9._-]+`,
	`backend be_[a-z]+_[A-Za-z0-9._-]+`,
	`    balance roundrobin`,
	`    server s[0-9]+ 0\.0\.0\.0:0 check disabled`,
	`    server s[0-9]+ [0-9]{1,3}(\.[0-9]{1,3}){3}:[0-9]{1,5} check # [A-Za-z0-9][A-Za-z0-9._-]*`,
}, "|") + `)$`)

// FuzzRender builds snapshots from fuzzed names, addresses and ports
// (bypassing the registry decoders) and checks that whatever is rendered
// has only known line shapes and, with haproxy installed, passes
// haproxy -c. Anything else must be rejected by Compute.
func FuzzRender(f *testing.F) {
	f.Add("services", "mongodb", 27017, "worker001", "10.10.1.0", 27017, "/run/s.sock")
	f.Add("services", "x\ny", 1, "w", "1.2.3.4", 1, "/s")
	f.Add("backends", "a", 65535, "n#", "10.0.0.1 backup", 0, "ipv4@127.0.0.1:65535")
	f.Add("frontends", "app-pod", 11211, "ingress001", "0.0.0.0", 11211, "/run/a b")
	f.Add("services", "dup", 6380, "w2", "10.10.2.0", 6380, "")
	f.Fuzz(func(t *testing.T, group, app string, port int, node, ip string, instPort int, stats string) {
		b := newSnap().app(registry.Group(group), app, port).inst(registry.Group(group), app, node, ip, instPort)
		b.app(registry.GroupServices, "dup", 6380).inst(registry.GroupServices, "dup", "w1", "10.10.1.0", 6380)
		p := baseParams()
		p.Consume = registry.Groups
		p.StatsSocket = stats
		d := Compute(b.s, p)
		out := Render(d)
		for i, line := range strings.Split(strings.TrimSuffix(string(out), "\n"), "\n") {
			if !lineShapes.MatchString(line) {
				t.Fatalf("line %d has an unknown shape: %q\n%s", i+1, line, out)
			}
		}
		haproxyCheck(t, out)
	})
}
