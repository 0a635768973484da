package overlay

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// TestMesh runs real WireGuard (kernel if present, else wireguard-go on
// TUN) in three network namespaces and walks the overlay through the
// life of a cluster: two nodes, a third joins, a route is deleted by
// hand, meshd restarts, a member is removed, a node boots from its cache,
// a node is SIGKILLed. It runs with userspace devices detached (their own
// processes, meshd's default) and inside the node process.
func TestMesh(t *testing.T) {
	t.Run("detached", func(t *testing.T) { testMesh(t, true) })
	t.Run("in-process", func(t *testing.T) { testMesh(t, false) })
}

func testMesh(t *testing.T, detached bool) {
	l := newLab(t, detached)
	n := []*node{l.addNode(0), l.addNode(1), l.addNode(2)}
	keys := make([]string, 3)
	members := make([]registry.Member, 3)
	for i, nd := range n {
		keys[i] = nd.must(t, helperCmd{Op: "new", Options: l.options(i)}).PublicKey
		members[i] = memberOf(i, keys[i])
	}
	apply := func(nd *node, rev int64, ms ...registry.Member) {
		t.Helper()
		nd.must(t, helperCmd{Op: "apply", Members: ms, Revision: rev})
		if plan := nd.must(t, helperCmd{Op: "plan", Members: ms, Revision: rev}).Plan; plan != "" {
			t.Fatalf("%s not converged after apply, still to do:\n%s", nd.name, plan)
		}
	}
	ping := func(from *node, to int) {
		t.Helper()
		if rep := from.do(t, helperCmd{Op: "ping", Addr: overlayIP(to)}); rep.Err != "" {
			t.Fatalf("%s cannot reach n%d over the overlay: %s\n%s log:\n%s", from.name, to, rep.Err, from.name, from.logText())
		}
	}

	// Before its member record exists a new node configures its device
	// and peers, and no address or route (desired.BeforeClaim).
	n[0].must(t, helperCmd{Op: "apply", Members: members[1:2], Revision: 1})
	if st := n[0].must(t, helperCmd{Op: "status"}).Status; !st.Waiting || st.Mode != "userspace" || st.Peers.Count != 1 {
		t.Fatalf("without a member record: status %+v, want waiting, a userspace device and its one peer", st)
	}
	if addr := l.ip("-n", n[0].ns, "addr", "show", l.iface(0)); strings.Contains(addr, "10.10.") {
		t.Errorf("an address before the claim:\n%s", addr)
	}
	if routes := l.ip("-n", n[0].ns, "route", "show", "table", "all", "dev", l.iface(0)); strings.Contains(routes, "10.10.") {
		t.Errorf("routes before the claim:\n%s", routes)
	}

	// Two nodes.
	apply(n[0], 2, members[0], members[1])
	apply(n[1], 2, members[0], members[1])
	ping(n[0], 1)
	ping(n[1], 0)
	link := l.ip("-n", n[0].ns, "link", "show", l.iface(0))
	if !strings.Contains(link, "mtu 1380") {
		t.Errorf("interface MTU: want uplink 1460 - 80 = 1380, got %s", link)
	}
	if addr := l.ip("-n", n[0].ns, "addr", "show", l.iface(0)); !strings.Contains(addr, "10.10.0.0/32") {
		t.Errorf("interface address: want 10.10.0.0/32, got %s", addr)
	}
	if rules := l.ip("-n", n[0].ns, "rule", "show"); !strings.Contains(rules, "to 10.0.0.0/8 lookup 51820") {
		t.Errorf("policy rule missing:\n%s", rules)
	}
	h01 := settledHandshake(t, n[0], keys[1])
	h10 := settledHandshake(t, n[1], keys[0])
	if h01.IsZero() || h10.IsZero() {
		t.Fatalf("no handshake after ping: %v %v", h01, h10)
	}
	// The per-peer series, scraped from the live device: the handshake
	// just seen and the ping's bytes, labelled with the peer's name.
	met := n[0].must(t, helperCmd{Op: "metrics"}).Metrics
	if hs := met["meshd_wireguard_peer_last_handshake_timestamp_seconds"]["n1"]; hs < float64(h01.Unix())-1 || hs > float64(h01.Unix())+1 {
		t.Errorf("handshake metric for n1 = %v, device says %v", hs, h01)
	}
	if rx, tx := met["meshd_wireguard_peer_receive_bytes_total"]["n1"], met["meshd_wireguard_peer_transmit_bytes_total"]["n1"]; rx <= 0 || tx <= 0 {
		t.Errorf("byte counters for n1: rx %v tx %v, want both > 0 after pings", rx, tx)
	}

	t.Run("third node joins without re-handshake", func(t *testing.T) {
		for _, nd := range n {
			apply(nd, 3, members...)
		}
		ping(n[0], 2)
		ping(n[1], 2)
		ping(n[2], 0)
		ping(n[2], 1)
		if got := handshake(t, n[0], keys[1]); !got.Equal(h01) {
			t.Errorf("n0's session with n1 re-handshook when n2 joined: %v -> %v", h01, got)
		}
		if got := handshake(t, n[1], keys[0]); !got.Equal(h10) {
			t.Errorf("n1's session with n0 re-handshook when n2 joined: %v -> %v", h10, got)
		}
	})

	t.Run("route deleted by hand comes back within a second", func(t *testing.T) {
		l.ip("-n", n[0].ns, "route", "del", "10.10.1.0/24", "table", "51820")
		start := time.Now()
		for {
			out, _ := exec.Command("ip", "-n", n[0].ns, "route", "show", "table", "51820", "10.10.1.0/24").Output()
			if strings.Contains(string(out), "10.10.1.0/24") {
				t.Logf("route back after %v: %s", time.Since(start), strings.TrimSpace(string(out)))
				break
			}
			if time.Since(start) > time.Second {
				t.Fatalf("route 10.10.1.0/24 not restored within 1s")
			}
			time.Sleep(10 * time.Millisecond)
		}
		ping(n[0], 1)

		l.ip("-n", n[0].ns, "rule", "del", "priority", "32000")
		waitFor(t, time.Second, "policy rule restored", func() bool {
			out, _ := exec.Command("ip", "-n", n[0].ns, "rule", "show").Output()
			return strings.Contains(string(out), "to 10.0.0.0/8 lookup 51820")
		})
	})

	t.Run("interface deleted by hand comes back", func(t *testing.T) {
		l.ip("-n", n[0].ns, "link", "del", l.iface(0))
		waitFor(t, 2*time.Second, "interface and routes restored", func() bool {
			out, _ := exec.Command("ip", "-n", n[0].ns, "route", "show", "table", "51820").Output()
			return strings.Contains(string(out), "10.10.2.0/24")
		})
		ping(n[0], 1)
		ping(n[2], 0)
	})

	t.Run("restart keeps key and peers", func(t *testing.T) {
		before := settledHandshake(t, n[0], keys[1])
		n[0].must(t, helperCmd{Op: "close"})
		// Closed: the interface and peers are still there.
		ping(n[1], 0)
		key := n[0].must(t, helperCmd{Op: "new", Options: l.options(0)}).PublicKey
		if key != keys[0] {
			t.Fatalf("public key changed across restart: %s -> %s", keys[0], key)
		}
		n[0].must(t, helperCmd{Op: "boot"})
		apply(n[0], 3, members...)
		if got := handshake(t, n[0], keys[1]); !got.Equal(before) {
			t.Errorf("restart re-handshook (peer removed and re-added?): %v -> %v", before, got)
		}
		ping(n[0], 1)
	})

	t.Run("removed member loses its peer", func(t *testing.T) {
		apply(n[0], 4, members[0], members[1])
		apply(n[1], 4, members[0], members[1])
		if hasPeer(t, n[0], keys[2]) || hasPeer(t, n[1], keys[2]) {
			t.Fatal("peer of removed member n2 still configured")
		}
		if out, _ := exec.Command("ip", "-n", n[0].ns, "route", "show", "table", "51820").Output(); strings.Contains(string(out), "10.10.2.0") {
			t.Errorf("route to removed member's subnet remains: %s", out)
		}
		if rep := n[0].do(t, helperCmd{Op: "ping", Addr: overlayIP(2), Timeout: 300 * time.Millisecond}); rep.Err == "" {
			t.Error("removed node still reachable over the overlay")
		}
		ping(n[0], 1)
	})

	t.Run("boot from cache without the registry", func(t *testing.T) {
		n[1].must(t, helperCmd{Op: "destroy"})
		if _, err := exec.Command("ip", "-n", n[1].ns, "link", "show", l.iface(1)).Output(); err == nil {
			t.Fatal("interface still present after destroy")
		}
		n[1].must(t, helperCmd{Op: "new", Options: l.options(1)})
		n[1].must(t, helperCmd{Op: "boot"})
		ping(n[1], 0)
		if st := n[1].must(t, helperCmd{Op: "status"}).Status; st.Peers.Count != 1 || st.Revision != 4 {
			t.Errorf("after boot: %d peers at revision %d, want 1 at 4", st.Peers.Count, st.Revision)
		}
	})
	t.Run("overlay address change", func(t *testing.T) {
		// n0 is given another subnet: its address is added before the old
		// one goes, its routes get the new source, n1 updates n0's
		// AllowedIPs in place.
		moved := members[0]
		moved.Subnet = netip.MustParsePrefix("10.10.9.0/24")
		moved.OverlayIP = moved.Subnet.Addr()
		before := settledHandshake(t, n[1], keys[0])
		apply(n[0], 5, moved, members[1])
		apply(n[1], 5, moved, members[1])
		addr := l.ip("-n", n[0].ns, "addr", "show", l.iface(0))
		if !strings.Contains(addr, "10.10.9.0/32") || strings.Contains(addr, "10.10.0.0/32") {
			t.Errorf("addresses after the change: %s", addr)
		}
		if r := l.ip("-n", n[0].ns, "route", "show", "table", "51820"); !strings.Contains(r, "src 10.10.9.0") {
			t.Errorf("routes keep the old source: %s", r)
		}
		ping(n[1], 9)
		ping(n[0], 1)
		if got := handshake(t, n[1], keys[0]); !got.Equal(before) {
			t.Errorf("changing n0's AllowedIPs re-handshook: %v -> %v", before, got)
		}
	})
	t.Run("SIGKILL and restart", func(t *testing.T) {
		current := []registry.Member{members[1]}
		current = append(current, members[0])
		current[1].Subnet = netip.MustParsePrefix("10.10.9.0/24")
		current[1].OverlayIP = current[1].Subnet.Addr()
		before := settledHandshake(t, n[1], keys[0])
		// n1 pings n0 every 20ms while n0's meshd is killed and restarted.
		type result struct {
			rep helperReply
			err error
		}
		pings := make(chan result, 1)
		go func() {
			rep, err := n[1].try(helperCmd{Op: "pings", Addr: overlayIP(9), Timeout: 1500 * time.Millisecond})
			pings <- result{rep, err}
		}()
		time.Sleep(200 * time.Millisecond)
		l.kill(n[0])
		killed := time.Now()
		l.startHelper(n[0])
		if key := n[0].must(t, helperCmd{Op: "new", Options: l.options(0)}).PublicKey; key != keys[0] {
			t.Fatalf("public key changed across a crash: %s -> %s", keys[0], key)
		}
		n[0].must(t, helperCmd{Op: "boot"})
		booted := time.Since(killed)
		res := <-pings
		rep := res.rep
		if res.err != nil || rep.Err != "" {
			t.Fatalf("ping loop: %v %s", res.err, rep.Err)
		}
		t.Logf("restarted in %v; n1 lost %d of %d pings to n0", booted, rep.Lost, rep.Sent)
		if !hasPeer(t, n[1], keys[0]) {
			t.Error("n1 dropped n0's peer while n0 was down")
		}
		if l.detached {
			// The device outlived meshd: not one ping lost, no new handshake.
			if rep.Lost != 0 {
				t.Errorf("lost %d pings during the restart, want 0", rep.Lost)
			}
			if got := handshake(t, n[1], keys[0]); !got.Equal(before) {
				t.Errorf("n0's restart made n1 re-handshake: %v -> %v", before, got)
			}
		}
		ping(n[1], 9)
		apply(n[0], 6, current...)
		ping(n[0], 1)
	})
}

