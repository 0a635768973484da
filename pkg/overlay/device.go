package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ensureDeviceLocked returns the interface's link, creating the WireGuard
// device when it is missing: a kernel link where the module exists (mode
// auto or kernel), else a wireguard-go device hosted in this process
// (mode auto or userspace), with its UAPI socket so wg(8) and wgctrl see
// it. An existing working device, whoever created it, is adopted as is:
// that is how a restarted meshd keeps the running data plane. When it
// found such a device it also returns it as read (nil when it created
// one), so the caller need not read it again.
func (a *Applier) ensureDeviceLocked(mtu int) (netlink.Link, *wgtypes.Device, error) {
	name := a.opts.Interface
	link, err := a.nl.LinkByName(name)
	if err != nil && a.user != nil {
		// Our own userspace device lost its TUN (someone deleted the
		// link): stop it so its UAPI socket is free for the new one.
		a.log.Warn("overlay interface disappeared, recreating", "interface", name)
		a.user.Close()
		a.user = nil
	}
	if err == nil {
		if dev, werr := a.wg.Device(name); werr == nil {
			if a.mode == "" {
				a.mode = modeOf(link)
			}
			return link, dev, nil
		}
		// A link with our name that WireGuard does not answer for: the TUN
		// of a userspace device whose process died, or something else.
		switch link.Type() {
		case "wireguard", "tuntap", "tun":
			a.log.Warn("overlay interface exists but is not a working WireGuard device, recreating", "interface", name, "type", link.Type())
			if a.user != nil {
				a.user.Close()
				a.user = nil
			}
			if err := a.nl.LinkDel(link); err != nil && !errors.As(err, new(netlink.LinkNotFoundError)) {
				return nil, nil, fmt.Errorf("delete stale %s: %w", name, err)
			}
			a.waitGone(name, time.Second)
		default:
			return nil, nil, fmt.Errorf("interface %s exists and is a %s, not WireGuard: refusing to touch it", name, link.Type())
		}
	}
	if a.opts.Mode != ModeUserspace {
		err := a.nl.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}})
		switch {
		case err == nil:
			a.mode = ModeKernel
			a.log.Info("created kernel WireGuard interface", "interface", name)
			link, err := a.nl.LinkByName(name)
			return link, nil, err
		case a.opts.Mode == ModeKernel:
			return nil, nil, fmt.Errorf("create kernel WireGuard interface %s: %w", name, err)
		case !noKernelWireGuard(err):
			return nil, nil, fmt.Errorf("create kernel WireGuard interface %s: %w", name, err)
		}
		a.log.Info("no kernel WireGuard, using the embedded userspace implementation", "interface", name)
	}
	if a.opts.Detach {
		err := spawnDevice(name, mtu, a.log)
		if err == nil {
			a.mode = ModeUserspace
			link, err := a.nl.LinkByName(name)
			return link, nil, err
		}
		a.log.Warn("cannot run the userspace device in its own process, running it inside meshd (it will not survive a restart)", "err", err)
	}
	u, err := newUserspaceDevice(name, mtu, a.log)
	if err != nil {
		return nil, nil, err
	}
	a.user = u
	a.mode = ModeUserspace
	link, err = a.nl.LinkByName(name)
	if err != nil {
		return nil, nil, fmt.Errorf("link %s after creating it: %w", name, err)
	}
	return link, nil, nil
}

// noKernelWireGuard reports whether a link-add error means the kernel has
// no WireGuard support.
func noKernelWireGuard(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) ||
		errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENODEV)
}

func modeOf(l netlink.Link) string {
	if l.Type() == "wireguard" {
		return ModeKernel
	}
	return ModeUserspace
}

// userspaceDevice is a wireguard-go device running in this process.
type userspaceDevice struct {
	dev  *device.Device
	uapi net.Listener
}

// newUserspaceDevice creates the TUN interface and a wireguard-go device
// on it, and serves its UAPI socket (/run/wireguard/<name>.sock).
func newUserspaceDevice(name string, mtu int, log *slog.Logger) (*userspaceDevice, error) {
	uapiFile, err := ipc.UAPIOpen(name)
	if err != nil {
		return nil, fmt.Errorf("userspace WireGuard %s: uapi socket: %w", name, err)
	}
	tdev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		uapiFile.Close()
		os.Remove("/run/wireguard/" + name + ".sock")
		return nil, fmt.Errorf("userspace WireGuard %s: create tun: %w", name, err)
	}
	l := log.With("interface", name)
	// wireguard-go's verbose log is a line per keepalive, handshake and
	// timer event of every peer; it goes to debug, and is not even
	// formatted unless debug is on (at a thousand peers it is thousands of
	// lines a minute). It logs peers by abbreviated public key only.
	verbose := device.DiscardLogf
	if l.Enabled(context.Background(), slog.LevelDebug) {
		verbose = func(format string, args ...any) { l.Debug("wireguard-go: " + fmt.Sprintf(format, args...)) }
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), &device.Logger{
		Verbosef: verbose,
		Errorf:   func(format string, args ...any) { l.Warn("wireguard-go: " + fmt.Sprintf(format, args...)) },
	})
	uapi, err := ipc.UAPIListen(name, uapiFile)
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("userspace WireGuard %s: uapi listen: %w", name, err)
	}
	go func() {
		for {
			c, err := uapi.Accept()
			if err != nil {
				return // listener closed
			}
			go dev.IpcHandle(c)
		}
	}()
	return &userspaceDevice{dev: dev, uapi: uapi}, nil
}

// Close stops the device and removes its TUN interface and socket.
func (u *userspaceDevice) Close() {
	u.uapi.Close()
	u.dev.Close()
}
