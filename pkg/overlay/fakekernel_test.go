package overlay

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// fakeKernel is an in-memory stand-in for the kernel the applier talks
// to: it implements wgClient and netlinkHandle (kernel.go), so the
// applier's state logic runs without root. It follows the real things
// point by point where the applier depends on them:
//   - the WireGuard device of each link is a FakeDevice (fakedevice.go),
//     which follows wgctrl's ConfigureDevice semantics;
//   - netlink's LinkByName (LinkNotFoundError), LinkAdd of a
//     *netlink.Wireguard (creates the link and its device), LinkDel
//     (takes the link's addresses and routes with it);
//   - AddrAdd (EEXIST for a present address), AddrDel (EADDRNOTAVAIL);
//   - RouteReplace (one route per table and destination), RouteDel
//     (ESRCH), RouteListFiltered with RT_FILTER_OIF and RT_FILTER_TABLE;
//   - RuleAdd (EEXIST for an identical rule), RuleDel (ENOENT).
//
// It does not model ordering between netlink and WireGuard, handshakes or
// traffic: those are the root tests' job (states_test.go, mesh_test.go).
type fakeKernel struct {
	mu        sync.Mutex
	links     map[string]*fakeLink
	nextIndex int
	routes    []netlink.Route
	rules     []netlink.Rule
	// writes counts the calls that change something (a converged Set
	// must make none); deviceReads counts WireGuard device reads (with
	// userspace WireGuard each is a round trip to the device's process).
	writes, deviceReads int
}

type fakeLink struct {
	attrs netlink.LinkAttrs
	addrs []net.IPNet
	dev   *FakeDevice
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{links: map[string]*fakeLink{}, nextIndex: 10}
}

func (k *fakeKernel) link(l netlink.Link) (*fakeLink, error) {
	for _, fl := range k.links {
		if fl.attrs.Index == l.Attrs().Index {
			return fl, nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (fl *fakeLink) netlinkLink() netlink.Link {
	return &netlink.Wireguard{LinkAttrs: fl.attrs}
}

// Device implements wgClient: the link's FakeDevice (fakedevice.go, the
// one in-memory WireGuard device), named after the link.
func (k *fakeKernel) Device(name string) (*wgtypes.Device, error) {
	k.mu.Lock()
	fl, ok := k.links[name]
	k.deviceReads++
	k.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("device %s: %w", name, unix.ENODEV)
	}
	d, err := fl.dev.Device()
	if err != nil {
		return nil, err
	}
	d.Name = name
	return d, nil
}

// ConfigureDevice implements wgClient with the link's FakeDevice.
func (k *fakeKernel) ConfigureDevice(name string, cfg wgtypes.Config) error {
	k.mu.Lock()
	fl, ok := k.links[name]
	if ok {
		k.writes++
	}
	k.mu.Unlock()
	if !ok {
		return fmt.Errorf("configure %s: %w", name, unix.ENODEV)
	}
	return fl.dev.ConfigureDevice(cfg)
}

// Close implements wgClient and netlinkHandle.
func (k *fakeKernel) Close() error { return nil }

// netlinkFake adapts fakeKernel to netlinkHandle (whose Close returns
// nothing).
type netlinkFake struct{ *fakeKernel }

func (n netlinkFake) Close() {}

func (k *fakeKernel) LinkByName(name string) (netlink.Link, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, ok := k.links[name]
	if !ok {
		return nil, netlink.LinkNotFoundError{}
	}
	return fl.netlinkLink(), nil
}

func (k *fakeKernel) LinkByIndex(index int) (netlink.Link, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, fl := range k.links {
		if fl.attrs.Index == index {
			return fl.netlinkLink(), nil
		}
	}
	return nil, netlink.LinkNotFoundError{}
}

func (k *fakeKernel) LinkAdd(l netlink.Link) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := l.(*netlink.Wireguard); !ok {
		return unix.EOPNOTSUPP
	}
	name := l.Attrs().Name
	if _, ok := k.links[name]; ok {
		return unix.EEXIST
	}
	k.writes++
	k.nextIndex++
	attrs := netlink.LinkAttrs{Name: name, Index: k.nextIndex, MTU: l.Attrs().MTU}
	if attrs.MTU == 0 {
		attrs.MTU = 1420
	}
	k.links[name] = &fakeLink{attrs: attrs, dev: NewFakeDevice(wgtypes.Key{})}
	return nil
}

func (k *fakeKernel) LinkDel(l netlink.Link) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return err
	}
	k.writes++
	delete(k.links, fl.attrs.Name)
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.LinkIndex == fl.attrs.Index })
	return nil
}

func (k *fakeKernel) LinkSetMTU(l netlink.Link, mtu int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return err
	}
	k.writes++
	fl.attrs.MTU = mtu
	return nil
}

func (k *fakeKernel) LinkSetUp(l netlink.Link) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return err
	}
	k.writes++
	fl.attrs.Flags |= net.FlagUp
	return nil
}

func (k *fakeKernel) AddrList(l netlink.Link, family int) ([]netlink.Addr, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return nil, err
	}
	var out []netlink.Addr
	for _, a := range fl.addrs {
		n := a
		out = append(out, netlink.Addr{IPNet: &n, LinkIndex: fl.attrs.Index})
	}
	return out, nil
}

