package overlay

import (
	"context"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

const (
	// repairDelay coalesces a burst of netlink events (a link going away
	// deletes many routes) into one repair pass.
	repairDelay = 20 * time.Millisecond
	// resyncInterval bounds how long a change no event announced (a lost
	// netlink message, a changed peer) can go unnoticed.
	resyncInterval = 30 * time.Second
	// resubscribeDelay is the pause before subscribing again after a
	// netlink subscription failed (socket overrun, closed).
	resubscribeDelay = time.Second
)

// routeRepairer keeps the applied state in place: it subscribes to
// route, address, link and rule events and, when something meshd owns is
// deleted (systemd-networkd flushing foreign routes, an operator's `ip
// route del`, the interface vanishing), asks for the newest desired
// state to be applied again (repair). Routes are back within repairDelay
// plus one Set. It also asks every resyncInterval. The decision (does
// this event concern meshd?) reads only the event and the interface's
// name and index; the repair itself is the component's, which records
// its outcome in the status.
type routeRepairer struct {
	iface string
	// linkIndex is the interface's index as the applier last saw it.
	linkIndex func() int32
	repair    func(ctx context.Context, why string)
	log       *slog.Logger
}

// run watches until ctx ends, subscribing again after a failure.
func (r *routeRepairer) run(ctx context.Context) {
	for ctx.Err() == nil {
		r.watchOnce(ctx)
		select {
		case <-ctx.Done():
		case <-time.After(resubscribeDelay):
		}
	}
}

// watchOnce runs one set of subscriptions until ctx ends or one of them
// fails.
func (r *routeRepairer) watchOnce(ctx context.Context) {
	done := make(chan struct{})
	defer close(done)
	failed := make(chan error, 3)
	onErr := func(err error) {
		select {
		case failed <- err:
		default:
		}
	}
	routes := make(chan netlink.RouteUpdate, 256)
	addrs := make(chan netlink.AddrUpdate, 64)
	links := make(chan netlink.LinkUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{ErrorCallback: onErr}); err != nil {
		r.log.Warn("route subscription failed", "err", err)
		return
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr}); err != nil {
		r.log.Warn("address subscription failed", "err", err)
		return
	}
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{ErrorCallback: onErr}); err != nil {
		r.log.Warn("link subscription failed", "err", err)
		return
	}
	rules, err := subscribeRuleDeletions(done, onErr)
	if err != nil {
		r.log.Warn("rule subscription failed", "err", err)
		return
	}
	// Something may have changed while we were not subscribed.
	r.repair(ctx, "resubscribed")

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	pending := false
	schedule := func() {
		if !pending {
			pending = true
			timer.Reset(repairDelay)
		}
	}
	tick := time.NewTicker(resyncInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case err := <-failed:
			r.log.Warn("netlink subscription failed, resubscribing", "err", err)
			return
		case u, ok := <-routes:
			if !ok {
				return
			}
			if u.Type == unix.RTM_DELROUTE && r.ownsRoute(u.Route) {
				schedule()
			}
		case u, ok := <-addrs:
			if !ok {
				return
			}
			if !u.NewAddr && r.ownsLinkIndex(u.LinkIndex) {
				schedule()
			}
		case u, ok := <-links:
			if !ok {
				return
			}
			if u.Link != nil && u.Attrs() != nil && u.Attrs().Name == r.iface &&
				(u.Header.Type == unix.RTM_DELLINK || u.Attrs().Flags&unix.IFF_UP == 0) {
				schedule()
			}
		case _, ok := <-rules:
			if !ok {
				return
			}
			schedule()
		case <-timer.C:
			pending = false
			r.repair(ctx, "netlink event")
		case <-tick.C:
			r.repair(ctx, "periodic resync")
		}
	}
}

// subscribeRuleDeletions reports every IPv4 policy rule deletion (the
// netlink library has no rule subscription). Rule deletions are rare, so
// any of them triggers a repair pass, which is a no-op when meshd's rule
// is still there.
func subscribeRuleDeletions(done <-chan struct{}, onErr func(error)) (<-chan struct{}, error) {
	s, err := nl.Subscribe(unix.NETLINK_ROUTE, unix.RTNLGRP_IPV4_RULE)
	if err != nil {
		return nil, err
	}
	ch := make(chan struct{}, 1)
	go func() {
		<-done
		s.Close()
	}()
	go func() {
		defer close(ch)
		for {
			msgs, _, err := s.Receive()
			if err != nil {
				onErr(err)
				return
			}
			for _, m := range msgs {
				if m.Header.Type == unix.RTM_DELRULE {
					select {
					case ch <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	return ch, nil
}

// ownsRoute reports whether rt is (was) one of meshd's routes.
func (r *routeRepairer) ownsRoute(rt netlink.Route) bool {
	if rt.Protocol == RouteProtocol {
		return true
	}
	return r.ownsLinkIndex(rt.LinkIndex)
}

func (r *routeRepairer) ownsLinkIndex(idx int) bool {
	return idx != 0 && int32(idx) == r.linkIndex()
}
