package hcloudfake

import (
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

// Locations the fake knows, with their network zones.
var locations = []schema.Location{
	{ID: 1, Name: "fsn1", NetworkZone: "eu-central", City: "Falkenstein"},
	{ID: 2, Name: "nbg1", NetworkZone: "eu-central", City: "Nuremberg"},
	{ID: 3, Name: "hel1", NetworkZone: "eu-central", City: "Helsinki"},
	{ID: 4, Name: "ash", NetworkZone: "us-east", City: "Ashburn, VA"},
	{ID: 5, Name: "hil", NetworkZone: "us-west", City: "Hillsboro, OR"},
	{ID: 6, Name: "sin", NetworkZone: "ap-southeast", City: "Singapore"},
}

// Server types and images the fake accepts.
var (
	serverTypes = []string{"cx22", "cx32", "cpx11", "cpx21", "cpx31", "cax11"}
	images      = map[string]int64{"debian-12": 114690387, "ubuntu-24.04": 161547269}
)

func locationByName(n string) (schema.Location, bool) {
	for _, l := range locations {
		if l.Name == n || strconv.FormatInt(l.ID, 10) == n {
			return l, true
		}
	}
	return schema.Location{}, false
}

func (s *Server) listLocations(w http.ResponseWriter, r *http.Request) {
	m := map[int64]*schema.Location{}
	for i := range locations {
		m[locations[i].ID] = &locations[i]
	}
	s.page(w, r, "locations", filter(r, m, func(l *schema.Location) string { return l.Name },
		func(*schema.Location) map[string]string { return nil }))
}

func (s *Server) listServers(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.page(w, r, "servers", filter(r, s.servers, func(x *schema.Server) string { return x.Name },
		func(x *schema.Server) map[string]string { return x.Labels }))
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
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("server with ID %d not found", id))
		return
	}
	writeJSON(w, http.StatusOK, schema.ServerGetResponse{Server: *srv})
}

