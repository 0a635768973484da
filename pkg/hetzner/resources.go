package hetzner

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
)

// SSHPort is the only TCP port the cluster firewall opens.
const SSHPort = 22

// spreadMax is how many servers a spread placement group holds.
const spreadMax = 10

// NetworkSpec is the private network servers are attached to.
type NetworkSpec struct {
	Name string
	// IPRange is the network's range, used when it is created.
	IPRange netip.Prefix
	// Subnet is the cloud subnet created in the location's network zone.
	Subnet netip.Prefix
}

// FirewallRules returns the inbound rules of the cluster firewall: SSH and
// the WireGuard UDP port, from anywhere, and nothing else. (nix-infra's
// clusters never opened the WireGuard port, so peers behind the Hetzner
// firewall could only be reached when they initiated.)
func FirewallRules(wireguardPort int) []hcloud.FirewallRule {
	any4 := net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
	any6 := net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	str := func(s string) *string { return &s }
	return []hcloud.FirewallRule{
		{
			Direction: hcloud.FirewallRuleDirectionIn, Protocol: hcloud.FirewallRuleProtocolTCP,
			Port: str(fmt.Sprint(SSHPort)), SourceIPs: []net.IPNet{any4, any6}, Description: str("ssh"),
		},
		{
			Direction: hcloud.FirewallRuleDirectionIn, Protocol: hcloud.FirewallRuleProtocolUDP,
			Port: str(fmt.Sprint(wireguardPort)), SourceIPs: []net.IPNet{any4, any6}, Description: str("meshd wireguard"),
		},
	}
}

// ruleKey spells a rule so that two rule sets can be compared.
func ruleKey(r hcloud.FirewallRule) string {
	var src, dst []string
	for _, n := range r.SourceIPs {
		src = append(src, n.String())
	}
	for _, n := range r.DestinationIPs {
		dst = append(dst, n.String())
	}
	slices.Sort(src)
	slices.Sort(dst)
	port := ""
	if r.Port != nil {
		port = *r.Port
	}
	return fmt.Sprintf("%s %s %s src=%s dst=%s", r.Direction, r.Protocol, port, strings.Join(src, ","), strings.Join(dst, ","))
}

func sameRules(a, b []hcloud.FirewallRule) bool {
	ka, kb := make([]string, len(a)), make([]string, len(b))
	for i, r := range a {
		ka[i] = ruleKey(r)
	}
	for i, r := range b {
		kb[i] = ruleKey(r)
	}
	slices.Sort(ka)
	slices.Sort(kb)
	return slices.Equal(ka, kb)
}

// notOurs is the error for a resource of the wanted name that another
// cluster (or a person) owns: meshctl neither changes nor adopts it.
func notOurs(kind, name, cluster string, labels map[string]string) error {
	return fmt.Errorf("%s %q exists but is not labelled %s=%s (it has %q); choose another name",
		kind, name, LabelCluster, cluster, labels[LabelCluster])
}

// appliedBySelector reports whether fw is applied through sel.
func appliedBySelector(fw *hcloud.Firewall, sel string) bool {
	return slices.ContainsFunc(fw.AppliedTo, func(r hcloud.FirewallResource) bool {
		return r.Type == hcloud.FirewallResourceTypeLabelSelector && r.LabelSelector != nil && r.LabelSelector.Selector == sel
	})
}

