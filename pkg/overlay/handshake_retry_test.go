package overlay

import (
	"net"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// TestLostFirstHandshakeIsRetried recreates a join race with real
// WireGuard: n0 adds n1 before n1's device exists, so n0's first
// handshake initiation is lost, and n1 knows no endpoint for n0, so it
// cannot initiate either. WireGuard alone would try again only after
// REKEY_TIMEOUT (5 s); the handshake retry re-adds the peer and the handshake
// completes well within that (n0, whose device had no peers, is the
// joining side and retries from about 100 ms).
func TestLostFirstHandshakeIsRetried(t *testing.T) {
	l := newLab(t, false)
	n := []*node{l.addNode(0), l.addNode(1)}
	k0 := n[0].must(t, helperCmd{Op: "new", Options: l.options(0)}).PublicKey
	k1 := n[1].must(t, helperCmd{Op: "new", Options: l.options(1)}).PublicKey
	m0, m1 := memberOf(0, k0), memberOf(1, k1)

	n[0].must(t, helperCmd{Op: "apply", Members: []registry.Member{m0, m1}, Revision: 1})
	added := time.Now()
	time.Sleep(50 * time.Millisecond) // n0's initiation reaches no device
	anon := m0
	anon.Endpoint = ""
	n[1].must(t, helperCmd{Op: "apply", Members: []registry.Member{anon, m1}, Revision: 1})

	waitFor(t, 2*time.Second, "first handshake after the lost initiation", func() bool {
		return !handshake(t, n[0], k1).IsZero()
	})
	if d := time.Since(added); d >= 5*time.Second {
		t.Fatalf("handshake took %v: no faster than WireGuard's own retry", d)
	}
	if rep := n[1].do(t, helperCmd{Op: "ping", Addr: overlayIP(0)}); rep.Err != "" {
		t.Fatalf("n1 cannot reach n0 after the handshake: %s", rep.Err)
	}
	// An established session is left alone by later retries.
	h := settledHandshake(t, n[0], k1)
	time.Sleep(time.Duration(float64(retryDelaysJoiner[len(retryDelaysJoiner)-1]) * (1 + retryJitter)))
	if got := handshake(t, n[0], k1); !got.Equal(h) {
		t.Errorf("the handshake retry re-handshook an established peer: %v -> %v", h, got)
	}
}

// TestNeedsRetry: the decision, check by check, from the live peer.
func TestNeedsRetry(t *testing.T) {
	added := time.Date(2026, 11, 22, 1, 0, 0, 0, time.UTC)
	hs := added.Add(20 * time.Millisecond)
	peer := func(handshake time.Time, rx, tx int64) wgtypes.Peer {
		return wgtypes.Peer{LastHandshakeTime: handshake, ReceiveBytes: rx, TransmitBytes: tx}
	}
	for _, c := range []struct {
		name  string
		steps []wgtypes.Peer
		want  []bool
	}{
		{"no handshake yet", []wgtypes.Peer{peer(time.Time{}, 148, 92)}, []bool{true}},
		{"handshake before the add (an older session)", []wgtypes.Peer{peer(added.Add(-time.Second), 0, 0)}, []bool{true}},
		{"healthy: both directions", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 400, 300)}, []bool{false, false}},
		{"silent session", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 124)}, []bool{false, false}},
		{"only receiving", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 900, 124)}, []bool{false, false}},
		{"sending into the void", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 700), peer(hs, 180, 900)}, []bool{false, false, true}},
		{"one packet that gets no answer", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 156), peer(hs, 180, 156), peer(hs, 180, 156)}, []bool{false, false, false, false}},
		{"a second send after a quiet look", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 156), peer(hs, 180, 156), peer(hs, 180, 400)}, []bool{false, false, false, true}},
		{"the answer comes at the second look", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 700), peer(hs, 260, 800), peer(hs, 260, 900)}, []bool{false, false, false, false}},
		{"new handshake since", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 700), peer(hs.Add(time.Second), 180, 900)}, []bool{false, false, false}},
		{"after a retry the baseline starts again", []wgtypes.Peer{peer(hs, 180, 124), peer(hs, 180, 700), peer(hs, 180, 900), peer(hs, 180, 1000)}, []bool{false, false, true, false}},
	} {
		k := &retryState{added: added, delays: []time.Duration{time.Second}}
		now := added.Add(100 * time.Millisecond)
		for i, p := range c.steps {
			if got, _ := k.needsRetry(p, now); got != c.want[i] {
				t.Errorf("%s: check %d: needsRetry = %v, want %v", c.name, i, got, c.want[i])
			}
			// A suspect is looked at again soon, not at the next delay.
			if at, ok := k.nextCheck(); k.suspect && !k.confirmAt.IsZero() && (!ok || !at.Equal(now.Add(noReplyConfirm))) {
				t.Errorf("%s: check %d: suspect checked next at %v (%v), want %v", c.name, i, at, ok, now.Add(noReplyConfirm))
			}
			k.advance()
			now = now.Add(noReplyConfirm)
		}
	}
}

