package registry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// MaxValueSize bounds a value meshd will decode. etcd's own default request
// limit is 1.5 MiB; nothing meshd reads is legitimately more than a few KiB
// (secrets are the largest).
const MaxValueSize = 256 << 10

// ErrBadValue is returned (wrapped) for a value that does not decode.
var ErrBadValue = errors.New("invalid value")

// Node is a node's entry at /cluster/nodes/<name>. The first three fields
// are nix-infra's and keep their spelling; Meshd is absent on entries that
// nix-infra's CLI wrote and on nodes that do not run meshd.
type Node struct {
	Name     string     `json:"name"`
	IPv4     string     `json:"ipv4"`
	Services []Group    `json:"services"`
	Meshd    *NodeMeshd `json:"meshd,omitempty"`

	// Lease is the etcd lease the entry is attached to (0: not leased,
	// written by nix-infra or by hand). Not part of the value.
	Lease int64 `json:"-"`
}

// NodeMeshd is what meshd adds to a node entry.
type NodeMeshd struct {
	// ID is the node's stable identity (random, kept in meshd's state
	// directory). A restarted meshd takes back an entry carrying its own
	// ID; an entry with another ID and a live lease belongs to another
	// node and is never stolen.
	ID string `json:"id"`
	// PublicKey is the node's WireGuard public key (empty without overlay).
	PublicKey string `json:"publicKey,omitempty"`
	// OverlayIP is the node's address on the overlay.
	OverlayIP string `json:"overlayIp,omitempty"`
	// Version is the meshd version running there.
	Version string `json:"version,omitempty"`
}

// Member is the durable record of a node's overlay identity at
// /cluster/meshd/members/<name>. Unlike the node entry it has no lease: a
// node whose meshd is briefly away keeps its WireGuard peer everywhere.
// It is removed only by `meshctl node remove`.
type Member struct {
	Name      string       `json:"name"`
	PublicKey string       `json:"publicKey"`
	Endpoint  string       `json:"endpoint,omitempty"` // host:port, empty if not reachable from outside
	Subnet    netip.Prefix `json:"subnet"`
	OverlayIP netip.Addr   `json:"overlayIp"`
	// Recipient is the node's age X25519 recipient for sealed secrets.
	Recipient string `json:"recipient,omitempty"`
}

// SubnetClaim is the value at /cluster/meshd/subnets/<subnet>.
type SubnetClaim struct {
	Node string `json:"node"`
}

// Env is an app's environment description, kept as raw JSON values so
// that whatever nix-infra wrote round-trips unchanged.
type Env map[string]json.RawMessage

// AppMeta is an app's metadata at /cluster/<group>/<app>/meta_data.
type AppMeta struct {
	Env       Env     `json:"env,omitempty"`
	EnvPrefix string  `json:"env_prefix,omitempty"`
	Publish   Publish `json:"publish"`
}

// Publish says where an app is reachable on every consuming node.
type Publish struct {
	Port int `json:"port"`
}

// Protocol returns env.PROTOCOL if it is a string ("http", "tcp", ...).
func (m AppMeta) Protocol() string {
	var s string
	if raw, ok := m.Env["PROTOCOL"]; ok && json.Unmarshal(raw, &s) == nil {
		return s
	}
	return ""
}

// Instance is one running copy of an app at
// /cluster/<group>/<app>/instances/<node>.
type Instance struct {
	IPv4 string `json:"ipv4"`
	Node string `json:"node"`
	Port int    `json:"port"`
}

// Addr returns the instance's address.
func (i Instance) Addr() netip.AddrPort {
	a, _ := netip.ParseAddr(i.IPv4)
	return netip.AddrPortFrom(a, uint16(i.Port))
}

// Status is what a node publishes at /meshd/status/<name> after each
// reconcile pass.
type Status struct {
	Node string `json:"node"`
	// Revision is the etcd revision of the newest snapshot for which every
	// component applied without error.
	Revision int64 `json:"revision"`
	// Seen is the newest revision the node has received.
	Seen      int64     `json:"seen"`
	UpdatedAt time.Time `json:"updatedAt"`
	Version   string    `json:"version,omitempty"`
	// Components holds each component's own status (overlay, haproxy,
	// creds), by name.
	Components map[string]json.RawMessage `json:"components,omitempty"`
	// Errors holds the last error of each component that is failing.
	Errors map[string]string `json:"errors,omitempty"`
	// Problems counts registry keys that were skipped as invalid.
	Problems int `json:"problems,omitempty"`
}

