package overlay

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

const (
	// RouteProtocol marks the routes and the rule meshd owns (rtnetlink
	// protocol number; unassigned in iproute2's rt_protos). meshd only
	// ever deletes routes and rules carrying it, and `ip route show proto
	// 77` lists exactly meshd's.
	RouteProtocol = 77
	// DefaultRulePriority places meshd's rule before the main table
	// (32766), so the overlay routes win over a stale flannel route for
	// 10.0.0.0/8 in main, and after everything a distribution or
	// wg-quick (32764, 32765) installs before main.
	DefaultRulePriority = 32000
	mainTable           = unix.RT_TABLE_MAIN
)

// liveAddrsLocked returns the interface's IPv4 addresses.
func (a *Applier) liveAddrsLocked(link netlink.Link) ([]netip.Prefix, error) {
	addrs, err := a.nl.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", a.opts.Interface, err)
	}
	var out []netip.Prefix
	for _, ad := range addrs {
		if ad.IPNet == nil {
			continue
		}
		if p, ok := ipNetToPrefix(*ad.IPNet); ok {
			// Keep the host part: an address is not a network.
			ip, _ := netip.AddrFromSlice(ad.IPNet.IP)
			out = append(out, netip.PrefixFrom(ip.Unmap(), p.Bits()))
		}
	}
	return sortedPrefixes(out), nil
}

// liveRoutesLocked returns the destinations of meshd's routes through the
// interface in table, and those of them whose preferred source is not src
// (the node's overlay address changed; only when src is valid).
func (a *Applier) liveRoutesLocked(link netlink.Link, table int, src netip.Addr) (routes, staleSrc []netip.Prefix, err error) {
	rs, err := a.nl.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: link.Attrs().Index, Table: table},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, nil, fmt.Errorf("list routes of %s: %w", a.opts.Interface, err)
	}
	for _, r := range rs {
		if r.Protocol != RouteProtocol || r.Dst == nil {
			continue
		}
		p, ok := ipNetToPrefix(*r.Dst)
		if !ok {
			continue
		}
		routes = append(routes, p)
		if rsrc, ok := netip.AddrFromSlice(r.Src); src.IsValid() && (!ok || rsrc.Unmap() != src) {
			staleSrc = append(staleSrc, p)
		}
	}
	return sortedPrefixes(routes), staleSrc, nil
}

// applyAddrsLocked adds the plan's new addresses, then deletes the stale
// ones, so a changed overlay address never leaves the node without one.
func (a *Applier) applyAddrsLocked(link netlink.Link, plan desired.Plan) []error {
	var errs []error
	for _, p := range plan.AddAddresses {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if err := a.nl.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add address %v: %w", p, err))
		}
	}
	for _, p := range plan.DelAddresses {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if err := a.nl.AddrDel(link, addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("delete address %v: %w", p, err))
		}
	}
	return errs
}

// applyRoutesLocked adds the plan's new routes, then deletes stale ones.
// Routes carry RouteProtocol and the overlay address as preferred source,
// so packets the node sends into the mesh come from its overlay IP (which
// the receiving peer's AllowedIPs accept).
func (a *Applier) applyRoutesLocked(link netlink.Link, want desired.State, plan desired.Plan) []error {
	var errs []error
	route := func(p netip.Prefix) *netlink.Route {
		r := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)},
			Table:     want.RouteTable,
			Protocol:  RouteProtocol,
			Scope:     netlink.SCOPE_LINK,
		}
		if src := want.SelfAddress(); src.IsValid() {
			r.Src = src.AsSlice()
		}
		return r
	}
	for _, p := range plan.AddRoutes {
		// Replace, not add: a route to the same destination that someone
		// else put in this table (without our protocol) is taken over.
		if err := a.nl.RouteReplace(route(p)); err != nil {
			errs = append(errs, fmt.Errorf("add route %v table %d: %w", p, want.RouteTable, err))
		}
	}
	for _, p := range plan.DelRoutes {
		r := route(p)
		r.Src = nil
		if err := a.nl.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %v table %d: %w", p, want.RouteTable, err))
		}
	}
	return errs
}

// ensureRuleLocked makes sure exactly one meshd rule exists, "to
// <network> lookup <table>", deleting meshd rules that differ (a changed
// table or network). With the routes in the main table there is no rule.
// Only destinations inside the overlay network consult the table, and a
// miss there falls through to main: a Hetzner private network or anything
// else in 10/8 keeps working.
func (a *Applier) ensureRuleLocked(want desired.State) error {
	var keep *netlink.Rule
	if want.RouteTable != mainTable && want.Network.IsValid() {
		keep = netlink.NewRule()
		keep.Family = netlink.FAMILY_V4
		keep.Table = want.RouteTable
		keep.Priority = a.opts.RulePriority
		keep.Protocol = RouteProtocol
		n := prefixToIPNet(want.Network)
		keep.Dst = &n
	}
	found, errs := a.deleteRulesLocked(keep)
	if keep != nil && !found {
		if err := a.nl.RuleAdd(keep); err != nil && !errors.Is(err, unix.EEXIST) {
			errs = append(errs, fmt.Errorf("add rule to %v lookup %d: %w", want.Network, want.RouteTable, err))
		}
	}
	return errors.Join(errs...)
}

// deleteRulesLocked deletes every meshd rule except one equal to keep,
// and reports whether that one exists.
func (a *Applier) deleteRulesLocked(keep *netlink.Rule) (found bool, errs []error) {
	rules, err := a.nl.RuleList(netlink.FAMILY_V4)
	if err != nil {
		return false, []error{fmt.Errorf("list rules: %w", err)}
	}
	for _, r := range rules {
		if r.Protocol != RouteProtocol {
			continue
		}
		if keep != nil && !found && sameRule(r, *keep) {
			found = true
			continue
		}
		if err := a.nl.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete stale rule %v: %w", r, err))
		}
	}
	return found, errs
}

func sameRule(a, b netlink.Rule) bool {
	if a.Table != b.Table || a.Priority != b.Priority || (a.Dst == nil) != (b.Dst == nil) {
		return false
	}
	return a.Dst == nil || a.Dst.String() == b.Dst.String()
}

// uplinkMTU is the MTU of the interface carrying the default route, or
// 1500 when there is none (giving desired.FallbackMTU).
func (a *Applier) uplinkMTU() int {
	routes, err := a.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: mainTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return desired.FallbackMTU + desired.MTUOverhead
	}
	for _, r := range routes {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if r.LinkIndex == 0 {
			continue
		}
		l, err := a.nl.LinkByIndex(r.LinkIndex)
		if err != nil || l.Attrs().Name == a.opts.Interface {
			continue
		}
		if mtu := l.Attrs().MTU; mtu >= 1280+desired.MTUOverhead {
			return mtu
		}
	}
	return desired.FallbackMTU + desired.MTUOverhead
}
