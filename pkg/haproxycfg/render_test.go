package haproxycfg

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// snapBuilder builds Snapshot values directly, bypassing the registry's
// decoders, so tests can also feed values the decoders would reject.
type snapBuilder struct{ s *registry.Snapshot }

func newSnap() *snapBuilder {
	return &snapBuilder{s: &registry.Snapshot{Revision: 1, Apps: map[registry.AppID]*registry.App{}}}
}

func (b *snapBuilder) app(g registry.Group, name string, port int) *snapBuilder {
	id := registry.AppID{Group: g, Name: name}
	a := b.s.Apps[id]
	if a == nil {
		a = &registry.App{ID: id, Instances: map[string]registry.Instance{}}
		b.s.Apps[id] = a
	}
	if port != 0 {
		a.Meta = &registry.AppMeta{Publish: registry.Publish{Port: port}}
	}
	return b
}

func (b *snapBuilder) inst(g registry.Group, name, node, ip string, port int) *snapBuilder {
	b.app(g, name, 0)
	b.s.Apps[registry.AppID{Group: g, Name: name}].Instances[node] = registry.Instance{IPv4: ip, Node: node, Port: port}
	return b
}

// nixInfraExample is the nix-infra example cluster: frontend pods on
// 11211–11611 and the usual services, on three workers.
func nixInfraExample() *registry.Snapshot {
	b := newSnap()
	fronts := []string{"app-pod", "app-mongodb-pod", "app-keydb-pod", "app-elasticsearch-pod", "app-mariadb-pod"}
	for i, name := range fronts {
		port := 11211 + 100*i
		b.app(registry.GroupFrontends, name, port)
		for w := 1; w <= 2; w++ {
			b.inst(registry.GroupFrontends, name, fmt.Sprintf("worker%03d", w), fmt.Sprintf("10.10.%d.0", 10+w), port)
		}
	}
	services := map[string]int{"mongodb": 27017, "keydb": 6380, "elasticsearch": 9200, "mariadb": 3306}
	for name, port := range services {
		b.app(registry.GroupServices, name, port)
		b.inst(registry.GroupServices, name, "service001", "10.10.21.0", port)
	}
	b.inst(registry.GroupServices, "mongodb", "service002", "10.10.22.0", 27017)
	b.app(registry.GroupBackends, "app-api", 11711)
	b.inst(registry.GroupBackends, "app-api", "worker003", "10.10.13.0", 11711)
	return b.s
}

func baseParams() Params {
	return Params{
		Self:          "worker001",
		Consume:       []registry.Group{registry.GroupBackends, registry.GroupServices},
		StatsSocket:   "/run/meshd/haproxy-stats.sock",
		MasterSocket:  "/run/meshd/haproxy-master.sock",
		ServerSlots:   4,
		HardStopAfter: 30 * time.Second,
		MaxReloads:    3,
	}
}

func TestRenderGolden(t *testing.T) {
	manyInst := newSnap().app(registry.GroupServices, "keydb", 6380)
	for i := 1; i <= 5; i++ {
		manyInst.inst(registry.GroupServices, "keydb", fmt.Sprintf("node%d", i), fmt.Sprintf("10.10.%d.0", i), 6380)
	}
	collide := newSnap().
		app(registry.GroupServices, "alpha", 6000).
		app(registry.GroupBackends, "beta", 6000). // backends < services: beta wins
		app(registry.GroupServices, "gamma", 22).  // reserved
		app(registry.GroupServices, "delta", 9999) // stats socket on TCP
	tests := []struct {
		name     string
		snap     *registry.Snapshot
		params   func(*Params)
		problems []Problem
	}{
		{name: "nixinfra-worker", snap: nixInfraExample()},
		{name: "nixinfra-ingress", snap: nixInfraExample(), params: func(p *Params) {
			p.Self = "ingress001"
			p.Consume = []registry.Group{registry.GroupFrontends}
		}},
		{name: "empty", snap: newSnap().s},
		{name: "no-instances", snap: newSnap().app(registry.GroupServices, "mariadb", 3306).s},
		{name: "meta-missing", snap: newSnap().inst(registry.GroupServices, "mariadb", "w1", "10.10.1.0", 3306).s},
		{name: "slots-grow", snap: manyInst.s},
		{name: "colliding-ports", snap: collide.s, params: func(p *Params) {
			p.ReservedPorts = []int{22}
			p.StatsSocket = "ipv4@127.0.0.1:9999"
		}, problems: []Problem{
			{App: "services/alpha", Reason: "port 6000 already used by backends/beta; not rendered"},
			{App: "services/delta", Reason: "port 9999 collides with stats socket; not rendered"},
			{App: "services/gamma", Reason: "port 22 collides with reserved port; not rendered"},
		}},
		{name: "hostile-names", snap: hostileSnap(), problems: hostileProblems},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := baseParams()
			if tt.params != nil {
				tt.params(&p)
			}
			d := Compute(tt.snap, p)
			if diff := cmp.Diff(tt.problems, d.Problems); diff != "" {
				t.Errorf("problems (-want +got):\n%s", diff)
			}
			got := Render(d)
			if again := Render(Compute(tt.snap, p)); string(again) != string(got) {
				t.Fatal("two renders of the same snapshot differ")
			}
			golden := filepath.Join("testdata", tt.name+".cfg")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update)", err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("render differs from %s (-want +got):\n%s", golden, diff)
			}
			haproxyCheck(t, got)
		})
	}
}

