package overlay

import (
	"context"
	"fmt"
	"net"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// kickDelays are the times after a peer was added at which it is added
// afresh if it has still not completed a handshake.
//
// Why: when a node joins, it and every existing node add each other at
// about the same moment, and each sends a handshake initiation at once.
// An initiation that arrives before the receiver has configured the
// sender (or before its device listens) is dropped, and WireGuard does
// not send another for REKEY_TIMEOUT (5 s). When both first initiations
// are lost, the new peer stays unreachable for 5 s. Re-adding the peer
// (remove + add in one configuration call) resets its handshake state so
// the device initiates again at once. Only peers that have sent this node
// nothing at all since they were added (no handshake, not one byte
// received: WireGuard counts handshake messages) are touched, so neither
// an established session nor one being set up is disturbed; after the
// last delay WireGuard's own retries take over.
// The delays leave a first handshake over a long-haul link (RTT of a few
// hundred milliseconds) time to complete before the first kick.
var kickDelays = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, time.Second, 3 * time.Second}

// kickState is one newly added peer waiting for its first handshake.
type kickState struct {
	peer  desired.Peer
	added time.Time
	next  int // index into kickDelays of the next check
}

// noteAdded records the peers plan added (with an endpoint to initiate
// to) for the kick loop and wakes it.
func (c *Component) noteAdded(plan desired.Plan, now time.Time) {
	var n int
	c.kmu.Lock()
	for _, pc := range plan.Peers {
		switch {
		case pc.Op == desired.OpAdd && pc.Peer.Endpoint.IsValid():
			if c.kicks == nil {
				c.kicks = map[string]*kickState{}
			}
			c.kicks[pc.Peer.PublicKey] = &kickState{peer: pc.Peer, added: now}
			n++
		case pc.Op == desired.OpRemove:
			delete(c.kicks, pc.Peer.PublicKey)
		}
	}
	c.kmu.Unlock()
	if n > 0 {
		select {
		case c.kickWake <- struct{}{}:
		default:
		}
	}
}

// kickLoop re-adds peers that have not completed a first handshake, at
// kickDelays after they were added. It runs until ctx ends.
func (c *Component) kickLoop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next, due := c.dueKicks(time.Now())
		if len(due) > 0 {
			kicked, err := c.applier.kickPeers(due)
			if err != nil && ctx.Err() == nil {
				c.log.Warn("cannot restart WireGuard handshakes", "err", err)
			}
			if len(kicked) > 0 {
				c.metrics.kicks.Add(float64(len(kicked)))
				c.log.Info("restarted first WireGuard handshakes", "peers", kicked)
			}
			continue
		}
		wait := time.Hour
		if !next.IsZero() {
			wait = time.Until(next)
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-c.kickWake:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
		case <-timer.C:
		}
	}
}

// dueKicks returns the peers whose next check is due at now (advancing
// their schedule, forgetting those past the last delay) and the time of
// the earliest check still pending.
func (c *Component) dueKicks(now time.Time) (next time.Time, due []kickState) {
	c.kmu.Lock()
	defer c.kmu.Unlock()
	for key, k := range c.kicks {
		at := k.added.Add(kickDelays[k.next])
		if at.After(now) {
			next = earliest(next, at)
			continue
		}
		due = append(due, *k)
		k.next++
		if k.next == len(kickDelays) {
			delete(c.kicks, key)
			continue
		}
		next = earliest(next, k.added.Add(kickDelays[k.next]))
	}
	return next, due
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// kickPeers re-adds each of peers that is still on the device and has
// received nothing since it was added, so that the device
// initiates a handshake again at once. It returns the names of the peers
// it re-added.
func (a *Applier) kickPeers(peers []kickState) ([]string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	dev, err := a.wg.Device(a.opts.Interface)
	if err != nil {
		return nil, fmt.Errorf("read device %s: %w", a.opts.Interface, err)
	}
	live := make(map[wgtypes.Key]wgtypes.Peer, len(dev.Peers))
	for _, p := range dev.Peers {
		live[p.PublicKey] = p
	}
	var cfg wgtypes.Config
	var names []string
	for _, k := range peers {
		key, err := wgtypes.ParseKey(k.peer.PublicKey)
		if err != nil {
			continue
		}
		p, ok := live[key]
		if !ok || p.LastHandshakeTime.After(k.added) || p.ReceiveBytes > 0 {
			// Removed meanwhile, or the handshake happened, or one is
			// under way: a handshake message from the peer arrived (a
			// responder's session is only confirmed by the initiator's
			// first data packet; re-adding would throw it away).
			continue
		}
		if p.Endpoint == nil {
			continue // nothing to initiate to
		}
		// Re-add the peer exactly as the device has it (the endpoint
		// WireGuard may have learned, the allowed IPs of the newest Set).
		ka := p.PersistentKeepaliveInterval
		add := wgtypes.PeerConfig{
			PublicKey:                   key,
			Endpoint:                    &net.UDPAddr{IP: p.Endpoint.IP, Port: p.Endpoint.Port},
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  p.AllowedIPs,
			PersistentKeepaliveInterval: &ka,
		}
		cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: key, Remove: true}, add)
		names = append(names, k.peer.Name)
	}
	if len(cfg.Peers) == 0 {
		return nil, nil
	}
	if err := a.wg.ConfigureDevice(a.opts.Interface, cfg); err != nil {
		return nil, fmt.Errorf("configure %s: %w", a.opts.Interface, err)
	}
	return names, nil
}
