package agent_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/testlog"
)

// recorder is a Component that records the revisions it was given and
// fails while fail returns true.
type recorder struct {
	mu   sync.Mutex
	revs []int64
	fail func(*registry.Snapshot) bool
}

func (r *recorder) Name() string { return "recorder" }
func (r *recorder) Apply(_ context.Context, s *registry.Snapshot) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.revs = append(r.revs, s.Revision)
	if r.fail != nil && r.fail(s) {
		return errors.New("injected failure")
	}
	return nil
}
func (r *recorder) Status() any { return map[string]int{"applies": len(r.revs)} }

type node struct {
	a      *agent.Agent
	cli    *clientv3.Client
	cancel context.CancelFunc
	done   chan error
}

// kill stops the node without cleanup: its client goes first, so it
// cannot revoke its lease (as with SIGKILL or power loss).
func (n *node) kill() {
	n.cli.Close()
	n.cancel()
	<-n.done
}

// stop is a graceful stop.
func (n *node) stop() error {
	n.cancel()
	err := <-n.done
	n.cli.Close()
	return err
}

const id1, id2 = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"

func startNode(t *testing.T, srv *etcdtest.Server, name, id, stateDir string, mod func(*agent.Options)) *node {
	t.Helper()
	cli, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	o := agent.Options{
		Client: cli, Node: name, ID: id, LeaseTTL: 2 * time.Second, Coalesce: 2 * time.Millisecond,
		StateDir: stateDir, Consume: []registry.Group{"backends"}, Version: "test",
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("test-node", name),
	}
	if mod != nil {
		mod(&o)
	}
	a, err := agent.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &node{a: a, cli: cli, cancel: cancel, done: make(chan error, 1)}
	go func() { n.done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-n.done:
		default:
		}
		cli.Close()
	})
	return n
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("not within %v: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func withInstance(o *agent.Options) {
	o.AdvertiseIP = mustAddr("10.10.1.0")
	o.Instances = []agent.Instance{{Group: "backends", App: "web", Port: 8080, Interval: 100 * time.Millisecond}}
}

func TestDeadNodeVanishesAndReturns(t *testing.T) {
	srv := etcdtest.New(t)
	dirA := t.TempDir()
	a := startNode(t, srv, "node-a", id1, dirA, withInstance)
	b := startNode(t, srv, "node-b", id2, t.TempDir(), nil)
	webOnA := func() bool {
		s := b.a.Snapshot()
		app := s.Apps[registry.AppID{Group: "backends", Name: "web"}]
		_, node := s.Nodes["node-a"]
		return node && app != nil && app.Instances["node-a"].Port == 8080
	}
	eventually(t, 10*time.Second, "b sees a's entry and instance", webOnA)

	a.kill()
	took := eventually(t, 2*time.Second+2*time.Second+time.Second, "a's entry and instance vanish from b's view", func() bool {
		s := b.a.Snapshot()
		_, node := s.Nodes["node-a"]
		app := s.Apps[registry.AppID{Group: "backends", Name: "web"}]
		return !node && (app == nil || len(app.Instances) == 0)
	})
	if took > 4*time.Second { // TTL + 2 s
		t.Errorf("vanished after %v, want within TTL + 2s", took)
	}
	startNode(t, srv, "node-a", id1, dirA, withInstance)
	eventually(t, 10*time.Second, "a reappears", webOnA)
}