// TestRetryScheduleConfirms: the check that makes a peer a suspect adds a
// second look noReplyConfirm later, even after the schedule's last delay,
// and a peer is forgotten only once its schedule is over and nothing is
// left to confirm.
func TestRetryScheduleConfirms(t *testing.T) {
	added := time.Date(2026, 11, 22, 1, 0, 0, 0, time.UTC)
	h := &handshakeRetry{pending: map[string]*retryState{}}
	k := &retryState{added: added, delays: []time.Duration{time.Second}}
	h.pending["k"] = k
	hs := added.Add(20 * time.Millisecond)
	k.handshake, k.rx, k.tx = hs, 180, 124
	if next, due := h.dueLocked(added.Add(500 * time.Millisecond)); len(due) != 0 || !next.Equal(added.Add(time.Second)) {
		t.Fatalf("before the delay: due %d, next %v", len(due), next)
	}
	at := added.Add(time.Second)
	if _, due := h.dueLocked(at); len(due) != 1 {
		t.Fatalf("at the delay: due %d", len(due))
	}
	if retry, _ := k.needsRetry(wgtypes.Peer{LastHandshakeTime: hs, ReceiveBytes: 180, TransmitBytes: 700}, at); retry {
		t.Fatal("re-added on the first look")
	}
	next, due := h.dueLocked(at)
	if len(due) != 0 || !next.Equal(at.Add(noReplyConfirm)) {
		t.Fatalf("after the suspicion: due %d, next %v, want the second look at %v", len(due), next, at.Add(noReplyConfirm))
	}
	if _, due := h.dueLocked(at.Add(noReplyConfirm)); len(due) != 1 {
		t.Fatalf("second look not due")
	}
	if retry, why := k.needsRetry(wgtypes.Peer{LastHandshakeTime: hs, ReceiveBytes: 180, TransmitBytes: 900}, at.Add(noReplyConfirm)); !retry || why != "no reply" {
		t.Fatalf("second look: retry %v (%s), want a re-add for no reply", retry, why)
	}
	if _, due := h.dueLocked(at.Add(time.Second)); len(due) != 0 || len(h.pending) != 0 {
		t.Errorf("after its schedule: due %d, pending %d, want the peer forgotten", len(due), len(h.pending))
	}
}

// A joiner retries first, even with its jitter, and never at the same
// moment as an established node.
func TestRetrySchedules(t *testing.T) {
	for range 100 {
		j := retryDelays(true)
		if max := retryDelaysJoiner[0] + time.Duration(float64(retryDelaysJoiner[0])*retryJitter); j[0] > max {
			t.Fatalf("joiner's first retry at %v, beyond %v", j[0], max)
		}
		if j[0] >= retryDelaysEstablished[0] || j[1] >= retryDelaysEstablished[0] {
			t.Fatalf("joiner schedule %v does not lead the established %v", j, retryDelaysEstablished)
		}
		for _, d := range j {
			if slices.Contains(retryDelaysEstablished, d) {
				t.Fatalf("both schedules retry at %v", d)
			}
		}
	}
	if !slices.Equal(retryDelays(false), retryDelaysEstablished) {
		t.Error("established schedule is not the fixed one")
	}
}

// TestRetryConfig: the decision, from the device's live peers, of which
// due peers to re-add and how: remove and add back exactly as the device
// has them; peers with a fresh handshake, gone from the device or without
// an endpoint are left alone.
func TestRetryConfig(t *testing.T) {
	added := time.Unix(1000, 0)
	key := func() wgtypes.Key {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		return k.PublicKey()
	}
	ka, kb, kc, kd := key(), key(), key(), key()
	allowed := []net.IPNet{{IP: net.IPv4(10, 10, 1, 0).To4(), Mask: net.CIDRMask(24, 32)}}
	ep := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 51820}
	due := []*retryState{
		{peer: desired.Peer{Name: "a", PublicKey: ka.String()}, added: added},
		{peer: desired.Peer{Name: "b", PublicKey: kb.String()}, added: added},
		{peer: desired.Peer{Name: "c", PublicKey: kc.String()}, added: added},
		{peer: desired.Peer{Name: "d", PublicKey: kd.String()}, added: added},
	}
	live := []wgtypes.Peer{
		{PublicKey: ka, Endpoint: ep, AllowedIPs: allowed, PersistentKeepaliveInterval: 25 * time.Second},
		{PublicKey: kb, Endpoint: ep, LastHandshakeTime: added.Add(time.Second)},
		{PublicKey: kd}, // no endpoint to initiate to
	}
	cfg, names := retryConfig(due, live, time.Now())
	if !slices.Equal(names, []string{"a (no handshake)"}) {
		t.Fatalf("re-added %v, want only a (no handshake)", names)
	}
	if len(cfg.Peers) != 2 || !cfg.Peers[0].Remove || cfg.Peers[0].PublicKey != ka || cfg.Peers[1].Remove || cfg.Peers[1].PublicKey != ka {
		t.Fatalf("config %+v, want remove a then add a", cfg.Peers)
	}
	add := cfg.Peers[1]
	if add.Endpoint.String() != ep.String() || !add.ReplaceAllowedIPs || len(add.AllowedIPs) != 1 || add.AllowedIPs[0].String() != "10.10.1.0/24" ||
		add.PersistentKeepaliveInterval == nil || *add.PersistentKeepaliveInterval != 25*time.Second {
		t.Fatalf("re-add %+v, want the peer as the device has it", add)
	}
}
