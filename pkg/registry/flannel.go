package registry

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// flannel's keys and values, as flanneld v0.28 writes them with its etcd
// subnet manager and its WireGuard backend. meshd reads them to peer with
// nodes that still run flanneld, and writes one for its own subnet so
// that flanneld nodes (and nix-infra's overlay-IP lookup) see meshd nodes.
//
// Field names and casing follow flannel's Go structs, which carry no JSON
// tags and so are spelled as the Go fields are:
//   - pkg/lease/lease.go, LeaseAttrs: PublicIP, PublicIPv6, BackendType,
//     BackendData, BackendV6Data (the last three omitempty);
//   - pkg/backend/wireguard/wireguard_network.go, wireguardLeaseAttrs:
//     PublicKey, Port;
//   - pkg/backend/wireguard/wireguard.go, RegisterNetwork: the backend
//     config's ListenPort (default 51820) and PersistentKeepaliveInterval
//     (a count of seconds: flannel multiplies it by time.Second).

// FlannelPrefix holds everything flannel keeps in etcd (its network
// config and its subnet leases). meshd watches it as a second prefix.
const FlannelPrefix = "/coreos.com/network/"

// FlannelBackendWireGuard is the BackendType of flannel's WireGuard backend.
const FlannelBackendWireGuard = "wireguard"

// FlannelLeaseTTL is the TTL flannel gives a subnet lease
// (pkg/subnet/etcd/local_manager.go, subnetTTL), and FlannelRenewMargin
// how long before expiry flanneld renews it (main.go, the default of
// --subnet-lease-renew-margin: 60 minutes).
const (
	FlannelLeaseTTL    = 24 * time.Hour
	FlannelRenewMargin = time.Hour
)

// FlannelLease is one subnet lease at /coreos.com/network/subnets/<a.b.c.d-len>.
// The JSON fields are flannel's LeaseAttrs; the others come from the key
// and from etcd.
type FlannelLease struct {
	PublicIP      string          `json:"PublicIP"`
	PublicIPv6    *string         `json:"PublicIPv6"`
	BackendType   string          `json:"BackendType,omitempty"`
	BackendData   json.RawMessage `json:"BackendData,omitempty"`
	BackendV6Data json.RawMessage `json:"BackendV6Data,omitempty"`

	// Subnet is the lease's subnet, from its key.
	Subnet netip.Prefix `json:"-"`
	// WireGuard is BackendData decoded, for BackendType "wireguard".
	WireGuard *FlannelWireGuard `json:"-"`
	// Lease is the etcd lease the key is attached to (0: none).
	Lease int64 `json:"-"`
}

// FlannelWireGuard is the BackendData of flannel's WireGuard backend.
type FlannelWireGuard struct {
	PublicKey string `json:"PublicKey"`
	// Port is the node's WireGuard port; 0 in leases of flannel versions
	// that did not write it (flannel then uses its own listen port).
	Port uint16 `json:"Port"`
}

// Addr returns the lease's public IPv4 address (valid after DecodeFlannelLease).
func (l FlannelLease) Addr() netip.Addr {
	a, _ := netip.ParseAddr(l.PublicIP)
	return a
}

// FlannelConfig is what meshd reads of /coreos.com/network/config.
type FlannelConfig struct {
	Network     netip.Prefix
	SubnetLen   int
	BackendType string
	// ListenPort is the backend's WireGuard port (flannel's default 51820).
	ListenPort int
	// Keepalive is the backend's PersistentKeepaliveInterval.
	Keepalive time.Duration
}

// FlannelDefaultPort is the ListenPort flannel's WireGuard backend uses
// when the config names none.
const FlannelDefaultPort = 51820

// EncodeFlannelLease returns the lease value flanneld's WireGuard backend
// writes for a node (wireguard.go, newSubnetAttrs, IPv4 only: no
// BackendV6Data, PublicIPv6 null).
func EncodeFlannelLease(publicIP netip.Addr, publicKey string, port uint16) ([]byte, error) {
	if !publicIP.Is4() {
		return nil, fmt.Errorf("flannel lease: public IP %v is not IPv4", publicIP)
	}
	if err := validKey(publicKey); err != nil {
		return nil, fmt.Errorf("flannel lease: public key: %w", err)
	}
	data, err := json.Marshal(FlannelWireGuard{PublicKey: publicKey, Port: port})
	if err != nil {
		return nil, err
	}
	return json.Marshal(FlannelLease{PublicIP: publicIP.String(), BackendType: FlannelBackendWireGuard, BackendData: data})
}