func TestRestartResumesLease(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	dir := t.TempDir()
	// A killed node's lease lives for its TTL from the last keep-alive:
	// 6 s leaves a busy machine time to start the second process.
	mod := func(o *agent.Options) { withInstance(o); o.LeaseTTL = 6 * time.Second }
	a := startNode(t, srv, "node-a", id1, dir, mod)
	var lease int64
	eventually(t, 10*time.Second, "registered", func() bool {
		r, err := cli.Get(context.Background(), registry.NodeKey("node-a"))
		if err == nil && len(r.Kvs) == 1 {
			lease = r.Kvs[0].Lease
		}
		return lease != 0
	})
	resp, _ := cli.Get(context.Background(), registry.InstanceKey("backends", "web", "node-a"))
	w := cli.Watch(context.Background(), "/cluster/", clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	a.kill() // like SIGKILL: the lease stays alive for its TTL
	startNode(t, srv, "node-a", id1, dir, mod)
	time.Sleep(time.Second)
	r, _ := cli.Get(context.Background(), registry.NodeKey("node-a"))
	if len(r.Kvs) != 1 || r.Kvs[0].Lease != lease {
		t.Fatalf("after restart the entry is on lease %v, want the resumed %x", r.Kvs, lease)
	}
	select {
	case ev := <-w:
		for _, e := range ev.Events {
			if e.Type == clientv3.EventTypeDelete {
				t.Errorf("restart deleted %s: peers would have seen the node leave", e.Kv.Key)
			}
		}
	default:
	}
}

// TestRestartTakesOverItsInstances: a meshd restarted on its previous
// lease finds the instances the previous process advertised on it. What is
// still healthy and unchanged it leaves as it is (no write: the other nodes
// have nothing to take in); what now fails its check, or is no longer
// configured, it withdraws, rather than leave it advertised for as long as
// the resumed lease lives.
func TestRestartTakesOverItsInstances(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	dir := t.TempDir()
	api := agent.Instance{Group: "backends", App: "api", Port: 9090}
	mod := func(o *agent.Options) {
		withInstance(o)
		o.Instances = append(o.Instances, api)
		o.LeaseTTL = 6 * time.Second
	}
	web, apiKey := registry.InstanceKey("backends", "web", "node-a"), registry.InstanceKey("backends", "api", "node-a")
	a := startNode(t, srv, "node-a", id1, dir, mod)
	var before *mvccpb.KeyValue
	eventually(t, 10*time.Second, "both instances advertised", func() bool {
		r, err := cli.Get(ctx, apiKey)
		if err != nil || len(r.Kvs) != 1 {
			return false
		}
		r, err = cli.Get(ctx, web)
		if err == nil && len(r.Kvs) == 1 {
			before = r.Kvs[0]
		}
		return before != nil
	})
	a.kill() // the lease and both keys stay for its TTL
	// web's first check after the restart takes a while: until it
	// reports, web stays advertised as it is (no withdrawal and re-put,
	// which every node's HAProxy would follow).
	w := cli.Watch(ctx, web, clientv3.WithRev(before.ModRevision+1))
	var slow sync.Once
	a = startNode(t, srv, "node-a", id1, dir, func(o *agent.Options) {
		mod(o)
		o.Instances = o.Instances[:1] // api is no longer configured
		o.Instances[0].Check = func(context.Context, netip.AddrPort) error {
			slow.Do(func() { time.Sleep(time.Second) })
			return nil
		}
	})
	eventually(t, 5*time.Second, "the instance no longer configured is withdrawn", func() bool {
		r, err := cli.Get(ctx, apiKey)
		return err == nil && len(r.Kvs) == 0
	})
	r, err := cli.Get(ctx, web)
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("web after the restart: %v, %v", r, err)
	}
	time.Sleep(1500 * time.Millisecond) // past web's first check
	select {
	case wr := <-w:
		t.Errorf("the restart changed web, which it should have left as it was: %v", wr.Events)
	default:
	}

	// Killed again; after this restart web's check fails.
	a.kill()
	startNode(t, srv, "node-a", id1, dir, func(o *agent.Options) {
		mod(o)
		o.Instances = o.Instances[:1]
		o.Instances[0].Check = func(context.Context, netip.AddrPort) error { return errors.New("connection refused") }
	})
	eventually(t, 5*time.Second, "the instance failing its check after the restart is withdrawn", func() bool {
		r, err := cli.Get(ctx, web)
		return err == nil && len(r.Kvs) == 0
	})
}

