package overlay

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// Handshake retry: a newly added peer whose first WireGuard handshake has
// not completed is removed and added again in one configuration call, so
// the device initiates a fresh handshake at once instead of after
// WireGuard's REKEY_TIMEOUT (5 s). Why joins stall and why the joining
// side drives the retries: docs/overlay.md, "Handshake retry".
//
// The schedules are the delays after a peer was added at which it is
// checked and, if it needs it (needsRetry), re-added: the joiner's (a
// node whose device had none of the peers a plan adds) early and
// jittered, the established nodes' later.
var (
	retryDelaysJoiner      = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, time.Second, 3 * time.Second}
	retryDelaysEstablished = []time.Duration{700 * time.Millisecond, 2 * time.Second}
	// retryJitter scales a joiner's schedule by a random factor in
	// [1-retryJitter, 1+retryJitter], per peer.
	retryJitter = 0.2
)

// retryDelays returns the schedule for a peer added by a plan: the
// joiner's (jittered) when joining is true, else the established one.
func retryDelays(joining bool) []time.Duration {
	if !joining {
		return retryDelaysEstablished
	}
	f := 1 - retryJitter + 2*retryJitter*rand.Float64()
	out := make([]time.Duration, len(retryDelaysJoiner))
	for i, d := range retryDelaysJoiner {
		out[i] = time.Duration(float64(d) * f)
	}
	return out
}

// retryState is one newly added peer in its first seconds.
type retryState struct {
	peer   desired.Peer
	added  time.Time
	delays []time.Duration
	next   int // index into delays of the next check

	// What the previous check saw of a completed handshake: its time and
	// the byte counters then (see needsRetry).
	handshake time.Time
	rx, tx    int64
}

// needsRetry decides, from the live peer, whether k should be re-added,
// and records what it saw for the next check. A peer is re-added when
// it has completed no handshake since it was added, or when, since the
// previous check, the same handshake is in place and this node sent it
// data but received nothing at all: the two sides hold keys that do not
// match (seen after crossing initiations, wireguard-go), which WireGuard
// itself only notices after 15 s without a reply. A peer that only
// receives, or is silent, or got a new handshake since, is left alone.
// The reason is "no handshake" or "no reply" ("" when no retry).
func (k *retryState) needsRetry(p wgtypes.Peer) (bool, string) {
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

// handshakeRetry tracks the newly added peers and re-adds those that need
// it: read the device, decide (retryConfig, pure), apply (one
// ConfigureDevice), all under the applier's lock so no Set interleaves.
type handshakeRetry struct {
	applier *Applier
	log     *slog.Logger
	// retried counts re-added peers (a metric).
	retried func(n int)

	mu      sync.Mutex
	pending map[string]*retryState // by public key
	wake    chan struct{}
}

func newHandshakeRetry(a *Applier, log *slog.Logger, retried func(int)) *handshakeRetry {
	return &handshakeRetry{applier: a, log: log, retried: retried, pending: map[string]*retryState{}, wake: make(chan struct{}, 1)}
}

// note records the peers plan added (with an endpoint to initiate to) and
// forgets those it removed. peers is the number of peers of the state the
// plan was for: when the plan added all of them, the device had none and
// this node is the joining side.
func (h *handshakeRetry) note(plan desired.Plan, peers int, now time.Time) {
	adds := 0
	for _, pc := range plan.Peers {
		if pc.Op == desired.OpAdd {
			adds++
		}
	}
	joining := adds > 0 && adds == peers
	var n int
	h.mu.Lock()
	for _, pc := range plan.Peers {
		switch {
		case pc.Op == desired.OpAdd && pc.Peer.Endpoint.IsValid():
			h.pending[pc.Peer.PublicKey] = &retryState{peer: pc.Peer, added: now, delays: retryDelays(joining)}
			n++
		case pc.Op == desired.OpRemove:
			delete(h.pending, pc.Peer.PublicKey)
		}
	}
	h.mu.Unlock()
	if n > 0 {
		select {
		case h.wake <- struct{}{}:
		default:
		}
	}
}

// run checks the pending peers at their schedule's delays until ctx ends.
func (h *handshakeRetry) run(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		h.mu.Lock()
		next, due := h.dueLocked(time.Now())
		h.mu.Unlock()
		if len(due) > 0 {
			var names []string
			err := h.applier.reconfigure(func(dev *wgtypes.Device) wgtypes.Config {
				var cfg wgtypes.Config
				cfg, names = retryConfig(due, dev.Peers)
				return cfg
			})
			if err != nil && ctx.Err() == nil {
				h.log.Warn("cannot restart WireGuard handshakes", "err", err)
			}
			if err == nil && len(names) > 0 {
				h.retried(len(names))
				h.log.Info("restarted WireGuard handshakes with new peers", "peers", names)
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
		case <-h.wake:
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

// dueLocked returns the peers whose next check is due at now (advancing
// their schedule, forgetting those past the last delay) and the time of
// the earliest check still pending. h.mu is held.
func (h *handshakeRetry) dueLocked(now time.Time) (next time.Time, due []*retryState) {
	for key, k := range h.pending {
		at := k.added.Add(k.delays[k.next])
		if at.After(now) {
			next = earliest(next, at)
			continue
		}
		due = append(due, k)
		k.next++
		if k.next == len(k.delays) {
			delete(h.pending, key)
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

// retryConfig decides which of due to re-add, from the device's live
// peers: each one still on the device that needs it (needsRetry) and has
// an endpoint to initiate to is removed and added back exactly as the
// device has it (the endpoint WireGuard may have learned, the allowed IPs
// of the newest Set). It returns the configuration and the re-added
// peers as "name (reason)".
func retryConfig(due []*retryState, live []wgtypes.Peer) (wgtypes.Config, []string) {
	byKey := make(map[wgtypes.Key]wgtypes.Peer, len(live))
	for _, p := range live {
		byKey[p.PublicKey] = p
	}
	var cfg wgtypes.Config
	var names []string
	for _, k := range due {
		key, err := wgtypes.ParseKey(k.peer.PublicKey)
		if err != nil {
			continue
		}
		p, ok := byKey[key]
		if !ok {
			continue
		}
		retry, why := k.needsRetry(p)
		if !retry || p.Endpoint == nil {
			continue
		}
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
	return cfg, names
}
