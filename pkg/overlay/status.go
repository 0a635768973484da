package overlay

import (
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// RecentHandshake is how old a peer's last handshake may be for the peer
// to count as up. WireGuard re-handshakes every 2 minutes while traffic
// flows (REKEY_AFTER_TIME) and persistent keepalive keeps traffic flowing,
// so a live peer's handshake is never older than about 2 minutes.
const RecentHandshake = 3 * time.Minute

// MaxStaleNames bounds the peer names listed in PeerSummary.Stale, so the
// published status stays small at any cluster size.
const MaxStaleNames = 16

// MaxStatusProblems bounds the problems listed in Status.Problems.
const MaxStatusProblems = 8

// Status is what the overlay publishes in the node's status (under
// "components"."overlay"). Its size does not depend on the number of
// peers: per-peer detail is in Peers (PeerDetail), served on the node's
// metrics listener, never written to etcd.
type Status struct {
	Interface string `json:"interface"`
	// Mode is the device in use: "kernel" or "userspace" ("" before the
	// first apply).
	Mode      string `json:"mode,omitempty"`
	PublicKey string `json:"publicKey"`
	Address   string `json:"address,omitempty"`
	Revision  int64  `json:"revision,omitempty"`
	Applied   bool   `json:"applied"`
	// Waiting is true while the node has no member record (no subnet) yet.
	Waiting bool        `json:"waiting,omitempty"`
	Peers   PeerSummary `json:"peers"`
	// Problems lists at most MaxStatusProblems of the members the desired
	// state skipped; ProblemCount is how many there are in all.
	Problems     []desired.Problem `json:"problems,omitempty"`
	ProblemCount int               `json:"problemCount,omitempty"`
	LastError    string            `json:"lastError,omitempty"`
	// CacheError says why the boot cache in the state directory could not
	// be written: the overlay runs, but a boot without etcd would start
	// from an older state.
	CacheError string `json:"cacheError,omitempty"`
}

// PeerSummary sums up the device's peers in a value of bounded size that
// changes only when something a reader cares about changes (never with
// byte counters or handshake times alone).
type PeerSummary struct {
	// Count is the number of peers on the device.
	Count int `json:"count"`
	// Recent is the number of peers with a handshake within
	// RecentHandshake.
	Recent int `json:"recent"`
	// Oldest is the age of the oldest handshake among the peers, in
	// coarse buckets: "" (no peers), "<3m", "<10m", "<1h", ">=1h", or
	// "never" when some peer has had no handshake at all.
	Oldest string `json:"oldest,omitempty"`
	// Stale names the peers (by node name, or public key when the name is
	// unknown) without a handshake within RecentHandshake, sorted, at most
	// MaxStaleNames of them; StaleCount is how many there are in all.
	Stale      []string `json:"stale,omitempty"`
	StaleCount int      `json:"staleCount,omitempty"`
}

// PeerDetail is one peer as the device reports it. It is served by the
// node (the metrics listener), never published to etcd.
type PeerDetail struct {
	Name      string `json:"name,omitempty"`
	PublicKey string `json:"publicKey"`
	Endpoint  string `json:"endpoint,omitempty"`
	// HandshakeAgeSeconds is the time since the last handshake, -1 if
	// there has been none.
	HandshakeAgeSeconds int64 `json:"handshakeAgeSeconds"`
	// LastHandshake is the time of the last handshake (zero: none).
	LastHandshake time.Time `json:"lastHandshake,omitzero"`
	RxBytes       int64     `json:"rxBytes"`
	TxBytes       int64     `json:"txBytes"`
}

// summarize computes the bounded summary of a device's peers at time
// now. It allocates nothing for peers with a recent handshake (the common
// case); names, which maps public keys to node names, is called only when
// some peer is stale.
func summarize(peers []wgtypes.Peer, names func() map[string]string, now time.Time) PeerSummary {
	s := PeerSummary{Count: len(peers)}
	var oldest time.Duration
	never := false
	var stale []string
	var byKey map[string]string
	for i := range peers {
		hs := peers[i].LastHandshakeTime
		if hs.IsZero() {
			never = true
		} else if age := now.Sub(hs); age > oldest {
			oldest = age
		}
		if !hs.IsZero() && now.Sub(hs) <= RecentHandshake {
			s.Recent++
			continue
		}
		if byKey == nil {
			byKey = names()
		}
		key := peers[i].PublicKey.String()
		name := byKey[key]
		if name == "" {
			name = key
		}
		stale = append(stale, name)
	}
	switch {
	case len(peers) == 0:
	case never:
		s.Oldest = "never"
	case oldest < RecentHandshake:
		s.Oldest = "<3m"
	case oldest < 10*time.Minute:
		s.Oldest = "<10m"
	case oldest < time.Hour:
		s.Oldest = "<1h"
	default:
		s.Oldest = ">=1h"
	}
	slices.Sort(stale)
	s.StaleCount = len(stale)
	if len(stale) > MaxStaleNames {
		stale = stale[:MaxStaleNames]
	}
	s.Stale = stale
	return s
}

// PeerSummaryMaxAge is the age from which the agent's periodic status
// refresh (every 25 s) reads the peer summary off the device again
// (PeerCache.Refresh); a status built after a reconcile pass reuses the
// last summary, whatever its age. Reading a device is O(peers) (a netlink
// dump of every peer); without the reuse, every pass, however small its
// change, would pay it for the status. What the summary reports moves on
// a scale of minutes (RecentHandshake); a peer going stale shows within
// 30 s.
const PeerSummaryMaxAge = 5 * time.Second

// PeerCache keeps the last peer summary read off a device until Refresh
// finds it PeerSummaryMaxAge old or Invalidate (the overlay changed the
// device). The zero value is ready to use.
type PeerCache struct {
	mu    sync.Mutex
	valid bool
	at    time.Time
	mode  string
	err   string
	sum   PeerSummary
}

// Invalidate makes the next read go to the device.
func (pc *PeerCache) Invalidate() {
	pc.mu.Lock()
	pc.valid = false
	pc.mu.Unlock()
}

// Refresh makes the next read go to the device if the summary is
// PeerSummaryMaxAge old at now (or from a clock that stepped back).
func (pc *PeerCache) Refresh(now time.Time) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if age := now.Sub(pc.at); age < 0 || age >= PeerSummaryMaxAge {
		pc.valid = false
	}
}

