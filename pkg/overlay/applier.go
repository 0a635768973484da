package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// Device modes.
const (
	// ModeAuto uses the kernel's WireGuard where the module exists and the
	// embedded userspace implementation otherwise.
	ModeAuto = "auto"
	// ModeKernel requires the kernel module.
	ModeKernel = "kernel"
	// ModeUserspace always runs wireguard-go inside meshd.
	ModeUserspace = "userspace"
)

// ApplierOptions configure an Applier.
type ApplierOptions struct {
	// Interface is the WireGuard interface's name.
	Interface string
	// Mode is ModeAuto, ModeKernel or ModeUserspace ("" is ModeAuto).
	Mode string
	// PrivateKey is the interface's key.
	PrivateKey wgtypes.Key
	// RulePriority is the priority of the policy rule that sends the
	// overlay network to the route table (0: DefaultRulePriority).
	RulePriority int
	// Detach runs a userspace device in a process of its own that
	// survives meshd (see DeviceFlag); the binary's main must call
	// MaybeRunDevice. If that process cannot be started, the device runs
	// inside this process instead.
	Detach bool
}

// Applier makes one WireGuard interface, its addresses and its routes
// match a desired.State, touching only what differs. It holds one
// long-lived wgctrl client and one netlink handle. Its methods are safe
// for concurrent use; Set calls are serialised.
type Applier struct {
	opts ApplierOptions
	log  *slog.Logger
	wg   wgClient
	nl   netlinkHandle

	// linkIndex is the interface's index after the last Set (0: none),
	// read without the lock by the event watcher.
	linkIndex atomic.Int32

	mu   sync.Mutex
	user *userspaceDevice // the device this process hosts, if any
	mode string           // what is in use: ModeKernel or ModeUserspace
}

// NewApplier opens the wgctrl client and netlink handle. It does not touch
// any interface until Set.
func NewApplier(opts ApplierOptions, log *slog.Logger) (*Applier, error) {
	if err := validInterfaceName(opts.Interface); err != nil {
		return nil, err
	}
	switch opts.Mode {
	case "":
		opts.Mode = ModeAuto
	case ModeAuto, ModeKernel, ModeUserspace:
	default:
		return nil, fmt.Errorf("overlay mode %q: want auto, kernel or userspace", opts.Mode)
	}
	if opts.RulePriority == 0 {
		opts.RulePriority = DefaultRulePriority
	}
	wg, err := wgctrl.New()
	if err != nil {
		return nil, fmt.Errorf("wgctrl: %w", err)
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		wg.Close()
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return &Applier{opts: opts, log: log, wg: wg, nl: nl}, nil
}

// newApplierWith is NewApplier over the given kernel clients (a test's
// fake); opts must already be valid and defaulted.
func newApplierWith(opts ApplierOptions, log *slog.Logger, wg wgClient, nl netlinkHandle) *Applier {
	return &Applier{opts: opts, log: log, wg: wg, nl: nl}
}

// Interface returns the interface's name.
func (a *Applier) Interface() string { return a.opts.Interface }

// Mode returns the device kind in use (ModeKernel or ModeUserspace), or
// "" before the first Set.
func (a *Applier) Mode() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mode
}

// Set makes the interface match want. It creates the interface when
// missing, then applies only the difference between the live device and
// want: per-peer deltas (never ReplacePeers, so an unchanged peer keeps
// its session), addresses and routes added before stale ones are deleted.
// Failures are collected with errors.Join; whatever succeeded stays
// applied and the next Set retries the rest. Calling Set again with the
// same state changes nothing.
func (a *Applier) Set(ctx context.Context, want desired.State) error {
	_, _, err := a.set(ctx, want)
	return err
}

// set is Set, also returning the plan that was applied and the device as
// read before it was (nil when set failed before reading it).
func (a *Applier) set(ctx context.Context, want desired.State) (desired.Plan, *wgtypes.Device, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.setLocked(ctx, want)
}

// setFresh is set, but only when the interface does not exist yet (it
// creates it); fresh reports whether it did. It configures a node's
// overlay before its claim (desired.BeforeClaim: peers, no address or
// route), which must never take away what a running device has.
func (a *Applier) setFresh(ctx context.Context, want desired.State) (plan desired.Plan, fresh bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.nl.LinkByName(a.opts.Interface); err == nil || !errors.As(err, new(netlink.LinkNotFoundError)) {
		return desired.Plan{}, false, nil
	}
	plan, _, err = a.setLocked(ctx, want)
	return plan, true, err
}