// TestKernelModeWithoutModule checks that mode "kernel" fails clearly,
// rather than falling back, where the kernel has no WireGuard.
func TestKernelModeWithoutModule(t *testing.T) {
	requireLab(t)
	if out, err := exec.Command("ip", "link", "add", "mdtprobe0", "type", "wireguard").CombinedOutput(); err == nil {
		exec.Command("ip", "link", "del", "mdtprobe0").Run()
		t.Skip("kernel has WireGuard")
	} else {
		t.Logf("no kernel WireGuard: %s", strings.TrimSpace(string(out)))
	}
	l := newLab(t, false)
	nd := l.addNode(0)
	opts := l.options(0)
	opts.Mode = ModeKernel
	key := nd.must(t, helperCmd{Op: "new", Options: opts}).PublicKey
	rep := nd.do(t, helperCmd{Op: "apply", Members: []registry.Member{memberOf(0, key)}})
	if !strings.Contains(rep.Err, "kernel WireGuard") {
		t.Fatalf("apply in kernel mode: err %q, want a kernel WireGuard error", rep.Err)
	}
}

// waitFor polls cond every 10ms until it holds or bound passes; the bound
// is the requirement being tested.
func waitFor(t *testing.T, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > bound {
			t.Fatalf("%s: not within %v", what, bound)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
}
