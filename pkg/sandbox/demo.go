package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
)

// The demo app every sandbox runs: served on DemoPort by the first
// DemoOptions.Servers nodes, reached by every other node at
// 127.0.0.1:DemoPublishPort through its HAProxy and the overlay.
const (
	DemoApp         = "demo"
	DemoGroup       = registry.GroupBackends
	DemoPort        = 8080
	DemoPublishPort = 18080
)

// DemoOptions configures BringUp.
type DemoOptions struct {
	// Nodes is how many nodes to start (at least 2).
	Nodes int
	// Servers is how many of them (the first ones) serve the demo app
	// (default 1); the others consume it.
	Servers int
	// Out receives one line per step (nil: discard).
	Out io.Writer
	// StepTimeout bounds each step's convergence (default 60s).
	StepTimeout time.Duration
	// Edit, if set, changes every node's generated meshd config
	// (NodeOptions.Edit).
	Edit func(*config.Config)
}

// Step is one bring-up step and how long the cluster took to apply it.
type Step struct {
	What        string
	Convergence Convergence
}

// BringUp registers the demo app and starts the nodes one by one, waiting
// after each until every running node applied its arrival, and finally
// until every node applied the demo instances. It reports each step.
func (c *Cluster) BringUp(ctx context.Context, o DemoOptions) ([]Step, error) {
	if o.Nodes < 2 {
		return nil, fmt.Errorf("nodes %d: want at least 2 (one serving the demo app, one consuming it)", o.Nodes)
	}
	if o.Servers <= 0 {
		o.Servers = 1
	}
	if o.Servers >= o.Nodes {
		return nil, fmt.Errorf("servers %d: want fewer than the %d nodes, so that some node consumes", o.Servers, o.Nodes)
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.StepTimeout == 0 {
		o.StepTimeout = 60 * time.Second
	}
	var steps []Step
	rev, at, err := c.RegisterApp(ctx, DemoGroup, DemoApp, DemoMeta())
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Out, "registered app %s/%s (published on 127.0.0.1:%d of consumers) at revision %d\n", DemoGroup, DemoApp, DemoPublishPort, rev)
	_ = at
	for i := 1; i <= o.Nodes; i++ {
		no := NodeOptions{Consume: []registry.Group{DemoGroup}}
		role := "consumes " + string(DemoGroup)
		if i <= o.Servers {
			no = NodeOptions{
				Instances: []config.Instance{{
					App: DemoApp, Group: DemoGroup, Port: DemoPort,
					Check: config.Check{TCP: fmt.Sprintf("127.0.0.1:%d", DemoPort)},
				}},
				BeforeStart: func(n *Node) error { return n.ServeDemo(DemoPort) },
			}
			role = fmt.Sprintf("serves %s/%s on :%d", DemoGroup, DemoApp, DemoPort)
		}
		no.Edit = o.Edit
		n, err := c.AddNode(ctx, no)
		if err != nil {
			return steps, err
		}
		fmt.Fprintf(o.Out, "started node %s: netns %s, address %s, meshd pid %d, %s\n", n.Name, n.NS, n.Addr, n.Pid(), role)
		sctx, cancel := context.WithTimeout(ctx, o.StepTimeout)
		st, err := c.waitStep(sctx, fmt.Sprintf("%s joined", n.Name), registry.NodeKey(n.Name), false, c.NodeNames())
		cancel()
		if err != nil {
			return steps, fmt.Errorf("%w\n%s log:\n%s", err, n.Name, n.LogTail(2000))
		}
		steps = append(steps, st)
		fmt.Fprintln(o.Out, "  "+st.String())
		if i > o.Servers {
			continue
		}
		// The instance is advertised once its check passes; time it among
		// the nodes running now (later ones get it when they join).
		sctx, cancel = context.WithTimeout(ctx, o.StepTimeout)
		st, err = c.waitStep(sctx, fmt.Sprintf("instance %s/%s on %s advertised", DemoGroup, DemoApp, n.Name),
			registry.InstanceKey(DemoGroup, DemoApp, n.Name), false, c.NodeNames())
		cancel()
		if err != nil {
			return steps, fmt.Errorf("%w\n%s log:\n%s", err, n.Name, n.LogTail(2000))
		}
		steps = append(steps, st)
		fmt.Fprintln(o.Out, "  "+st.String())
	}
	return steps, nil
}

// DemoMeta is the demo app's meta_data.
func DemoMeta() registry.AppMeta {
	return registry.AppMeta{
		Env:     registry.Env{"PROTOCOL": json.RawMessage(`"http"`), "PORT": json.RawMessage(fmt.Sprint(DemoPort))},
		Publish: registry.Publish{Port: DemoPublishPort},
	}
}

// waitStep waits for key to appear (or vanish), then for nodes to apply
// the revision at which it did.
func (c *Cluster) waitStep(ctx context.Context, what, key string, gone bool, nodes []string) (Step, error) {
	rev, at, err := c.WaitKey(ctx, key, gone)
	if err != nil {
		return Step{}, fmt.Errorf("%s: waiting for %s: %w", what, key, err)
	}
	cv, err := c.WaitApplied(ctx, rev, at, nodes)
	if err != nil {
		return Step{What: what, Convergence: cv}, fmt.Errorf("%s: %w", what, err)
	}
	return Step{What: what, Convergence: cv}, nil
}

// String is the step as a progress line: the write's revision and each
// node's time to apply it.
func (s Step) String() string {
	names := make([]string, 0, len(s.Convergence.PerNode))
	for n := range s.Convergence.PerNode {
		names = append(names, n)
	}
	slices.SortFunc(names, compareNodeNames)
	parts := make([]string, len(names))
	for i, n := range names {
		parts[i] = fmt.Sprintf("%s %s", n, fmtDur(s.Convergence.PerNode[n]))
	}
	return fmt.Sprintf("%s (revision %d): every node applied it in %s [%s]",
		s.What, s.Convergence.Revision, fmtDur(s.Convergence.Max()), strings.Join(parts, ", "))
}

// compareNodeNames orders n2 before n10.
func compareNodeNames(a, b string) int {
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	return strings.Compare(a, b)
}

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%dµs", d.Microseconds())
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000)
	}
	return d.Round(100 * time.Millisecond).String()
}