// hostile values that the registry decoders reject, built directly.
func hostileSnap() *registry.Snapshot {
	return newSnap().
		app(registry.GroupServices, "ok", 7000).
		inst(registry.GroupServices, "ok", "good", "10.10.1.0", 7000).
		inst(registry.GroupServices, "ok", "evil\n    bind 0.0.0.0:22", "10.10.2.0", 7000).
		inst(registry.GroupServices, "ok", "badip", "10.10.3.0 check\nlisten x", 7000).
		inst(registry.GroupServices, "ok", "v6", "fe80::1", 7000).
		inst(registry.GroupServices, "ok", "zero", "0.0.0.0", 7000).
		inst(registry.GroupServices, "ok", "port", "10.10.4.0", 70000).
		app(registry.GroupServices, "x y", 7001).
		app(registry.GroupServices, "../etc", 7002).
		app(registry.GroupServices, "bad#comment", 7003).
		app(registry.GroupServices, "big-port", 65536).
		app("services\nglobal", "a", 7004).s
}

var hostileProblems = []Problem{
	{App: "services/../etc", Reason: `app name: invalid name: "../etc" has forbidden character '.' at byte 0`},
	{App: "services/bad#comment", Reason: `app name: invalid name: "bad#comment" has forbidden character '#' at byte 3`},
	{App: "services/big-port", Reason: "publish.port 65536 out of range"},
	{App: "services/ok", Reason: `instance badip: ipv4 "10.10.3.0 check\nlisten x" is not a usable IPv4 address`},
	{App: "services/ok", Reason: `instance node: invalid name: "evil\n    bind 0.0.0.0:22" has forbidden character '\n' at byte 4`},
	{App: "services/ok", Reason: "instance port: port 70000 out of range"},
	{App: "services/ok", Reason: `instance v6: ipv4 "fe80::1" is not a usable IPv4 address`},
	{App: "services/ok", Reason: `instance zero: ipv4 "0.0.0.0" is not a usable IPv4 address`},
	{App: "services/x y", Reason: `app name: invalid name: "x y" has forbidden character ' ' at byte 1`},
}