func TestNameOwnedByLiveNodeIsNotStolen(t *testing.T) {
	srv := etcdtest.New(t)
	startNode(t, srv, "node-a", id1, t.TempDir(), nil)
	cli := etcdtest.NewClient(t, srv)
	eventually(t, 10*time.Second, "registered", func() bool {
		r, _ := cli.Get(context.Background(), registry.NodeKey("node-a"))
		return len(r.Kvs) == 1
	})
	impostor := startNode(t, srv, "node-a", id2, t.TempDir(), nil)
	select {
	case err := <-impostor.done:
		if !errors.Is(err, agent.ErrNodeOwned) || !strings.Contains(err.Error(), id1) {
			t.Fatalf("impostor returned %v, want ErrNodeOwned naming the owner", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("impostor kept running")
	}
	r, _ := cli.Get(context.Background(), registry.NodeKey("node-a"))
	n, err := registry.DecodeNode("node-a", r.Kvs[0].Value)
	if err != nil || n.Meshd.ID != id1 {
		t.Fatalf("entry now %s, %v", r.Kvs[0].Value, err)
	}
}

// TestImpostorLeavesMemberRecord: a second meshd started under a live
// node's name (a cloned machine, a restored backup) is refused before it
// writes anything: the live node's member record (its WireGuard key and
// endpoint, which every peer configures) and subnet claim stay as they
// were, not overwritten with the impostor's key for as long as the live
// node runs.
func TestImpostorLeavesMemberRecord(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	startNode(t, srv, "node-a", id1, t.TempDir(), func(o *agent.Options) {
		o.Member = &agent.MemberOptions{PublicKey: flannelKey, Endpoint: "192.0.2.1:51820", Pool: registry.DefaultPool}
	})
	var before *mvccpb.KeyValue
	eventually(t, 10*time.Second, "node-a registered", func() bool {
		r, err := cli.Get(ctx, registry.NodeKey("node-a"))
		if err != nil || len(r.Kvs) != 1 {
			return false
		}
		m, err := cli.Get(ctx, registry.MemberKey("node-a"))
		if err != nil || len(m.Kvs) != 1 {
			return false
		}
		before = m.Kvs[0]
		return true
	})
	claims, err := cli.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	impostor := startNode(t, srv, "node-a", id2, t.TempDir(), func(o *agent.Options) {
		o.Member = &agent.MemberOptions{PublicKey: flannelKey2, Endpoint: "198.51.100.9:51820", Pool: registry.DefaultPool}
	})
	select {
	case err := <-impostor.done:
		if !errors.Is(err, agent.ErrNodeOwned) {
			t.Fatalf("impostor returned %v, want ErrNodeOwned", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("impostor kept running")
	}
	m, err := cli.Get(ctx, registry.MemberKey("node-a"))
	if err != nil || len(m.Kvs) != 1 {
		t.Fatalf("member record: %v, %v", m, err)
	}
	if after := m.Kvs[0]; after.ModRevision != before.ModRevision {
		t.Errorf("the impostor rewrote the live node's member record:\nbefore %s\nafter  %s", before.Value, after.Value)
	}
	after, err := cli.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix())
	if err != nil || len(after.Kvs) != len(claims.Kvs) {
		t.Errorf("subnet claims: %d before the impostor, %d after (%v)", len(claims.Kvs), len(after.Kvs), err)
	}
}

func TestLegacyEntryIsAdopted(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	cli.Put(context.Background(), registry.NodeKey("worker001"), `{"name":"worker001","ipv4":"65.108.1.2","services":["backends","services"]}`)
	startNode(t, srv, "worker001", id1, t.TempDir(), func(o *agent.Options) {
		o.PublicIPv4 = "65.108.1.2"
		o.Consume = []registry.Group{"backends", "services"}
	})
	eventually(t, 10*time.Second, "legacy entry taken over on a lease", func() bool {
		r, _ := cli.Get(context.Background(), registry.NodeKey("worker001"))
		if len(r.Kvs) != 1 || r.Kvs[0].Lease == 0 {
			return false
		}
		n, err := registry.DecodeNode("worker001", r.Kvs[0].Value)
		return err == nil && n.IPv4 == "65.108.1.2" && len(n.Services) == 2 && n.Meshd != nil
	})
}

func TestGracefulStopRevokes(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	a := startNode(t, srv, "node-a", id1, t.TempDir(), withInstance)
	eventually(t, 10*time.Second, "instance advertised", func() bool {
		r, _ := cli.Get(context.Background(), registry.InstanceKey("backends", "web", "node-a"))
		return len(r.Kvs) == 1
	})
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	r, _ := cli.Get(context.Background(), "/", clientv3.WithPrefix())
	for _, kv := range r.Kvs {
		if string(kv.Key) == registry.SeenKey("node-a") {
			// The durable presence record stays, saying when it stopped.
			s, err := registry.DecodeSeen("node-a", kv.Value)
			if err != nil || kv.Lease != 0 || !s.StoppedAt.After(s.RegisteredAt) || time.Since(s.StoppedAt) > time.Minute {
				t.Errorf("presence record after a graceful stop: %+v (lease %x) %v", s, kv.Lease, err)
			}
			continue
		}
		if strings.Contains(string(kv.Key), "node-a") {
			t.Errorf("%s still there right after a graceful stop", kv.Key)
		}
	}
}

func TestFailingCheckWithdrawsInstance(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	var mu sync.Mutex
	healthy := true
	startNode(t, srv, "node-a", id1, t.TempDir(), func(o *agent.Options) {
		withInstance(o)
		o.Instances[0].Check = func(context.Context, netip.AddrPort) error {
			mu.Lock()
			defer mu.Unlock()
			if !healthy {
				return errors.New("connection refused")
			}
			return nil
		}
	})
	present := func() bool {
		r, _ := cli.Get(context.Background(), registry.InstanceKey("backends", "web", "node-a"))
		return len(r.Kvs) == 1
	}
	eventually(t, 10*time.Second, "advertised while healthy", present)
	mu.Lock()
	healthy = false
	mu.Unlock()
	eventually(t, 2*time.Second, "withdrawn within a couple of seconds", func() bool { return !present() })
	mu.Lock()
	healthy = true
	mu.Unlock()
	eventually(t, 2*time.Second, "advertised again", present)
}

// TestSlowRegistrationGetsMoreTime: a registration that needs longer than
// its bound (here 1 ms, against a registry of 2,000 subnet claims the
// claim reads whole) is retried with twice the time until it fits, not
// at the same bound forever.
func TestSlowRegistrationGetsMoreTime(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	pool := registry.Pool{Min: mustAddr("10.16.0.0"), Max: mustAddr("10.31.255.0"), Bits: 24}
	ops := make([]clientv3.Op, 0, 100)
	for i := range 2000 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(16 + i/256), byte(i % 256), 0}), 24)
		ops = append(ops, clientv3.OpPut(registry.SubnetKey(p), fmt.Sprintf(`{"node":"other%04d"}`, i)))
		if len(ops) == cap(ops) {
			if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
				t.Fatal(err)
			}
			ops = ops[:0]
		}
	}
	var logs testlog.Buffer
	startNode(t, srv, "n1", id1, t.TempDir(), func(o *agent.Options) {
		o.RegisterTimeout = time.Millisecond
		o.Member = &agent.MemberOptions{PublicKey: flannelKey, Endpoint: "192.0.2.1:51820", Pool: pool}
		o.Log = slog.New(slog.NewTextHandler(&logs, nil))
	})
	eventually(t, 30*time.Second, "n1 registered", func() bool {
		r, err := cli.Get(ctx, registry.NodeKey("n1"))
		return err == nil && len(r.Kvs) == 1
	})
	if !strings.Contains(logs.String(), `msg="registration failed, retrying"`) || !strings.Contains(logs.String(), "timeout=2ms") {
		t.Errorf("no registration ran out of its 1 ms and was retried with 2 ms (the test registered nothing slow); log:\n%s", logs.String())
	}
	r, err := cli.Get(ctx, registry.MemberKey("n1"))
	if err != nil || len(r.Kvs) != 1 {
		t.Fatalf("n1's member record: %v, %v", r, err)
	}
	m, err := registry.DecodeMember("n1", r.Kvs[0].Value)
	if b := m.Subnet.Addr().As4(); err != nil || !pool.Contains(m.Subnet) || int(b[1]-16)*256+int(b[2]) < 2000 {
		t.Errorf("n1's member record %+v, %v: want a subnet of the pool no other node claimed", m, err)
	}
}

