package overlay

import (
	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
)

// OptionsFromConfig maps meshd's configuration file onto the component's
// options, so meshd's main only wires: overlay.New(OptionsFromConfig(cfg),
// log, reg). It asks for detached userspace devices, which needs
// overlay.MaybeRunDevice(os.Args[1:]) at the top of main.
func OptionsFromConfig(c config.Config) Options {
	o := c.Overlay
	return Options{
		Self:         c.NodeName,
		StateDir:     c.StateDir,
		Interface:    o.Interface,
		ListenPort:   o.ListenPort,
		MTU:          o.MTU,
		Keepalive:    o.Keepalive.D(),
		Mode:         o.Mode,
		RouteTable:   o.RouteTable,
		RouteNetwork: o.RouteNetwork,
		Network:      o.Network,
		Pool:         registry.Pool{Min: o.SubnetMin, Max: o.SubnetMax, Bits: o.SubnetLen},

		ImportKeyFile: o.ImportKeyFile,

		DetachUserspace: true,
	}
}
