package hetzner_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
)

func TestFreeSubnet(t *testing.T) {
	pp := netip.MustParsePrefix
	for _, tt := range []struct {
		name  string
		want  string
		taken []netip.Prefix
		got   string
		ok    bool
	}{
		{"wanted is free", "172.20.1.0/24", nil, "172.20.1.0/24", true},
		{"wanted is taken: first free", "172.20.1.0/24", []netip.Prefix{pp("172.20.1.0/24")}, "172.20.0.0/24", true},
		{"skips every taken one", "172.20.0.0/24", []netip.Prefix{pp("172.20.0.0/23"), pp("172.20.2.0/24")}, "172.20.3.0/24", true},
		{"a larger subnet overlapping counts", "172.20.5.0/24", []netip.Prefix{pp("172.20.4.0/22")}, "172.20.0.0/24", true},
		{"full", "172.20.0.0/17", []netip.Prefix{pp("172.20.0.0/17"), pp("172.20.128.0/17")}, "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := hetzner.FreeSubnet(pp("172.20.0.0/16"), pp(tt.want), tt.taken)
			if ok != tt.ok || (ok && got.String() != tt.got) {
				t.Errorf("FreeSubnet = %s, %v; want %s, %v", got, ok, tt.got, tt.ok)
			}
		})
	}
}

func TestProvisionSecondZoneGetsItsOwnSubnet(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "eu1")
	opts.PlacementGroup = ""
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	// The same command in a location of another network zone: the
	// network gets a subnet there that does not overlap the first one
	// (the fake, like the API, rejects an overlapping one).
	opts.Names, opts.Location = []string{"us1"}, "ash"
	res, err := p.Provision(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	nw, _ := f.Network("prod-net")
	got := map[string]string{}
	for _, s := range nw.Subnets {
		got[s.NetworkZone] = s.IPRange
	}
	if diff := cmp.Diff(map[string]string{"eu-central": "172.20.1.0/24", "us-east": "172.20.0.0/24"}, got); diff != "" {
		t.Errorf("subnets by zone (-want +got):\n%s", diff)
	}
	if a, err := netip.ParseAddr(res[0].PrivateIP); err != nil || !netip.MustParsePrefix("172.20.0.0/24").Contains(a) {
		t.Errorf("us1's private IP %q is not in its zone's subnet", res[0].PrivateIP)
	}
	// A third run in the first zone adds nothing.
	opts.Names, opts.Location = []string{"eu2"}, "fsn1"
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.Network("prod-net"); len(n.Subnets) != 2 {
		t.Errorf("subnets after a third run: %+v", n.Subnets)
	}
}

func TestProvisionAppliesTheFirewallByLabelSelector(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	// A firewall from an earlier meshctl, attached to nothing through a
	// selector.
	fwID := f.AddFirewall("prod-meshd", map[string]string{hetzner.LabelCluster: "prod"})
	opts := baseOptions(t, "node1")
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	if n := len(f.RequestsTo("POST", "/firewalls/"+itoa(fwID)+"/actions/apply_to_resources")); n != 1 {
		t.Fatalf("apply_to_resources requests = %d, want 1", n)
	}
	fw, _ := f.Firewall("prod-meshd")
	if len(fw.AppliedTo) != 1 || fw.AppliedTo[0].Type != "label_selector" || fw.AppliedTo[0].LabelSelector.Selector != "meshd/cluster=prod" {
		t.Fatalf("applied to %+v", fw.AppliedTo)
	}
	// A server added later by hand with the cluster's label is covered
	// without any meshctl run; one of another cluster is not.
	f.AddServer("by-hand", map[string]string{hetzner.LabelCluster: "prod"})
	f.AddServer("other", map[string]string{hetzner.LabelCluster: "staging"})
	for name, want := range map[string]int{"node1": 1, "by-hand": 1, "other": 0} {
		if s, _ := f.ServerByName(name); len(s.PublicNet.Firewalls) != want {
			t.Errorf("%s has firewalls %+v, want %d", name, s.PublicNet.Firewalls, want)
		}
	}
	// A re-run does not apply it again.
	opts.Names = []string{"node2"}
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	if n := len(f.RequestsTo("POST", "/firewalls/"+itoa(fwID)+"/actions/apply_to_resources")); n != 1 {
		t.Errorf("apply_to_resources requests = %d after a re-run, want still 1", n)
	}
}
