package desired

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

// lease returns a flannel WireGuard lease for 10.10.<i>.0/24 with key(i),
// as flanneld writes it (Port set).
func lease(i int) registry.FlannelLease {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(10 + i/256), byte(i % 256), 0}), 24)
	return registry.FlannelLease{
		PublicIP:    fmt.Sprintf("198.51.100.%d", i%250+1),
		BackendType: registry.FlannelBackendWireGuard,
		WireGuard:   &registry.FlannelWireGuard{PublicKey: key(i), Port: 51820},
		Subnet:      subnet,
	}
}

func withLeases(s *registry.Snapshot, ls ...registry.FlannelLease) *registry.Snapshot {
	if s.FlannelLeases == nil {
		s.FlannelLeases = map[netip.Prefix]registry.FlannelLease{}
	}
	for _, l := range ls {
		s.FlannelLeases[l.Subnet] = l
	}
	return s
}

func flannelPeer(l registry.FlannelLease, keepalive time.Duration) Peer {
	return Peer{
		Name:       FlannelPeerName(l.Subnet),
		PublicKey:  l.WireGuard.PublicKey,
		Endpoint:   netip.AddrPortFrom(netip.MustParseAddr(l.PublicIP), l.WireGuard.Port),
		AllowedIPs: []netip.Prefix{l.Subnet},
		Keepalive:  keepalive,
	}
}