// Applied sets the summary to that of the device after an apply that
// worked: before is the device as the apply read it, plan what it
// changed. Removed peers go, added ones come without a handshake (as
// WireGuard adds them), updated ones keep theirs. It spares the status a
// second read of the device (O(peers)) on every change of the overlay.
func (pc *PeerCache) Applied(mode string, before *wgtypes.Device, plan desired.Plan, target *desired.State, now time.Time) {
	if before == nil {
		pc.Invalidate()
		return
	}
	gone := map[wgtypes.Key]bool{}
	var added []wgtypes.Peer
	for _, c := range plan.Peers {
		if c.Op != desired.OpRemove && c.Op != desired.OpAdd {
			continue // updated in place: its handshake stays
		}
		k, err := wgtypes.ParseKey(c.Peer.PublicKey)
		if err != nil { // the apply would have failed
			pc.Invalidate()
			return
		}
		gone[k] = true // an added peer's earlier state, if any, goes too
		if c.Op == desired.OpAdd {
			added = append(added, wgtypes.Peer{PublicKey: k})
		}
	}
	peers := make([]wgtypes.Peer, 0, len(before.Peers)+len(added))
	for _, p := range before.Peers {
		if !gone[p.PublicKey] {
			peers = append(peers, p)
		}
	}
	peers = append(peers, added...)
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.mode, pc.err = mode, ""
	pc.sum = summarize(peers, func() map[string]string { return peerNames(target) }, now)
	pc.valid, pc.at = true, now
}

