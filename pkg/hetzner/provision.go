package hetzner

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
)

// ProvisionOptions says which servers to create and how.
type ProvisionOptions struct {
	Cluster    string
	Names      []string
	ServerType string
	Location   string
	// Image is an image name (debian-12) or ID.
	Image string
	Role  string
	// Labels are the operator's extra labels for the servers.
	Labels map[string]string
	// SSHKeys names keys that exist in the project.
	SSHKeys []string
	// SSHKeyFiles are keys uploaded when no project key has their
	// fingerprint.
	SSHKeyFiles []PublicKey
	// Network, when set, is attached to every server (created if missing).
	Network *NetworkSpec
	// PlacementGroup names the spread group (created if missing); empty
	// means none.
	PlacementGroup string
	// Firewall names the cluster firewall (created if missing).
	Firewall      string
	WireGuardPort int
	// UserData, when set, replaces the rendered cloud-config verbatim.
	UserData []byte
	// NixChannel, InfectURL and InfectSHA256 tune the rendered
	// cloud-config.
	NixChannel   string
	InfectURL    string
	InfectSHA256 string
	// Parallel bounds how many servers are created at once.
	Parallel int
	// PollInterval is how often a server in transition is looked at
	// again (default 1s).
	PollInterval time.Duration
}

// Outcome is what happened to one server.
type Outcome string

// Outcomes of provisioning and destroying.
const (
	OutcomeCreated Outcome = "created"
	OutcomeExists  Outcome = "exists"
	// OutcomeStarted: the server existed powered off and was powered on.
	OutcomeStarted Outcome = "started"
	OutcomeFailed  Outcome = "failed"
	OutcomeDeleted Outcome = "deleted"
)

// ServerResult is one line of the final report.
type ServerResult struct {
	Name      string  `json:"name"`
	ID        int64   `json:"id,omitempty"`
	IPv4      string  `json:"ipv4,omitempty"`
	IPv6      string  `json:"ipv6,omitempty"`
	PrivateIP string  `json:"privateIp,omitempty"`
	Status    string  `json:"status,omitempty"`
	Role      string  `json:"role,omitempty"`
	Outcome   Outcome `json:"outcome"`
	Error     string  `json:"error,omitempty"`
}

// Provisioner creates and deletes a cluster's servers.
type Provisioner struct {
	Client   *hcloud.Client
	Progress Progress
}

func (p *Provisioner) progress() Progress {
	if p.Progress == nil {
		return discardProgress{}
	}
	return p.Progress
}

// validate checks everything that can be checked without the API.
func (o *ProvisionOptions) validate() error {
	if err := ValidateCluster(o.Cluster); err != nil {
		return err
	}
	if len(o.Names) == 0 {
		return fmt.Errorf("%w: no server names given", ErrInvalid)
	}
	seen := map[string]bool{}
	for _, n := range o.Names {
		if err := ValidateServerName(n); err != nil {
			return err
		}
		if seen[n] {
			return fmt.Errorf("%w: server %q named twice", ErrInvalid, n)
		}
		seen[n] = true
	}
	if err := ValidateRole(o.Role); err != nil {
		return err
	}
	for flag, v := range map[string]string{"--type": o.ServerType, "--location": o.Location, "--image": o.Image, "--firewall": o.Firewall} {
		if v == "" {
			return fmt.Errorf("%w: %s is required", ErrInvalid, flag)
		}
	}
	if len(o.SSHKeys)+len(o.SSHKeyFiles) == 0 {
		return fmt.Errorf("%w: give --ssh-key or --ssh-key-file (without a key Hetzner mails a root password)", ErrInvalid)
	}
	if o.WireGuardPort < 1 || o.WireGuardPort > 65535 {
		return fmt.Errorf("%w: wireguard port %d", ErrInvalid, o.WireGuardPort)
	}
	if len(o.UserData) > MaxUserData {
		return fmt.Errorf("%w: user data is %d bytes, the API takes at most %d", ErrInvalid, len(o.UserData), MaxUserData)
	}
	if n := o.Network; n != nil {
		if !n.IPRange.IsValid() || !n.Subnet.IsValid() || !n.IPRange.Contains(n.Subnet.Addr()) || n.Subnet.Bits() < n.IPRange.Bits() {
			return fmt.Errorf("%w: network subnet %s must lie inside %s", ErrInvalid, n.Subnet, n.IPRange)
		}
	}
	if o.UserData == nil {
		// Render once to fail early on a bad channel or URL.
		if _, err := o.cloudInit(o.Names[0]).Render(); err != nil {
			return err
		}
	}
	if o.Parallel < 1 {
		o.Parallel = 1
	}
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	return nil
}

