package agent_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// runner is a component with a long-running part.
type runner struct {
	started, stopped atomic.Bool
}

func (r *runner) Name() string                                    { return "runner" }
func (r *runner) Apply(context.Context, *registry.Snapshot) error { return nil }
func (r *runner) Status() any                                     { return nil }
func (r *runner) Run(ctx context.Context) error {
	r.started.Store(true)
	<-ctx.Done()
	r.stopped.Store(true)
	return nil
}

// TestRunnerRunsWithTheAgent: the agent starts a component's Run and
// ends it when the agent stops, before Run returns.
func TestRunnerRunsWithTheAgent(t *testing.T) {
	srv := etcdtest.New(t)
	r := &runner{}
	n := startNode(t, srv, "node-a", id1, t.TempDir(), func(o *agent.Options) { o.Components = []agent.Component{r} })
	eventually(t, 5*time.Second, "component's Run started", r.started.Load)
	if r.stopped.Load() {
		t.Fatal("Run ended while the agent runs")
	}
	n.cancel()
	select {
	case <-n.done:
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop")
	}
	if !r.stopped.Load() {
		t.Fatal("agent.Run returned before the component's Run ended")
	}
}
