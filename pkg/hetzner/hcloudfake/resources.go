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

// network is a network and every private address it ever handed out: the
// API does not give a deleted server's address to the next server at
// once, and the fake never does.
type network struct {
	n      schema.Network
	handed map[netip.Addr]bool
}

// firewall is a firewall and what it is applied to, as given.
type firewall struct {
	f       schema.Firewall
	applyTo []firewallResource
}

func nonNil(l map[string]string) map[string]string {
	if l == nil {
		return map[string]string{}
	}
	return l
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
		func(k *schema.SSHKey) map[string]string { return k.Labels }, func(k *schema.SSHKey) any { return *k })
	items = slices.DeleteFunc(items, func(x any) bool { return fp != "" && x.(schema.SSHKey).Fingerprint != fp })
	s.page(w, r, "ssh_keys", items)
}

func (s *Server) createSSHKey(w http.ResponseWriter, r *http.Request) {
	var req sshKeyCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Name == "" {
		invalid(w, "name", "is required")
		return
	}
	if err := validLabels(req.Labels); err != nil {
		invalid(w, "labels", err.Error())
		return
	}
	fp, err := Fingerprint(req.PublicKey)
	if err != nil {
		invalid(w, "public_key", "is not a valid public key")
		return
	}
	for _, k := range s.sshKeys {
		if k.Name == req.Name {
			uniqueness(w, "name", "SSH key with the same name already exists")
			return
		}
		if k.Fingerprint == fp {
			uniqueness(w, "public_key", "SSH key with the same fingerprint already exists")
			return
		}
	}
	k := &schema.SSHKey{ID: s.id(), Name: req.Name, PublicKey: req.PublicKey, Fingerprint: fp, Labels: nonNil(req.Labels), Created: created}
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
	s.page(w, r, "networks", filter(r, s.networks, func(n *network) string { return n.n.Name },
		func(n *network) map[string]string { return n.n.Labels }, func(n *network) any { return n.n }))
}

// checkSubnet applies "Networks": a subnet's ip_range "must be contained
// within the parent Network's ip_range", "each subnet must belong to one
// of the available Network Zones", "Subnets can not have overlapping IP
// ranges"; type is cloud, server or vswitch (vswitch needs vswitch_id).
func checkSubnet(nw netip.Prefix, sub subnetRequest, existing []schema.NetworkSubnet) (field string, err error) {
	p, err := cidr(sub.IPRange)
	if err != nil {
		return "ip_range", err
	}
	if !nw.Contains(p.Addr()) || p.Bits() < nw.Bits() {
		return "ip_range", fmt.Errorf("%s is not inside the network's %s", p, nw)
	}
	for _, e := range existing {
		if overlaps(p, mustPrefix(e.IPRange)) {
			return "ip_range", fmt.Errorf("%s overlaps subnet %s", p, e.IPRange)
		}
	}
	switch sub.Type {
	case "cloud", "server":
	case "vswitch":
		if sub.VSwitchID == nil {
			return "vswitch_id", fmt.Errorf("is required for type vswitch")
		}
	default:
		return "type", fmt.Errorf("%q: want cloud, server or vswitch", sub.Type)
	}
	if !slices.ContainsFunc(locations, func(l schema.Location) bool { return l.NetworkZone == sub.NetworkZone }) {
		return "network_zone", fmt.Errorf("%q is not a network zone", sub.NetworkZone)
	}
	return "", nil
}

func (s *Server) createNetwork(w http.ResponseWriter, r *http.Request) {
	var req networkCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Name == "" {
		invalid(w, "name", "is required")
		return
	}
	if err := validLabels(req.Labels); err != nil {
		invalid(w, "labels", err.Error())
		return
	}
	rng, err := validNetworkRange(req.IPRange)
	if err != nil {
		invalid(w, "ip_range", err.Error())
		return
	}
	subnets := []schema.NetworkSubnet{}
	for _, sub := range req.Subnets {
		if field, err := checkSubnet(rng, sub, subnets); err != nil {
			invalid(w, "subnets."+field, err.Error())
			return
		}
		subnets = append(subnets, subnetOf(rng, sub))
	}
	for _, n := range s.networks {
		if n.n.Name == req.Name {
			uniqueness(w, "name", "network name is already used")
			return
		}
	}
	n := &network{n: schema.Network{ID: s.id(), Name: req.Name, IPRange: rng.String(), Subnets: subnets, Labels: nonNil(req.Labels),
		Created: created, Servers: []int64{}, Routes: []schema.NetworkRoute{}, LoadBalancers: []int64{}}, handed: map[netip.Addr]bool{}}
	s.networks[n.n.ID] = n
	writeJSON(w, http.StatusCreated, schema.NetworkCreateResponse{Network: n.n})
}

