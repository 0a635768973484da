package overlay

import (
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The applier reaches the kernel through two small interfaces, the
// methods it calls and no more, as wgctrl-go itself hides each of its
// backends behind a four-method wginternal.Client. The real ones are a
// *wgctrl.Client and a *netlink.Handle (NewApplier); the state tests that
// run without root use fakeKernel (fakekernel_test.go).

// wgClient is the part of *wgctrl.Client the applier uses.
type wgClient interface {
	Device(name string) (*wgtypes.Device, error)
	ConfigureDevice(name string, cfg wgtypes.Config) error
	Close() error
}

// netlinkHandle is the part of *netlink.Handle the applier uses: the
// interface, its IPv4 addresses, routes and policy rules.
type netlinkHandle interface {
	LinkByName(name string) (netlink.Link, error)
	LinkByIndex(index int) (netlink.Link, error)
	LinkAdd(link netlink.Link) error
	LinkDel(link netlink.Link) error
	LinkSetMTU(link netlink.Link, mtu int) error
	LinkSetUp(link netlink.Link) error
	AddrList(link netlink.Link, family int) ([]netlink.Addr, error)
	AddrAdd(link netlink.Link, addr *netlink.Addr) error
	AddrDel(link netlink.Link, addr *netlink.Addr) error
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteReplace(route *netlink.Route) error
	RouteDel(route *netlink.Route) error
	RuleList(family int) ([]netlink.Rule, error)
	RuleAdd(rule *netlink.Rule) error
	RuleDel(rule *netlink.Rule) error
	Close()
}

var (
	_ wgClient      = (*wgctrl.Client)(nil)
	_ netlinkHandle = (*netlink.Handle)(nil)
)