func (o *ProvisionOptions) cloudInit(name string) CloudInit {
	return CloudInit{Cluster: o.Cluster, Name: name, Role: o.Role, WireGuardPort: o.WireGuardPort,
		NixChannel: o.NixChannel, InfectURL: o.InfectURL, InfectSHA256: o.InfectSHA256}
}

// ListServers returns every server carrying the cluster's label, across
// all pages.
func (p *Provisioner) ListServers(ctx context.Context, cluster string) ([]*hcloud.Server, error) {
	s, err := p.Client.Server.AllWithOpts(ctx, hcloud.ServerListOpts{
		ListOpts: hcloud.ListOpts{LabelSelector: ClusterSelector(cluster)},
	})
	if err != nil {
		return nil, fmt.Errorf("list servers of cluster %s: %w", cluster, err)
	}
	return s, nil
}

// shared holds the resources every new server references.
type shared struct {
	keys    []*hcloud.SSHKey
	network *hcloud.Network
	pg      *hcloud.PlacementGroup
	image   *hcloud.Image
}

// Provision creates the named servers that the cluster does not have yet
// and reports all of them. Servers that exist (same name, cluster label)
// are kept; one that is powered off (a start that failed) is powered on,
// so running it again after a partial failure completes the rest. No
// server counts as done unless it is running. The error names every
// server that failed.
func (p *Provisioner) Provision(ctx context.Context, o ProvisionOptions) ([]ServerResult, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	existing, err := p.ListServers(ctx, o.Cluster)
	if err != nil {
		return nil, err
	}
	byName := map[string]*hcloud.Server{}
	for _, s := range existing {
		byName[s.Name] = s
	}
	results := make([]ServerResult, len(o.Names))
	var sh *shared
	if adding := len(slices.DeleteFunc(slices.Clone(o.Names), func(n string) bool { return byName[n] != nil })); adding > 0 {
		// Refuse a type or image that cannot (or soon will not) be
		// ordered before anything is created.
		st, err := checkServerType(ctx, p.Client, o.ServerType, o.Location)
		if err != nil {
			return nil, err
		}
		img, err := checkImage(ctx, p.Client, o.Image, st.Architecture)
		if err != nil {
			return nil, err
		}
		if sh, err = p.ensureShared(ctx, &o, adding); err != nil {
			var names []string
			for i, n := range o.Names {
				if byName[n] == nil {
					names = append(names, n)
					results[i] = ServerResult{Name: n, Role: o.Role, Outcome: OutcomeFailed, Error: "not created: " + err.Error()}
					p.progress().Server(n, "not created")
				}
			}
			return results, fmt.Errorf("server %s not created: %w", strings.Join(names, ", "), err)
		}
		sh.image = img
	}

	errs := make([]error, len(o.Names))
	sem := make(chan struct{}, o.Parallel)
	var wg sync.WaitGroup
	for i, name := range o.Names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				errs[i] = fmt.Errorf("server %s: %w", name, ctx.Err())
				results[i] = ServerResult{Name: name, Role: o.Role, Outcome: OutcomeFailed, Error: ctx.Err().Error()}
				return
			}
			defer func() { <-sem }()
			if s := byName[name]; s != nil {
				results[i], errs[i] = p.keepRunning(ctx, &o, s, OutcomeExists)
				return
			}
			results[i], errs[i] = p.createOne(ctx, &o, sh, name)
		}()
	}
	wg.Wait()
	var failed []error
	for _, e := range errs {
		if e != nil {
			failed = append(failed, e)
		}
	}
	if len(failed) > 0 {
		return results, fmt.Errorf("%d of %d servers failed: %w", len(failed), len(o.Names), errors.Join(failed...))
	}
	return results, nil
}

// keepRunning reports an existing server of the cluster as out (exists
// or created) once it is running, powering it on if it is off; a server
// that cannot be brought to running is a failure, never done.
func (p *Provisioner) keepRunning(ctx context.Context, o *ProvisionOptions, s *hcloud.Server, out Outcome) (ServerResult, error) {
	s, started, err := p.ensureRunning(ctx, s, o.PollInterval)
	if err != nil {
		p.progress().Server(s.Name, "failed: "+err.Error())
		r := resultOf(s, OutcomeFailed)
		r.Error = err.Error()
		return r, fmt.Errorf("server %s: %w", s.Name, err)
	}
	if started && out == OutcomeExists {
		out = OutcomeStarted
	}
	p.progress().Server(s.Name, fmt.Sprintf("%s (id %d, %s)", out, s.ID, s.Status))
	return resultOf(s, out), nil
}

