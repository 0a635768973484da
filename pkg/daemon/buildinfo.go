package daemon

import (
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// buildInfo is meshd_build_info: always 1, with the version meshd was
// built as, the VCS revision the Go toolchain stamped (or "unknown") and
// the Go version.
func buildInfo(version string) prometheus.Collector {
	if version == "" {
		version = "unknown"
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshd_build_info",
		Help: "Always 1; the labels say which meshd build this is.",
		ConstLabels: prometheus.Labels{
			"version": version, "revision": vcsRevision(), "goversion": runtime.Version(),
		},
	})
	g.Set(1)
	return g
}

func vcsRevision() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && s.Value != "" {
				return s.Value
			}
		}
	}
	return "unknown"
}