// ensureFirewall returns the cluster firewall, creating it, resetting its
// rules when someone changed them, and applying it through the cluster's
// label selector (as the hcloud CLI's and terraform's users do), so every
// server of the cluster has it, including servers added later by hand or
// detached from it directly.
func ensureFirewall(ctx context.Context, c *hcloud.Client, cluster, name string, wgPort int, progress func(string)) (*hcloud.Firewall, error) {
	want := FirewallRules(wgPort)
	sel := ClusterSelector(cluster)
	applyTo := []hcloud.FirewallResource{{Type: hcloud.FirewallResourceTypeLabelSelector,
		LabelSelector: &hcloud.FirewallResourceLabelSelector{Selector: sel}}}
	fw, _, err := c.Firewall.GetByName(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("firewall %q: %w", name, err)
	}
	if fw == nil {
		res, _, err := c.Firewall.Create(ctx, hcloud.FirewallCreateOpts{
			Name: name, Labels: ResourceLabels(cluster, "", nil), Rules: want, ApplyTo: applyTo,
		})
		if hcloud.IsError(err, hcloud.ErrorCodeUniquenessError) {
			fw, _, err = c.Firewall.GetByName(ctx, name)
		} else if err == nil {
			fw = res.Firewall
			if err := c.Action.WaitFor(ctx, res.Actions...); err != nil {
				return nil, fmt.Errorf("firewall %q: %w", name, err)
			}
			progress(fmt.Sprintf("created firewall %q (tcp/%d, udp/%d) for servers labelled %s", name, SSHPort, wgPort, sel))
		}
		if err != nil {
			return nil, fmt.Errorf("create firewall %q: %w", name, err)
		}
	}
	if fw.Labels[LabelCluster] != cluster {
		return nil, notOurs("firewall", name, cluster, fw.Labels)
	}
	if !sameRules(fw.Rules, want) {
		actions, _, err := c.Firewall.SetRules(ctx, fw, hcloud.FirewallSetRulesOpts{Rules: want})
		if err == nil {
			err = c.Action.WaitFor(ctx, actions...)
		}
		if err != nil {
			return nil, fmt.Errorf("reset rules of firewall %q: %w", name, err)
		}
		progress(fmt.Sprintf("reset the rules of firewall %q", name))
	}
	if !appliedBySelector(fw, sel) {
		actions, _, err := c.Firewall.ApplyResources(ctx, fw, applyTo)
		if err == nil {
			err = c.Action.WaitFor(ctx, actions...)
		}
		if err != nil {
			return nil, fmt.Errorf("apply firewall %q to %s: %w", name, sel, err)
		}
		progress(fmt.Sprintf("applied firewall %q to servers labelled %s", name, sel))
	}
	return fw, nil
}

// ensurePlacementGroup returns the cluster's spread placement group,
// creating it, and checks it has room for adding more servers.
func ensurePlacementGroup(ctx context.Context, c *hcloud.Client, cluster, name string, adding int, progress func(string)) (*hcloud.PlacementGroup, error) {
	pg, _, err := c.PlacementGroup.GetByName(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("placement group %q: %w", name, err)
	}
	if pg == nil {
		res, _, err := c.PlacementGroup.Create(ctx, hcloud.PlacementGroupCreateOpts{
			Name: name, Labels: ResourceLabels(cluster, "", nil), Type: hcloud.PlacementGroupTypeSpread,
		})
		if hcloud.IsError(err, hcloud.ErrorCodeUniquenessError) {
			pg, _, err = c.PlacementGroup.GetByName(ctx, name)
		} else if err == nil {
			pg = res.PlacementGroup
			progress(fmt.Sprintf("created spread placement group %q", name))
		}
		if err != nil {
			return nil, fmt.Errorf("create placement group %q: %w", name, err)
		}
	}
	if pg.Labels[LabelCluster] != cluster {
		return nil, notOurs("placement group", name, cluster, pg.Labels)
	}
	if pg.Type != hcloud.PlacementGroupTypeSpread {
		return nil, fmt.Errorf("placement group %q has type %q, want spread", name, pg.Type)
	}
	if len(pg.Servers)+adding > spreadMax {
		return nil, fmt.Errorf("placement group %q holds %d servers; adding %d exceeds the spread limit of %d",
			name, len(pg.Servers), adding, spreadMax)
	}
	return pg, nil
}