func (p *Provisioner) ensureShared(ctx context.Context, o *ProvisionOptions, adding int) (*shared, error) {
	note := p.progress().Note
	var sh shared
	var err error
	if sh.keys, err = ensureSSHKeys(ctx, p.Client, o.Cluster, o.SSHKeys, o.SSHKeyFiles, note); err != nil {
		return nil, err
	}
	if _, err = ensureFirewall(ctx, p.Client, o.Cluster, o.Firewall, o.WireGuardPort, note); err != nil {
		return nil, err
	}
	if o.Network != nil {
		if sh.network, err = ensureNetwork(ctx, p.Client, o.Cluster, *o.Network, o.Location, note); err != nil {
			return nil, err
		}
	}
	if o.PlacementGroup != "" {
		if sh.pg, err = ensurePlacementGroup(ctx, p.Client, o.Cluster, o.PlacementGroup, adding, note); err != nil {
			return nil, err
		}
	}
	return &sh, nil
}

func (p *Provisioner) createOne(ctx context.Context, o *ProvisionOptions, sh *shared, name string) (ServerResult, error) {
	fail := func(err error) (ServerResult, error) {
		p.progress().Server(name, "failed: "+err.Error())
		return ServerResult{Name: name, Role: o.Role, Outcome: OutcomeFailed, Error: err.Error()}, fmt.Errorf("server %s: %w", name, err)
	}
	userData := string(o.UserData)
	if o.UserData == nil {
		var err error
		if userData, err = o.cloudInit(name).Render(); err != nil {
			return fail(err)
		}
	}
	start := true
	opts := hcloud.ServerCreateOpts{
		Name:             name,
		ServerType:       &hcloud.ServerType{Name: o.ServerType},
		Image:            &hcloud.Image{ID: sh.image.ID},
		Location:         &hcloud.Location{Name: o.Location},
		SSHKeys:          sh.keys,
		UserData:         userData,
		StartAfterCreate: &start,
		// The cluster firewall reaches the server through its label
		// selector (ensureFirewall), not through a direct attachment.
		Labels:         ResourceLabels(o.Cluster, o.Role, o.Labels),
		PlacementGroup: sh.pg,
	}
	if sh.network != nil {
		opts.Networks = []*hcloud.Network{sh.network}
	}
	p.progress().Server(name, "creating")
	res, _, err := p.Client.Server.Create(ctx, opts)
	if hcloud.IsError(err, hcloud.ErrorCodeUniquenessError) {
		// Either a create whose response was lost and that was retried,
		// or a server of that name outside the cluster.
		s, _, gerr := p.Client.Server.GetByName(ctx, name)
		switch {
		case gerr != nil:
			return fail(fmt.Errorf("create: %w (and looking it up: %w)", err, gerr))
		case s != nil && s.Labels[LabelCluster] == o.Cluster:
			return p.keepRunning(ctx, o, s, OutcomeExists)
		case s != nil:
			return fail(notOurs("server", name, o.Cluster, s.Labels))
		}
	}
	if err != nil {
		return fail(fmt.Errorf("create: %w", err))
	}
	actions := append([]*hcloud.Action{res.Action}, res.NextActions...)
	err = p.Client.Action.WaitForFunc(ctx, func(a *hcloud.Action) error {
		switch a.Status {
		case hcloud.ActionStatusError:
			return fmt.Errorf("%s: %w", a.Command, a.Error())
		case hcloud.ActionStatusRunning:
			p.progress().Server(name, fmt.Sprintf("%s %d%%", a.Command, a.Progress))
		}
		return nil
	}, actions...)
	if err != nil {
		return fail(fmt.Errorf("server %d was created but did not start: %w", res.Server.ID, err))
	}
	s, _, err := p.Client.Server.GetByID(ctx, res.Server.ID)
	if err != nil || s == nil {
		if err == nil {
			err = errors.New("server vanished")
		}
		return fail(fmt.Errorf("read server %d: %w", res.Server.ID, err))
	}
	return p.keepRunning(ctx, o, s, OutcomeCreated)
}

// resultOf describes a server as the API returned it.
func resultOf(s *hcloud.Server, out Outcome) ServerResult {
	r := ServerResult{Name: s.Name, ID: s.ID, Status: string(s.Status), Role: s.Labels[LabelRole], Outcome: out}
	if !s.PublicNet.IPv4.IsUnspecified() {
		r.IPv4 = s.PublicNet.IPv4.IP.String()
	}
	if !s.PublicNet.IPv6.IsUnspecified() {
		if s.PublicNet.IPv6.Network != nil {
			r.IPv6 = s.PublicNet.IPv6.Network.String()
		} else {
			r.IPv6 = s.PublicNet.IPv6.IP.String()
		}
	}
	if len(s.PrivateNet) > 0 && s.PrivateNet[0].IP != nil {
		r.PrivateIP = s.PrivateNet[0].IP.String()
	}
	return r
}
