package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/bench"
	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/sandbox"
)

// measurer runs the scenarios one after the other into res; a scenario
// that fails becomes a note and the next one runs.
type measurer struct {
	o    options
	res  *bench.Results
	work string // scratch directory
	etcd *etcdProc
	alog *slog.Logger // the scale agents' warnings (nil: none)
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func (m *measurer) note(format string, a ...any) {
	m.res.Notes = append(m.res.Notes, fmt.Sprintf(format, a...))
}

// counted runs one part of the run, records what the kernel dropped
// meanwhile, and returns what the part returned.
func counted[T any](m *measurer, part string, run func() (T, error)) (T, error) {
	before, err := bench.ReadNetLoss()
	v, runErr := run()
	if err == nil {
		var after bench.NetLoss
		if after, err = bench.ReadNetLoss(); err == nil {
			m.res.NetLoss = append(m.res.NetLoss, bench.PartLoss{Part: part, NetLoss: after.Sub(before)})
		}
	}
	if err != nil {
		m.note("%s: kernel drop counters not read: %v", part, err)
	}
	return v, runErr
}

// newClient is a client of endpoint built as meshd builds its own
// (keep-alive pings, reconnect backoff): the agents, the floor's watchers
// and the passive nodes connect the way real nodes do.
func newClient(endpoint string) (*clientv3.Client, error) {
	return etcdclient.New(etcdclient.Options{Endpoints: []string{endpoint}})
}

// scale runs the floor and the scale benchmark at n nodes (live of them
// real agents), the agents and watchers connected to etcd or, with proxy,
// to a gRPC proxy in front of it; the harness's control client always
// talks to etcd.
func (m *measurer) scale(ctx context.Context, n, live int, proxy bool) {
	endpoint, label := m.etcd.endpoint, ""
	stopProxy := func() {}
	if proxy {
		p, pe, err := startChild("grpc-proxy", m.etcd.endpoint)
		if err != nil {
			m.note("grpc-proxy N=%d: %v", n, err)
			return
		}
		stopProxy, endpoint, label = p.stop, pe, " via grpc-proxy"
	}
	defer stopProxy()
	clientOf := func() (*clientv3.Client, error) { return newClient(endpoint) }
	control := func() (*clientv3.Client, error) { return newClient(m.etcd.endpoint) }
	logf("floor N=%d%s ...", n, label)
	f, err := counted(m, fmt.Sprintf("etcd watch floor N=%d%s", n, label), func() (bench.Series, error) {
		return bench.Floor(ctx, bench.FloorOptions{NewClient: clientOf, Control: control, Label: label, N: n, Trials: m.o.trials, Note: m.note})
	})
	if err != nil {
		m.note("floor N=%d%s: %v", n, label, err)
	} else {
		logf("%s", f.Summary())
		m.res.Floor = append(m.res.Floor, f)
	}
	logf("scale N=%d%s ...", n, label)
	var prof, idleProf io.Writer
	if dir := m.o.scaleProf; dir != "" {
		base := fmt.Sprintf("scale-%d%s", n, strings.ReplaceAll(strings.TrimSpace(label), " ", "-"))
		for _, p := range []struct {
			w    *io.Writer
			name string
		}{{&prof, base + ".pprof"}, {&idleProf, base + "-idle.pprof"}} {
			f, err := os.Create(filepath.Join(dir, p.name))
			if err != nil {
				m.note("scale N=%d%s: %v", n, label, err)
				return
			}
			defer f.Close()
			*p.w = f
		}
	}
	s, err := counted(m, fmt.Sprintf("scale N=%d%s", n, label), func() (bench.ScaleResult, error) {
		return bench.Scale(ctx, bench.ScaleOptions{
			CPUProfile: prof, IdleCPUProfile: idleProf,
			NewClient: clientOf, Control: control, Label: label, MetricsURL: m.etcd.endpoint + "/metrics", N: n, Live: live, Trials: m.o.trials,
			Idle: m.o.idle, Joins: m.o.joins,
			Passive: func(ctx context.Context, n int) (func(), error) {
				p, _, err := startChild("passive-nodes", endpoint, strconv.Itoa(n))
				if err != nil {
					return nil, fmt.Errorf("passive nodes: %w", err)
				}
				return p.stop, nil
			},
			StateDir: filepath.Join(m.work, fmt.Sprintf("scale-%d", n)), Log: logf, AgentLog: m.alog,
		})
	})
	if err != nil {
		m.note("scale N=%d%s: %v", n, label, err)
	} else {
		m.res.Scale = append(m.res.Scale, s)
	}
}

// traefik runs the peer comparison at each instance count and throttle.
func (m *measurer) traefik(ctx context.Context) error {
	if m.o.traefikBin == "" {
		m.note("Traefik not run: no binary given (-traefik or TRAEFIK_BIN)")
		return nil
	}
	cli, err := newClient(m.etcd.endpoint)
	if err != nil {
		return err
	}
	defer cli.Close()
	for _, n := range m.o.traefikNs {
		for _, throttle := range m.o.throttles {
			logf("traefik N=%d throttle=%s ...", n, throttle)
			t, err := counted(m, fmt.Sprintf("Traefik N=%d throttle %s", n, throttle), func() (bench.TraefikResult, error) {
				return bench.Traefik(ctx, bench.TraefikOptions{
					Binary: m.o.traefikBin, EtcdAddr: strings.TrimPrefix(m.etcd.endpoint, "http://"), Client: cli,
					N: n, Trials: m.o.trials, Throttle: throttle, Dir: m.work, Log: logf,
				})
			})
			if err != nil {
				m.note("traefik N=%d throttle=%s: %v", n, throttle, err)
				continue
			}
			if m.o.traefikVer != "" {
				t.Version = m.o.traefikVer
			}
			m.res.Traefik = append(m.res.Traefik, t)
		}
	}
	if len(m.res.Traefik) > 0 {
		m.res.Versions = append(m.res.Versions, "Traefik "+m.res.Traefik[0].Version)
	}
	return nil
}

// sandboxes runs one real meshd with a large view, then the full-fidelity
// benchmark at each sandbox size.
func (m *measurer) sandboxes(ctx context.Context) error {
	if n := m.o.oneNode; n > 0 {
		logf("one node N=%d ...", n)
		o, err := counted(m, fmt.Sprintf("one meshd with a %d-node view", n), func() (bench.OneNodeResult, error) {
			return bench.OneNode(ctx, bench.OneNodeOptions{
				Sandbox: sandbox.Options{Name: "mdbench1", MeshdBinary: m.o.meshd},
				N:       n, Idle: max(m.o.idle, 10*time.Second), Log: logf,
			})
		})
		if err != nil {
			m.note("one node N=%d: %v", n, err)
		} else {
			m.res.OneNode = append(m.res.OneNode, o)
		}
	}
	for _, n := range m.o.fidelity {
		logf("full fidelity N=%d ...", n)
		f, err := counted(m, fmt.Sprintf("full fidelity sandbox N=%d", n), func() (bench.FidelityResult, error) {
			return bench.Fidelity(ctx, bench.FidelityOptions{
				Sandbox: sandbox.Options{Name: "mdbench", MeshdBinary: m.o.meshd},
				N:       n, Trials: m.o.trials, KillTrials: m.o.killTrials, Log: logf,
				Profile: profileFor(n, m.o), ProfileDir: m.o.out,
			})
		})
		if err != nil {
			m.note("full fidelity N=%d: %v", n, err)
			continue
		}
		m.res.Fidelity = append(m.res.Fidelity, f)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return nil
}

// profileFor is how long the full-fidelity run of size n profiles a
// node: -profile at the largest size, nothing at the others.
func profileFor(n int, o options) time.Duration {
	if len(o.fidelity) == 0 || n != o.fidelity[len(o.fidelity)-1] {
		return 0
	}
	return o.profile
}
