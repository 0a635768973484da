package overlay

import (
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// fakeComponent is a Component whose applier drives a fakeKernel through
// nl (which may wrap the fake to inject failures).
func fakeComponent(t *testing.T, wrap func(netlinkHandle) netlinkHandle) (*Component, *fakeKernel) {
	t.Helper()
	a, k := fakeApplier(t)
	if wrap != nil {
		a.nl = wrap(a.nl)
	}
	opts := Options{Self: "n0", StateDir: t.TempDir(), Interface: a.opts.Interface, Network: netip.MustParsePrefix("10.0.0.0/8")}
	m, err := newMetrics(nil)
	if err != nil {
		t.Fatal(err)
	}
	return assemble(opts, a.log, a.opts.PrivateKey, m, mustComputer(t, opts), a), k
}

// runningComponent is fakeComponent with Run going until the test ends and
// the status rebuilds it asks for (NotifyStatus) sent on notified.
func runningComponent(t *testing.T) (c *Component, k *fakeKernel, notified chan time.Time, ctx context.Context) {
	t.Helper()
	c, k = fakeComponent(t, nil)
	notified = make(chan time.Time, 4)
	c.NotifyStatus(func() { notified <- time.Now() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go c.Run(ctx)
	return c, k, notified, ctx
}

// waitReread waits for the status rebuild a component asks for
// FirstHandshakeRead after an apply (at applied) that added peers.
func waitReread(t *testing.T, notified <-chan time.Time, applied time.Time) {
	t.Helper()
	select {
	case at := <-notified:
		if d := at.Sub(applied); d < FirstHandshakeRead {
			t.Errorf("status rebuilt %v after the apply, before %v", d, FirstHandshakeRead)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no status rebuild after peers were added")
	}
}

// device returns the FakeDevice of c's interface (nil before it exists).
func (k *fakeKernel) device(c *Component) *FakeDevice {
	k.mu.Lock()
	defer k.mu.Unlock()
	if fl := k.links[c.applier.Interface()]; fl != nil {
		return fl.dev
	}
	return nil
}

// TestRepairRecordsErrors: a repair that fails shows in the status (not
// applied, with the error), and the next repair that works clears it.
func TestRepairRecordsErrors(t *testing.T) {
	var fr *failingRoutes
	c, k := fakeComponent(t, func(nl netlinkHandle) netlinkHandle {
		fr = &failingRoutes{netlinkFake: nl.(netlinkFake)}
		return fr
	})
	ctx := context.Background()
	ms := []registry.Member{memberOf(0, c.PublicKey()), memberOf(1, newPublicKey(t))}
	if err := c.Apply(ctx, snapshotOf(ms, 1)); err != nil {
		t.Fatal(err)
	}
	if st := c.StatusNow(time.Now()); !st.Applied || st.LastError != "" {
		t.Fatalf("after Apply: applied %v, error %q", st.Applied, st.LastError)
	}
	// Someone deletes the route, and putting it back fails.
	n := prefixToIPNet(ms[1].Subnet)
	if err := k.RouteDel(&netlink.Route{Dst: &n, Table: 51820}); err != nil {
		t.Fatal(err)
	}
	fr.fail = true
	c.repair(ctx, "test")
	st := c.StatusNow(time.Now())
	if st.Applied || !strings.Contains(st.LastError, "add route 10.10.1.0/24") {
		t.Fatalf("after a failed repair: applied %v, error %q; want not applied and the route's error", st.Applied, st.LastError)
	}
	// The same snapshot again is not skipped while the error stands.
	if err := c.Apply(ctx, snapshotOf(ms, 2)); err == nil {
		t.Fatal("Apply while routes fail: no error")
	}
	fr.fail = false
	c.repair(ctx, "test")
	if st := c.StatusNow(time.Now()); !st.Applied || st.LastError != "" {
		t.Fatalf("after a repair that works: applied %v, error %q", st.Applied, st.LastError)
	}
}

// TestRunStopsWithContext: Run owns the long-running parts and returns
// nil once its context ends.
func TestRunStopsWithContext(t *testing.T) {
	c, _ := fakeComponent(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}

func newPublicKey(t *testing.T) string {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey().String()
}

func TestNewValidates(t *testing.T) {
	// As config.Default's overlay section maps (config imports overlay).
	base := Options{
		Interface: "meshd-wg", ListenPort: 51820, Keepalive: 25 * time.Second, Mode: "auto", RouteTable: 51820,
		Network: netip.MustParsePrefix("10.0.0.0/8"),
		Pool:    registry.Pool{Min: netip.MustParseAddr("10.10.0.0"), Max: netip.MustParseAddr("10.99.0.0"), Bits: 24},
	}
	base.Self, base.StateDir = "n0", t.TempDir()
	for name, mut := range map[string]func(*Options){
		"bad node name":      func(o *Options) { o.Self = "../x" },
		"bad interface name": func(o *Options) { o.Interface = "wg 0; rm" },
		"long interface":     func(o *Options) { o.Interface = "abcdefghijklmnop" },
		"bad mode":           func(o *Options) { o.Mode = "magic" },
		"no network":         func(o *Options) { o.Network = netip.Prefix{} },
		"no state dir":       func(o *Options) { o.StateDir = "" },
		"mtu too large":      func(o *Options) { o.MTU = MaxMTU + 1 },
		"main route table":   func(o *Options) { o.RouteTable = 254 },
		"relative key file":  func(o *Options) { o.ImportKeyFile = "flannel.key" },
	} {
		t.Run(name, func(t *testing.T) {
			o := base
			mut(&o)
			c, err := New(o, discard(), nil)
			if err == nil {
				c.Close()
				t.Fatal("New accepted bad options")
			}
		})
	}
	c, err := New(base, discard(), prometheus.NewRegistry())
	if err != nil {
		t.Fatalf("New with defaults: %v", err)
	}
	defer c.Close()
	if c.Name() != "overlay" || len(c.PublicKey()) != 44 {
		t.Errorf("Name %q, PublicKey %q", c.Name(), c.PublicKey())
	}
	st := c.Status().(Status)
	if st.PublicKey != c.PublicKey() || st.Mode != "" || st.Applied {
		t.Errorf("status before any apply: %+v", st)
	}
	b, err := json.Marshal(c.Status())
	if err != nil {
		t.Fatalf("status does not encode: %v", err)
	}
	if strings.Contains(string(b), c.key.String()) {
		t.Error("status contains the private key")
	}
}

// TestFlannelLeaseChangeAlone: the overlay reads flannel leases as well
// as members. When a txn deletes a node's member record and its flannel
// lease, the two prefixes' watches may deliver them in separate passes:
// first the member (the lease left alone makes the node a flannel-only
// peer with the same key), then the lease alone. That second pass changes
// no member and must still remove the peer.
func TestFlannelLeaseChangeAlone(t *testing.T) {
	c, k := fakeComponent(t, nil)
	ctx := context.Background()
	self, other := memberOf(0, c.PublicKey()), memberOf(4, newPublicKey(t))
	s := registry.NewStore()
	put := func(key string, v any, rev int64) {
		t.Helper()
		b, ok := v.([]byte)
		if !ok {
			var err error
			if b, err = json.Marshal(v); err != nil {
				t.Fatal(err)
			}
		}
		s.Put(registry.KV{Key: key, Value: b}, rev)
	}
	lease, err := registry.EncodeFlannelLease(netip.MustParseAddr("192.0.2.5"), other.PublicKey, 51820)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []registry.Member{self, other} {
		put(registry.SubnetKey(m.Subnet), registry.SubnetClaim{Node: m.Name}, 1)
		put(registry.MemberKey(m.Name), m, 1)
	}
	put(registry.FlannelSubnetKey(other.Subnet), lease, 2)
	peers := func() []string {
		dev, err := k.Device(c.applier.opts.Interface)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, p := range dev.Peers {
			out = append(out, p.PublicKey.String())
		}
		return out
	}
	if err := c.Apply(ctx, s.Snapshot()); err != nil {
		t.Fatal(err)
	}
	if got := peers(); len(got) != 1 || got[0] != other.PublicKey {
		t.Fatalf("peers with n4's member record and lease: %v", got)
	}
	// The deletion of the member record and claim arrives first: n4 is
	// now a flannel-only peer, the same key.
	s.Delete(registry.MemberKey(other.Name), 4)
	s.Delete(registry.SubnetKey(other.Subnet), 4)
	if err := c.Apply(ctx, s.Snapshot()); err != nil {
		t.Fatal(err)
	}
	// Then the lease's, from the other prefix's watch, same revision.
	s.Delete(registry.FlannelSubnetKey(other.Subnet), 4)
	if err := c.Apply(ctx, s.Snapshot()); err != nil {
		t.Fatal(err)
	}
	if got := peers(); len(got) != 0 {
		t.Fatalf("peers after the member record and the flannel lease are gone: %v, want none", got)
	}
}

// TestStatusRereadAfterAddedPeers: an apply that adds a peer shows it
// without a handshake; about a second later Run has the status rebuilt
// from a fresh read, which shows the handshake that completed meanwhile.
// An apply that adds none asks for nothing.
func TestStatusRereadAfterAddedPeers(t *testing.T) {
	c, k, notified, ctx := runningComponent(t)
	peer := newPublicKey(t)
	ms := []registry.Member{memberOf(0, c.PublicKey()), memberOf(1, peer)}
	applied := time.Now()
	if err := c.Apply(ctx, snapshotOf(ms, 1)); err != nil {
		t.Fatal(err)
	}
	reads := func() int { k.mu.Lock(); defer k.mu.Unlock(); return k.deviceReads }
	before := reads()
	if st := c.StatusNow(time.Now()); st.Peers.Count != 1 || st.Peers.Oldest != "never" {
		t.Fatalf("right after the apply: %+v, want 1 peer, never handshaken", st.Peers)
	}
	if r := reads(); r != before {
		t.Errorf("the status after an apply read the device %d times; the apply's own read suffices", r-before)
	}
	dev := k.device(c)
	dev.Traffic(peer, time.Now(), 0, 0) // the first handshake completes
	waitReread(t, notified, applied)
	if st := c.StatusNow(time.Now()); st.Peers.Recent != 1 {
		t.Errorf("after the re-read: %+v, want the peer's handshake", st.Peers)
	}
	// An apply that adds no peer (same members, a new revision).
	if err := c.Apply(ctx, snapshotOf(ms, 2)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-notified:
		t.Error("status rebuild asked for after an apply that added no peer")
	case <-time.After(FirstHandshakeRead + 500*time.Millisecond):
	}
}

// routeHook runs hook (once) when the applier adds its first route: after
// the device has the plan's peers, before the apply returns.
type routeHook struct {
	netlinkFake
	once sync.Once
	hook func()
}

func (h *routeHook) RouteReplace(r *netlink.Route) error {
	h.once.Do(h.hook)
	return h.netlinkFake.RouteReplace(r)
}

// TestRetryCountsHandshakeDuringApply: a new peer whose first handshake
// completes while the apply is still adding routes has a working session;
// the handshake retry leaves it alone (re-adding it would reset that
// session), while a new peer with no handshake is re-added.
func TestRetryCountsHandshakeDuringApply(t *testing.T) {
	fast, slow := newPublicKey(t), newPublicKey(t)
	var (
		c        *Component
		k        *fakeKernel
		shookAt  time.Time
		hookedOK bool
	)
	c, k = fakeComponent(t, func(nl netlinkHandle) netlinkHandle {
		return &routeHook{netlinkFake: nl.(netlinkFake), hook: func() {
			shookAt = time.Now()
			hookedOK = k.device(c).Traffic(fast, shookAt, 148, 92)
		}}
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)
	ms := []registry.Member{memberOf(0, c.PublicKey()), memberOf(1, fast), memberOf(2, slow)}
	if err := c.Apply(ctx, snapshotOf(ms, 1)); err != nil {
		t.Fatal(err)
	}
	if !hookedOK {
		t.Fatal("the device had no peer for the handshake when the first route was added")
	}
	peer := func(pub string) wgtypes.Peer {
		dev, err := k.Device(c.applier.Interface())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range dev.Peers {
			if p.PublicKey.String() == pub {
				return p
			}
		}
		t.Fatalf("peer %s gone from the device", pub)
		return wgtypes.Peer{}
	}
	// The joiner checks at about 100 and 300 ms (each peer's schedule
	// jittered by up to 20 %): the slow peer's re-add shows the retry ran;
	// by 400 ms both peers had both checks.
	applied := time.Now()
	dev := k.device(c)
	configs := dev.Configs() // the apply's
	waitFor(t, 10*time.Second, "the retry of the peer without a handshake", func() bool { return dev.Configs() > configs })
	time.Sleep(time.Until(applied.Add(400 * time.Millisecond)))
	if got := peer(fast).LastHandshakeTime; !got.Equal(shookAt) {
		t.Errorf("the peer that handshook during the apply was re-added (handshake %v, was %v)", got, shookAt)
	}
}

// TestPrepareBeforeClaim: a new node without a member record configures
// its device with its peers and listen port, and no address or route, and
// is then prepared to claim; the Apply after the claim adds the address
// and routes without touching the peers. A device that exists already
// (a restarted meshd) is left as it is.
func TestPrepareBeforeClaim(t *testing.T) {
	c, k := fakeComponent(t, nil)
	ctx := context.Background()
	if err := c.Boot(ctx); err != nil { // no cache: nothing to boot
		t.Fatal(err)
	}
	select {
	case <-c.PreparedForClaim():
		t.Fatal("prepared before any Apply (a Boot without a cache configures nothing)")
	default:
	}
	others := []registry.Member{memberOf(1, newPublicKey(t)), memberOf(2, newPublicKey(t))}
	if err := c.Apply(ctx, snapshotOf(others, 1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.PreparedForClaim():
	default:
		t.Fatal("not prepared after the first Apply")
	}
	k.mu.Lock()
	fl := k.links[c.applier.Interface()]
	k.mu.Unlock()
	if fl == nil {
		t.Fatal("no device before the claim")
	}
	dev, _ := fl.dev.Device()
	if len(dev.Peers) != 2 || dev.ListenPort != desired.DefaultListenPort {
		t.Fatalf("before the claim: %d peers, port %d; want 2 and %d", len(dev.Peers), dev.ListenPort, desired.DefaultListenPort)
	}
	if len(fl.addrs) != 0 || len(k.routes) != 0 {
		t.Fatalf("before the claim: addresses %v, routes %v; want none", fl.addrs, k.routes)
	}
	if st := c.StatusNow(time.Now()); !st.Waiting || st.Applied {
		t.Errorf("before the claim: waiting %v, applied %v; want waiting, not applied", st.Waiting, st.Applied)
	}
	configs := fl.dev.Configs()
	ms := append([]registry.Member{memberOf(0, c.PublicKey())}, others...)
	if err := c.Apply(ctx, snapshotOf(ms, 2)); err != nil {
		t.Fatal(err)
	}
	if n := fl.dev.Configs(); n != configs {
		t.Errorf("the Apply after the claim configured the device %d more times; its peers were there", n-configs)
	}
	if len(fl.addrs) != 1 || len(k.routes) != 2 {
		t.Errorf("after the claim: addresses %v, routes %v; want the overlay IP and 2 routes", fl.addrs, k.routes)
	}
	if st := c.StatusNow(time.Now()); !st.Applied || st.Peers.Count != 2 {
		t.Errorf("after the claim: applied %v, %d peers", st.Applied, st.Peers.Count)
	}

	// A restarted meshd over the running device, its member record gone
	// (removed while it was down): it changes nothing before it claims.
	again := assemble(c.opts, c.log, c.key, c.metrics, mustComputer(t, c.opts), c.applier)
	k.mu.Lock()
	writes := k.writes
	k.mu.Unlock()
	if err := again.Apply(ctx, snapshotOf(others, 3)); err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.writes != writes {
		t.Errorf("a running device was changed %d times before the claim", k.writes-writes)
	}
	select {
	case <-again.PreparedForClaim():
	default:
		t.Error("not prepared after the first Apply")
	}
}

func mustComputer(t *testing.T, opts Options) *desired.Computer {
	t.Helper()
	c, err := desired.NewComputer(opts.Self, opts.params())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestPreClaimPeersCheckedFromClaim: the peers a node configured before
// its claim are not re-added while no other node can know it; their
// handshake retry starts with the apply after the claim, and a handshake
// completed in between counts.
func TestPreClaimPeersCheckedFromClaim(t *testing.T) {
	c, k, notified, ctx := runningComponent(t)
	early, silent := newPublicKey(t), newPublicKey(t)
	others := []registry.Member{memberOf(1, early), memberOf(2, silent)}
	if err := c.Apply(ctx, snapshotOf(others, 1)); err != nil {
		t.Fatal(err)
	}
	dev := k.device(c)
	configs := dev.Configs()
	// Past the joiner's first two checks (100 and 300 ms, +20 %).
	time.Sleep(500 * time.Millisecond)
	if n := dev.Configs(); n != configs {
		t.Fatalf("peers re-added %d times before the claim", n-configs)
	}
	shook := time.Now()
	dev.Traffic(early, shook, 92, 148) // an initiation of a node that learnt of this one
	select {
	case <-notified:
		t.Fatal("status re-read asked for before the claim")
	default:
	}
	ms := append([]registry.Member{memberOf(0, c.PublicKey())}, others...)
	claimed := time.Now()
	if err := c.Apply(ctx, snapshotOf(ms, 2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the retry of the peer without a handshake, after the claim", func() bool { return dev.Configs() > configs })
	// The first handshakes with the peers of before the claim are read
	// into the status a second after it, as after any added peers.
	waitReread(t, notified, claimed)
	d, _ := dev.Device()
	for _, p := range d.Peers {
		if p.PublicKey.String() == early && !p.LastHandshakeTime.Equal(shook) {
			t.Errorf("the peer that handshook before the claim's apply was re-added")
		}
	}
}

// TestUnchangedStateReadsNoDevice: a snapshot that changes what the
// overlay reads but not its result (here a member it must skip) is
// applied without a device read, and shows as applied at its revision;
// a real change still reads and configures the device.
func TestUnchangedStateReadsNoDevice(t *testing.T) {
	c, k := fakeComponent(t, nil)
	ctx := context.Background()
	ms := []registry.Member{memberOf(0, c.PublicKey()), memberOf(1, newPublicKey(t))}
	if err := c.Apply(ctx, snapshotOf(ms, 1)); err != nil {
		t.Fatal(err)
	}
	reads := func() int { k.mu.Lock(); defer k.mu.Unlock(); return k.deviceReads }
	before := reads()
	bad := memberOf(2, "not a key")
	if err := c.Apply(ctx, snapshotOf(append(ms, bad), 2)); err != nil {
		t.Fatal(err)
	}
	if r := reads(); r != before {
		t.Errorf("an apply that changes nothing read the device %d times", r-before)
	}
	st := c.StatusNow(time.Now())
	if !st.Applied || st.Revision != 2 || st.ProblemCount != 1 {
		t.Errorf("after the unchanged apply: applied %v, revision %d, problems %d; want applied at 2 with the skipped member", st.Applied, st.Revision, st.ProblemCount)
	}
	before = reads()
	if err := c.Apply(ctx, snapshotOf(append(ms, bad, memberOf(3, newPublicKey(t))), 3)); err != nil {
		t.Fatal(err)
	}
	if reads() == before {
		t.Error("a new member was applied without reading the device")
	}
	if st := c.StatusNow(time.Now()); !st.Applied || st.Peers.Count != 2 {
		t.Errorf("after a new member: applied %v, %d peers; want 2", st.Applied, st.Peers.Count)
	}
}
