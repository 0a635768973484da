package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/sandbox"
)

// profileMetricsAddr is where the profiled sandbox nodes serve /metrics
// and /debug/pprof/, on their own loopback.
const profileMetricsAddr = "127.0.0.1:9464"

// PassProfile is one consumer node's reconcile passes, profiled while the
// harness puts and deletes an instance in a loop (the full-fidelity
// instance trials, again, for Window): where the time between the etcd
// write and the node's applied status goes, and what its CPU does.
type PassProfile struct {
	Node    string
	Window  time.Duration
	Changes int
	// Applied is the harness's mean time from the write until the node
	// published it applied (the same measure as the "applied" rows).
	Applied time.Duration
	// Wait, Pass and Components are means from the node's own metrics:
	// the change's wait before its pass (meshd_reconcile_wait_seconds),
	// the pass (meshd_reconcile_seconds), each component's apply
	// (meshd_component_apply_seconds); Passes counts the passes.
	Wait, Pass time.Duration
	Passes     int
	Components map[string]time.Duration
	// CPUPerChange is the meshd process's CPU time (/proc) over the
	// window divided by Changes.
	CPUPerChange time.Duration
	// Top is `go tool pprof -top` of the node's CPU profile over the
	// window; ProfileFile names the saved profile.
	Top, ProfileFile string
}

// histogram is one Prometheus histogram's sum and count.
type histogram struct{ sum, count float64 }

// scrapeHistograms reads the _sum and _count of the named histograms
// (by name and, for labelled ones, the label's value: "name{value}")
// from a Prometheus text exposition.
func scrapeHistograms(text []byte, names ...string) map[string]histogram {
	out := map[string]histogram{}
	sc := bufio.NewScanner(bytes.NewReader(text))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		for _, name := range names {
			for _, suffix := range []string{"_sum", "_count"} {
				rest, ok := strings.CutPrefix(line, name+suffix)
				if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
					continue
				}
				key := name
				if rest[0] == '{' {
					end := strings.IndexByte(rest, '}')
					if end < 0 {
						continue
					}
					if _, v, ok := strings.Cut(rest[1:end], `="`); ok {
						key = name + "{" + strings.TrimSuffix(v, `"`) + "}"
					}
					rest = rest[end+1:]
				}
				v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
				if err != nil {
					continue
				}
				h := out[key]
				if suffix == "_sum" {
					h.sum = v
				} else {
					h.count = v
				}
				out[key] = h
			}
		}
	}
	return out
}

// meanDelta is the mean of the samples a histogram took between two
// scrapes (0 without samples).
func meanDelta(a, b histogram) time.Duration {
	n := b.count - a.count
	if n <= 0 {
		return 0
	}
	return time.Duration((b.sum - a.sum) / n * float64(time.Second))
}

// profilePasses runs change (one instance put or delete, returning the
// harness's time until node applied it) in a loop for window while node's
// meshd takes a CPU profile, and reads node's metrics before and after.
// meshdBin is the binary the node runs (for pprof's symbols); dir keeps
// the profile.
func profilePasses(ctx context.Context, node *sandbox.Node, window time.Duration, meshdBin, dir string, change func(i int) (time.Duration, error)) (PassProfile, error) {
	p := PassProfile{Node: node.Name, Window: window, Components: map[string]time.Duration{}}
	base := "http://" + profileMetricsAddr
	names := []string{"meshd_reconcile_wait_seconds", "meshd_reconcile_seconds", "meshd_component_apply_seconds"}
	scrape := func() (map[string]histogram, error) {
		b, err := node.Fetch(ctx, base+"/metrics", 4<<20)
		if err != nil {
			return nil, fmt.Errorf("%s metrics: %w", node.Name, err)
		}
		return scrapeHistograms(b, names...), nil
	}
	before, err := scrape()
	if err != nil {
		return p, err
	}
	type prof struct {
		b   []byte
		err error
	}
	profCh := make(chan prof, 1)
	secs := int(window.Seconds())
	go func() {
		pctx, cancel := context.WithTimeout(ctx, window+30*time.Second)
		defer cancel()
		b, err := node.Fetch(pctx, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", base, secs), 64<<20)
		profCh <- prof{b, err}
	}()
	pid := node.Pid()
	cpu0 := procCPU(pid)
	start := time.Now()
	var applied time.Duration
	// Changes come in put/delete pairs: the loop ends with the instance
	// gone, as the trials do.
	for i := 0; time.Since(start) < time.Duration(secs)*time.Second || i%2 == 1; i++ {
		d, err := change(i)
		if err != nil {
			return p, err
		}
		applied += d
		p.Changes++
	}
	cpu := procCPU(pid) - cpu0
	pr := <-profCh
	if pr.err != nil {
		return p, fmt.Errorf("%s CPU profile: %w", node.Name, pr.err)
	}
	after, err := scrape()
	if err != nil {
		return p, err
	}
	if p.Changes > 0 {
		p.Applied = applied / time.Duration(p.Changes)
		p.CPUPerChange = cpu / time.Duration(p.Changes)
	}
	p.Wait = meanDelta(before[names[0]], after[names[0]])
	p.Pass = meanDelta(before[names[1]], after[names[1]])
	p.Passes = int(after[names[1]].count - before[names[1]].count)
	for k, h := range after {
		if c, ok := strings.CutPrefix(k, names[2]+"{"); ok {
			p.Components[strings.TrimSuffix(c, "}")] = meanDelta(before[k], h)
		}
	}
	p.ProfileFile = filepath.Join(dir, fmt.Sprintf("cpu-%s.pprof", node.Name))
	if err := os.WriteFile(p.ProfileFile, pr.b, 0o644); err != nil {
		return p, err
	}
	// The flat top, then the cumulative one of meshd's own functions:
	// which of its parts the samples fall under.
	flat, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=12", meshdBin, p.ProfileFile).CombinedOutput()
	if err != nil {
		p.Top = fmt.Sprintf("go tool pprof: %v: %s", err, flat)
		return p, nil
	}
	cum, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-cum", "-nodecount=200", meshdBin, p.ProfileFile).CombinedOutput()
	if err != nil {
		p.Top = fmt.Sprintf("go tool pprof: %v: %s", err, cum)
		return p, nil
	}
	var b strings.Builder
	b.Write(flat)
	b.WriteString("\n# by cumulative time, meshd's own functions (-top -cum):\n")
	n := 0
	for _, l := range strings.Split(string(cum), "\n") {
		if strings.Contains(l, "github.com/meshd/meshd/") && n < 20 {
			b.WriteString(l + "\n")
			n++
		}
	}
	p.Top = b.String()
	return p, nil
}
