package hetzner_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hetznercloud/hcloud-go/v2/hcloud"

	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
	"github.com/meshd/meshd/pkg/registry"
)

func server(id int64, name, cluster string) *hcloud.Server {
	return &hcloud.Server{ID: id, Name: name, Status: hcloud.ServerStatusRunning,
		Labels:    map[string]string{hetzner.LabelCluster: cluster, hetzner.LabelRole: "worker"},
		PublicNet: hcloud.ServerPublicNet{IPv4: hcloud.ServerPublicNetIPv4{IP: net.ParseIP("203.0.113.1")}}}
}

func snapshot() *registry.Snapshot {
	return &registry.Snapshot{
		Nodes: map[string]registry.Node{"a": {Name: "a"}, "ghost": {Name: "ghost"}},
		Members: map[string]registry.Member{
			"a": {Name: "a", Subnet: netip.MustParsePrefix("10.10.1.0/24"), OverlayIP: netip.MustParseAddr("10.10.1.0")},
			"b": {Name: "b", Subnet: netip.MustParsePrefix("10.10.2.0/24"), OverlayIP: netip.MustParseAddr("10.10.2.0")},
		},
		Subnets:  map[netip.Prefix]string{netip.MustParsePrefix("10.10.9.0/24"): "lease-only"},
		Statuses: map[string]registry.Status{"a": {Node: "a", Revision: 42}},
		Apps:     map[registry.AppID]*registry.App{},
	}
}

func TestInventory(t *testing.T) {
	rows := hetzner.Inventory([]*hcloud.Server{server(1, "a", "prod"), server(2, "b", "prod"), server(3, "c", "prod")}, snapshot())
	got := map[string]string{}
	for _, r := range rows {
		got[r.Name] = r.State
	}
	want := map[string]string{"a": "joined", "b": "down", "c": "never joined", "ghost": "no server"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
	if rows[0].Name != "a" || rows[0].Applied != 42 || rows[0].OverlayIP != "10.10.1.0" || rows[0].IPv4 != "203.0.113.1" {
		t.Errorf("row a = %+v", rows[0])
	}
	if got := hetzner.Inventory(nil, nil); len(got) != 0 {
		t.Errorf("empty inventory = %+v", got)
	}
	// Without the registry every server's state is unknown, not "never
	// joined".
	for _, r := range hetzner.Inventory([]*hcloud.Server{server(1, "a", "prod")}, nil) {
		if r.State != hetzner.StateUnknown || r.ServerID != 1 {
			t.Errorf("row without registry = %+v", r)
		}
	}
}

func TestPlanDestroy(t *testing.T) {
	servers := []*hcloud.Server{server(1, "a", "prod"), server(2, "x", "staging")}
	plan, err := hetzner.PlanDestroy("prod", []string{"a", "ghost", "lease-only", "a"}, servers, snapshot())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"a", "ghost", "lease-only"}, plan.Names()); diff != "" {
		t.Errorf("plan (-want +got):\n%s", diff)
	}
	if len(plan.Servers) != 1 || plan.Servers[0].ID != 1 {
		t.Errorf("servers to delete: %+v", plan.Servers)
	}
	// A server of another cluster, or an unknown name, refuses everything.
	for _, names := range [][]string{{"a", "x"}, {"a", "typo"}} {
		_, err := hetzner.PlanDestroy("prod", names, servers, snapshot())
		if !errors.Is(err, hetzner.ErrNotInCluster) || !strings.Contains(err.Error(), names[1]) {
			t.Errorf("%v: error %v", names, err)
		}
	}
}

type removed struct{ names []string }

func (r *removed) RemoveNode(_ context.Context, n string) (int64, error) {
	r.names = append(r.names, n)
	return 3, nil
}

func TestDestroyKeepsKeysOfServersThatSurvive(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	labels := map[string]string{hetzner.LabelCluster: "prod"}
	f.AddServer("a", labels)
	f.AddServer("b", labels)
	f.Inject(hcloudfake.Fault{Method: "DELETE", Path: "/servers/" + itoa(mustServer(t, f, "b").ID),
		Status: 423, Code: "locked", Message: "server is locked", Times: -1})
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	servers, err := p.ListServers(context.Background(), "prod")
	if err != nil {
		t.Fatal(err)
	}
	plan, err := hetzner.PlanDestroy("prod", []string{"a", "b", "ghost"}, servers, snapshot())
	if err != nil {
		t.Fatal(err)
	}
	var reg removed
	res, err := p.Destroy(context.Background(), plan, &reg, 2)
	if err == nil || !strings.Contains(err.Error(), "server b") || !strings.Contains(err.Error(), "server is locked (locked)") {
		t.Fatalf("error = %v", err)
	}
	slices.Sort(reg.names)
	if diff := cmp.Diff([]string{"a", "ghost"}, reg.names); diff != "" {
		t.Errorf("registry removals (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"b"}, f.ServerNames()); diff != "" {
		t.Errorf("servers left (-want +got):\n%s", diff)
	}
	outcomes := map[string]hetzner.Outcome{}
	for _, r := range res {
		outcomes[r.Name] = r.Outcome
	}
	if diff := cmp.Diff(map[string]hetzner.Outcome{"a": "deleted", "b": "failed", "ghost": "deleted"}, outcomes); diff != "" {
		t.Errorf("outcomes (-want +got):\n%s", diff)
	}
}

func mustServer(t *testing.T, f *hcloudfake.Server, name string) hcloud.Server {
	t.Helper()
	s, ok := f.ServerByName(name)
	if !ok {
		t.Fatalf("no server %s", name)
	}
	return hcloud.Server{ID: s.ID, Name: s.Name}
}

func TestDestroyWithoutRegistryDeletesServersAndListsTheKeysLeft(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	labels := map[string]string{hetzner.LabelCluster: "prod"}
	f.AddServer("a", labels)
	f.AddServer("b", labels)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	servers, err := p.ListServers(context.Background(), "prod")
	if err != nil {
		t.Fatal(err)
	}
	// The registry cannot be read: a name without a server is refused,
	// saying why.
	if _, err := hetzner.PlanDestroy("prod", []string{"a", "ghost"}, servers, nil); !errors.Is(err, hetzner.ErrNotInCluster) ||
		!strings.Contains(err.Error(), "the registry could not be read") {
		t.Errorf("plan with an unknown name: %v", err)
	}
	plan, err := hetzner.PlanDestroy("prod", []string{"a"}, servers, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := p.Destroy(context.Background(), plan, nil, 2)
	if !errors.Is(err, hetzner.ErrKeysLeft) || !strings.Contains(err.Error(), "meshctl destroy a") {
		t.Fatalf("error = %v, want ErrKeysLeft naming the command", err)
	}
	if diff := cmp.Diff([]string{"b"}, f.ServerNames()); diff != "" {
		t.Errorf("servers left (-want +got):\n%s", diff)
	}
	if len(res) != 1 || res[0].Outcome != hetzner.OutcomeDeleted || !res[0].ServerDeleted ||
		!slices.Contains(res[0].KeysLeft, "/cluster/nodes/a") || res[0].RemoveLater != "meshctl destroy a" {
		t.Errorf("result %+v", res)
	}
}
