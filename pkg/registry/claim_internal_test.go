package registry

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/meshd/meshd/pkg/etcdtest"
)

// readRecorder records, from a client's own calls, the range reads it
// sends (a prefix read has a range end) and the bytes etcd answered.
type readRecorder struct {
	mu       sync.Mutex
	prefixes []string // keys read with a range end
	points   []string // keys read alone
	answered int      // bytes of every answer
	txns     int      // transactions sent
}

func (r *readRecorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.prefixes, r.points, r.answered, r.txns = nil, nil, 0, 0
}

func (r *readRecorder) addRange(rr *etcdserverpb.RangeRequest) {
	if rr == nil {
		return
	}
	if len(rr.RangeEnd) > 0 {
		r.prefixes = append(r.prefixes, string(rr.Key))
	} else {
		r.points = append(r.points, string(rr.Key))
	}
}

func (r *readRecorder) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	r.mu.Lock()
	defer r.mu.Unlock()
	switch q := req.(type) {
	case *etcdserverpb.RangeRequest:
		r.addRange(q)
	case *etcdserverpb.TxnRequest:
		r.txns++
		ops := q.Failure // the branch etcd ran
		if resp, ok := reply.(*etcdserverpb.TxnResponse); ok && resp.Succeeded {
			ops = q.Success
		}
		for _, op := range ops {
			r.addRange(op.GetRequestRange())
		}
	}
	if m, ok := reply.(proto.Message); ok && err == nil {
		r.answered += proto.Size(m)
	}
	return err
}

// recordedCluster is a new etcd holding n other nodes (seedNodes), and a
// client of it whose reads the recorder records.
func recordedCluster(t testing.TB, n int) (*clientv3.Client, *readRecorder) {
	t.Helper()
	srv := etcdtest.New(t)
	rec := &readRecorder{}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{srv.Endpoint()},
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(rec.intercept)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	seedNodes(t, cli, n)
	return cli, rec
}

// seedNodes writes n other nodes' subnet claims and the flannel leases
// meshd writes for them (one lease each, as during a migration), from
// DefaultPool's top down, 100 keys a transaction.
func seedNodes(t testing.TB, cli *clientv3.Client, n int) {
	t.Helper()
	ctx := context.Background()
	var ops []clientv3.Op
	flush := func() {
		if len(ops) == 0 {
			return
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			t.Fatal(err)
		}
		ops = ops[:0]
	}
	top := u32(DefaultPool.Max)
	for i := range n {
		p := netip.PrefixFrom(addrOf(top-uint32(i)<<8), DefaultPool.Bits)
		lease, err := EncodeFlannelLease(netip.AddrFrom4([4]byte{203, 0, byte(i >> 8), byte(i)}), FakePublicKey(i), 51820)
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops,
			clientv3.OpPut(SubnetKey(p), string(claimValue(fmt.Sprintf("other%05d", i)))),
			clientv3.OpPut(FlannelSubnetKey(p), string(lease)))
		if len(ops) >= 100 {
			flush()
		}
	}
	flush()
}

