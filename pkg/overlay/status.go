package overlay

import (
	"net/netip"
	"slices"
	"strings"
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

// Summarize computes the bounded summary of a peer list at time now.
func Summarize(peers []PeerDetail, now time.Time) PeerSummary {
	s := PeerSummary{Count: len(peers)}
	var oldest time.Duration
	never := false
	var stale []string
	for _, p := range peers {
		if p.LastHandshake.IsZero() {
			never = true
		} else if age := now.Sub(p.LastHandshake); age > oldest {
			oldest = age
		}
		if !p.LastHandshake.IsZero() && now.Sub(p.LastHandshake) <= RecentHandshake {
			s.Recent++
			continue
		}
		name := p.Name
		if name == "" {
			name = p.PublicKey
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

// Status implements agent.Component. It reads the live device for
// handshake times; it never includes the private key.
func (c *Component) Status() any { return c.StatusNow(time.Now()) }

// StatusNow is Status with handshake ages measured from now.
func (c *Component) StatusNow(now time.Time) Status {
	st, peers := c.status(now)
	st.Peers = Summarize(peers, now)
	return st
}

// PeerDetails returns every peer of the device with its handshake and
// byte counters, sorted by name (then key).
func (c *Component) PeerDetails(now time.Time) []PeerDetail {
	_, peers := c.status(now)
	return peers
}

func (c *Component) status(now time.Time) (Status, []PeerDetail) {
	v := c.track.view()
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
	peers := readDevice(&st, v.target, c.reader, now)
	return st, peers
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

// readDevice fills st's address and mode from target and dev, and returns
// dev's peers, named after target's, sorted by name (then key).
func readDevice(st *Status, target *desired.State, dev deviceReader, now time.Time) []PeerDetail {
	names := map[string]string{}
	if target != nil {
		if a := target.SelfAddress(); a.IsValid() {
			st.Address = a.String()
		}
		for _, p := range target.Peers {
			names[p.PublicKey] = p.Name
		}
	}
	st.Mode = dev.Mode()
	if st.Mode == "" {
		return nil
	}
	d, err := dev.Device()
	if err != nil {
		if st.LastError == "" {
			st.LastError = registry.StatusText(err.Error())
		}
		return nil
	}
	peers := make([]PeerDetail, 0, len(d.Peers))
	for _, p := range d.Peers {
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
		peers = append(peers, ps)
	}
	slices.SortFunc(peers, func(a, b PeerDetail) int {
		if c := strings.Compare(a.Name, b.Name); c != 0 {
			return c
		}
		return strings.Compare(a.PublicKey, b.PublicKey)
	})
	return peers
}

// StatusOf is the status a node publishes whose desired overlay is want
// (computed from the snapshot at revision) and whose device is dev: the
// code Component.Status runs, for callers that keep a device of their own
// (the scale bench's simulated nodes).
func StatusOf(iface string, want desired.State, revision int64, dev *FakeDevice, now time.Time) Status {
	st := Status{Interface: iface, PublicKey: dev.PublicKey(), Revision: revision, Applied: true}
	setProblems(&st, want.Problems)
	st.Peers = Summarize(readDevice(&st, &want, dev, now), now)
	return st
}