// Seen is a node's durable presence record at /meshd/seen/<name>. It has
// no lease, so it outlives the node's entry: when the lease is gone it
// tells when the node was last known to be up. meshd writes it only when
// it registers (a new or resumed lease) and when it stops cleanly, never
// periodically, so an idle cluster writes nothing.
type Seen struct {
	Node string `json:"node"`
	// RegisteredAt is when the node last registered.
	RegisteredAt time.Time `json:"registeredAt"`
	// StoppedAt is when meshd last stopped cleanly; it is older than
	// RegisteredAt (or zero) while the node runs.
	StoppedAt time.Time `json:"stoppedAt,omitzero"`
	// LeaseTTLSeconds is the node's lease TTL: a node that crashed was up
	// until at most this long before its entry vanished.
	LeaseTTLSeconds int64 `json:"leaseTTLSeconds,omitempty"`
}

// DecodeSeen decodes a presence record; its name must match the key's.
func DecodeSeen(name string, b []byte) (Seen, error) {
	var s Seen
	if err := decodeStrict(b, &s); err != nil {
		return Seen{}, err
	}
	if s.Node != name {
		return Seen{}, fmt.Errorf("%w: node %q does not match key %q", ErrBadValue, s.Node, name)
	}
	return s, nil
}

// SealedSecret is a secret sealed to one node at /meshd/secrets/<node>/<name>.
type SealedSecret struct {
	Version int64 `json:"version"`
	// Ciphertext is the age-encrypted value (ASCII armored).
	Ciphertext string `json:"ciphertext"`
}

func decodeStrict(b []byte, v any) error {
	if len(b) > MaxValueSize {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadValue, len(b), MaxValueSize)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: %v", ErrBadValue, err)
	}
	return nil
}

// DecodeNode decodes and validates a node entry. key names the node; the
// value's own name must match it.
func DecodeNode(name string, b []byte) (Node, error) {
	var n Node
	if err := decodeStrict(b, &n); err != nil {
		return Node{}, err
	}
	if n.Name != name {
		return Node{}, fmt.Errorf("%w: name %s does not match key %s", ErrBadValue, Quoted([]byte(n.Name)), Quoted([]byte(name)))
	}
	if n.IPv4 != "" {
		if _, err := netip.ParseAddr(n.IPv4); err != nil {
			return Node{}, fmt.Errorf("%w: ipv4: %v", ErrBadValue, err)
		}
	}
	for _, g := range n.Services {
		if _, err := ParseGroup(string(g)); err != nil {
			return Node{}, fmt.Errorf("%w: services: %v", ErrBadValue, err)
		}
	}
	if n.Meshd != nil {
		if err := validID(n.Meshd.ID); err != nil {
			return Node{}, fmt.Errorf("%w: meshd.id: %v", ErrBadValue, err)
		}
		if n.Meshd.PublicKey != "" {
			if err := validKey(n.Meshd.PublicKey); err != nil {
				return Node{}, fmt.Errorf("%w: meshd.publicKey: %v", ErrBadValue, err)
			}
		}
		if n.Meshd.OverlayIP != "" {
			if _, err := netip.ParseAddr(n.Meshd.OverlayIP); err != nil {
				return Node{}, fmt.Errorf("%w: meshd.overlayIp: %v", ErrBadValue, err)
			}
		}
	}
	return n, nil
}

// DecodeMember decodes and validates a member record.
func DecodeMember(name string, b []byte) (Member, error) {
	var m Member
	if err := decodeStrict(b, &m); err != nil {
		return Member{}, err
	}
	if m.Name != name {
		return Member{}, fmt.Errorf("%w: name %s does not match key %s", ErrBadValue, Quoted([]byte(m.Name)), Quoted([]byte(name)))
	}
	if err := validKey(m.PublicKey); err != nil {
		return Member{}, fmt.Errorf("%w: publicKey: %v", ErrBadValue, err)
	}
	if !m.Subnet.IsValid() || !m.Subnet.Addr().Is4() || m.Subnet != m.Subnet.Masked() {
		return Member{}, fmt.Errorf("%w: subnet %v: want a masked IPv4 prefix", ErrBadValue, m.Subnet)
	}
	if !m.OverlayIP.IsValid() || !m.Subnet.Contains(m.OverlayIP) {
		return Member{}, fmt.Errorf("%w: overlayIp %v not in subnet %v", ErrBadValue, m.OverlayIP, m.Subnet)
	}
	if m.Endpoint != "" {
		if _, err := netip.ParseAddrPort(m.Endpoint); err != nil {
			return Member{}, fmt.Errorf("%w: endpoint: %v", ErrBadValue, err)
		}
	}
	if len(m.Recipient) > 200 || bytes.ContainsAny([]byte(m.Recipient), " \t\r\n\"'") {
		return Member{}, fmt.Errorf("%w: recipient is malformed", ErrBadValue)
	}
	return m, nil
}