func (a *Applier) setLocked(ctx context.Context, want desired.State) (desired.Plan, *wgtypes.Device, error) {
	if err := ctx.Err(); err != nil {
		return desired.Plan{}, nil, err
	}
	if want.MTU == 0 {
		want.MTU = a.uplinkMTU() - desired.MTUOverhead
	}
	link, dev, err := a.ensureDeviceLocked(want.MTU)
	if err != nil {
		return desired.Plan{}, nil, err
	}
	a.linkIndex.Store(int32(link.Attrs().Index))
	if dev == nil { // created just now
		if dev, err = a.wg.Device(a.opts.Interface); err != nil {
			return desired.Plan{}, nil, fmt.Errorf("read device %s: %w", a.opts.Interface, err)
		}
	}
	live, staleSrc, err := a.liveLocked(link, dev, want.RouteTable, want.SelfAddress())
	if err != nil {
		return desired.Plan{}, dev, err
	}
	// A wanted route with a stale source counts as missing, so it is
	// replaced; an unwanted one is deleted like any other.
	live.Routes = slices.DeleteFunc(live.Routes, func(p netip.Prefix) bool {
		return slices.Contains(staleSrc, p) && slices.Contains(want.Routes, p)
	})
	plan := desired.Diff(live, want)
	var errs []error
	if err := a.configureLocked(dev, plan); err != nil {
		errs = append(errs, err)
	}
	if plan.MTU != 0 {
		if err := a.nl.LinkSetMTU(link, plan.MTU); err != nil {
			errs = append(errs, fmt.Errorf("set mtu %d: %w", plan.MTU, err))
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := a.nl.LinkSetUp(link); err != nil {
			errs = append(errs, fmt.Errorf("set %s up: %w", a.opts.Interface, err))
		}
	}
	// Addresses before routes: a route's preferred source must exist.
	errs = append(errs, a.applyAddrsLocked(link, plan)...)
	errs = append(errs, a.applyRoutesLocked(link, want, plan)...)
	if err := a.ensureRuleLocked(want); err != nil {
		errs = append(errs, err)
	}
	if !plan.Empty() {
		a.log.Debug("overlay applied", "changes", len(plan.Peers), "plan", plan.String())
	}
	return plan, dev, errors.Join(errs...)
}

// configureLocked sends the peer deltas, the listen port and (if the
// device does not have it yet) the private key in one ConfigureDevice
// call. ReplacePeers stays false: peers not named are untouched.
func (a *Applier) configureLocked(dev *wgtypes.Device, plan desired.Plan) error {
	var cfg wgtypes.Config
	if dev.PrivateKey != a.opts.PrivateKey {
		k := a.opts.PrivateKey
		cfg.PrivateKey = &k
	}
	if plan.ListenPort != 0 {
		port := plan.ListenPort
		cfg.ListenPort = &port
	}
	for _, c := range plan.Peers {
		pc, err := peerConfig(c)
		if err != nil {
			return err
		}
		cfg.Peers = append(cfg.Peers, pc)
	}
	if cfg.PrivateKey == nil && cfg.ListenPort == nil && len(cfg.Peers) == 0 {
		return nil
	}
	if err := a.wg.ConfigureDevice(a.opts.Interface, cfg); err != nil {
		return fmt.Errorf("configure %s (%d peer changes): %w", a.opts.Interface, len(cfg.Peers), err)
	}
	return nil
}

// reconfigure reads the device, asks decide for a configuration and
// applies it, all under the applier's lock so that no Set interleaves
// between what decide saw and what is applied. An empty configuration
// changes nothing.
func (a *Applier) reconfigure(decide func(*wgtypes.Device) wgtypes.Config) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	dev, err := a.wg.Device(a.opts.Interface)
	if err != nil {
		return fmt.Errorf("read device %s: %w", a.opts.Interface, err)
	}
	cfg := decide(dev)
	if cfg.PrivateKey == nil && cfg.ListenPort == nil && len(cfg.Peers) == 0 {
		return nil
	}
	if err := a.wg.ConfigureDevice(a.opts.Interface, cfg); err != nil {
		return fmt.Errorf("configure %s: %w", a.opts.Interface, err)
	}
	return nil
}

