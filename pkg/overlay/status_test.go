package overlay

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// bigMember is member i of a large cluster, as ClaimMember writes it.
func bigMember(i int, publicKey string) registry.Member {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(1 + i>>8), byte(i), 0}), 24)
	return registry.Member{
		Name:      fmt.Sprintf("worker-%05d", i),
		PublicKey: publicKey,
		Endpoint:  fmt.Sprintf("203.0.%d.%d:51820", 113+i>>8, i&255),
		Subnet:    subnet,
		OverlayIP: subnet.Addr(),
	}
}

// fakeCluster is a Component of node worker-00000 in a cluster of n+1
// members, applied to a FakeDevice: the real desired state, the real
// per-peer deltas, and the real status code reading the device.
func fakeCluster(t testing.TB, n int) (*Component, *FakeDevice, desired.State) {
	t.Helper()
	self, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	snap := &registry.Snapshot{Revision: 42, Members: map[string]registry.Member{}}
	for i := range n + 1 {
		k := self
		if i > 0 {
			if k, err = wgtypes.GeneratePrivateKey(); err != nil {
				t.Fatal(err)
			}
		}
		m := bigMember(i, k.PublicKey().String())
		snap.Members[m.Name] = m
	}
	params := desired.Params{Keepalive: 25 * time.Second, Network: netip.MustParsePrefix("10.0.0.0/8")}
	want, err := desired.Compute(snap, "worker-00000", params)
	if err != nil {
		t.Fatal(err)
	}
	if len(want.Peers) != n {
		t.Fatalf("desired state has %d peers, want %d", len(want.Peers), n)
	}
	dev := NewFakeDevice(self)
	if _, err := dev.Set(want); err != nil {
		t.Fatal(err)
	}
	c := &Component{opts: Options{Self: "worker-00000", Interface: "meshd-wg"}, key: self, reader: dev,
		track: &tracker{target: &want, applied: true, revision: snap.Revision}, cache: &bootCache{}}
	return c, dev, want
}

// trafficFor gives every peer of dev byte counters and a handshake: most
// recent, one in 5 stale (4 to 64 minutes old), one in 50 never.
func trafficFor(dev *FakeDevice, want desired.State, now time.Time) {
	for i, p := range want.Peers {
		hs := now.Add(-time.Duration(i%120) * time.Second)
		switch {
		case i%50 == 7:
			hs = time.Time{}
		case i%5 == 3:
			hs = now.Add(-time.Duration(4+i%60) * time.Minute)
		}
		dev.Traffic(p.PublicKey, hs, int64(1000*i+17), int64(900*i+3))
	}
}

