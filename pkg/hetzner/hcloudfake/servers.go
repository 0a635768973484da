package hcloudfake

import (
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

func (s *Server) sortedServerIDsLocked() []int64 {
	ids := make([]int64, 0, len(s.servers))
	for id := range s.servers {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// serverViewLocked is the server as the API shows it: public_net.firewalls
// lists every firewall applied to it, directly or through a label
// selector.
func (s *Server) serverViewLocked(srv *schema.Server) schema.Server {
	out := *srv
	out.PublicNet.Firewalls = []schema.ServerFirewall{}
	ids := make([]int64, 0, len(s.firewalls))
	for id := range s.firewalls {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		for _, a := range s.firewalls[id].applyTo {
			if (a.Type == "server" && a.Server.ID == srv.ID) || (a.Type == "label_selector" && matchLabels(a.LabelSelector.Selector, srv.Labels)) {
				out.PublicNet.Firewalls = append(out.PublicNet.Firewalls, schema.ServerFirewall{ID: id, Status: "applied"})
				break
			}
		}
	}
	return out
}

func (s *Server) listServers(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "servers", filter(r, s.servers, func(x *schema.Server) string { return x.Name },
		func(x *schema.Server) map[string]string { return x.Labels }, func(x *schema.Server) any { return s.serverViewLocked(x) }))
}

func (s *Server) getServer(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	srv, found := s.servers[id]
	if !found {
		notFound(w, fmt.Sprintf("server with ID %d", id))
		return
	}
	writeJSON(w, http.StatusOK, schema.ServerGetResponse{Server: s.serverViewLocked(srv)})
}

// imageFor resolves "image" of "Create a Server" for a server type's
// architecture: a name picks the image of that architecture; an ID must
// be of it. Images past their unavailable_after cannot be ordered.
func imageFor(ref *idOrName, arch string, now time.Time) (schema.Image, string) {
	for _, i := range images {
		if (ref.ID != 0 && i.ID == ref.ID) || (ref.ID == 0 && *i.Name == ref.Name && i.Architecture == arch) {
			if i.Architecture != arch {
				return i, fmt.Sprintf("image %d is for architecture %s, server type is %s", i.ID, i.Architecture, arch)
			}
			if i.Deprecation != nil && !now.Before(i.Deprecation.UnavailableAfter) {
				return i, fmt.Sprintf("image %s is deprecated and no longer available", *i.Name)
			}
			return i, ""
		}
	}
	return schema.Image{}, fmt.Sprintf("image %q not found for architecture %s", ref.key(), arch)
}

func (s *Server) createServer(w http.ResponseWriter, r *http.Request) {
	var req serverCreateRequest
	if !decode(w, r, &req) {
		return
	}
	s.mu.Lock()
	s.creating++
	s.maxCreating = max(s.maxCreating, s.creating)
	s.mu.Unlock()
	time.Sleep(s.CreateDelay)
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() { s.creating-- }()
	now := s.Now()
	if err := validHostname(req.Name); err != nil {
		invalid(w, "name", err.Error())
		return
	}
	if err := validLabels(req.Labels); err != nil {
		invalid(w, "labels", err.Error())
		return
	}
	if req.ServerType == nil {
		invalid(w, "server_type", "is required")
		return
	}
	if req.Image == nil {
		invalid(w, "image", "is required")
		return
	}
	if req.Location != nil && req.Datacenter != nil {
		invalid(w, "location", "must not be used together with datacenter")
		return
	}
	if req.Datacenter != nil {
		invalid(w, "datacenter", "the fake takes location only")
		return
	}
	loc := locations[0]
	if req.Location != nil {
		var ok bool
		if loc, ok = locationByName(req.Location.key()); !ok {
			invalid(w, "location", fmt.Sprintf("location %q not found", req.Location.key()))
			return
		}
	}
	st, ok := serverTypeBy(req.ServerType.key())
	if !ok {
		invalid(w, "server_type", fmt.Sprintf("server type %q not found", req.ServerType.key()))
		return
	}
	if !orderable(st, loc.Name, now) {
		// "resource_unavailable: The requested resource is currently
		// unavailable (e.g. not available for order)".
		writeError(w, http.StatusServiceUnavailable, "resource_unavailable",
			fmt.Sprintf("server type %s is not available for order in %s", st.Name, loc.Name), nil)
		return
	}
	img, bad := imageFor(req.Image, st.Architecture, now)
	if bad != "" {
		invalid(w, "image", bad)
		return
	}
	if req.UserData != nil && len(*req.UserData) > 32<<10 {
		invalid(w, "user_data", "is limited to 32KiB")
		return
	}
	for _, x := range s.servers {
		if x.Name == req.Name {
			uniqueness(w, "name", "server name is already used")
			return
		}
	}
	for _, k := range req.SSHKeys {
		if !slices.ContainsFunc(slices.Collect(maps.Values(s.sshKeys)), func(x *schema.SSHKey) bool {
			return x.ID == k.ID || (k.ID == 0 && x.Name == k.Name)
		}) {
			invalid(w, "ssh_keys", fmt.Sprintf("ssh key %q not found", k.key()))
			return
		}
	}
	for _, fw := range req.Firewalls {
		if s.firewalls[fw.Firewall] == nil {
			invalid(w, "firewalls", fmt.Sprintf("firewall %d not found", fw.Firewall))
			return
		}
	}
	var pg *schema.PlacementGroup
	if req.PlacementGroup != nil {
		if pg = s.pgs[*req.PlacementGroup]; pg == nil {
			invalid(w, "placement_group", fmt.Sprintf("placement group %d not found", *req.PlacementGroup))
			return
		}
		if len(pg.Servers) >= 10 {
			writeError(w, http.StatusUnprocessableEntity, "placement_error", "spread placement group is full", nil)
			return
		}
	}
	id := s.id()
	private := []schema.ServerPrivateNet{}
	var joins []func()
	for _, nid := range req.Networks {
		nw := s.networks[nid]
		if nw == nil {
			invalid(w, "networks", fmt.Sprintf("network %d not found", nid))
			return
		}
		ip, ok := nw.freeIPLocked(loc.NetworkZone)
		if !ok {
			writeError(w, http.StatusUnprocessableEntity, "no_subnet_available",
				fmt.Sprintf("network %d has no subnet with free addresses in %s", nid, loc.NetworkZone), nil)
			return
		}
		joins = append(joins, func() { nw.handed[ip] = true; nw.n.Servers = append(nw.n.Servers, id) })
		private = append(private, schema.ServerPrivateNet{Network: nid, IP: ip.String(), AliasIPs: []string{},
			MACAddress: fmt.Sprintf("86:00:00:00:%02x:%02x", id/256%256, id%256)})
	}
	for _, j := range joins {
		j()
	}
	n := id % 250
	srv := &schema.Server{
		ID: id, Name: req.Name, Status: "initializing", Created: created, Labels: nonNil(req.Labels),
		ServerType: st, Location: loc, Image: &img,
		PublicNet: schema.ServerPublicNet{
			IPv4:        schema.ServerPublicNetIPv4{ID: id, IP: fmt.Sprintf("203.0.113.%d", n)},
			IPv6:        schema.ServerPublicNetIPv6{ID: id + 10000, IP: fmt.Sprintf("2001:db8:%x::/64", n)},
			FloatingIPs: []int64{},
		},
		PrivateNet: private, Volumes: []int64{}, LoadBalancers: []int64{},
	}
	for _, fw := range req.Firewalls {
		f := s.firewalls[fw.Firewall]
		f.applyTo = append(f.applyTo, firewallResource{Type: "server", Server: &struct {
			ID int64 `json:"id"`
		}{id}})
	}
	if pg != nil {
		pg.Servers = append(pg.Servers, id)
		srv.PlacementGroup = pg
	}
	s.servers[id] = srv
	if req.UserData != nil {
		s.userData[id] = *req.UserData
	}
	resp := schema.ServerCreateResponse{Server: s.serverViewLocked(srv), NextActions: []schema.Action{}}
	resp.Action = s.newActionLocked("create_server", "server", id, srv.Name, func() { srv.Status = "off" })
	if req.StartAfterCreate == nil || *req.StartAfterCreate {
		resp.NextActions = append(resp.NextActions, s.newActionLocked("start_server", "server", id, srv.Name, func() { srv.Status = "running" }))
	}
	writeJSON(w, http.StatusCreated, resp)
}

// freeIPLocked is the next address of the network's subnet in zone that
// was never handed out: "Networks" reserves the network's first address
// for the gateway; the fake starts servers at the subnet's second.
func (n *network) freeIPLocked(zone string) (netip.Addr, bool) {
	for _, sub := range n.n.Subnets {
		if sub.NetworkZone != zone || sub.Type == "vswitch" {
			continue
		}
		p := mustPrefix(sub.IPRange)
		for a := p.Addr().Next().Next(); p.Contains(a); a = a.Next() {
			if !n.handed[a] && p.Contains(a.Next()) { // the last address is broadcast
				return a, true
			}
		}
	}
	return netip.Addr{}, false
}

func (s *Server) powerOn(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	srv := s.servers[id]
	if srv == nil {
		notFound(w, fmt.Sprintf("server with ID %d", id))
		return
	}
	srv.Status = "starting"
	a := s.newActionLocked("start_server", "server", id, srv.Name, func() { srv.Status = "running" }, func() { srv.Status = "off" })
	writeJSON(w, http.StatusCreated, schema.ServerActionPoweronResponse{Action: a})
}

func (s *Server) deleteServer(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	srv, found := s.servers[id]
	if !found {
		notFound(w, fmt.Sprintf("server with ID %d", id))
		return
	}
	srv.Status = "deleting"
	a := s.newActionLocked("delete_server", "server", id, srv.Name, func() {
		delete(s.servers, id)
		for _, pg := range s.pgs {
			pg.Servers = slices.DeleteFunc(pg.Servers, func(x int64) bool { return x == id })
		}
		for _, nw := range s.networks {
			// The server's address stays in handed: it is never reused.
			nw.n.Servers = slices.DeleteFunc(nw.n.Servers, func(x int64) bool { return x == id })
		}
		for _, fw := range s.firewalls {
			fw.applyTo = slices.DeleteFunc(fw.applyTo, func(x firewallResource) bool {
				return x.Type == "server" && x.Server.ID == id
			})
		}
	})
	writeJSON(w, http.StatusOK, schema.ServerDeleteResponse{Action: a})
}

// ServerByName returns the server's current state.
func (s *Server) ServerByName(name string) (schema.Server, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.servers {
		if x.Name == name {
			return s.serverViewLocked(x), true
		}
	}
	return schema.Server{}, false
}

// ServerNames returns the names of every server, sorted.
func (s *Server) ServerNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, x := range s.servers {
		out = append(out, x.Name)
	}
	slices.Sort(out)
	return out
}

// SetServerStatus sets a server's status directly (a server someone
// powered off in the console).
func (s *Server) SetServerStatus(name, status string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.servers {
		if x.Name == name {
			x.Status = status
		}
	}
}

// UserData returns the user data a server was created with.
func (s *Server) UserData(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, x := range s.servers {
		if x.Name == name {
			return s.userData[id]
		}
	}
	return ""
}

// AddServer adds a running server directly (one created by someone else).
func (s *Server) AddServer(name string, labels map[string]string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.id()
	st, _ := serverTypeBy("cpx22")
	s.servers[id] = &schema.Server{ID: id, Name: name, Status: "running", Created: created, Labels: nonNil(labels), ServerType: st,
		Location: locations[0], PrivateNet: []schema.ServerPrivateNet{}, Volumes: []int64{}, LoadBalancers: []int64{},
		PublicNet: schema.ServerPublicNet{IPv4: schema.ServerPublicNetIPv4{IP: "198.51.100." + strconv.FormatInt(id%250, 10)}, FloatingIPs: []int64{}}}
	return id
}