// DecodeFlannelLease decodes and validates the lease for subnet. Leases
// of other backends decode with WireGuard nil; a WireGuard lease must
// carry a valid key.
func DecodeFlannelLease(subnet netip.Prefix, b []byte) (FlannelLease, error) {
	l, err := decodeFlannelAttrs(subnet, b)
	if err != nil {
		return FlannelLease{}, err
	}
	if l.BackendType != FlannelBackendWireGuard {
		return l, nil
	}
	var wg FlannelWireGuard
	if len(l.BackendData) == 0 {
		return FlannelLease{}, fmt.Errorf("%w: wireguard lease without BackendData", ErrBadValue)
	}
	if err := json.Unmarshal(l.BackendData, &wg); err != nil {
		return FlannelLease{}, fmt.Errorf("%w: BackendData: %v", ErrBadValue, err)
	}
	if err := validKey(wg.PublicKey); err != nil {
		return FlannelLease{}, fmt.Errorf("%w: BackendData.PublicKey: %v", ErrBadValue, err)
	}
	l.WireGuard = &wg
	return l, nil
}

// decodeFlannelAttrs decodes the backend-independent part of a lease:
// the JSON and the public IPv4 address.
func decodeFlannelAttrs(subnet netip.Prefix, b []byte) (FlannelLease, error) {
	var l FlannelLease
	if err := decodeStrict(b, &l); err != nil {
		return FlannelLease{}, err
	}
	l.Subnet = subnet
	if a, err := netip.ParseAddr(l.PublicIP); err != nil || !a.Is4() {
		return FlannelLease{}, fmt.Errorf("%w: PublicIP %s is not an IPv4 address", ErrBadValue, Quoted([]byte(l.PublicIP)))
	}
	return l, nil
}

// DecodeFlannelConfig decodes flannel's network config, filling in the
// WireGuard backend's defaults.
func DecodeFlannelConfig(b []byte) (FlannelConfig, error) {
	var raw struct {
		Network   string
		SubnetLen int
		Backend   struct {
			Type                        string
			ListenPort                  *int
			PersistentKeepaliveInterval int64
		}
	}
	if err := decodeStrict(b, &raw); err != nil {
		return FlannelConfig{}, err
	}
	c := FlannelConfig{SubnetLen: raw.SubnetLen, BackendType: raw.Backend.Type, ListenPort: FlannelDefaultPort}
	if raw.Network != "" {
		p, err := netip.ParsePrefix(raw.Network)
		if err != nil || p != p.Masked() {
			return FlannelConfig{}, fmt.Errorf("%w: Network %s is not a masked prefix", ErrBadValue, Quoted([]byte(raw.Network)))
		}
		c.Network = p
	}
	if raw.Backend.ListenPort != nil {
		if *raw.Backend.ListenPort < 1 || *raw.Backend.ListenPort > 65535 {
			return FlannelConfig{}, fmt.Errorf("%w: Backend.ListenPort %d out of range", ErrBadValue, *raw.Backend.ListenPort)
		}
		c.ListenPort = *raw.Backend.ListenPort
	}
	if k := raw.Backend.PersistentKeepaliveInterval; k < 0 || k > 65535 {
		return FlannelConfig{}, fmt.Errorf("%w: Backend.PersistentKeepaliveInterval %d out of range", ErrBadValue, k)
	}
	c.Keepalive = time.Duration(raw.Backend.PersistentKeepaliveInterval) * time.Second
	return c, nil
}

// FlannelEndpoint is where a flannel node's WireGuard listens, as
// flannel's handleSubnetEvents computes it: the lease's PublicIP and the
// lease's Port, or (older leases) the configured listen port. cfg may be
// nil (no network config: flannel's default port).
func FlannelEndpoint(l FlannelLease, cfg *FlannelConfig) netip.AddrPort {
	port := uint16(FlannelDefaultPort)
	if cfg != nil && cfg.ListenPort != 0 {
		port = uint16(cfg.ListenPort)
	}
	if l.WireGuard != nil && l.WireGuard.Port != 0 {
		port = l.WireGuard.Port
	}
	return netip.AddrPortFrom(l.Addr(), port)
}