// subnetOf is the subnet as the API shows it: the gateway is the first
// address of the network's range ("Networks": a subnet's gateway).
func subnetOf(rng netip.Prefix, sub subnetRequest) schema.NetworkSubnet {
	return schema.NetworkSubnet{Type: sub.Type, IPRange: mustPrefix(sub.IPRange).String(), NetworkZone: sub.NetworkZone,
		Gateway: rng.Addr().Next().String()}
}

func (s *Server) addSubnet(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req subnetRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.networks[id]
	if n == nil {
		notFound(w, "network")
		return
	}
	rng := mustPrefix(n.n.IPRange)
	if field, err := checkSubnet(rng, req, n.n.Subnets); err != nil {
		invalid(w, field, err.Error())
		return
	}
	sub := subnetOf(rng, req)
	a := s.newActionLocked("add_subnet", "network", id, n.n.Name, func() { n.n.Subnets = append(n.n.Subnets, sub) })
	writeJSON(w, http.StatusCreated, schema.NetworkActionAddSubnetResponse{Action: a})
}

// AddNetwork adds a network directly (one created by someone else).
func (s *Server) AddNetwork(name, ipRange string, labels map[string]string, subnets ...schema.NetworkSubnet) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := &network{n: schema.Network{ID: s.id(), Name: name, IPRange: ipRange, Subnets: subnets, Labels: nonNil(labels), Created: created,
		Servers: []int64{}, Routes: []schema.NetworkRoute{}, LoadBalancers: []int64{}}, handed: map[netip.Addr]bool{}}
	s.networks[n.n.ID] = n
	return n.n.ID
}

// Network returns a network's current state by name.
func (s *Server) Network(name string) (schema.Network, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.networks {
		if n.n.Name == name {
			return n.n, true
		}
	}
	return schema.Network{}, false
}

// viewLocked is the firewall as the API shows it: applied_to lists what
// it was applied to, a label selector with the servers it matches now
// under applied_to_resources.
func (s *Server) viewLocked(f *firewall) schema.Firewall {
	out := f.f
	out.AppliedTo = []schema.FirewallResource{}
	for _, a := range f.applyTo {
		switch a.Type {
		case "server":
			out.AppliedTo = append(out.AppliedTo, schema.FirewallResource{Type: "server", Server: &schema.FirewallResourceServer{ID: a.Server.ID}})
		case "label_selector":
			res := schema.FirewallResource{Type: "label_selector",
				LabelSelector: &schema.FirewallResourceLabelSelector{Selector: a.LabelSelector.Selector}, AppliedToResources: []schema.FirewallResource{}}
			for _, id := range s.sortedServerIDsLocked() {
				if matchLabels(a.LabelSelector.Selector, s.servers[id].Labels) {
					res.AppliedToResources = append(res.AppliedToResources, schema.FirewallResource{Type: "server", Server: &schema.FirewallResourceServer{ID: id}})
				}
			}
			out.AppliedTo = append(out.AppliedTo, res)
		}
	}
	return out
}

func (s *Server) listFirewalls(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "firewalls", filter(r, s.firewalls, func(f *firewall) string { return f.f.Name },
		func(f *firewall) map[string]string { return f.f.Labels }, func(f *firewall) any { return s.viewLocked(f) }))
}

func rulesOf(req []firewallRule) ([]schema.FirewallRule, error) {
	if len(req) > 50 {
		return nil, fmt.Errorf("at most 50 rules")
	}
	out := []schema.FirewallRule{}
	for i, r := range req {
		if err := validRule(r); err != nil {
			return nil, fmt.Errorf("rule %d: %w", i, err)
		}
		out = append(out, schema.FirewallRule{Direction: r.Direction, SourceIPs: nonNilS(r.SourceIPs), DestinationIPs: nonNilS(r.DestinationIPs),
			Protocol: r.Protocol, Port: r.Port, Description: r.Description})
	}
	return out, nil
}

