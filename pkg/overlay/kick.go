package overlay

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// Kick schedules: the times after a peer was added at which it is added
// afresh if it needs it (needsKick): no handshake yet, or a handshake
// whose keys evidently do not match.
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
// one round trip. The two sides must not re-add at the same moment, or
// they cross again. So the joining side drives: a node whose device had
// none of the peers a plan adds (a new node, a reboot, a recreated
// interface) uses the early schedule, jittered so that two nodes booting
// together drift apart; a node adding a newcomer to its existing peers
// waits (the late schedule), as a fallback for a joiner that does not
// kick. A working session is never disturbed (needsKick); after the last
// delay WireGuard's own retries take over.
//
// Measured in the sandbox (N=8): a joiner's device comes up about 100 ms
// after its key is published, so the others' first initiations find no
// device, and the joiner's own initiations, sent once it has configured
// everyone, usually complete every handshake. When the existing nodes
// kicked early too (key order decided who), their kicks kept coinciding
// with the joiner's start and crossed. Creating the device before
// publishing the key (tried) also lined both sides up: 5-15 s stalls in
// about a third of the joins. In the 15 s ones, wireguard-go's verbose log
// shows both sides recording a completed handshake (crossing initiations
// and responses handled concurrently) while the sender hears nothing back
// until WireGuard's own "no reply for 15 s" rekey; needsKick's second rule
// catches that state at the check after the handshake.
//
// The first delay leaves a handshake over a long-haul link (RTT of a few
// hundred milliseconds) time to complete; if it has not, a kick costs one
// more round trip.
var (
	kickDelaysJoiner      = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, time.Second, 3 * time.Second}
	kickDelaysEstablished = []time.Duration{700 * time.Millisecond, 2 * time.Second}
	// kickJitter scales a joiner's schedule by a random factor in
	// [1-kickJitter, 1+kickJitter], per peer.
	kickJitter = 0.2
)

// kickDelays returns the schedule for a peer added by a plan: the
// joiner's (jittered) when joining is true, else the established one.
func kickDelays(joining bool) []time.Duration {
	if !joining {
		return kickDelaysEstablished
	}
	f := 1 - kickJitter + 2*kickJitter*rand.Float64()
	out := make([]time.Duration, len(kickDelaysJoiner))
	for i, d := range kickDelaysJoiner {
		out[i] = time.Duration(float64(d) * f)
	}
	return out
}

// kickState is one newly added peer in its first seconds.
type kickState struct {
	peer   desired.Peer
	added  time.Time
	delays []time.Duration
	next   int // index into delays of the next check

	// What the previous check saw of a completed handshake: its time and
	// the byte counters then (see needsKick).
	handshake time.Time
	rx, tx    int64
}

// needsKick decides, from the live peer, whether k should be re-added,
// and records what it saw for the next check. A peer is re-added when
// it has completed no handshake since it was added, or when, since the
// previous check, the same handshake is in place and this node sent it
// data but received nothing at all: the two sides hold keys that do not
// match (seen after crossing initiations, wireguard-go), which WireGuard
// itself only notices after 15 s without a reply. A peer that only
// receives, or is silent, or got a new handshake since, is left alone.
// The reason is "no handshake" or "no reply" ("" when no kick).
func (k *kickState) needsKick(p wgtypes.Peer) (bool, string) {
	if !p.LastHandshakeTime.After(k.added) {
		k.handshake = time.Time{}
		return true, "no handshake"
	}
	broken := p.LastHandshakeTime.Equal(k.handshake) && p.TransmitBytes > k.tx && p.ReceiveBytes == k.rx
	k.handshake, k.rx, k.tx = p.LastHandshakeTime, p.ReceiveBytes, p.TransmitBytes
	if broken {
		k.handshake = time.Time{} // the re-added peer starts afresh
		return true, "no reply"
	}
	return false, ""
}

// noteAdded records the peers plan added (with an endpoint to initiate
// to) for the kick loop and wakes it. peers is the number of peers of the
// state the plan was for: when the plan added all of them, the device had
// none and this node is the joining side.
func (c *Component) noteAdded(plan desired.Plan, peers int, now time.Time) {
	adds := 0
	for _, pc := range plan.Peers {
		if pc.Op == desired.OpAdd {
			adds++
		}
	}
	joining := adds > 0 && adds == peers
	var n int
	c.kmu.Lock()
	for _, pc := range plan.Peers {
		switch {
		case pc.Op == desired.OpAdd && pc.Peer.Endpoint.IsValid():
			if c.kicks == nil {
				c.kicks = map[string]*kickState{}
			}
			c.kicks[pc.Peer.PublicKey] = &kickState{peer: pc.Peer, added: now, delays: kickDelays(joining)}
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

// kickLoop re-adds new peers that need it (needsKick) at their kick
// schedule's delays after they were added. It runs until ctx ends.
func (c *Component) kickLoop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c.kmu.Lock()
		next, due := c.dueKicksLocked(time.Now())
		var kicked []string
		var err error
		if len(due) > 0 {
			kicked, err = c.applier.kickPeers(due)
		}
		c.kmu.Unlock()
		if err != nil && ctx.Err() == nil {
			c.log.Warn("cannot restart WireGuard handshakes", "err", err)
		}
		if len(kicked) > 0 {
			c.metrics.kicks.Add(float64(len(kicked)))
			c.log.Info("restarted WireGuard handshakes with new peers", "peers", kicked)
		}
		if len(due) > 0 {
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

// dueKicksLocked returns the peers whose next check is due at now
// (advancing their schedule, forgetting those past the last delay) and
// the time of the earliest check still pending. c.kmu is held.
func (c *Component) dueKicksLocked(now time.Time) (next time.Time, due []*kickState) {
	for key, k := range c.kicks {
		at := k.added.Add(k.delays[k.next])
		if at.After(now) {
			next = earliest(next, at)
			continue
		}
		due = append(due, k)
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

// kickPeers re-adds each of peers that is still on the device and needs
// it (needsKick), so that the device initiates a handshake again at once.
// It returns the peers it re-added, as "name (reason)".
func (a *Applier) kickPeers(peers []*kickState) ([]string, error) {
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
		if !ok {
			continue
		}
		kick, why := k.needsKick(p)
		if !kick {
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
		names = append(names, k.peer.Name+" ("+why+")")
	}
	if len(cfg.Peers) == 0 {
		return nil, nil
	}
	if err := a.wg.ConfigureDevice(a.opts.Interface, cfg); err != nil {
		return nil, fmt.Errorf("configure %s: %w", a.opts.Interface, err)
	}
	return names, nil
}
