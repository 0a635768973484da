package registry_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

func TestPickSubnet(t *testing.T) {
	pool := registry.DefaultPool
	p := func(s string) netip.Prefix { return netip.MustParsePrefix(s) }
	tests := []struct {
		name   string
		used   []string
		prefer string
		want   string
	}{
		{"empty pool gives the first", nil, "", "10.10.0.0/24"},
		{"skips used", []string{"10.10.0.0/24", "10.10.1.0/24"}, "", "10.10.2.0/24"},
		{"prefer free", nil, "10.10.93.0/24", "10.10.93.0/24"},
		{"prefer used falls back", []string{"10.10.93.0/24"}, "10.10.93.0/24", "10.10.0.0/24"},
		{"prefer outside pool ignored", nil, "10.200.0.0/24", "10.10.0.0/24"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			used := map[netip.Prefix]bool{}
			for _, u := range tt.used {
				used[p(u)] = true
			}
			var prefer netip.Prefix
			if tt.prefer != "" {
				prefer = p(tt.prefer)
			}
			got, err := registry.PickSubnet(pool, used, prefer)
			if err != nil || got != p(tt.want) {
				t.Errorf("got %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	small := registry.Pool{Min: netip.MustParseAddr("10.10.0.0"), Max: netip.MustParseAddr("10.10.1.0"), Bits: 24}
	if _, err := registry.PickSubnet(small, map[netip.Prefix]bool{p("10.10.0.0/24"): true, p("10.10.1.0/24"): true}, netip.Prefix{}); err == nil {
		t.Error("exhausted pool gave a subnet")
	}
}

func TestClaimMemberRaceAndStability(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	const n = 12
	got := make([]registry.Member, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := etcdtest.NewClient(t, srv) // separate clients: real concurrency
			got[i], errs[i] = registry.ClaimMember(ctx, c, registry.Member{
				Name: fmt.Sprintf("node%02d", i), PublicKey: pubKey(i),
			}, registry.DefaultPool, "")
		}()
	}
	wg.Wait()
	seen := map[netip.Prefix]string{}
	for i, m := range got {
		if errs[i] != nil {
			t.Fatalf("node%02d: %v", i, errs[i])
		}
		if other, dup := seen[m.Subnet]; dup {
			t.Fatalf("%s and %s both got %v", other, m.Name, m.Subnet)
		}
		seen[m.Subnet] = m.Name
		if m.OverlayIP != m.Subnet.Addr() {
			t.Errorf("%s overlay IP %v, want the subnet's .0", m.Name, m.OverlayIP)
		}
	}
	// A restart (same name, new endpoint) keeps the subnet.
	again, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "node03", PublicKey: pubKey(3), Endpoint: "192.0.2.1:51820"}, registry.DefaultPool, "")
	if err != nil || again.Subnet != got[3].Subnet || again.Endpoint != "192.0.2.1:51820" {
		t.Fatalf("re-claim = %+v, %v; want subnet %v", again, err, got[3].Subnet)
	}
	snap, err := registry.ReadSnapshot(ctx, cli)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Members) != n || len(snap.Subnets) != n {
		t.Errorf("members %d subnets %d, want %d", len(snap.Members), len(snap.Subnets), n)
	}
	// node remove releases the subnet; the next node may take it.
	if _, err := registry.RemoveNode(ctx, cli, "node03"); err != nil {
		t.Fatal(err)
	}
	snap, _ = registry.ReadSnapshot(ctx, cli)
	if _, ok := snap.Subnets[got[3].Subnet]; ok {
		t.Error("subnet claim survived node remove")
	}
}

func TestClaimAdoptsFlannelLease(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	// flannel leases of two nodes, one of them ours (matched by public IP).
	put := func(k, v string) {
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	put("/coreos.com/network/subnets/10.10.93.0-24", `{"PublicIP":"65.108.1.2","BackendType":"wireguard","BackendData":{"PublicKey":"x"}}`)
	put("/coreos.com/network/subnets/10.10.0.0-24", `{"PublicIP":"65.108.1.9","BackendType":"wireguard"}`)
	m, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "worker001", PublicKey: pubKey(1)}, registry.DefaultPool, "65.108.1.2")
	if err != nil {
		t.Fatal(err)
	}
	if m.Subnet != netip.MustParsePrefix("10.10.93.0/24") || m.OverlayIP != netip.MustParseAddr("10.10.93.0") {
		t.Errorf("adopted %v / %v, want flannel's 10.10.93.0/24", m.Subnet, m.OverlayIP)
	}
	// Another new node must not take a subnet a flannel node still holds.
	m2, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "worker002", PublicKey: pubKey(2)}, registry.DefaultPool, "65.108.1.5")
	if err != nil {
		t.Fatal(err)
	}
	if m2.Subnet == netip.MustParsePrefix("10.10.0.0/24") || m2.Subnet == m.Subnet {
		t.Errorf("worker002 got %v, which flannel or worker001 holds", m2.Subnet)
	}
}

func pubKey(i int) string {
	b := []byte("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	s := fmt.Sprintf("%02d", i)
	copy(b[0:], s)
	return string(b)
}

// TestClaimMemberHerd: a fleet booting at once. All 100 simultaneous
// claims succeed, with distinct subnets.
func TestClaimMemberHerd(t *testing.T) {
	srv := etcdtest.New(t)
	got, errs := claimHerd(t, srv, 0, 100)
	seen := map[netip.Prefix]string{}
	for i, m := range got {
		if errs[i] != nil {
			t.Fatalf("herd%03d: %v", i, errs[i])
		}
		if other, dup := seen[m.Subnet]; dup {
			t.Fatalf("%s and %s both got %v", other, m.Name, m.Subnet)
		}
		seen[m.Subnet] = m.Name
	}
}

// BenchmarkClaimHerd is the time for 100 nodes claiming at once (losers
// re-read every claim and pick again).
func BenchmarkClaimHerd(b *testing.B) {
	srv := etcdtest.New(b)
	round := 0
	for b.Loop() {
		_, errs := claimHerd(b, srv, round, 100)
		for _, err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		round++
	}
}

// claimHerd runs n simultaneous ClaimMember calls over ten clients.
func claimHerd(t testing.TB, srv *etcdtest.Server, round, n int) ([]registry.Member, []error) {
	ctx := context.Background()
	clients := make([]*clientv3.Client, 10) // ten connections' worth of contention
	for i := range clients {
		clients[i] = etcdtest.NewClient(t, srv)
	}
	got := make([]registry.Member, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got[i], errs[i] = registry.ClaimMember(ctx, clients[i%len(clients)], registry.Member{
				Name: fmt.Sprintf("h%d-%03d", round, i), PublicKey: pubKey(i),
			}, registry.DefaultPool, "")
		}()
	}
	close(start)
	wg.Wait()
	return got, errs
}