// preparer is a Component that is prepared to claim when the test says.
type preparer struct {
	recorder
	ready     chan struct{}
	firstSelf chan bool // whether the first snapshot held the node's member record
	once      sync.Once
}

func (p *preparer) Apply(ctx context.Context, s *registry.Snapshot) error {
	p.once.Do(func() { _, ok := s.Members["n1"]; p.firstSelf <- ok })
	return p.recorder.Apply(ctx, s)
}

func (p *preparer) PreparedForClaim() <-chan struct{} { return p.ready }

// TestClaimWaitsForPreparedComponents: the node claims its member record
// only once its ClaimPreparer components are prepared (the overlay
// configures its peers first), and their first pass sees no claim yet.
func TestClaimWaitsForPreparedComponents(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	p := &preparer{ready: make(chan struct{}), firstSelf: make(chan bool, 1)}
	startNode(t, srv, "n1", id1, t.TempDir(), func(o *agent.Options) {
		o.Member = &agent.MemberOptions{PublicKey: flannelKey, Endpoint: "192.0.2.1:51820", Pool: registry.DefaultPool}
		o.Components = []agent.Component{p}
	})
	select {
	case self := <-p.firstSelf:
		if self {
			t.Fatal("the first pass already saw the node's member record")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no first pass")
	}
	time.Sleep(200 * time.Millisecond)
	if r, err := cli.Get(ctx, registry.MemberKey("n1")); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("member record claimed before the component was prepared (%v)", err)
	}
	close(p.ready)
	eventually(t, 30*time.Second, "n1's member record once prepared", func() bool {
		r, err := cli.Get(ctx, registry.MemberKey("n1"))
		return err == nil && len(r.Kvs) == 1
	})

	// A component that never gets prepared delays the claim by half the
	// lease TTL (here 1 s), not for ever.
	var logs testlog.Buffer
	never := &preparer{ready: make(chan struct{}), firstSelf: make(chan bool, 1)}
	startNode(t, srv, "n2", id2, t.TempDir(), func(o *agent.Options) {
		o.Member = &agent.MemberOptions{PublicKey: flannelKey2, Endpoint: "192.0.2.2:51820", Pool: registry.DefaultPool}
		o.Components = []agent.Component{never}
		o.Log = slog.New(slog.NewTextHandler(&logs, nil))
	})
	eventually(t, 30*time.Second, "n2's member record without its component prepared", func() bool {
		r, err := cli.Get(ctx, registry.MemberKey("n2"))
		return err == nil && len(r.Kvs) == 1
	})
	if !strings.Contains(logs.String(), "claiming the member record before a component is prepared") {
		t.Errorf("no warning about the unprepared component; log:\n%s", logs.String())
	}
}
