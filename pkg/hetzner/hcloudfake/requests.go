package hcloudfake

import (
	"encoding/json"
	"strconv"
)

// The request bodies below follow the API reference's request sections
// field by field (not hcloud-go's schema package), so that a field the
// API does not have is rejected rather than silently decoded.

// idOrName is a field the reference types "ID or name": a JSON number or
// a string.
type idOrName struct {
	ID   int64
	Name string
}

func (v *idOrName) UnmarshalJSON(b []byte) error {
	var n json.Number
	if err := json.Unmarshal(b, &n); err == nil {
		id, err := n.Int64()
		v.ID = id
		return err
	}
	return json.Unmarshal(b, &v.Name)
}

// key is what the catalogue lookups take: the name, or the ID as text.
func (v *idOrName) key() string {
	if v == nil {
		return ""
	}
	if v.ID != 0 {
		return strconv.FormatInt(v.ID, 10)
	}
	return v.Name
}

// serverCreateRequest is "Servers: Create a Server".
type serverCreateRequest struct {
	Name             string     `json:"name"`
	Location         *idOrName  `json:"location"`
	Datacenter       *idOrName  `json:"datacenter"`
	ServerType       *idOrName  `json:"server_type"`
	StartAfterCreate *bool      `json:"start_after_create"`
	Image            *idOrName  `json:"image"`
	PlacementGroup   *int64     `json:"placement_group"`
	SSHKeys          []idOrName `json:"ssh_keys"`
	Volumes          []int64    `json:"volumes"`
	Networks         []int64    `json:"networks"`
	Firewalls        []struct {
		Firewall int64 `json:"firewall"`
	} `json:"firewalls"`
	UserData  *string           `json:"user_data"`
	Labels    map[string]string `json:"labels"`
	Automount *bool             `json:"automount"`
	PublicNet *struct {
		EnableIPv4 *bool  `json:"enable_ipv4"`
		EnableIPv6 *bool  `json:"enable_ipv6"`
		IPv4       *int64 `json:"ipv4"`
		IPv6       *int64 `json:"ipv6"`
	} `json:"public_net"`
}

// sshKeyCreateRequest is "SSH Keys: Create an SSH key".
type sshKeyCreateRequest struct {
	Name      string            `json:"name"`
	PublicKey string            `json:"public_key"`
	Labels    map[string]string `json:"labels"`
}

// subnetRequest is a subnet of "Networks: Create a Network" and the body
// of "Add a subnet to a Network".
type subnetRequest struct {
	Type        string `json:"type"`
	IPRange     string `json:"ip_range"`
	NetworkZone string `json:"network_zone"`
	VSwitchID   *int64 `json:"vswitch_id"`
}

// networkCreateRequest is "Networks: Create a Network".
type networkCreateRequest struct {
	Name    string            `json:"name"`
	IPRange string            `json:"ip_range"`
	Labels  map[string]string `json:"labels"`
	Subnets []subnetRequest   `json:"subnets"`
	Routes  []struct {
		Destination string `json:"destination"`
		Gateway     string `json:"gateway"`
	} `json:"routes"`
	ExposeRoutesToVSwitch *bool `json:"expose_routes_to_vswitch"`
}

// firewallRule is a rule of "Firewalls: Create a Firewall" and "Set
// Rules".
type firewallRule struct {
	Description    *string  `json:"description"`
	Direction      string   `json:"direction"`
	SourceIPs      []string `json:"source_ips"`
	DestinationIPs []string `json:"destination_ips"`
	Protocol       string   `json:"protocol"`
	Port           *string  `json:"port"`
}

// firewallResource is an entry of apply_to ("Create a Firewall", "Apply
// to Resources").
type firewallResource struct {
	Type   string `json:"type"`
	Server *struct {
		ID int64 `json:"id"`
	} `json:"server"`
	LabelSelector *struct {
		Selector string `json:"selector"`
	} `json:"label_selector"`
}

// firewallCreateRequest is "Firewalls: Create a Firewall".
type firewallCreateRequest struct {
	Name    string             `json:"name"`
	Labels  map[string]string  `json:"labels"`
	Rules   []firewallRule     `json:"rules"`
	ApplyTo []firewallResource `json:"apply_to"`
}

// placementGroupCreateRequest is "Placement Groups: Create a
// PlacementGroup".
type placementGroupCreateRequest struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels"`
	Type   string            `json:"type"`
}