func (s *Server) createServer(w http.ResponseWriter, r *http.Request) {
	var req schema.ServerCreateRequest
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
	invalid := func(field, msg string) {
		writeError(w, http.StatusUnprocessableEntity, "invalid_input", fmt.Sprintf("invalid input in field '%s': %s", field, msg))
	}
	if req.Name == "" {
		invalid("name", "is required")
		return
	}
	for _, x := range s.servers {
		if x.Name == req.Name {
			writeError(w, http.StatusConflict, "uniqueness_error", "server name is already used")
			return
		}
	}
	if !slices.Contains(serverTypes, req.ServerType.Name) {
		invalid("server_type", fmt.Sprintf("server type %q not found", req.ServerType.Name))
		return
	}
	imgID, ok := images[req.Image.Name]
	if req.Image.ID != 0 {
		imgID, ok = req.Image.ID, slices.Contains([]int64{114690387, 161547269}, req.Image.ID)
	}
	if !ok {
		invalid("image", "image not found")
		return
	}
	loc, ok := locationByName(req.Location)
	if !ok {
		invalid("location", fmt.Sprintf("location %q not found", req.Location))
		return
	}
	if len(req.UserData) > 32<<10 {
		invalid("user_data", "too long")
		return
	}
	for _, k := range req.SSHKeys {
		if s.sshKeys[k] == nil {
			invalid("ssh_keys", fmt.Sprintf("ssh key %d not found", k))
			return
		}
	}
	for _, fw := range req.Firewalls {
		if s.firewalls[fw.Firewall] == nil {
			invalid("firewalls", fmt.Sprintf("firewall %d not found", fw.Firewall))
			return
		}
	}
	var pg *schema.PlacementGroup
	if req.PlacementGroup != 0 {
		if pg = s.pgs[req.PlacementGroup]; pg == nil {
			invalid("placement_group", fmt.Sprintf("placement group %d not found", req.PlacementGroup))
			return
		}
		if len(pg.Servers) >= 10 {
			writeError(w, http.StatusUnprocessableEntity, "placement_error", "spread placement group is full")
			return
		}
	}
	id := s.id()
	var private []schema.ServerPrivateNet
	for _, nid := range req.Networks {
		nw := s.networks[nid]
		if nw == nil {
			invalid("networks", fmt.Sprintf("network %d not found", nid))
			return
		}
		var ip string
		for _, sub := range nw.Subnets {
			if sub.NetworkZone == loc.NetworkZone {
				p := netip.MustParsePrefix(sub.IPRange)
				a := p.Addr()
				for range 2 + len(nw.Servers) {
					a = a.Next()
				}
				ip = a.String()
				break
			}
		}
		if ip == "" {
			invalid("networks", fmt.Sprintf("network %d has no subnet in %s", nid, loc.NetworkZone))
			return
		}
		nw.Servers = append(nw.Servers, id)
		private = append(private, schema.ServerPrivateNet{Network: nid, IP: ip, MACAddress: fmt.Sprintf("86:00:00:00:00:%02x", id%256)})
	}
	labels := map[string]string{}
	if req.Labels != nil {
		labels = *req.Labels
	}
	n := id % 250
	srv := &schema.Server{
		ID: id, Name: req.Name, Status: "initializing", Created: created, Labels: labels,
		ServerType: schema.ServerType{Name: req.ServerType.Name}, Location: loc,
		Image: &schema.Image{ID: imgID, Type: "system"},
		PublicNet: schema.ServerPublicNet{
			IPv4: schema.ServerPublicNetIPv4{ID: id, IP: fmt.Sprintf("203.0.113.%d", n)},
			IPv6: schema.ServerPublicNetIPv6{ID: id + 10000, IP: fmt.Sprintf("2001:db8:%x::/64", n)},
		},
		PrivateNet: private,
	}
	for _, fw := range req.Firewalls {
		f := s.firewalls[fw.Firewall]
		srv.PublicNet.Firewalls = append(srv.PublicNet.Firewalls, schema.ServerFirewall{ID: f.ID, Status: "applied"})
		f.AppliedTo = append(f.AppliedTo, schema.FirewallResource{Type: "server", Server: &schema.FirewallResourceServer{ID: id}})
	}
	if pg != nil {
		pg.Servers = append(pg.Servers, id)
		srv.PlacementGroup = pg
	}
	s.servers[id] = srv
	s.userData[id] = req.UserData
	resp := schema.ServerCreateResponse{Server: *srv}
	resp.Action = s.newActionLocked("create_server", "server", id, srv.Name, func() { srv.Status = "off" })
	if req.StartAfterCreate == nil || *req.StartAfterCreate {
		resp.NextActions = []schema.Action{s.newActionLocked("start_server", "server", id, srv.Name, func() { srv.Status = "running" })}
	}
	writeJSON(w, http.StatusCreated, resp)
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
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("server with ID %d not found", id))
		return
	}
	srv.Status = "deleting"
	a := s.newActionLocked("delete_server", "server", id, srv.Name, func() {
		delete(s.servers, id)
		for _, pg := range s.pgs {
			pg.Servers = slices.DeleteFunc(pg.Servers, func(x int64) bool { return x == id })
		}
		for _, nw := range s.networks {
			nw.Servers = slices.DeleteFunc(nw.Servers, func(x int64) bool { return x == id })
		}
		for _, fw := range s.firewalls {
			fw.AppliedTo = slices.DeleteFunc(fw.AppliedTo, func(x schema.FirewallResource) bool {
				return x.Server != nil && x.Server.ID == id
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
			return *x, true
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
	s.servers[id] = &schema.Server{ID: id, Name: name, Status: "running", Created: created, Labels: labels,
		Location: locations[0], PublicNet: schema.ServerPublicNet{IPv4: schema.ServerPublicNetIPv4{IP: fmt.Sprintf("198.51.100.%d", id%250)}}}
	return id
}
