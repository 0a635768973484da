package overlay

import (
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// FakeDevice is a WireGuard device kept in memory, a fake for where a
// real device cannot be had in numbers: the scale bench's thousands of
// simulated nodes, and unit tests of the status and metrics. Set sends it
// the same per-peer deltas the Applier sends a real device (desired.Diff,
// peerConfig), and ConfigureDevice follows wgctrl's documented semantics
// for the fields meshd uses (wgtypes.PeerConfig: Remove, UpdateOnly,
// Endpoint, ReplaceAllowedIPs, PersistentKeepaliveInterval). It has no
// addresses, routes or MTU: those are netlink's, not the device's.
type FakeDevice struct {
	mu      sync.Mutex
	key     wgtypes.Key
	pub     string // key's public half, derived once (a scalar multiplication)
	port    int
	peers   map[wgtypes.Key]*wgtypes.Peer
	configs int
	rekey   time.Duration
}

// RekeyEvery makes every peer that has had a handshake handshake again
// each time every has passed since its last one, as seen by Device: what
// a real device does while packets flow (WireGuard starts a new handshake
// when it sends on a session older than REKEY_AFTER_TIME, 2 minutes, and
// persistent keepalive sends at least every keepalive interval, so a live
// peer's handshake is never older than 2 minutes plus that interval).
// Zero (the default) keeps handshakes where Traffic put them.
func (d *FakeDevice) RekeyEvery(every time.Duration) {
	d.mu.Lock()
	d.rekey = every
	d.mu.Unlock()
}

// NewFakeDevice returns an empty device with private key key.
func NewFakeDevice(key wgtypes.Key) *FakeDevice {
	return &FakeDevice{key: key, pub: key.PublicKey().String(), peers: map[wgtypes.Key]*wgtypes.Peer{}}
}

// PublicKey is the device's public key, base64.
func (d *FakeDevice) PublicKey() string { return d.pub }

// Mode names the device kind, as Applier.Mode does.
func (d *FakeDevice) Mode() string { return "fake" }

// Configs counts the ConfigureDevice calls that changed something.
func (d *FakeDevice) Configs() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.configs
}

// Device returns a copy of the device as wgctrl would report it.
func (d *FakeDevice) Device() (*wgtypes.Device, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	dev := &wgtypes.Device{Name: "fake", Type: wgtypes.Userspace, PrivateKey: d.key, PublicKey: d.key.PublicKey(), ListenPort: d.port}
	now := time.Now()
	// Sorted by key, for tests that compare reads; the pointers are
	// sorted, not the peers (about 170 bytes each: at 10,000 peers,
	// sorting those moved tens of megabytes per read).
	ps := make([]*wgtypes.Peer, 0, len(d.peers))
	for _, p := range d.peers {
		ps = append(ps, p)
	}
	slices.SortFunc(ps, func(a, b *wgtypes.Peer) int { return compareKeys(a.PublicKey, b.PublicKey) })
	if len(ps) > 0 {
		dev.Peers = make([]wgtypes.Peer, 0, len(ps))
	}
	for _, p := range ps {
		if hs := p.LastHandshakeTime; d.rekey > 0 && !hs.IsZero() && now.Sub(hs) >= d.rekey {
			p.LastHandshakeTime = hs.Add(now.Sub(hs) / d.rekey * d.rekey)
		}
		c := *p
		c.AllowedIPs = slices.Clone(p.AllowedIPs)
		dev.Peers = append(dev.Peers, c)
	}
	return dev, nil
}

func compareKeys(a, b wgtypes.Key) int {
	for i := range a {
		if a[i] != b[i] {
			return int(a[i]) - int(b[i])
		}
	}
	return 0
}

// Set makes the device's peers and port match want with the Applier's
// own diff and per-peer configs, and returns the plan it applied.
func (d *FakeDevice) Set(want desired.State) (desired.Plan, error) {
	dev, _ := d.Device()
	live := desired.State{ListenPort: dev.ListenPort, MTU: want.MTU, RouteTable: want.RouteTable,
		Addresses: want.Addresses, Routes: want.Routes}
	for _, p := range dev.Peers {
		lp := desired.Peer{PublicKey: p.PublicKey.String(), Keepalive: p.PersistentKeepaliveInterval}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			lp.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
		for _, n := range p.AllowedIPs {
			if pf, ok := ipNetToPrefix(n); ok {
				lp.AllowedIPs = append(lp.AllowedIPs, pf)
			}
		}
		live.Peers = append(live.Peers, lp)
	}
	plan := desired.Diff(live, want)
	var cfg wgtypes.Config
	if plan.ListenPort != 0 {
		port := plan.ListenPort
		cfg.ListenPort = &port
	}
	for _, c := range plan.Peers {
		pc, err := peerConfig(c)
		if err != nil {
			return plan, err
		}
		cfg.Peers = append(cfg.Peers, pc)
	}
	if cfg.ListenPort == nil && len(cfg.Peers) == 0 {
		return plan, nil
	}
	return plan, d.ConfigureDevice(cfg)
}

// ConfigureDevice applies cfg as wgctrl.Client.ConfigureDevice does.
func (d *FakeDevice) ConfigureDevice(cfg wgtypes.Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if cfg.ReplacePeers {
		return fmt.Errorf("fake device: ReplacePeers is not used by meshd")
	}
	if cfg.PrivateKey != nil {
		d.key = *cfg.PrivateKey
	}
	if cfg.ListenPort != nil {
		d.port = *cfg.ListenPort
	}
	for _, pc := range cfg.Peers {
		p, ok := d.peers[pc.PublicKey]
		switch {
		case pc.Remove:
			delete(d.peers, pc.PublicKey)
			continue
		case !ok && pc.UpdateOnly:
			continue // wgctrl: only update an existing peer
		case !ok:
			p = &wgtypes.Peer{PublicKey: pc.PublicKey, ProtocolVersion: 1}
			d.peers[pc.PublicKey] = p
		}
		if pc.Endpoint != nil {
			ep := *pc.Endpoint
			p.Endpoint = &ep
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, slices.Clone(pc.AllowedIPs)...)
	}
	d.configs++
	return nil
}

// Traffic records a handshake at t (zero: none yet) and the byte
// counters of the peer with public key pub, as traffic on a real device
// would. It reports whether the device has that peer.
func (d *FakeDevice) Traffic(pub string, t time.Time, rx, tx int64) bool {
	k, err := wgtypes.ParseKey(pub)
	if err != nil {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.peers[k]
	if !ok {
		return false
	}
	p.LastHandshakeTime, p.ReceiveBytes, p.TransmitBytes = t, rx, tx
	return true
}