// read fills st's address (from target), and its mode and peer summary
// (from the cache, or from dev when the cache is not valid; now is the
// time the summary's handshake ages count from).
func (pc *PeerCache) read(st *Status, target *desired.State, dev deviceReader, now time.Time) {
	if target != nil {
		if a := target.SelfAddress(); a.IsValid() {
			st.Address = a.String()
		}
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if !pc.valid {
		var d *wgtypes.Device
		pc.mode, d, pc.err = readDevice(dev)
		pc.sum = PeerSummary{}
		if d != nil {
			pc.sum = summarize(d.Peers, func() map[string]string { return peerNames(target) }, now)
		}
		pc.valid, pc.at = true, now
	}
	st.Mode, st.Peers = pc.mode, pc.sum
	if st.LastError == "" && pc.err != "" {
		st.LastError = pc.err
	}
}

// Status implements agent.Component. It reads the live device for
// handshake times; it never includes the private key.
func (c *Component) Status() any { return c.StatusNow(time.Now()) }

// StatusNow is Status with handshake ages measured from now. The peer
// summary is the last one read (PeerCache): RefreshStatus has it read
// again.
func (c *Component) StatusNow(now time.Time) Status {
	v := c.track.view()
	st := c.status(v)
	c.peerCache.read(&st, v.target, c.reader, now)
	return st
}

// RefreshStatus implements agent.StatusRefresher: the next status reads
// the device if the last summary is PeerSummaryMaxAge old.
func (c *Component) RefreshStatus() { c.peerCache.Refresh(time.Now()) }

// PeerDetails returns every peer of the device with its handshake and
// byte counters, sorted by name (then key), read now.
func (c *Component) PeerDetails(now time.Time) []PeerDetail {
	v := c.track.view()
	_, d, _ := readDevice(c.reader)
	if d == nil {
		return nil
	}
	return details(d.Peers, peerNames(v.target), now)
}

// status is the part of the status that does not read the device.
func (c *Component) status(v trackerView) Status {
	st := Status{
		Interface: c.opts.Interface,
		PublicKey: c.PublicKey(),
		Revision:  v.revision,
		Applied:   v.applied,
		Waiting:   v.waiting,
	}
	setProblems(&st, v.problems)
	if v.lastErr != nil {
		st.LastError = registry.StatusText(v.lastErr.Error())
	}
	if err := c.cache.lastErr(); err != nil {
		st.CacheError = registry.StatusText(err.Error())
	}
	return st
}

// setProblems puts at most MaxStatusProblems of problems in st.
func setProblems(st *Status, problems []desired.Problem) {
	st.ProblemCount = len(problems)
	st.Problems = problems
	if len(st.Problems) > MaxStatusProblems {
		st.Problems = st.Problems[:MaxStatusProblems]
	}
}

// deviceReader is what the status reads of the live device: the Applier,
// or a FakeDevice in tests and the scale bench.
type deviceReader interface {
	Mode() string
	Device() (*wgtypes.Device, error)
}

// readDevice returns the device's mode and the device as read now (nil
// with the reason in errText when it cannot be read, or when there is no
// device yet: mode "").
func readDevice(dev deviceReader) (mode string, d *wgtypes.Device, errText string) {
	mode = dev.Mode()
	if mode == "" {
		return mode, nil, ""
	}
	d, err := dev.Device()
	if err != nil {
		return mode, nil, registry.StatusText(err.Error())
	}
	return mode, d, ""
}

// peerNames maps the public keys of target's peers to their names.
func peerNames(target *desired.State) map[string]string {
	names := map[string]string{}
	if target != nil {
		for _, p := range target.Peers {
			names[p.PublicKey] = p.Name
		}
	}
	return names
}

// details lists peers with names from names, sorted by name (then key).
func details(peers []wgtypes.Peer, names map[string]string, now time.Time) []PeerDetail {
	out := make([]PeerDetail, 0, len(peers))
	for _, p := range peers {
		ps := PeerDetail{
			Name:                names[p.PublicKey.String()],
			PublicKey:           p.PublicKey.String(),
			HandshakeAgeSeconds: -1,
			RxBytes:             p.ReceiveBytes,
			TxBytes:             p.TransmitBytes,
		}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			ps.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
		}
		if !p.LastHandshakeTime.IsZero() {
			ps.LastHandshake = p.LastHandshakeTime
			ps.HandshakeAgeSeconds = int64(now.Sub(p.LastHandshakeTime) / time.Second)
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b PeerDetail) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.PublicKey, b.PublicKey)
	})
	return out
}

// StatusOf is the status a node publishes whose desired overlay is want
// (computed from the snapshot at revision) and whose device is dev, with
// the peer summary kept in pc: the code Component.Status runs, for
// callers that keep a device of their own (the scale bench's simulated
// nodes). The caller invalidates pc when it changes dev.
func StatusOf(iface string, want desired.State, revision int64, dev *FakeDevice, pc *PeerCache, now time.Time) Status {
	st := Status{Interface: iface, PublicKey: dev.PublicKey(), Revision: revision, Applied: true}
	setProblems(&st, want.Problems)
	pc.read(&st, &want, dev, now)
	return st
}
