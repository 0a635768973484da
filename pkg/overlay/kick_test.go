package overlay

import (
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// TestLostFirstHandshakeIsRetried recreates a join race with real
// WireGuard: n0 adds n1 before n1's device exists, so n0's first
// handshake initiation is lost, and n1 knows no endpoint for n0, so it
// cannot initiate either. WireGuard alone would try again only after
// REKEY_TIMEOUT (5 s); the kick loop re-adds the peer and the handshake
// completes well within that (n0 kicks at 100 ms or, when its key is the
// higher one, at 1 s).
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
	// An established session is left alone by later kicks.
	h := settledHandshake(t, n[0], k1)
	time.Sleep(max(kickDelaysFirst[len(kickDelaysFirst)-1], kickDelaysSecond[len(kickDelaysSecond)-1]))
	if got := handshake(t, n[0], k1); !got.Equal(h) {
		t.Errorf("the kick loop re-handshook an established peer: %v -> %v", h, got)
	}
}
