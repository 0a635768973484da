package hetzner

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
	"github.com/hetznercloud/hcloud-go/v2/hcloud/exp/deprecationutil"

	"github.com/meshd/meshd/pkg/backoff"
)

// Defaults of a new server: a current shared x86 type that every location
// sells (the cpx11–cpx51 and cx22–cx52 families were deprecated in
// October 2025 and are no longer orderable in the EU locations), and
// Debian 12, which nixos-infect converts.
const (
	DefaultServerType = "cpx22"
	DefaultLocation   = "hel1"
	DefaultImage      = "debian-12"
)

// orderable reports whether st can be ordered in location now: listed
// there, available, and not deprecated there (nor as a whole).
func orderable(st *hcloud.ServerType, location string) bool {
	if st.IsDeprecated() {
		return false
	}
	for _, l := range st.Locations {
		if l.Location != nil && l.Location.Name == location {
			return l.Available && !l.IsDeprecated()
		}
	}
	return false
}

// checkServerType looks the server type up and refuses one that cannot
// be ordered in location, or is deprecated there, before anything is
// created. The error lists what location sells.
func checkServerType(ctx context.Context, c *hcloud.Client, name, location string) (*hcloud.ServerType, error) {
	st, _, err := c.ServerType.Get(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("server type %q: %w", name, err)
	}
	if st != nil && orderable(st, location) {
		return st, nil
	}
	all, err := c.ServerType.All(ctx)
	if err != nil {
		return nil, fmt.Errorf("list server types: %w", err)
	}
	var ok []string
	for _, t := range all {
		if orderable(t, location) {
			ok = append(ok, fmt.Sprintf("%s (%s, %d cores, %g GB)", t.Name, t.Architecture, t.Cores, t.Memory))
		}
	}
	slices.Sort(ok)
	why := fmt.Sprintf("server type %q does not exist", name)
	if st != nil {
		why = fmt.Sprintf("server type %q cannot be ordered in %s", name, location)
		if msg, _ := deprecationutil.ServerTypeMessage(st, location); msg != "" {
			why = msg
		} else if st.IsDeprecated() {
			why = fmt.Sprintf("server type %q is deprecated", name)
		}
	}
	return nil, fmt.Errorf("%w: %s; orderable in %s: %s", ErrInvalid, why, location, strings.Join(ok, ", "))
}

// checkImage looks the image up for the server type's architecture and
// refuses a deprecated one (as terraform's hcloud provider does by
// default): it is about to stop being orderable, and a re-run would fail.
func checkImage(ctx context.Context, c *hcloud.Client, image string, arch hcloud.Architecture) (*hcloud.Image, error) {
	var img *hcloud.Image
	var err error
	if id, perr := strconv.ParseInt(image, 10, 64); perr == nil {
		img, _, err = c.Image.GetByID(ctx, id)
	} else {
		img, _, err = c.Image.GetByNameAndArchitecture(ctx, image, arch)
	}
	if err != nil {
		return nil, fmt.Errorf("image %q: %w", image, err)
	}
	if img == nil {
		return nil, fmt.Errorf("%w: image %q does not exist for architecture %s", ErrInvalid, image, arch)
	}
	if img.Architecture != arch {
		return nil, fmt.Errorf("%w: image %q is for %s, the server type is %s", ErrInvalid, image, img.Architecture, arch)
	}
	if msg, _ := deprecationutil.ImageMessage(img); msg != "" {
		return nil, fmt.Errorf("%w: %s; choose a current image (e.g. %s)", ErrInvalid, msg, DefaultImage)
	}
	return img, nil
}

// isRunning is the one status that counts as done: cloud-init runs only
// on a server that is running.
func isRunning(s *hcloud.Server) bool { return s.Status == hcloud.ServerStatusRunning }

// ensureRunning brings an existing server of the cluster to running: it
// powers on one that is off (a start that failed, or someone stopped it),
// waits out transitions, and fails for anything else. It returns the
// server as it is afterwards and whether it powered it on.
func (p *Provisioner) ensureRunning(ctx context.Context, s *hcloud.Server, poll time.Duration) (*hcloud.Server, bool, error) {
	started := false
	for {
		switch s.Status {
		case hcloud.ServerStatusRunning:
			return s, started, nil
		case hcloud.ServerStatusOff:
			if started {
				return s, started, fmt.Errorf("server %d is still off after power on", s.ID)
			}
			p.progress().Server(s.Name, "off, powering on")
			a, _, err := p.Client.Server.Poweron(ctx, s)
			if err == nil {
				err = p.Client.Action.WaitFor(ctx, a)
			}
			if err != nil {
				return s, started, fmt.Errorf("power on server %d: %w", s.ID, err)
			}
			started = true
		case hcloud.ServerStatusInitializing, hcloud.ServerStatusStarting, hcloud.ServerStatusStopping, hcloud.ServerStatusRebuilding, hcloud.ServerStatusMigrating:
			if err := backoff.Sleep(ctx, poll); err != nil {
				return s, started, fmt.Errorf("server %d stays %s: %w", s.ID, s.Status, err)
			}
		default:
			return s, started, fmt.Errorf("server %d is %s", s.ID, s.Status)
		}
		ns, _, err := p.Client.Server.GetByID(ctx, s.ID)
		if err != nil {
			return s, started, fmt.Errorf("read server %d: %w", s.ID, err)
		}
		if ns == nil {
			return s, started, fmt.Errorf("server %d vanished", s.ID)
		}
		s = ns
	}
}