func (k *fakeKernel) AddrAdd(l netlink.Link, addr *netlink.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(fl.addrs, func(a net.IPNet) bool { return a.String() == addr.IPNet.String() }) {
		return unix.EEXIST
	}
	k.writes++
	fl.addrs = append(fl.addrs, *addr.IPNet)
	return nil
}

func (k *fakeKernel) AddrDel(l netlink.Link, addr *netlink.Addr) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	fl, err := k.link(l)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(fl.addrs, func(a net.IPNet) bool { return a.String() == addr.IPNet.String() })
	if i < 0 {
		return unix.EADDRNOTAVAIL
	}
	k.writes++
	fl.addrs = slices.Delete(fl.addrs, i, i+1)
	// The kernel drops the routes whose preferred source was the address.
	ip := addr.IPNet.IP
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.Src != nil && r.Src.Equal(ip) })
	return nil
}

func sameDst(a, b *net.IPNet) bool {
	return a != nil && b != nil && a.String() == b.String()
}

func (k *fakeKernel) RouteListFiltered(family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netlink.Route
	for _, r := range k.routes {
		if mask&netlink.RT_FILTER_OIF != 0 && r.LinkIndex != filter.LinkIndex {
			continue
		}
		if mask&netlink.RT_FILTER_TABLE != 0 && r.Table != filter.Table {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

func (k *fakeKernel) RouteReplace(r *netlink.Route) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !slices.ContainsFunc(k.linkList(), func(fl *fakeLink) bool { return fl.attrs.Index == r.LinkIndex }) {
		return unix.ENODEV
	}
	k.writes++
	k.routes = slices.DeleteFunc(k.routes, func(o netlink.Route) bool { return o.Table == r.Table && sameDst(o.Dst, r.Dst) })
	k.routes = append(k.routes, *r)
	return nil
}

func (k *fakeKernel) RouteDel(r *netlink.Route) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	i := slices.IndexFunc(k.routes, func(o netlink.Route) bool { return o.Table == r.Table && sameDst(o.Dst, r.Dst) })
	if i < 0 {
		return unix.ESRCH
	}
	k.writes++
	k.routes = slices.Delete(k.routes, i, i+1)
	return nil
}

func (k *fakeKernel) RuleList(family int) ([]netlink.Rule, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.rules), nil
}

func (k *fakeKernel) RuleAdd(r *netlink.Rule) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if slices.ContainsFunc(k.rules, func(o netlink.Rule) bool { return sameRule(o, *r) && o.Protocol == r.Protocol }) {
		return unix.EEXIST
	}
	k.writes++
	k.rules = append(k.rules, *r)
	return nil
}

func (k *fakeKernel) RuleDel(r *netlink.Rule) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	i := slices.IndexFunc(k.rules, func(o netlink.Rule) bool { return sameRule(o, *r) })
	if i < 0 {
		return unix.ENOENT
	}
	k.writes++
	k.rules = slices.Delete(k.rules, i, i+1)
	return nil
}

func (k *fakeKernel) linkList() []*fakeLink {
	var out []*fakeLink
	for _, fl := range k.links {
		out = append(out, fl)
	}
	return out
}

// String prints the kernel's state as sorted lines in ip(8)/wg(8) terms.
func (k *fakeKernel) String() string {
	k.mu.Lock()
	defer k.mu.Unlock()
	var lines []string
	for _, fl := range k.links {
		up := "down"
		if fl.attrs.Flags&net.FlagUp != 0 {
			up = "up"
		}
		lines = append(lines, fmt.Sprintf("link %s mtu %d %s", fl.attrs.Name, fl.attrs.MTU, up))
		for _, a := range fl.addrs {
			lines = append(lines, fmt.Sprintf("addr %s dev %s", a.String(), fl.attrs.Name))
		}
		dev, _ := fl.dev.Device()
		lines = append(lines, fmt.Sprintf("wg %s listen-port %d public-key %s", fl.attrs.Name, dev.ListenPort, dev.PublicKey))
		for _, p := range dev.Peers {
			lines = append(lines, "peer "+peerLine(p))
		}
	}
	for _, r := range k.routes {
		name := "?"
		for _, fl := range k.links {
			if fl.attrs.Index == r.LinkIndex {
				name = fl.attrs.Name
			}
		}
		lines = append(lines, fmt.Sprintf("route %s dev %s table %d proto %d src %s", r.Dst, name, r.Table, r.Protocol, r.Src))
	}
	for _, r := range k.rules {
		lines = append(lines, fmt.Sprintf("rule to %s lookup %d pref %d proto %d", r.Dst, r.Table, r.Priority, r.Protocol))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func peerLine(p wgtypes.Peer) string {
	var ips []string
	for _, n := range p.AllowedIPs {
		ips = append(ips, n.String())
	}
	slices.Sort(ips)
	ep := "(none)"
	if p.Endpoint != nil {
		ep = p.Endpoint.String()
	}
	return fmt.Sprintf("%s endpoint %s allowed-ips %s keepalive %s", p.PublicKey, ep, strings.Join(ips, ","), time.Duration(p.PersistentKeepaliveInterval))
}

var (
	_ wgClient      = (*fakeKernel)(nil)
	_ netlinkHandle = netlinkFake{}
)