func TestFlannelOnlyLeaseBecomesPeer(t *testing.T) {
	m0, m1 := member(0), member(1)
	fl := lease(2)
	old := lease(3) // an older flannel: no Port in BackendData
	old.WireGuard = &registry.FlannelWireGuard{PublicKey: key(3)}
	snap := withLeases(snapOf(m0, m1), fl, old)
	snap.FlannelConfig = &registry.FlannelConfig{BackendType: "wireguard", ListenPort: 51999, Keepalive: time.Minute}
	st, err := Compute(snap, "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	oldPeer := flannelPeer(old, time.Minute)
	oldPeer.Endpoint = netip.AddrPortFrom(netip.MustParseAddr(old.PublicIP), 51999) // the config's port
	want := []Peer{peerOf(m1, 25*time.Second), flannelPeer(fl, time.Minute), oldPeer}
	sortPeers(want)
	if diff := cmp.Diff(want, st.Peers, cmpOpts...); diff != "" {
		t.Errorf("peers (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]netip.Prefix{m1.Subnet, fl.Subnet, old.Subnet}, st.Routes, cmpOpts...); diff != "" {
		t.Errorf("routes (-want +got):\n%s", diff)
	}
	if len(st.Problems) != 0 {
		t.Errorf("problems: %v", st.Problems)
	}
	// Without a network config: flannel's default port, meshd's keepalive.
	snap.FlannelConfig = nil
	st, _ = Compute(snap, "n0", defaultParams)
	for _, p := range st.Peers {
		if p.Name == FlannelPeerName(old.Subnet) && (p.Endpoint.Port() != 51820 || p.Keepalive != 25*time.Second) {
			t.Errorf("peer without config: %+v", p)
		}
	}
}

func TestMemberRecordWinsOverFlannelLease(t *testing.T) {
	m0, m1 := member(0), member(1)
	// n1 migrated: its old flannel lease (same subnet, old key, old
	// endpoint) is still there, and so is meshd's own lease for n0.
	stale := lease(1)
	stale.WireGuard = &registry.FlannelWireGuard{PublicKey: key(900), Port: 51820}
	own := lease(0)
	snap := withLeases(snapOf(m0, m1), stale, own)
	snap.Subnets = map[netip.Prefix]string{m0.Subnet: "n0", m1.Subnet: "n1"}
	st, err := Compute(snap, "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]Peer{peerOf(m1, 25*time.Second)}, st.Peers, cmpOpts...); diff != "" {
		t.Errorf("peers (-want +got):\n%s", diff)
	}
	if len(st.Problems) != 0 {
		t.Errorf("problems: %v", st.Problems)
	}
}

func TestExpiredFlannelLeaseRemovesPeer(t *testing.T) {
	m0 := member(0)
	fl := lease(5)
	c, err := NewComputer("n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	snap := withLeases(snapOf(m0), fl)
	st, _ := c.Compute(snap)
	if len(st.Peers) != 1 || st.Peers[0].Name != "flannel:10.10.5.0-24" {
		t.Fatalf("peers with the lease: %+v", st.Peers)
	}
	// etcd deletes the key when flannel's lease expires.
	snap = &registry.Snapshot{Members: snap.Members, FlannelLeases: map[netip.Prefix]registry.FlannelLease{}}
	st, _ = c.Compute(snap)
	if len(st.Peers) != 0 || len(st.Routes) != 0 {
		t.Errorf("after expiry: peers %+v routes %v", st.Peers, st.Routes)
	}
}

func TestHostileFlannelLeasesSkipped(t *testing.T) {
	m0, m1 := member(0), member(1)
	good := lease(2)
	badKey := lease(3)
	badKey.WireGuard = &registry.FlannelWireGuard{PublicKey: "AAAA"}
	outside := lease(4)
	outside.Subnet = netip.MustParsePrefix("192.168.4.0/24")
	selfKey := lease(5)
	selfKey.WireGuard = &registry.FlannelWireGuard{PublicKey: m0.PublicKey}
	memberKey := lease(6)
	memberKey.WireGuard = &registry.FlannelWireGuard{PublicKey: m1.PublicKey}
	clashA, clashB := lease(7), lease(8)
	clashB.WireGuard = &registry.FlannelWireGuard{PublicKey: clashA.WireGuard.PublicKey}
	overSelf := lease(9)
	overSelf.Subnet = netip.MustParsePrefix("10.10.0.128/25")
	claimed := lease(10) // claimed by n7, which has no member record
	wide := lease(11)
	wide.Subnet = netip.MustParsePrefix("10.10.64.0/18") // swallows lease 70
	inWide := lease(70)
	noIP := lease(12)
	noIP.PublicIP = "0.0.0.0"
	vxlan := lease(13)
	vxlan.BackendType, vxlan.WireGuard = "vxlan", nil
	snap := withLeases(snapOf(m0, m1), good, badKey, outside, selfKey, memberKey, clashA, clashB, overSelf, claimed, wide, inWide, noIP, vxlan)
	snap.Subnets = map[netip.Prefix]string{m0.Subnet: "n0", m1.Subnet: "n1", claimed.Subnet: "n7"}
	st, err := Compute(snap, "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	want := []Peer{peerOf(m1, 25*time.Second), flannelPeer(good, 25*time.Second)}
	sortPeers(want)
	if diff := cmp.Diff(want, st.Peers, cmpOpts...); diff != "" {
		t.Errorf("peers (-want +got):\n%s", diff)
	}
	got := map[string]string{}
	for _, p := range st.Problems {
		got[p.Member] = p.Err
	}
	for _, l := range []registry.FlannelLease{badKey, outside, selfKey, memberKey, clashA, clashB, overSelf, claimed, wide, inWide, noIP} {
		if got[FlannelPeerName(l.Subnet)] == "" {
			t.Errorf("lease %v not reported; problems %v", l.Subnet, st.Problems)
		}
	}
	if _, ok := got[FlannelPeerName(vxlan.Subnet)]; ok {
		t.Errorf("a vxlan lease is not a problem, flannel ignores it too")
	}
	if len(st.Problems) != 11 {
		t.Errorf("%d problems, want 11: %v", len(st.Problems), st.Problems)
	}
	// The Computer agrees.
	c, _ := NewComputer("n0", defaultParams)
	cst, _ := c.Compute(snap)
	if diff := cmp.Diff(st, cst, cmpOpts...); diff != "" {
		t.Errorf("Computer differs (-Compute +Computer):\n%s", diff)
	}
}
