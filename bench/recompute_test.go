package bench

import (
	"fmt"
	"testing"
)

// BenchmarkRecompute splits what one agent spends on one change, by
// cluster size: building the snapshot from the store, and the two pure
// desired-state computations the scale benchmark's component runs. It
// explains the growth of "CPU per agent per change" in RESULTS.md.
func BenchmarkRecompute(b *testing.B) {
	for _, n := range []int{8, 100, 1000, 10000} {
		for name, f := range recomputeParts(clusterStore(n)) {
			b.Run(fmt.Sprintf("%s/N=%d", name, n), func(b *testing.B) {
				for b.Loop() {
					f()
				}
			})
		}
	}
}
