package overlay

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// MaxMTU is the largest interface MTU the overlay accepts (jumbo frames
// on the uplink, less WireGuard's overhead, stay below it).
const MaxMTU = 9000

// Validate checks the options the overlay owns. Each error starts with
// the field's name in meshd's config file (overlay.<name>), so the config
// check can report it as it is; New runs the same check.
func (o Options) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if err := validInterfaceName(o.Interface); err != nil {
		bad("interface: %w", err)
	}
	if o.ListenPort < 0 || o.ListenPort > 65535 {
		bad("listenPort %d: out of range (0: 51820)", o.ListenPort)
	}
	if o.MTU != 0 && (o.MTU < 1280 || o.MTU > MaxMTU) {
		bad("mtu %d: want 0 (auto) or 1280-%d", o.MTU, MaxMTU)
	}
	switch o.Mode {
	case "auto", "kernel", "userspace":
	default:
		bad("mode %q: want auto, kernel or userspace", o.Mode)
	}
	if o.RouteTable < 0 || o.RouteTable > 1<<31-1 || o.RouteTable == 253 || o.RouteTable == 254 || o.RouteTable == 255 {
		bad("routeTable %d: want a table id other than default/main/local (0: 51820)", o.RouteTable)
	}
	if o.Keepalive < 0 {
		bad("keepalive %v: must not be negative", o.Keepalive)
	}
	if !o.Network.IsValid() || !o.Network.Addr().Is4() || o.Network != o.Network.Masked() {
		bad("network %v: want a masked IPv4 prefix", o.Network)
	}
	if o.ImportKeyFile != "" && (!filepath.IsAbs(o.ImportKeyFile) || strings.ContainsAny(o.ImportKeyFile, "\n\x00")) {
		bad("importKeyFile %q: want an absolute path", o.ImportKeyFile)
	}
	return errors.Join(errs...)
}