func nonNilS(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// checkApplyTo applies "Apply to Resources": type server with server.id
// of an existing server, or label_selector with a selector.
func (s *Server) checkApplyToLocked(res []firewallResource) error {
	for _, a := range res {
		switch {
		case a.Type == "server" && a.Server != nil:
			if s.servers[a.Server.ID] == nil {
				return fmt.Errorf("server %d not found", a.Server.ID)
			}
		case a.Type == "label_selector" && a.LabelSelector != nil && a.LabelSelector.Selector != "":
		default:
			return fmt.Errorf("type %q needs its matching object (server or label_selector)", a.Type)
		}
	}
	return nil
}

func (s *Server) createFirewall(w http.ResponseWriter, r *http.Request) {
	var req firewallCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Name == "" || len(req.Name) > 128 {
		invalid(w, "name", "is required and limited to 128 characters")
		return
	}
	if err := validLabels(req.Labels); err != nil {
		invalid(w, "labels", err.Error())
		return
	}
	rules, err := rulesOf(req.Rules)
	if err != nil {
		invalid(w, "rules", err.Error())
		return
	}
	if err := s.checkApplyToLocked(req.ApplyTo); err != nil {
		invalid(w, "apply_to", err.Error())
		return
	}
	for _, f := range s.firewalls {
		if f.f.Name == req.Name {
			uniqueness(w, "name", "firewall name is already used")
			return
		}
	}
	f := &firewall{f: schema.Firewall{ID: s.id(), Name: req.Name, Labels: nonNil(req.Labels), Rules: rules, Created: created}, applyTo: req.ApplyTo}
	s.firewalls[f.f.ID] = f
	actions := []schema.Action{}
	if len(req.ApplyTo) > 0 {
		actions = append(actions, s.newActionLocked("apply_firewall", "firewall", f.f.ID, f.f.Name, nil))
	}
	writeJSON(w, http.StatusCreated, schema.FirewallCreateResponse{Firewall: s.viewLocked(f), Actions: actions})
}

func (s *Server) setRules(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req struct {
		Rules []firewallRule `json:"rules"`
	}
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.firewalls[id]
	if f == nil {
		notFound(w, "firewall")
		return
	}
	rules, err := rulesOf(req.Rules)
	if err != nil {
		invalid(w, "rules", err.Error())
		return
	}
	a := s.newActionLocked("set_firewall_rules", "firewall", id, f.f.Name, func() { f.f.Rules = rules })
	writeJSON(w, http.StatusCreated, schema.FirewallActionSetRulesResponse{Actions: []schema.Action{a}})
}

func (s *Server) applyToResources(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req struct {
		ApplyTo []firewallResource `json:"apply_to"`
	}
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.firewalls[id]
	if f == nil {
		notFound(w, "firewall")
		return
	}
	if err := s.checkApplyToLocked(req.ApplyTo); err != nil {
		invalid(w, "apply_to", err.Error())
		return
	}
	a := s.newActionLocked("apply_firewall", "firewall", id, f.f.Name, func() { f.applyTo = append(f.applyTo, req.ApplyTo...) })
	writeJSON(w, http.StatusCreated, schema.FirewallActionApplyToResourcesResponse{Actions: []schema.Action{a}})
}

// Firewall returns a firewall's current state by name.
func (s *Server) Firewall(name string) (schema.Firewall, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.firewalls {
		if f.f.Name == name {
			return s.viewLocked(f), true
		}
	}
	return schema.Firewall{}, false
}

// AddFirewall adds a firewall directly, applied to nothing (one made by
// an earlier meshctl that attached it to each server).
func (s *Server) AddFirewall(name string, labels map[string]string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := &firewall{f: schema.Firewall{ID: s.id(), Name: name, Labels: nonNil(labels), Rules: []schema.FirewallRule{}, Created: created}}
	s.firewalls[f.f.ID] = f
	return f.f.ID
}

// SetFirewallRules changes a firewall's rules directly (someone edited it
// in the console).
func (s *Server) SetFirewallRules(name string, rules []schema.FirewallRule) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.firewalls {
		if f.f.Name == name {
			f.f.Rules = rules
		}
	}
}

func (s *Server) listPlacementGroups(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "placement_groups", filter(r, s.pgs, func(p *schema.PlacementGroup) string { return p.Name },
		func(p *schema.PlacementGroup) map[string]string { return p.Labels }, func(p *schema.PlacementGroup) any { return *p }))
}

func (s *Server) createPlacementGroup(w http.ResponseWriter, r *http.Request) {
	var req placementGroupCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Type != "spread" {
		invalid(w, "type", fmt.Sprintf("%q: want spread", req.Type))
		return
	}
	if err := validLabels(req.Labels); err != nil {
		invalid(w, "labels", err.Error())
		return
	}
	for _, p := range s.pgs {
		if p.Name == req.Name {
			uniqueness(w, "name", "placement group name is already used")
			return
		}
	}
	p := &schema.PlacementGroup{ID: s.id(), Name: req.Name, Labels: nonNil(req.Labels), Type: req.Type, Created: created, Servers: []int64{}}
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
