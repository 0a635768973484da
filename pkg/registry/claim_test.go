package registry_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
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
				Name: fmt.Sprintf("node%02d", i), PublicKey: registry.FakePublicKey(i),
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
	again, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "node03", PublicKey: registry.FakePublicKey(3), Endpoint: "192.0.2.1:51820"}, registry.DefaultPool, "")
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
	m, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "worker001", PublicKey: registry.FakePublicKey(1)}, registry.DefaultPool, "65.108.1.2")
	if err != nil {
		t.Fatal(err)
	}
	if m.Subnet != netip.MustParsePrefix("10.10.93.0/24") || m.OverlayIP != netip.MustParseAddr("10.10.93.0") {
		t.Errorf("adopted %v / %v, want flannel's 10.10.93.0/24", m.Subnet, m.OverlayIP)
	}
	// Another new node must not take a subnet a flannel node still holds.
	m2, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "worker002", PublicKey: registry.FakePublicKey(2)}, registry.DefaultPool, "65.108.1.5")
	if err != nil {
		t.Fatal(err)
	}
	if m2.Subnet == netip.MustParsePrefix("10.10.0.0/24") || m2.Subnet == m.Subnet {
		t.Errorf("worker002 got %v, which flannel or worker001 holds", m2.Subnet)
	}
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
				Name: fmt.Sprintf("h%d-%03d", round, i), PublicKey: registry.FakePublicKey(i),
			}, registry.DefaultPool, "")
		}()
	}
	close(start)
	wg.Wait()
	return got, errs
}

// TestClaimWritesEntryInItsTransaction: the entry (the node entry, in
// meshd) is written in the claim's transaction, so peers see the member
// record and the entry at one revision; a restart that changes nothing
// writes nothing; a changed endpoint rewrites both, again at one revision;
// an entry changed between the claim's read and its write makes the claim
// read again rather than overwrite it; and an entry the claim may not take
// stops it before anything is written.
func TestClaimWritesEntryInItsTransaction(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	g, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	const key = "/cluster/nodes/n1"
	var interfere func() // run once inside May, after the claim's read
	var reads int        // claim attempts that read the entry
	entry := &registry.ClaimEntry{
		Key: key, Lease: g.ID,
		Value: func(m registry.Member) []byte { return []byte("entry " + m.OverlayIP.String() + " " + m.Endpoint) },
		May: func(ctx context.Context, cur *mvccpb.KeyValue) error {
			reads++
			if f := interfere; f != nil {
				interfere = nil
				f()
			}
			return nil
		},
	}
	want := registry.Member{Name: "n1", PublicKey: registry.FakePublicKey(1), Endpoint: "192.0.2.1:51820"}
	revs := func() (member, entry, claim int64) {
		t.Helper()
		m, err1 := cli.Get(ctx, registry.MemberKey("n1"))
		e, err2 := cli.Get(ctx, key)
		c, err3 := cli.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix())
		if err := errors.Join(err1, err2, err3); err != nil || len(m.Kvs) != 1 || len(e.Kvs) != 1 || len(c.Kvs) != 1 {
			t.Fatalf("after the claim: member %v, entry %v, claims %v (%v)", m.Kvs, e.Kvs, c.Kvs, err)
		}
		if e.Kvs[0].Lease != int64(g.ID) {
			t.Errorf("entry on lease %x, want %x", e.Kvs[0].Lease, g.ID)
		}
		return m.Kvs[0].ModRevision, e.Kvs[0].ModRevision, c.Kvs[0].ModRevision
	}

	m, err := registry.ClaimMemberWith(ctx, cli, want, registry.DefaultPool, "", entry)
	if err != nil {
		t.Fatal(err)
	}
	mr, er, cr := revs()
	if mr != er || mr != cr {
		t.Errorf("a new node's claim, member record and entry at revisions %d, %d, %d; want one", cr, mr, er)
	}
	if got, _ := cli.Get(ctx, key); string(got.Kvs[0].Value) != "entry "+m.OverlayIP.String()+" 192.0.2.1:51820" {
		t.Errorf("entry %q does not name the claimed member", got.Kvs[0].Value)
	}

	// A restart with the same member and entry on the same lease.
	before, _ := cli.Get(ctx, "/", clientv3.WithPrefix())
	if _, err := registry.ClaimMemberWith(ctx, cli, want, registry.DefaultPool, "", entry); err != nil {
		t.Fatal(err)
	}
	if after, _ := cli.Get(ctx, "/", clientv3.WithPrefix()); after.Header.Revision != before.Header.Revision {
		t.Errorf("a claim that changes nothing wrote (revision %d -> %d)", before.Header.Revision, after.Header.Revision)
	}

	// A new endpoint, and the entry changed by someone else after the
	// claim read it: the claim reads again and writes both at one revision.
	want.Endpoint = "192.0.2.7:51820"
	interfere = func() {
		if _, err := cli.Put(ctx, key, "someone else's"); err != nil {
			t.Error(err)
		}
	}
	reads = 0
	if _, err := registry.ClaimMemberWith(ctx, cli, want, registry.DefaultPool, "", entry); err != nil {
		t.Fatal(err)
	}
	if interfere != nil {
		t.Fatal("the test's interference did not run")
	}
	if reads != 2 {
		t.Errorf("the claim read the entry %d times; want 2: the write after the interference must fail and read again", reads)
	}
	mr2, er2, _ := revs()
	if mr2 == mr || mr2 != er2 {
		t.Errorf("new endpoint: member record at %d (was %d), entry at %d; want both rewritten at one revision", mr2, mr, er2)
	}
	if got, _ := cli.Get(ctx, key); string(got.Kvs[0].Value) != "entry "+m.OverlayIP.String()+" 192.0.2.7:51820" {
		t.Errorf("entry %q after the retried claim", got.Kvs[0].Value)
	}

	// An entry the claim may not take: nothing is written, the error is
	// returned as is.
	refused := errors.New("held by another live process")
	entry.May = func(context.Context, *mvccpb.KeyValue) error { return refused }
	before, _ = cli.Get(ctx, "/", clientv3.WithPrefix())
	other := registry.Member{Name: "n1", PublicKey: registry.FakePublicKey(9), Endpoint: "198.51.100.9:51820"}
	if _, err := registry.ClaimMemberWith(ctx, cli, other, registry.DefaultPool, "", entry); !errors.Is(err, refused) {
		t.Errorf("claim with a refused entry returned %v, want the refusal", err)
	}
	if after, _ := cli.Get(ctx, "/", clientv3.WithPrefix()); after.Header.Revision != before.Header.Revision {
		t.Errorf("a refused claim wrote (revision %d -> %d)", before.Header.Revision, after.Header.Revision)
	}
}
