// Package bench measures meshd's convergence: how long from a change in
// etcd until every node has applied it, and what that costs. It holds the
// scenarios (full fidelity on the sandbox, in-process scale, the etcd
// watch floor, Traefik as the peer) and the report writer; `make bench`
// runs them all through bench/cmd/bench and rewrites bench/RESULTS.md and
// bench/convergence.png.
package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Series is one measured distribution: one convergence time per trial.
type Series struct {
	// Name identifies the series in tables and the plot ("meshd scale N=100
	// instance added").
	Name    string
	Samples []time.Duration
}

// Add appends one trial's result.
func (s *Series) Add(d time.Duration) { s.Samples = append(s.Samples, d) }

// Quantile returns the q-quantile (nearest rank) of the samples, or 0.
func (s Series) Quantile(q float64) time.Duration {
	if len(s.Samples) == 0 {
		return 0
	}
	v := slices.Clone(s.Samples)
	slices.Sort(v)
	i := int(math.Ceil(q*float64(len(v)))) - 1
	return v[min(max(i, 0), len(v)-1)]
}

// Max is the slowest trial.
func (s Series) Max() time.Duration { return s.Quantile(1) }

// Summary is the series' one-line description.
func (s Series) Summary() string {
	return fmt.Sprintf("%s: n=%d p50=%s p99=%s max=%s", s.Name, len(s.Samples),
		ms(s.Quantile(0.5)), ms(s.Quantile(0.99)), ms(s.Max()))
}

// ms formats a duration in milliseconds with enough precision for
// sub-millisecond values.
func ms(d time.Duration) string {
	f := float64(d) / float64(time.Millisecond)
	switch {
	case f < 1:
		return fmt.Sprintf("%.3f ms", f)
	case f < 100:
		return fmt.Sprintf("%.1f ms", f)
	}
	return fmt.Sprintf("%.0f ms", f)
}

// maxOf returns the largest duration in a map (the slowest node).
func maxOf(m map[string]time.Duration) time.Duration {
	var out time.Duration
	for _, d := range m {
		out = max(out, d)
	}
	return out
}
