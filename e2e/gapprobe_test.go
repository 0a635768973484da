package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meshd/meshd/pkg/sandbox"
)

// gapProbe pings overlay addresses from inside node namespaces, one ICMP
// echo every probeEvery per pair, and records per pair the longest time
// without a reply: between two replies, or from the probe's start to its
// first reply, or from the last reply to its end. It runs for at most
// probeMax, whatever its caller does.
type gapProbe struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	pairs  map[string]*pairGap
}

type pairGap struct {
	sent, lost int
	maxGap     time.Duration
	at         time.Time // when the longest gap ended
}

const (
	probeEvery   = 50 * time.Millisecond
	probeTimeout = 250 * time.Millisecond
	probeMax     = 3 * time.Minute
)

// probeTarget is one node pinging an overlay address.
type probeTarget struct {
	from *sandbox.Node
	to   string // name, for reports
	addr netip.Addr
}

func startGapProbe(targets []probeTarget) *gapProbe {
	ctx, cancel := context.WithTimeout(context.Background(), probeMax)
	g := &gapProbe{cancel: cancel, pairs: map[string]*pairGap{}}
	for _, tg := range targets {
		p := &pairGap{}
		g.pairs[tg.from.Name+"->"+tg.to] = p
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			last := time.Now()
			note := func(now time.Time) {
				if d := now.Sub(last); d > p.maxGap {
					p.maxGap, p.at = d, now
				}
			}
			tick := time.NewTicker(probeEvery)
			defer tick.Stop()
			for {
				pctx, pcancel := context.WithTimeout(ctx, probeTimeout)
				_, err := tg.from.Ping(pctx, tg.addr)
				pcancel()
				now := time.Now()
				if ctx.Err() != nil {
					g.mu.Lock()
					note(now)
					g.mu.Unlock()
					return
				}
				g.mu.Lock()
				p.sent++
				if err != nil {
					p.lost++
				} else {
					note(now)
					last = now
				}
				g.mu.Unlock()
				select {
				case <-ctx.Done():
				case <-tick.C:
				}
			}
		}()
	}
	return g
}

// gapReport is what a probe saw: the longest gap over every pair, its
// pair, and one line per pair.
type gapReport struct {
	Max   time.Duration
	Pair  string
	Lines []string
}

func (g *gapProbe) stop() gapReport {
	g.cancel()
	g.wg.Wait()
	g.mu.Lock()
	defer g.mu.Unlock()
	var r gapReport
	for _, name := range slices.Sorted(maps.Keys(g.pairs)) {
		p := g.pairs[name]
		if p.maxGap > r.Max {
			r.Max, r.Pair = p.maxGap, name
		}
		r.Lines = append(r.Lines, fmt.Sprintf("%s: %d/%d lost, longest gap %v (ended %s)",
			name, p.lost, p.sent, p.maxGap.Round(time.Millisecond), p.at.Format("15:04:05.000")))
	}
	return r
}

func (r gapReport) String() string {
	return fmt.Sprintf("longest overlay gap %v (%s)\n  %s", r.Max.Round(time.Millisecond), r.Pair, strings.Join(r.Lines, "\n  "))
}