// ensureNetwork returns the private network, creating it with a cloud
// subnet in the location's network zone, or adding that subnet to a
// network of this cluster that lacks one. A network meshctl did not
// create is used as it is, if it has a subnet in the zone.
func ensureNetwork(ctx context.Context, c *hcloud.Client, cluster string, spec NetworkSpec, location string, progress func(string)) (*hcloud.Network, error) {
	loc, _, err := c.Location.GetByName(ctx, location)
	if err != nil {
		return nil, fmt.Errorf("location %q: %w", location, err)
	}
	if loc == nil {
		return nil, fmt.Errorf("location %q does not exist", location)
	}
	zone := loc.NetworkZone
	subnet := hcloud.NetworkSubnet{Type: hcloud.NetworkSubnetTypeCloud, IPRange: ipNet(spec.Subnet), NetworkZone: zone}
	nw, _, err := c.Network.GetByName(ctx, spec.Name)
	if err != nil {
		return nil, fmt.Errorf("network %q: %w", spec.Name, err)
	}
	if nw == nil {
		nw, _, err = c.Network.Create(ctx, hcloud.NetworkCreateOpts{
			Name: spec.Name, IPRange: ipNet(spec.IPRange), Subnets: []hcloud.NetworkSubnet{subnet},
			Labels: ResourceLabels(cluster, "", nil),
		})
		if hcloud.IsError(err, hcloud.ErrorCodeUniquenessError) {
			nw, _, err = c.Network.GetByName(ctx, spec.Name)
		} else if err == nil {
			progress(fmt.Sprintf("created network %q %s with subnet %s in %s", spec.Name, spec.IPRange, spec.Subnet, zone))
		}
		if err != nil {
			return nil, fmt.Errorf("create network %q: %w", spec.Name, err)
		}
	}
	for _, s := range nw.Subnets {
		if s.NetworkZone == zone && s.Type != hcloud.NetworkSubnetTypeVSwitch {
			return nw, nil
		}
	}
	if nw.Labels[LabelCluster] != cluster {
		return nil, fmt.Errorf("network %q has no subnet in network zone %s and is not labelled %s=%s, so meshctl will not add one",
			spec.Name, zone, LabelCluster, cluster)
	}
	var taken []netip.Prefix
	for _, s := range nw.Subnets {
		if p, ok := prefixOf(s.IPRange); ok {
			taken = append(taken, p)
		}
	}
	rng, ok := prefixOf(nw.IPRange)
	if !ok {
		return nil, fmt.Errorf("network %q has no IP range", spec.Name)
	}
	free, ok := FreeSubnet(rng, spec.Subnet, taken)
	if !ok {
		return nil, fmt.Errorf("network %q (%s) has no free /%d for a subnet in %s", spec.Name, rng, spec.Subnet.Bits(), zone)
	}
	spec.Subnet = free
	subnet.IPRange = ipNet(free)
	a, _, err := c.Network.AddSubnet(ctx, nw, hcloud.NetworkAddSubnetOpts{Subnet: subnet})
	if err == nil {
		err = c.Action.WaitFor(ctx, a)
	}
	if err != nil {
		return nil, fmt.Errorf("add subnet %s in %s to network %q: %w", spec.Subnet, zone, spec.Name, err)
	}
	progress(fmt.Sprintf("added subnet %s in %s to network %q", spec.Subnet, zone, spec.Name))
	return nw, nil
}

// FreeSubnet returns want if it lies in rng and overlaps none of taken,
// else the first prefix of want's size in rng that overlaps none: each
// network zone gets its own subnet of the private network.
func FreeSubnet(rng, want netip.Prefix, taken []netip.Prefix) (netip.Prefix, bool) {
	free := func(p netip.Prefix) bool {
		return rng.Contains(p.Addr()) && p.Bits() >= rng.Bits() &&
			!slices.ContainsFunc(taken, func(t netip.Prefix) bool { return t.Overlaps(p) })
	}
	if free(want) {
		return want, true
	}
	size := uint64(1) << (want.Addr().BitLen() - want.Bits())
	if want.Bits() < rng.Bits() || !rng.Addr().Is4() {
		return netip.Prefix{}, false
	}
	base := rng.Masked().Addr().As4()
	start := uint64(base[0])<<24 | uint64(base[1])<<16 | uint64(base[2])<<8 | uint64(base[3])
	end := start + (uint64(1) << (32 - rng.Bits()))
	for a := start; a+size <= end; a += size {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), want.Bits())
		if free(p) {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones).Masked(), true
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
