package hcloudfake

import (
	"crypto/md5"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

func labelsOf(l *map[string]string) map[string]string {
	if l == nil {
		return map[string]string{}
	}
	return *l
}

// Fingerprint is the MD5 fingerprint the API gives a public key line.
func Fingerprint(line string) (string, error) {
	f := strings.Fields(line)
	if len(f) < 2 {
		return "", fmt.Errorf("not a public key")
	}
	blob, err := base64.StdEncoding.DecodeString(f[1])
	if err != nil {
		return "", err
	}
	sum := md5.Sum(blob)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02x", b)
	}
	return strings.Join(parts, ":"), nil
}

func (s *Server) listSSHKeys(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fp := r.URL.Query().Get("fingerprint")
	items := filter(r, s.sshKeys, func(k *schema.SSHKey) string { return k.Name },
		func(k *schema.SSHKey) map[string]string { return k.Labels })
	items = slices.DeleteFunc(items, func(x any) bool { return fp != "" && x.(schema.SSHKey).Fingerprint != fp })
	s.page(w, r, "ssh_keys", items)
}

func (s *Server) createSSHKey(w http.ResponseWriter, r *http.Request) {
	var req schema.SSHKeyCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	fp, err := Fingerprint(req.PublicKey)
	if err != nil || req.Name == "" {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'public_key'")
		return
	}
	for _, k := range s.sshKeys {
		if k.Name == req.Name || k.Fingerprint == fp {
			writeError(w, http.StatusConflict, "uniqueness_error", "SSH key with the same name or fingerprint already exists")
			return
		}
	}
	k := &schema.SSHKey{ID: s.id(), Name: req.Name, PublicKey: req.PublicKey, Fingerprint: fp, Labels: labelsOf(req.Labels), Created: created}
	s.sshKeys[k.ID] = k
	writeJSON(w, http.StatusCreated, schema.SSHKeyCreateResponse{SSHKey: *k})
}

// AddSSHKey adds a key directly (one uploaded earlier by someone else).
func (s *Server) AddSSHKey(name, publicKey string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	fp, _ := Fingerprint(publicKey)
	k := &schema.SSHKey{ID: s.id(), Name: name, PublicKey: publicKey, Fingerprint: fp, Labels: map[string]string{}, Created: created}
	s.sshKeys[k.ID] = k
	return k.ID
}

// SSHKeys returns every key.
func (s *Server) SSHKeys() []schema.SSHKey {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []schema.SSHKey
	for _, k := range s.sshKeys {
		out = append(out, *k)
	}
	return out
}

func (s *Server) listNetworks(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "networks", filter(r, s.networks, func(n *schema.Network) string { return n.Name },
		func(n *schema.Network) map[string]string { return n.Labels }))
}

func validSubnet(nw netip.Prefix, sub schema.NetworkSubnet) error {
	p, err := netip.ParsePrefix(sub.IPRange)
	if err != nil || !nw.Contains(p.Addr()) || p.Bits() < nw.Bits() {
		return fmt.Errorf("subnet %q is not inside the network's range", sub.IPRange)
	}
	if sub.Type != "cloud" && sub.Type != "server" && sub.Type != "vswitch" {
		return fmt.Errorf("subnet type %q", sub.Type)
	}
	if !slices.ContainsFunc(locations, func(l schema.Location) bool { return l.NetworkZone == sub.NetworkZone }) {
		return fmt.Errorf("network zone %q", sub.NetworkZone)
	}
	return nil
}

func (s *Server) createNetwork(w http.ResponseWriter, r *http.Request) {
	var req schema.NetworkCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rng, err := netip.ParsePrefix(req.IPRange)
	if err != nil || !rng.Addr().IsPrivate() {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'ip_range'")
		return
	}
	for _, sub := range req.Subnets {
		if err := validSubnet(rng, sub); err != nil {
			writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'subnets': "+err.Error())
			return
		}
	}
	for _, n := range s.networks {
		if n.Name == req.Name {
			writeError(w, http.StatusConflict, "uniqueness_error", "network name is already used")
			return
		}
	}
	n := &schema.Network{ID: s.id(), Name: req.Name, IPRange: req.IPRange, Subnets: req.Subnets, Labels: labelsOf(req.Labels),
		Created: created, Servers: []int64{}, Routes: req.Routes}
	s.networks[n.ID] = n
	writeJSON(w, http.StatusCreated, schema.NetworkCreateResponse{Network: *n})
}

func (s *Server) addSubnet(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req schema.NetworkActionAddSubnetRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.networks[id]
	if n == nil {
		writeError(w, http.StatusNotFound, "not_found", "network not found")
		return
	}
	sub := schema.NetworkSubnet{Type: req.Type, IPRange: req.IPRange, NetworkZone: req.NetworkZone}
	if err := validSubnet(netip.MustParsePrefix(n.IPRange), sub); err != nil {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", err.Error())
		return
	}
	a := s.newActionLocked("add_subnet", "network", id, n.Name, func() { n.Subnets = append(n.Subnets, sub) })
	writeJSON(w, http.StatusCreated, schema.NetworkActionAddSubnetResponse{Action: a})
}

