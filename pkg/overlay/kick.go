package overlay

import (
	"context"
	"fmt"
	"net"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// Kick schedules: the times after a peer was added at which it is added
// afresh if it has still not completed a handshake.
//
// Why: when a node joins, it and every existing node add each other at
// about the same moment, and each sends a handshake initiation at once.
// Two things can then stall the pair for WireGuard's REKEY_TIMEOUT (5 s),
// during which neither side sends another initiation:
//   - both initiations arrive before the receiver has configured the
//     sender (or before its device listens) and are dropped;
//   - both arrive after: each side answers the other's initiation and
//     so becomes the responder, and each then rejects the other's answer
//     to its own initiation (it is no longer waiting for one). A
//     responder's session is confirmed only by the initiator's first
//     data packet, which neither side can send.
//
// Re-adding the peer (remove + add in one configuration call) resets its
// handshake state so the device initiates again at once, while the other
// side, having initiated recently, does not: the handshake completes in
// one round trip. So that the two sides do not kick at the same moment
// and cross again, only the side with the lower public key kicks early
// (kickDelaysFirst); the other kicks later, as a fallback for a peer that
// does not kick (kickDelaysSecond). Only peers without a completed
// handshake since they were added are touched, so an established session
// is never disturbed; after the last delay WireGuard's own retries take
// over.
//
// Timing matters: a joining node creates its device at its first Apply,
// after its member record is out, so the others' first initiations
// usually find no device and the joiner's own initiations, sent once it
// has configured everyone, complete the handshakes. Creating the device
// before publishing the key (tried) lines both sides up and makes
// crossing common: 5-15 s stalls in about a third of the joins at N=8 in
// the sandbox. The 15 s ones are not cured by re-adding: with
// wireguard-go's verbose log, both sides record a completed handshake
// (crossing initiations and responses handled concurrently) yet the
// sender hears nothing back until WireGuard's own "no reply for 15 s"
// rekey. A node whose device comes up fast (kernel WireGuard) may meet
// that; see the session notes.
//
// The first delay leaves a handshake over a long-haul link (RTT of
// a few hundred milliseconds) time to complete; if it has not, a kick
// costs one more round trip.
var (
	kickDelaysFirst  = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, time.Second, 3 * time.Second}
	kickDelaysSecond = []time.Duration{time.Second, 3 * time.Second}
)

// kickDelays returns the schedule for a peer of the node whose public
// key is self.
func kickDelays(self, peer string) []time.Duration {
	if self < peer {
		return kickDelaysFirst
	}
	return kickDelaysSecond
}

// kickState is one newly added peer waiting for its first handshake.
type kickState struct {
	peer   desired.Peer
	added  time.Time
	delays []time.Duration
	next   int // index into delays of the next check
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
			c.kicks[pc.Peer.PublicKey] = &kickState{peer: pc.Peer, added: now, delays: kickDelays(c.PublicKey(), pc.Peer.PublicKey)}
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
// their kick schedule's delays after they were added. It runs until ctx ends.
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
		at := k.added.Add(k.delays[k.next])
		if at.After(now) {
			next = earliest(next, at)
			continue
		}
		due = append(due, *k)
		k.next++
		if k.next == len(k.delays) {
			delete(c.kicks, key)
			continue
		}
		next = earliest(next, k.added.Add(k.delays[k.next]))
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
// completed no handshake since it was added, so that the device
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
		if !ok || p.LastHandshakeTime.After(k.added) {
			continue // removed meanwhile, or the handshake happened
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
