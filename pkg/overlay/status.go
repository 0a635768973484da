package overlay

import (
	"net/netip"
	"time"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// Status is what the overlay publishes in the node's status (under
// "components"."overlay") for meshctl status.
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
	Waiting   bool              `json:"waiting,omitempty"`
	PeerCount int               `json:"peerCount"`
	Peers     []PeerStatus      `json:"peers,omitempty"`
	Problems  []desired.Problem `json:"problems,omitempty"`
	LastError string            `json:"lastError,omitempty"`
	// CacheError says why the boot cache in the state directory could not
	// be written: the overlay runs, but a boot without etcd would start
	// from an older state.
	CacheError string `json:"cacheError,omitempty"`
}

// PeerStatus is one peer as the device reports it.
type PeerStatus struct {
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

// Status implements agent.Component. It reads the live device for
// handshake times; it never includes the private key.
func (c *Component) Status() any { return c.StatusNow(time.Now()) }

// StatusNow is Status with handshake ages measured from now.
func (c *Component) StatusNow(now time.Time) Status {
	c.mu.Lock()
	st := Status{
		Interface: c.opts.Interface,
		PublicKey: c.PublicKey(),
		Revision:  c.revision,
		Applied:   c.applied,
		Waiting:   c.waiting,
		Problems:  c.problems,
	}
	if c.lastErr != nil {
		st.LastError = c.lastErr.Error()
	}
	if c.cacheErr != nil {
		st.CacheError = c.cacheErr.Error()
	}
	names := map[string]string{}
	if c.target != nil {
		if a := c.target.SelfAddress(); a.IsValid() {
			st.Address = a.String()
		}
		for _, p := range c.target.Peers {
			names[p.PublicKey] = p.Name
		}
	}
	c.mu.Unlock()
	st.Mode = c.applier.Mode()
	if st.Mode == "" {
		return st
	}
	dev, err := c.applier.Device()
	if err != nil {
		if st.LastError == "" {
			st.LastError = err.Error()
		}
		return st
	}
	st.PeerCount = len(dev.Peers)
	for _, p := range dev.Peers {
		ps := PeerStatus{
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
		st.Peers = append(st.Peers, ps)
	}
	return st
}