// DecodeSubnetClaim decodes a subnet claim.
func DecodeSubnetClaim(b []byte) (SubnetClaim, error) {
	var c SubnetClaim
	if err := decodeStrict(b, &c); err != nil {
		return SubnetClaim{}, err
	}
	if err := ValidName(c.Node); err != nil {
		return SubnetClaim{}, fmt.Errorf("%w: node: %v", ErrBadValue, err)
	}
	return c, nil
}

// DecodeMeta decodes and validates app metadata.
func DecodeMeta(b []byte) (AppMeta, error) {
	var m AppMeta
	if err := decodeStrict(b, &m); err != nil {
		return AppMeta{}, err
	}
	if m.Publish.Port < 1 || m.Publish.Port > 65535 {
		return AppMeta{}, fmt.Errorf("%w: publish.port %d out of range", ErrBadValue, m.Publish.Port)
	}
	if m.EnvPrefix != "" {
		if err := validEnvName(m.EnvPrefix); err != nil {
			return AppMeta{}, fmt.Errorf("%w: env_prefix: %v", ErrBadValue, err)
		}
	}
	return m, nil
}

// DecodeInstance decodes and validates an instance; node is from the key
// and must match the value.
func DecodeInstance(node string, b []byte) (Instance, error) {
	var in Instance
	if err := decodeStrict(b, &in); err != nil {
		return Instance{}, err
	}
	if in.Node != node {
		return Instance{}, fmt.Errorf("%w: node %s does not match key %s", ErrBadValue, Quoted([]byte(in.Node)), Quoted([]byte(node)))
	}
	a, err := netip.ParseAddr(in.IPv4)
	if err != nil || !a.Is4() {
		return Instance{}, fmt.Errorf("%w: ipv4 %s is not an IPv4 address", ErrBadValue, Quoted([]byte(in.IPv4)))
	}
	if !a.IsGlobalUnicast() {
		// Loopback would turn a consumer's HAProxy onto its own node.
		return Instance{}, fmt.Errorf("%w: ipv4 %s is not a unicast host address", ErrBadValue, a)
	}
	if in.Port < 1 || in.Port > 65535 {
		return Instance{}, fmt.Errorf("%w: port %d out of range", ErrBadValue, in.Port)
	}
	return in, nil
}

// DecodeStatus decodes a node status.
func DecodeStatus(name string, b []byte) (Status, error) {
	var s Status
	if err := decodeStrict(b, &s); err != nil {
		return Status{}, err
	}
	if s.Node != name {
		return Status{}, fmt.Errorf("%w: node %s does not match key %s", ErrBadValue, Quoted([]byte(s.Node)), Quoted([]byte(name)))
	}
	return s, nil
}

// DecodeSealedSecret decodes a sealed secret envelope.
func DecodeSealedSecret(b []byte) (SealedSecret, error) {
	var s SealedSecret
	if err := decodeStrict(b, &s); err != nil {
		return SealedSecret{}, err
	}
	if s.Version < 1 {
		return SealedSecret{}, fmt.Errorf("%w: version %d", ErrBadValue, s.Version)
	}
	if s.Ciphertext == "" {
		return SealedSecret{}, fmt.Errorf("%w: empty ciphertext", ErrBadValue)
	}
	return s, nil
}

// validKey checks a base64 WireGuard (Curve25519) public key: 44
// characters of standard base64 ending in '='.
func validKey(s string) error {
	if len(s) != 44 || s[43] != '=' {
		return fmt.Errorf("want 44 characters of base64")
	}
	for i := 0; i < 43; i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '/') {
			return fmt.Errorf("not base64")
		}
	}
	return nil
}

func validEnvName(s string) error {
	if s == "" || len(s) > 128 {
		return fmt.Errorf("length %d", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c == '_' || (i > 0 && c >= '0' && c <= '9')) {
			return fmt.Errorf("%s is not an environment variable name", Quoted([]byte(s)))
		}
	}
	return nil
}

// validID checks a node ID: 32 lowercase hex digits.
func validID(s string) error {
	if len(s) != 32 {
		return fmt.Errorf("want 32 hex digits")
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("want 32 hex digits")
		}
	}
	return nil
}