// FakePublicKey is a valid WireGuard public key (44 characters of
// base64) that differs for each i; the package's external tests use it
// too.
func FakePublicKey(i int) string {
	b := []byte("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
	copy(b, fmt.Sprintf("%05d", i))
	return string(b)
}

// nodeEntry is a ClaimEntry for node on lease, as the agent's: any
// current value may be replaced.
func nodeEntry(node string, lease clientv3.LeaseID) *ClaimEntry {
	return &ClaimEntry{
		Key: NodeKey(node), Lease: lease,
		Value: func(m Member) []byte {
			return []byte(`{"name":"` + node + `","overlay":"` + m.OverlayIP.String() + `"}`)
		},
		May: func(context.Context, *mvccpb.KeyValue) error { return nil },
	}
}

// TestReclaimReadsOnlyItsOwnKeys: a node that holds a subnet (a restart,
// a re-registration after its lease was lost) takes its claim back by
// reading its own keys, not every subnet claim and flannel lease; and
// it keeps the subnet only while the claim is still its own.
func TestReclaimReadsOnlyItsOwnKeys(t *testing.T) {
	cli, rec := recordedCluster(t, 300)
	ctx := t.Context()
	grant := func() clientv3.LeaseID {
		g, err := cli.Grant(ctx, 60)
		if err != nil {
			t.Fatal(err)
		}
		return g.ID
	}
	want := Member{Name: "n1", PublicKey: FakePublicKey(99999), Endpoint: "192.0.2.1:51820"}

	// The first claim reads every claim and lease: it picks a subnet.
	rec.reset()
	first, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", nodeEntry("n1", grant()))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(rec.prefixes, " "), SubnetsPrefix) {
		t.Fatalf("a new node's claim read no claims (prefix reads %q)", rec.prefixes)
	}
	if rec.txns != 2 {
		t.Errorf("a new node's claim sent %d transactions; want 2 (its read, its write)", rec.txns)
	}

	// Its lease lost: the claim again, the entry on a new lease.
	rec.reset()
	lease := grant()
	again, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", nodeEntry("n1", lease))
	if err != nil {
		t.Fatal(err)
	}
	if again != first {
		t.Errorf("re-registration got %+v, want %+v", again, first)
	}
	if len(rec.prefixes) != 0 || rec.txns != 2 {
		t.Errorf("re-registration sent %d transactions and read prefixes %q; want 2 (its read, its write) and its own keys only (read %q)", rec.txns, rec.prefixes, rec.points)
	}
	t.Logf("re-registration read %q, %d bytes answered", rec.points, rec.answered)
	if e, err := cli.Get(ctx, NodeKey("n1")); err != nil || len(e.Kvs) != 1 || clientv3.LeaseID(e.Kvs[0].Lease) != lease {
		t.Fatalf("entry after re-registration: %v, %v; want it on lease %x", e, err, lease)
	}

	// A restart that changes nothing: its own keys, no write.
	before, _ := cli.Get(ctx, "/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	rec.reset()
	if _, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", nodeEntry("n1", lease)); err != nil {
		t.Fatal(err)
	}
	if len(rec.prefixes) != 0 {
		t.Errorf("an unchanged restart read prefixes %q", rec.prefixes)
	}
	if after, _ := cli.Get(ctx, "/", clientv3.WithPrefix(), clientv3.WithCountOnly()); after.Header.Revision != before.Header.Revision {
		t.Errorf("an unchanged restart wrote (revision %d -> %d)", before.Header.Revision, after.Header.Revision)
	}

	// The subnet's claim names another node now (someone rewrote it): the
	// member record's subnet is not kept; the claim reads everything and
	// picks another.
	if _, err := cli.Put(ctx, SubnetKey(first.Subnet), string(claimValue("intruder"))); err != nil {
		t.Fatal(err)
	}
	rec.reset()
	moved, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", nodeEntry("n1", lease))
	if err != nil {
		t.Fatal(err)
	}
	if moved.Subnet == first.Subnet {
		t.Errorf("kept subnet %v, whose claim names another node", first.Subnet)
	}
	if !strings.Contains(strings.Join(rec.prefixes, " "), SubnetsPrefix) {
		t.Errorf("a claim whose subnet was taken read no claims (prefix reads %q)", rec.prefixes)
	}
	if c, err := cli.Get(ctx, SubnetKey(moved.Subnet)); err != nil || len(c.Kvs) != 1 || string(c.Kvs[0].Value) != string(claimValue("n1")) {
		t.Errorf("new subnet %v's claim: %v, %v", moved.Subnet, c, err)
	}
}

// BenchmarkReclaim is what a node's registration reads when it holds a
// subnet already, among 10,000 nodes (each with its claim and a flannel
// lease): after an etcd outage longer than the lease TTL every node does
// this at once. "own keys" is ClaimMemberWith; "every claim" is the claim
// that reads all of them (claimOnce, which a new node needs to pick a
// subnet, and which every registration ran before). Reported: bytes etcd
// answered per registration.
func BenchmarkReclaim(b *testing.B) {
	cli, rec := recordedCluster(b, 10000)
	ctx := context.Background()
	g, err := cli.Grant(ctx, 600)
	if err != nil {
		b.Fatal(err)
	}
	want := Member{Name: "n1", PublicKey: FakePublicKey(99999), Endpoint: "192.0.2.1:51820"}
	entry := nodeEntry("n1", g.ID)
	if _, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", entry); err != nil {
		b.Fatal(err)
	}
	run := func(b *testing.B, claim func() error) {
		rec.reset()
		for b.Loop() {
			if err := claim(); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(rec.answered)/float64(b.N), "read-B/op")
	}
	b.Run("own keys", func(b *testing.B) {
		run(b, func() error {
			_, err := ClaimMemberWith(ctx, cli, want, DefaultPool, "", entry)
			return err
		})
	})
	b.Run("every claim", func(b *testing.B) {
		run(b, func() error {
			_, ok, err := claimOnce(ctx, cli, want, DefaultPool, "", entry, 1)
			if err == nil && !ok {
				err = fmt.Errorf("claim did not hold")
			}
			return err
		})
	})
}
