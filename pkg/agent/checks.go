package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// Check is an instance health check. advertised is the address the
// instance is published with (invalid while the node has none).
type Check func(ctx context.Context, advertised netip.AddrPort) error

// checkTiming returns the interval and timeout of an instance's check,
// with the defaults filled in.
func checkTiming(in Instance) (interval, timeout time.Duration) {
	interval = in.Interval
	if interval <= 0 {
		interval = time.Second
	}
	timeout = in.Timeout
	if timeout <= 0 {
		timeout = min(interval, 2*time.Second)
	}
	return interval, timeout
}

// RunCheck runs an instance's check once, bounded by its timeout, against
// the address it is advertised with. A nil check passes.
func RunCheck(ctx context.Context, in Instance, advertised netip.AddrPort) error {
	if in.Check == nil {
		return nil
	}
	_, timeout := checkTiming(in)
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return in.Check(cctx, advertised)
}

// checkLoop runs one instance's health check and advertises the instance
// only while it passes: a crashed app stops receiving traffic from every
// node within about one interval, not only when its whole node dies.
func (a *Agent) checkLoop(ctx context.Context, i int) {
	in := a.o.Instances[i]
	interval, _ := checkTiming(in)
	t := time.NewTicker(interval)
	defer t.Stop()
	first := true
	for {
		err := RunCheck(ctx, in, netip.AddrPortFrom(a.advertiseIP(), uint16(in.Port)))
		ok := err == nil
		if ctx.Err() != nil {
			return
		}
		a.mu.Lock()
		changed := first || a.healthy[i] != ok
		a.healthy[i] = ok
		a.mu.Unlock()
		if changed {
			if ok {
				a.log.Info("instance check passing", "app", in.App, "group", in.Group)
			} else {
				a.log.Warn("instance check failing, withdrawing", "app", in.App, "group", in.Group, "err", err)
			}
			signal(a.instChg)
		}
		first = false
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.checkNow[i]:
			// The node just learnt its advertised address: check now
			// rather than one interval later.
		}
	}
}

// errNoAddress is the default check's answer before the node knows the
// address its instances are advertised with.
var errNoAddress = errors.New("no advertised address yet")

// AdvertisedTCPCheck connects to the address the instance is advertised
// with: the app itself, not the node's own HAProxy, which listens on
// 127.0.0.1 at the same port on every node that consumes the app's group.
func AdvertisedTCPCheck() Check {
	return func(ctx context.Context, advertised netip.AddrPort) error {
		if !advertised.Addr().IsValid() {
			return errNoAddress
		}
		return dialTCP(ctx, advertised.String())
	}
}

// TCPCheck returns a check that connects to addr.
func TCPCheck(addr string) Check {
	return func(ctx context.Context, _ netip.AddrPort) error { return dialTCP(ctx, addr) }
}

func dialTCP(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	return c.Close()
}

// AllChecks returns a check that passes when every one of checks passes,
// run in order; it fails with the first failure.
func AllChecks(checks ...Check) Check {
	return func(ctx context.Context, advertised netip.AddrPort) error {
		for _, c := range checks {
			if err := c(ctx, advertised); err != nil {
				return err
			}
		}
		return nil
	}
}

// UnitStater reports a systemd unit's ActiveState ("active", "failed"...).
// The real one talks to systemd over D-Bus.
type UnitStater interface {
	ActiveState(ctx context.Context, unit string) (string, error)
}

// UnitCheck returns a check that passes while unit is active.
func UnitCheck(s UnitStater, unit string) Check {
	return func(ctx context.Context, _ netip.AddrPort) error {
		st, err := s.ActiveState(ctx, unit)
		if err != nil {
			return err
		}
		if st != "active" && st != "reloading" {
			return fmt.Errorf("unit %s is %s", unit, st)
		}
		return nil
	}
}