// AddNetwork adds a network directly (one created by someone else).
func (s *Server) AddNetwork(name, ipRange string, labels map[string]string, subnets ...schema.NetworkSubnet) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := &schema.Network{ID: s.id(), Name: name, IPRange: ipRange, Subnets: subnets, Labels: labels, Created: created, Servers: []int64{}}
	s.networks[n.ID] = n
	return n.ID
}

func (s *Server) listFirewalls(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "firewalls", filter(r, s.firewalls, func(f *schema.Firewall) string { return f.Name },
		func(f *schema.Firewall) map[string]string { return f.Labels }))
}

func rulesOf(req []schema.FirewallRuleRequest) ([]schema.FirewallRule, error) {
	out := []schema.FirewallRule{}
	for _, r := range req {
		if r.Direction != "in" && r.Direction != "out" {
			return nil, fmt.Errorf("direction %q", r.Direction)
		}
		if (r.Protocol == "tcp" || r.Protocol == "udp") != (r.Port != nil) {
			return nil, fmt.Errorf("port is required for tcp and udp only")
		}
		for _, ip := range append(slices.Clone(r.SourceIPs), r.DestinationIPs...) {
			if _, err := netip.ParsePrefix(ip); err != nil {
				return nil, fmt.Errorf("ip %q: %v", ip, err)
			}
		}
		out = append(out, schema.FirewallRule{Direction: r.Direction, SourceIPs: r.SourceIPs, DestinationIPs: r.DestinationIPs,
			Protocol: r.Protocol, Port: r.Port, Description: r.Description})
	}
	return out, nil
}

func (s *Server) createFirewall(w http.ResponseWriter, r *http.Request) {
	var req schema.FirewallCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rules, err := rulesOf(req.Rules)
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'rules': "+err.Error())
		return
	}
	for _, f := range s.firewalls {
		if f.Name == req.Name {
			writeError(w, http.StatusConflict, "uniqueness_error", "firewall name is already used")
			return
		}
	}
	f := &schema.Firewall{ID: s.id(), Name: req.Name, Labels: labelsOf(req.Labels), Rules: rules, Created: created, AppliedTo: []schema.FirewallResource{}}
	s.firewalls[f.ID] = f
	writeJSON(w, http.StatusCreated, schema.FirewallCreateResponse{Firewall: *f, Actions: []schema.Action{}})
}

func (s *Server) setRules(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req schema.FirewallActionSetRulesRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.firewalls[id]
	if f == nil {
		writeError(w, http.StatusNotFound, "not_found", "firewall not found")
		return
	}
	rules, err := rulesOf(req.Rules)
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'rules': "+err.Error())
		return
	}
	a := s.newActionLocked("set_firewall_rules", "firewall", id, f.Name, func() { f.Rules = rules })
	writeJSON(w, http.StatusCreated, schema.FirewallActionSetRulesResponse{Actions: []schema.Action{a}})
}

// Firewall returns a firewall's current state by name.
func (s *Server) Firewall(name string) (schema.Firewall, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.firewalls {
		if f.Name == name {
			return *f, true
		}
	}
	return schema.Firewall{}, false
}

// SetFirewallRules changes a firewall's rules directly (someone edited it
// in the console).
func (s *Server) SetFirewallRules(name string, rules []schema.FirewallRule) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.firewalls {
		if f.Name == name {
			f.Rules = rules
		}
	}
}

func (s *Server) listPlacementGroups(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "placement_groups", filter(r, s.pgs, func(p *schema.PlacementGroup) string { return p.Name },
		func(p *schema.PlacementGroup) map[string]string { return p.Labels }))
}

func (s *Server) createPlacementGroup(w http.ResponseWriter, r *http.Request) {
	var req schema.PlacementGroupCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Type != "spread" {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", "invalid input in field 'type'")
		return
	}
	for _, p := range s.pgs {
		if p.Name == req.Name {
			writeError(w, http.StatusConflict, "uniqueness_error", "placement group name is already used")
			return
		}
	}
	p := &schema.PlacementGroup{ID: s.id(), Name: req.Name, Labels: labelsOf(req.Labels), Type: req.Type, Created: created, Servers: []int64{}}
	s.pgs[p.ID] = p
	writeJSON(w, http.StatusCreated, schema.PlacementGroupCreateResponse{PlacementGroup: *p})
}

// PlacementGroup returns a placement group's current state by name.
func (s *Server) PlacementGroup(name string) (schema.PlacementGroup, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.pgs {
		if p.Name == name {
			return *p, true
		}
	}
	return schema.PlacementGroup{}, false
}

// Network returns a network's current state by name.
func (s *Server) Network(name string) (schema.Network, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.networks {
		if n.Name == name {
			return *n, true
		}
	}
	return schema.Network{}, false
}
