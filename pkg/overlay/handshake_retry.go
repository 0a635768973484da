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
	peer desired.Peer
	// added: a handshake after it is the peer's; from: when its schedule
	// starts (zero: at added).
	added, from time.Time
	delays      []time.Duration
	next        int // index into delays of the next scheduled check

	// What the previous check saw of a completed handshake: its time and
	// the byte counters then (see needsRetry).
	handshake time.Time
	rx, tx    int64
	// suspect: a check saw this node send over that handshake and receive
	// nothing; confirmAt, when set, is an extra check soon after it.
	suspect   bool
	confirmAt time.Time
}

// noReplyConfirm is how soon after a check that saw this node send and
// receive nothing a second look is taken.
const noReplyConfirm = 100 * time.Millisecond

// nextCheck returns when k is to be checked next; false once its
// schedule is over and nothing is left to confirm.
func (k *retryState) nextCheck() (time.Time, bool) {
	if !k.confirmAt.IsZero() {
		return k.confirmAt, true
	}
	if k.next < len(k.delays) {
		from := k.from
		if from.IsZero() {
			from = k.added
		}
		return from.Add(k.delays[k.next]), true
	}
	return time.Time{}, false
}

// advance moves k past the check that is due now.
func (k *retryState) advance() {
	if !k.confirmAt.IsZero() {
		k.confirmAt = time.Time{}
		return
	}
	k.next++
}

// needsRetry decides at now, from the live peer, whether k should be
// re-added, and records what it saw for the next check. A peer is
// re-added when it has completed no handshake since it was added, or
// when, over the same handshake, this node received nothing at all while
// it kept sending: data sent at two checks in a row, nothing received
// since the one before. That is the state of two sides holding keys that
// do not match (seen after crossing initiations, wireguard-go), which
// WireGuard itself only notices after 15 s without a reply. One packet
// that gets no answer (a keepalive, an ICMP error, a reply still on its
// way) is not enough: the first such check only makes the peer a suspect
// and asks for a second look noReplyConfirm later. A peer that only
// receives, or is silent, or got a new handshake since, is left alone.
// The reason is "no handshake" or "no reply" ("" when no retry).
func (k *retryState) needsRetry(p wgtypes.Peer, now time.Time) (bool, string) {
	if !p.LastHandshakeTime.After(k.added) {
		k.handshake, k.suspect, k.confirmAt = time.Time{}, false, time.Time{}
		return true, "no handshake"
	}
	silent := p.LastHandshakeTime.Equal(k.handshake) && p.TransmitBytes > k.tx && p.ReceiveBytes == k.rx
	switch {
	case silent && k.suspect:
		k.handshake, k.suspect, k.confirmAt = time.Time{}, false, time.Time{} // the re-added peer starts afresh
		return true, "no reply"
	case silent:
		// rx and the handshake stay the baseline: the second look asks
		// whether anything at all came back since before the sending.
		k.tx, k.suspect, k.confirmAt = p.TransmitBytes, true, now.Add(noReplyConfirm)
		return false, ""
	case k.suspect && p.LastHandshakeTime.Equal(k.handshake) && p.ReceiveBytes == k.rx:
		// Still nothing received, but nothing sent since either: wait for
		// the next scheduled check.
		return false, ""
	}
	k.handshake, k.rx, k.tx, k.suspect, k.confirmAt = p.LastHandshakeTime, p.ReceiveBytes, p.TransmitBytes, false, time.Time{}
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
// this node is the joining side. since is when the apply of plan
// started: a handshake the device records after it belongs to the added
// peer (one may complete before the apply returns, while it adds routes).
// The checks are scheduled from from: since, or, for the peers a node
// configured before its claim, the apply after the claim (the others
// cannot answer before they know the node).
func (h *handshakeRetry) note(plan desired.Plan, peers int, since, from time.Time) {
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
			h.pending[pc.Peer.PublicKey] = &retryState{peer: pc.Peer, added: since, from: from, delays: retryDelays(joining)}
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
		now := time.Now()
		next, due := h.dueLocked(now)
		h.mu.Unlock()
		if len(due) > 0 {
			var names []string
			err := h.applier.reconfigure(func(dev *wgtypes.Device) wgtypes.Config {
				var cfg wgtypes.Config
				cfg, names = retryConfig(due, dev.Peers, now)
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
// them past it, forgetting those whose schedule is over) and the time of
// the earliest check still pending. h.mu is held.
func (h *handshakeRetry) dueLocked(now time.Time) (next time.Time, due []*retryState) {
	for key, k := range h.pending {
		at, ok := k.nextCheck()
		if !ok {
			delete(h.pending, key)
			continue
		}
		if at.After(now) {
			next = earliest(next, at)
			continue
		}
		due = append(due, k)
		k.advance()
		if at, ok := k.nextCheck(); ok {
			next = earliest(next, at)
		}
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
func retryConfig(due []*retryState, live []wgtypes.Peer, now time.Time) (wgtypes.Config, []string) {
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
		retry, why := k.needsRetry(p, now)
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