// TestStatusSizeIndependentOfPeers: the node status a node publishes
// (registry.Status with the overlay component, as the agent marshals it)
// is the same size, within a few digits, with 100 peers as with 5,000,
// while the per-peer detail on the node has every peer.
func TestStatusSizeIndependentOfPeers(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	size := map[int]int{}
	for _, n := range []int{100, 5000} {
		c, dev, want := fakeCluster(t, n)
		trafficFor(dev, want, now)
		st := c.StatusNow(now)
		if st.Peers.Count != n {
			t.Fatalf("n=%d: count %d", n, st.Peers.Count)
		}
		if st.Peers.StaleCount == 0 || len(st.Peers.Stale) > MaxStaleNames || st.Peers.Oldest != "never" {
			t.Fatalf("n=%d: summary %+v", n, st.Peers)
		}
		if got := len(c.PeerDetails(now)); got != n {
			t.Fatalf("n=%d: %d peer details, want %d", n, got, n)
		}
		raw, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(registry.Status{Node: "worker-00000", Revision: 42, Seen: 42, UpdatedAt: now,
			Components: map[string]json.RawMessage{"overlay": raw}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := registry.DecodeStatus("worker-00000", b); err != nil {
			t.Fatalf("n=%d: the published status does not decode: %v", n, err)
		}
		size[n] = len(b)
		t.Logf("n=%d: status %d bytes", n, len(b))
	}
	if d := size[5000] - size[100]; d > 16 {
		t.Errorf("status grew by %d bytes from 100 to 5000 peers (%d -> %d): want only the counts' digits", d, size[100], size[5000])
	}
	if size[5000] > 4096 {
		t.Errorf("status is %d bytes with 5000 peers, want at most 4 KiB", size[5000])
	}
}

// TestStatusUnchangedByTraffic: byte counters and handshakes that stay
// recent do not change the published status (so they cost no etcd write);
// a peer going stale does.
func TestStatusUnchangedByTraffic(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	c, dev, want := fakeCluster(t, 20)
	for _, p := range want.Peers {
		dev.Traffic(p.PublicKey, now.Add(-time.Minute), 10, 20)
	}
	before, _ := json.Marshal(c.StatusNow(now))
	for i, p := range want.Peers {
		dev.Traffic(p.PublicKey, now.Add(time.Duration(i)*time.Second), int64(5000+i), int64(7000+i))
	}
	later := now.Add(30 * time.Second)
	c.peerCache.Refresh(later) // as the agent's status refresh: read the device again
	after, _ := json.Marshal(c.StatusNow(later))
	if string(before) != string(after) {
		t.Fatalf("status changed with traffic alone:\n%s\n%s", before, after)
	}
	dev.Traffic(want.Peers[3].PublicKey, later.Add(-10*time.Minute), 1, 1)
	c.peerCache.Refresh(later.Add(PeerSummaryMaxAge))
	stale := c.StatusNow(later.Add(PeerSummaryMaxAge))
	if stale.Peers.StaleCount != 1 || stale.Peers.Stale[0] != want.Peers[3].Name || stale.Peers.Oldest != "<1h" {
		t.Fatalf("a stale peer is not reported: %+v", stale.Peers)
	}
}

// TestPeerSummaryCache: a status reuses the last summary read off the
// device, whatever its age (a reconcile pass reads no device); the
// periodic refresh (RefreshStatus) has it read again once it is
// PeerSummaryMaxAge old, and so does a change of the device by the
// overlay at once.
func TestPeerSummaryCache(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	c, dev, want := fakeCluster(t, 20)
	for _, p := range want.Peers {
		dev.Traffic(p.PublicKey, now.Add(-time.Minute), 10, 20)
	}
	if st := c.StatusNow(now); st.Peers.Recent != 20 {
		t.Fatalf("recent %d, want 20", st.Peers.Recent)
	}
	dev.Traffic(want.Peers[0].PublicKey, now.Add(-time.Hour), 1, 1)
	if st := c.StatusNow(now.Add(time.Hour)); st.Peers.Recent != 20 {
		t.Errorf("without a refresh: recent %d, want the cached 20", st.Peers.Recent)
	}
	c.peerCache.Refresh(now.Add(PeerSummaryMaxAge - time.Millisecond))
	if st := c.StatusNow(now.Add(PeerSummaryMaxAge)); st.Peers.Recent != 20 {
		t.Errorf("refreshed within the max age: recent %d, want the cached 20", st.Peers.Recent)
	}
	c.peerCache.Refresh(now.Add(PeerSummaryMaxAge))
	if st := c.StatusNow(now.Add(PeerSummaryMaxAge)); st.Peers.Recent != 19 || st.Peers.StaleCount != 1 {
		t.Errorf("refreshed at the max age: %+v, want 19 recent and 1 stale", st.Peers)
	}
	// The overlay removes a peer: the next status counts it gone.
	if _, err := dev.Set(desired.State{ListenPort: want.ListenPort, Peers: want.Peers[1:]}); err != nil {
		t.Fatal(err)
	}
	c.peerCache.Invalidate()
	if st := c.StatusNow(now.Add(PeerSummaryMaxAge)); st.Peers.Count != 19 || st.Peers.Recent != 19 {
		t.Errorf("after Invalidate: %+v, want 19 peers, all recent", st.Peers)
	}
	// A clock that steps back reads the device again.
	dev.Traffic(want.Peers[1].PublicKey, now.Add(-time.Hour), 1, 1)
	c.peerCache.Refresh(now)
	if st := c.StatusNow(now); st.Peers.StaleCount != 1 {
		t.Errorf("after the clock stepped back: %+v, want 1 stale", st.Peers)
	}
}

// TestPeerMetrics gathers the per-peer series from a real Prometheus
// registry: one series per peer and name, the device's values, and a
// removed peer's series gone at the next scrape.
func TestPeerMetrics(t *testing.T) {
	c, dev, want := fakeCluster(t, 3)
	now := time.Now().Truncate(time.Second)
	dev.Traffic(want.Peers[0].PublicKey, now, 1234, 5678)
	reg := prometheus.NewRegistry()
	if err := reg.Register(peerCollector{c}); err != nil {
		t.Fatal(err)
	}
	gather := func() map[string]map[string]float64 {
		out, err := gatherPeers(reg)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	got := gather()
	p0 := want.Peers[0].Name
	if v := got["meshd_wireguard_peer_last_handshake_timestamp_seconds"][p0]; v != float64(now.Unix()) {
		t.Errorf("handshake of %s = %v, want %v", p0, v, now.Unix())
	}
	if v := got["meshd_wireguard_peer_receive_bytes_total"][p0]; v != 1234 {
		t.Errorf("rx of %s = %v", p0, v)
	}
	if v := got["meshd_wireguard_peer_transmit_bytes_total"][p0]; v != 5678 {
		t.Errorf("tx of %s = %v", p0, v)
	}
	for name, vals := range got {
		if len(vals) != 3 {
			t.Errorf("%s has %d series, want 3: %v", name, len(vals), vals)
		}
	}
	// The peer leaves the cluster: its series vanish.
	next := want
	next.Peers = want.Peers[1:]
	if _, err := dev.Set(next); err != nil {
		t.Fatal(err)
	}
	c.track.target = &next
	for name, vals := range gather() {
		if _, ok := vals[p0]; ok || len(vals) != 2 {
			t.Errorf("after removing %s, %s has %v", p0, name, vals)
		}
	}
}

// TestFakeDeviceFollowsDeltas: the fake device reached through the
// applier's deltas holds exactly the desired peers after any sequence of
// states (the property TestApplierStates checks on a real device).
func TestFakeDeviceFollowsDeltas(t *testing.T) {
	_, dev, want := fakeCluster(t, 30)
	for step := range 20 {
		next := want
		next.Peers = nil
		for i, p := range want.Peers {
			if (i+step)%3 == 0 {
				continue
			}
			if (i+step)%5 == 0 {
				p.Endpoint = netip.AddrPortFrom(p.Endpoint.Addr(), uint16(4000+step))
			}
			next.Peers = append(next.Peers, p)
		}
		if _, err := dev.Set(next); err != nil {
			t.Fatal(err)
		}
		plan, err := dev.Set(next)
		if err != nil {
			t.Fatal(err)
		}
		if !plan.Empty() {
			t.Fatalf("step %d: not converged: %s", step, plan)
		}
		d, _ := dev.Device()
		if len(d.Peers) != len(next.Peers) {
			t.Fatalf("step %d: %d peers on the device, want %d", step, len(d.Peers), len(next.Peers))
		}
	}
	if !strings.Contains(dev.Mode(), "fake") {
		t.Fatal("the fake device must say so")
	}
}

// gatherPeers scrapes reg: metric name -> peer label -> value.
func gatherPeers(reg *prometheus.Registry) (map[string]map[string]float64, error) {
	mfs, err := reg.Gather()
	if err != nil {
		return nil, err
	}
	out := map[string]map[string]float64{}
	for _, mf := range mfs {
		vals := map[string]float64{}
		for _, m := range mf.GetMetric() {
			peer := m.GetLabel()[0].GetValue()
			switch {
			case m.Gauge != nil:
				vals[peer] = m.GetGauge().GetValue()
			case m.Counter != nil:
				vals[peer] = m.GetCounter().GetValue()
			}
		}
		out[mf.GetName()] = vals
	}
	return out, nil
}

// TestFakeDeviceRekey: with RekeyEvery, a peer that has had a handshake
// reports one within the last period, on the period's grid from its
// first; a peer that never had one still has none.
func TestFakeDeviceRekey(t *testing.T) {
	_, dev, want := fakeCluster(t, 2)
	first := time.Now().Add(-5 * time.Minute)
	dev.Traffic(want.Peers[0].PublicKey, first, 1, 1)
	dev.RekeyEvery(2 * time.Minute)
	d, err := dev.Device()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]time.Time{}
	for _, p := range d.Peers {
		got[p.PublicKey.String()] = p.LastHandshakeTime
	}
	if hs := got[want.Peers[0].PublicKey]; !hs.Equal(first.Add(4 * time.Minute)) {
		t.Errorf("handshake %v, want two periods after %v", hs, first)
	}
	if hs := got[want.Peers[1].PublicKey]; !hs.IsZero() {
		t.Errorf("a peer without a handshake got one at %v", hs)
	}
}

// TestPeerSummaryAfterApply: the summary PeerCache.Applied derives from
// the device as read before an apply, and the apply's plan, is the one a
// read of the device after the apply gives.
func TestPeerSummaryAfterApply(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	_, dev, want := fakeCluster(t, 6)
	for i, p := range want.Peers {
		dev.Traffic(p.PublicKey, now.Add(-time.Duration(i)*time.Minute), 10, 20) // peers 4, 5 stale
	}
	next := want
	next.Peers = append([]desired.Peer(nil), want.Peers[1:]...)          // peer 0 removed
	next.Peers[0].Endpoint = netip.MustParseAddrPort("192.0.2.99:51820") // peer 1 updated
	k, _ := wgtypes.GeneratePrivateKey()
	next.Peers = append(next.Peers, desired.Peer{Name: "new", PublicKey: k.PublicKey().String(), // added
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.10.99.0/24")}, Keepalive: 25 * time.Second})

	before, err := dev.Device()
	if err != nil {
		t.Fatal(err)
	}
	plan, err := dev.Set(next)
	if err != nil {
		t.Fatal(err)
	}
	var pc PeerCache
	pc.Applied(dev.Mode(), before, plan, &next, now)
	var got Status
	pc.read(&got, &next, failingReader{t}, now) // fresh: must not read
	after, _ := dev.Device()
	want2 := summarize(after.Peers, func() map[string]string { return peerNames(&next) }, now)
	if diff := cmp.Diff(want2, got.Peers); diff != "" {
		t.Errorf("summary after the apply (-read +derived):\n%s", diff)
	}
	if got.Peers.Count != 6 || got.Peers.Oldest != "never" || got.Peers.StaleCount != 3 {
		t.Errorf("derived %+v, want 6 peers, the new one never handshaken, 3 not recent", got.Peers)
	}
}

// failingReader is a device that fails the test when read.
type failingReader struct{ t *testing.T }

func (f failingReader) Mode() string { return "fake" }
func (f failingReader) Device() (*wgtypes.Device, error) {
	f.t.Error("device read although the summary was fresh")
	return nil, errors.New("not to be read")
}
