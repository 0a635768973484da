package agent

import (
	"context"
	"fmt"
	"net"
	"time"
)

// checkLoop runs one instance's health check and advertises the instance
// only while it passes: a crashed app stops receiving traffic from every
// node within about one interval, not only when its whole node dies.
func (a *Agent) checkLoop(ctx context.Context, i int) {
	in := a.o.Instances[i]
	interval := in.Interval
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	first := true
	for {
		ok := true
		var err error
		if in.Check != nil {
			cctx, cancel := context.WithTimeout(ctx, min(interval, 2*time.Second))
			err = in.Check(cctx)
			cancel()
			ok = err == nil
		}
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
		}
	}
}

// TCPCheck returns a check that connects to addr.
func TCPCheck(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// UnitStater reports a systemd unit's ActiveState ("active", "failed"...).
// The real one talks to systemd over D-Bus.
type UnitStater interface {
	ActiveState(ctx context.Context, unit string) (string, error)
}

// UnitCheck returns a check that passes while unit is active.
func UnitCheck(s UnitStater, unit string) func(context.Context) error {
	return func(ctx context.Context) error {
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
