package sandbox

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// PeerReport is one WireGuard peer of a node.
type PeerReport struct {
	Node string
	// HandshakeAge is the time since the latest handshake, -1 if none.
	HandshakeAge time.Duration
}

// NodeReport is what Check found on one node.
type NodeReport struct {
	Node      string
	Addr      netip.Addr
	OverlayIP netip.Addr
	Applied   int64
	Serves    bool
	Peers     []PeerReport
	// Pinged counts the other members whose overlay address answered an
	// ICMP echo through WireGuard, out of PingTargets.
	Pinged, PingTargets int
	// Reaches says whether 127.0.0.1:DemoPublishPort on the node answered
	// with the demo app from another node (consumers only).
	Reaches bool
	Latency time.Duration
	Errors  []string
}

// OK says whether every check of the node passed.
func (r NodeReport) OK() bool {
	return len(r.Errors) == 0 && r.Pinged == r.PingTargets && (r.Serves || r.Reaches)
}

// Check verifies every running node within timeout: its WireGuard peers,
// that it pings every other member's overlay address, and (consumers) that
// 127.0.0.1:DemoPublishPort reaches the demo app on another node through
// HAProxy and WireGuard. Checks retry until they pass or the time is up.
func (c *Cluster) Check(ctx context.Context, timeout time.Duration) ([]NodeReport, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	members, err := c.Members(ctx)
	if err != nil {
		return nil, err
	}
	sts, _, err := c.Statuses(ctx)
	if err != nil {
		return nil, err
	}
	byKey := map[string]string{}
	for name, m := range members {
		byKey[m.PublicKey] = name
	}
	nodes := c.Nodes()
	reports := make([]NodeReport, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reports[i] = c.checkNode(ctx, n, members, byKey, sts[n.Name])
		}()
	}
	wg.Wait()
	return reports, nil
}

func (c *Cluster) checkNode(ctx context.Context, n *Node, members map[string]registry.Member, byKey map[string]string, st registry.Status) NodeReport {
	r := NodeReport{Node: n.Name, Addr: n.Addr, Applied: st.Revision, Serves: len(n.Config.Instances) > 0}
	fail := func(format string, a ...any) { r.Errors = append(r.Errors, fmt.Sprintf(format, a...)) }
	if n.Pid() == 0 {
		fail("meshd is not running")
		return r
	}
	self, ok := members[n.Name]
	if !ok {
		fail("no member record")
	}
	r.OverlayIP = self.OverlayIP
	// Reachability first: the pings also bring up handshakes.
	var targets []registry.Member
	for name, m := range members {
		if name != n.Name && c.Node(name) != nil && c.Node(name).Pid() != 0 {
			targets = append(targets, m)
		}
	}
	r.PingTargets = len(targets)
	for _, m := range targets {
		if retry(ctx, func() error {
			pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			defer cancel()
			_, err := n.Ping(pctx, m.OverlayIP)
			return err
		}) == nil {
			r.Pinged++
		} else {
			fail("no ping reply from %s (%s)", m.Name, m.OverlayIP)
		}
	}
	if !r.Serves {
		url := fmt.Sprintf("http://127.0.0.1:%d/", DemoPublishPort)
		var last error
		if err := retry(ctx, func() error {
			body, lat, err := n.HTTPGet(ctx, url)
			if err != nil {
				last = err
				return err
			}
			if !strings.HasPrefix(body, "demo from ") || body == DemoBody(n.Name) {
				last = fmt.Errorf("unexpected answer %q", body)
				return last
			}
			r.Reaches, r.Latency = true, lat
			return nil
		}); err != nil {
			fail("demo app not reached through 127.0.0.1:%d: %v", DemoPublishPort, last)
		}
	}
	peers, err := n.WGPeers(ctx)
	if err != nil {
		fail("wg show: %v", err)
	}
	now := time.Now()
	for _, p := range peers {
		name := byKey[p.PublicKey]
		if name == "" {
			name = p.PublicKey[:8] + "…"
		}
		age := time.Duration(-1)
		if !p.Handshake.IsZero() {
			age = now.Sub(p.Handshake).Round(time.Second)
		}
		r.Peers = append(r.Peers, PeerReport{Node: name, HandshakeAge: age})
	}
	slices.SortFunc(r.Peers, func(a, b PeerReport) int { return compareNodeNames(a.Node, b.Node) })
	return r
}

// retry calls f every 100ms until it succeeds or ctx ends.
func retry(ctx context.Context, f func() error) error {
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WriteTable prints the reports as a table: node, addresses, applied
// revision, peers with handshake ages, pings, and whether the node reaches
// the demo app.
func WriteTable(w io.Writer, reports []NodeReport) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tOVERLAY\tAPPLIED\tPEERS (handshake age)\tPING\tDEMO APP\tRESULT")
	for _, r := range reports {
		var peers []string
		for _, p := range r.Peers {
			age := "no handshake"
			if p.HandshakeAge >= 0 {
				age = p.HandshakeAge.String()
			}
			peers = append(peers, fmt.Sprintf("%s (%s)", p.Node, age))
		}
		if len(peers) == 0 {
			peers = []string{"-"}
		}
		demo := "serves it"
		if !r.Serves {
			demo = "no"
			if r.Reaches {
				demo = "yes, " + fmtDur(r.Latency)
			}
		}
		overlay := "-"
		if r.OverlayIP.IsValid() {
			overlay = r.OverlayIP.String()
		}
		result := "ok"
		if !r.OK() {
			result = "FAILED"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d/%d\t%s\t%s\n", r.Node, r.Addr, overlay, r.Applied,
			strings.Join(peers, ", "), r.Pinged, r.PingTargets, demo, result)
	}
	tw.Flush()
	for _, r := range reports {
		for _, e := range r.Errors {
			fmt.Fprintf(w, "  %s: %s\n", r.Node, e)
		}
	}
}