// TestRenderRejectsHandBuiltHostile feeds Render a Desired that bypassed
// Compute: nothing of the hostile values may reach the file.
func TestRenderRejectsHandBuiltHostile(t *testing.T) {
	d := Desired{
		Self:        "me\nglobal",
		StatsSocket: "/tmp/s.sock level admin\nlisten",
		GlobalExtra: []string{"maxconn 100", "nbthread 2\nlisten evil", "tune\x00x"},
		Listeners: []Listener{
			{App: registry.AppID{Group: registry.GroupServices, Name: "good"}, Port: 7000,
				Slots: []Server{{Node: "n1", Addr: netip.MustParseAddrPort("10.0.0.1:7000")}, {}}},
			{App: registry.AppID{Group: registry.GroupServices, Name: "bad name"}, Port: 7001, Slots: make([]Server, 1)},
			{App: registry.AppID{Group: "evil\ngroup", Name: "x"}, Port: 7002, Slots: make([]Server, 1)},
			{App: registry.AppID{Group: registry.GroupServices, Name: "badnode"}, Port: 7003,
				Slots: []Server{{Node: "n#1", Addr: netip.MustParseAddrPort("10.0.0.1:7000")}}},
			{App: registry.AppID{Group: registry.GroupServices, Name: "v6"}, Port: 7004,
				Slots: []Server{{Node: "n1", Addr: netip.MustParseAddrPort("[::1]:7000")}}},
			{App: registry.AppID{Group: registry.GroupServices, Name: "noslot"}, Port: 7005},
			{App: registry.AppID{Group: registry.GroupServices, Name: "port"}, Port: 0, Slots: make([]Server, 1)},
		},
	}
	out := string(Render(d))
	for _, bad := range []string{"evil", "bad name", "badnode", "n#1", "listen evil", "\nlisten", "level admin\n", "me\n", "::1", "noslot", "be_services_port", "nbthread", "tune"} {
		if strings.Contains(out, bad) {
			t.Errorf("rendered config contains %q:\n%s", bad, out)
		}
	}
	for _, good := range []string{"be_services_good", "server s1 10.0.0.1:7000 check # n1", "maxconn 100"} {
		if !strings.Contains(out, good) {
			t.Errorf("rendered config lacks %q:\n%s", good, out)
		}
	}
	haproxyCheck(t, []byte(out))
}

func TestComputeIgnoresUnconsumedGroups(t *testing.T) {
	p := baseParams()
	p.Consume = []registry.Group{registry.GroupFrontends}
	d := Compute(nixInfraExample(), p)
	for _, l := range d.Listeners {
		if l.App.Group != registry.GroupFrontends {
			t.Errorf("listener for unconsumed %v", l.App)
		}
	}
	if len(d.Listeners) != 5 {
		t.Errorf("got %d listeners, want the 5 frontends", len(d.Listeners))
	}
}

func TestHashIgnoresSlotPlacement(t *testing.T) {
	d := Compute(nixInfraExample(), baseParams())
	moved := Desired(d)
	moved.Listeners = append([]Listener(nil), d.Listeners...)
	l := moved.Listeners[0]
	l.Slots = append([]Server(nil), l.Slots...)
	l.Slots[0], l.Slots[3] = l.Slots[3], l.Slots[0]
	moved.Listeners[0] = l
	if Hash(moved) != Hash(d) {
		t.Error("moving an instance to another slot changed the hash")
	}
	if StructureHash(moved) != StructureHash(d) {
		t.Error("moving an instance changed the structure hash")
	}
	snap := nixInfraExample()
	snap.Apps[registry.AppID{Group: registry.GroupServices, Name: "keydb"}].Instances["service003"] =
		registry.Instance{IPv4: "10.10.23.0", Node: "service003", Port: 6380}
	more := Compute(snap, baseParams())
	if Hash(more) == Hash(d) {
		t.Error("adding an instance did not change the hash")
	}
	if StructureHash(more) != StructureHash(d) {
		t.Error("adding an instance within the slots changed the structure hash")
	}
	snap.Apps[registry.AppID{Group: registry.GroupServices, Name: "redis"}] = &registry.App{
		ID: registry.AppID{Group: registry.GroupServices, Name: "redis"}, Meta: &registry.AppMeta{Publish: registry.Publish{Port: 6379}}}
	if StructureHash(Compute(snap, baseParams())) == StructureHash(d) {
		t.Error("adding an app did not change the structure hash")
	}
}

// haproxyCheck runs `haproxy -c` on cfg when haproxy is installed.
func haproxyCheck(t *testing.T, cfg []byte) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Log("haproxy not installed: skipping haproxy -c")
		return
	}
	f := filepath.Join(t.TempDir(), "check.cfg")
	if err := os.WriteFile(f, cfg, 0o644); err != nil {
		t.Fatal(err)
	}
	a := &Applier{Binary: bin}
	if err := a.validate(t.Context(), f); err != nil {
		t.Errorf("haproxy -c rejects the rendered config: %v\n%s", err, cfg)
	}
}