// peerConfig turns one delta into wgctrl's form.
func peerConfig(c desired.PeerChange) (wgtypes.PeerConfig, error) {
	k, err := wgtypes.ParseKey(c.Peer.PublicKey)
	if err != nil {
		return wgtypes.PeerConfig{}, fmt.Errorf("peer %s: public key: %w", c.Peer.Name, err)
	}
	pc := wgtypes.PeerConfig{PublicKey: k}
	switch c.Op {
	case desired.OpRemove:
		pc.Remove = true
		return pc, nil
	case desired.OpUpdate:
		pc.UpdateOnly = true
	}
	if (c.Op == desired.OpAdd || c.Endpoint) && c.Peer.Endpoint.IsValid() {
		pc.Endpoint = net.UDPAddrFromAddrPort(c.Peer.Endpoint)
	}
	if c.Op == desired.OpAdd || c.AllowedIPs {
		pc.ReplaceAllowedIPs = true
		for _, p := range c.Peer.AllowedIPs {
			pc.AllowedIPs = append(pc.AllowedIPs, prefixToIPNet(p))
		}
	}
	if c.Op == desired.OpAdd || c.Keepalive {
		ka := c.Peer.Keepalive
		pc.PersistentKeepaliveInterval = &ka
	}
	return pc, nil
}

// Live reads the interface's current state in desired.State's terms,
// for status and debugging. table selects the routes read.
func (a *Applier) Live(table int) (desired.State, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	link, err := a.nl.LinkByName(a.opts.Interface)
	if err != nil {
		return desired.State{}, fmt.Errorf("link %s: %w", a.opts.Interface, err)
	}
	dev, err := a.wg.Device(a.opts.Interface)
	if err != nil {
		return desired.State{}, fmt.Errorf("read device %s: %w", a.opts.Interface, err)
	}
	st, _, err := a.liveLocked(link, dev, table, netip.Addr{})
	return st, err
}

// Device returns the live WireGuard device (peers with handshake times).
func (a *Applier) Device() (*wgtypes.Device, error) {
	return a.wg.Device(a.opts.Interface)
}

// liveLocked reads the device and kernel state; staleSrc lists routes
// whose preferred source is not src.
func (a *Applier) liveLocked(link netlink.Link, dev *wgtypes.Device, table int, src netip.Addr) (st desired.State, staleSrc []netip.Prefix, err error) {
	st = desired.State{
		MTU:        link.Attrs().MTU,
		ListenPort: dev.ListenPort,
		RouteTable: table,
	}
	for _, p := range dev.Peers {
		lp := desired.Peer{
			PublicKey: p.PublicKey.String(),
			Keepalive: p.PersistentKeepaliveInterval,
		}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			lp.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		for _, n := range p.AllowedIPs {
			if pf, ok := ipNetToPrefix(n); ok {
				lp.AllowedIPs = append(lp.AllowedIPs, pf)
			}
		}
		st.Peers = append(st.Peers, lp)
	}
	if st.Addresses, err = a.liveAddrsLocked(link); err != nil {
		return desired.State{}, nil, err
	}
	if st.Routes, staleSrc, err = a.liveRoutesLocked(link, table, src); err != nil {
		return desired.State{}, nil, err
	}
	return st, staleSrc, nil
}

// Close releases the wgctrl client and netlink handle. It leaves the
// interface, its peers and routes in place: meshd stopping (or
// restarting) must not take the data plane down. A userspace device
// hosted by this process keeps running until the process exits.
func (a *Applier) Close() error {
	a.nl.Close()
	return a.wg.Close()
}

// Destroy removes the interface, its routes and the policy rule: the
// node leaves the overlay. Used by tests and by an explicit teardown,
// never on a plain stop.
func (a *Applier) Destroy() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, errs := a.deleteRulesLocked(nil)
	if a.user != nil {
		a.user.Close()
		a.user = nil
	}
	if link, err := a.nl.LinkByName(a.opts.Interface); err == nil {
		if err := a.nl.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", a.opts.Interface, err))
		}
	}
	a.mode = ""
	return errors.Join(errs...)
}

// waitGone polls until the named link has disappeared (a closed TUN is
// removed asynchronously), for at most d.
func (a *Applier) waitGone(name string, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := a.nl.LinkByName(name); err != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func prefixToIPNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipNetToPrefix(n net.IPNet) (netip.Prefix, bool) {
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if addr.Is4In6() {
		addr = addr.Unmap()
		if bits == 128 {
			ones -= 96
		}
	}
	return netip.PrefixFrom(addr, ones).Masked(), true
}

// sortedPrefixes sorts and returns ps.
func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return ps
}
