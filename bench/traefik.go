package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TraefikOptions configures the peer comparison: N Traefik processes
// watching the same etcd through their KV provider, given the same change
// meshd gets (one backend server added, then removed).
type TraefikOptions struct {
	// Binary is a Traefik v3 executable (built by hand, see RESULTS.md).
	Binary string
	// EtcdAddr is etcd's host:port on the host loopback.
	EtcdAddr string
	Client   *clientv3.Client
	N        int
	Trials   int
	// Throttle is providers.providersThrottleDuration (Traefik's own
	// coalescing; its default is 2s).
	Throttle time.Duration
	// Dir holds the instances' logs.
	Dir string
	Log func(format string, a ...any)
}

// TraefikResult is what the peer comparison measured.
type TraefikResult struct {
	N        int
	Throttle time.Duration
	Version  string
	// Added/Removed: the put/delete of the server key until every
	// instance's API shows (no longer shows) the server.
	Added, Removed Series
}

const traefikRoot = "traefik"

type traefikProc struct {
	cmd *exec.Cmd
	api string
}

// Traefik runs the peer comparison.
func Traefik(ctx context.Context, o TraefikOptions) (TraefikResult, error) {
	res := TraefikResult{N: o.N, Throttle: o.Throttle,
		Added:   Series{Name: fmt.Sprintf("traefik N=%d throttle=%s server added", o.N, o.Throttle)},
		Removed: Series{Name: fmt.Sprintf("traefik N=%d throttle=%s server removed", o.N, o.Throttle)},
	}
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
	if out, err := exec.CommandContext(ctx, o.Binary, "version").CombinedOutput(); err == nil {
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "Version:" {
				res.Version = f[1]
			}
		}
	}
	cli := o.Client
	// The router and service around the server, as an app's meta_data
	// gives HAProxy a listener and a backend.
	for k, v := range map[string]string{
		"http/routers/benchapp/rule":                        "PathPrefix(`/`)",
		"http/routers/benchapp/entryPoints/0":               "bench",
		"http/routers/benchapp/service":                     "benchapp",
		"http/services/benchapp/loadBalancer/servers/0/url": "http://10.10.200.1:8080",
	} {
		if _, err := cli.Put(ctx, traefikRoot+"/"+k, v); err != nil {
			return res, err
		}
	}
	defer cli.Delete(context.WithoutCancel(ctx), traefikRoot+"/", clientv3.WithPrefix())
	procs := make([]*traefikProc, 0, o.N)
	defer func() {
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			done := make(chan struct{})
			go func() { _ = p.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = p.cmd.Process.Kill()
				<-done
			}
		}
	}()
	for i := range o.N {
		ports, err := freePorts(2)
		if err != nil {
			return res, err
		}
		logf, err := os.Create(filepath.Join(o.Dir, fmt.Sprintf("traefik-%d.log", i)))
		if err != nil {
			return res, err
		}
		cmd := exec.CommandContext(ctx, o.Binary,
			"--global.checkNewVersion=false", "--global.sendAnonymousUsage=false",
			"--log.level=ERROR",
			"--api=true", "--api.insecure=true",
			"--entryPoints.traefik.address=127.0.0.1:"+strconv.Itoa(ports[0]),
			"--entryPoints.bench.address=127.0.0.1:"+strconv.Itoa(ports[1]),
			"--providers.etcd.endpoints="+o.EtcdAddr,
			"--providers.etcd.rootKey="+traefikRoot,
			"--providers.providersThrottleDuration="+o.Throttle.String(),
		)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			logf.Close()
			return res, fmt.Errorf("start traefik: %w", err)
		}
		logf.Close()
		procs = append(procs, &traefikProc{cmd: cmd, api: fmt.Sprintf("http://127.0.0.1:%d/api/http/services/benchapp@etcd", ports[0])})
	}
	// Every instance must have the initial configuration before trials.
	first := "http://10.10.200.1:8080"
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	if _, err := waitTraefik(sctx, procs, time.Now(), func(urls []string) bool { return contains(urls, first) }); err != nil {
		cancel()
		return res, fmt.Errorf("traefik instances did not load the initial configuration: %w", err)
	}
	cancel()
	o.Log("traefik %s: %d instances up", res.Version, o.N)
	key := traefikRoot + "/http/services/benchapp/loadBalancer/servers/1/url"
	for t := range o.Trials {
		url := fmt.Sprintf("http://10.10.201.%d:8080", t%250+1)
		for _, add := range []bool{true, false} {
			tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			start := time.Now()
			var err error
			if add {
				_, err = cli.Put(tctx, key, url)
			} else {
				_, err = cli.Delete(tctx, key)
			}
			if err != nil {
				cancel()
				return res, err
			}
			d, err := waitTraefik(tctx, procs, start, func(urls []string) bool { return contains(urls, url) == add })
			cancel()
			if err != nil {
				return res, fmt.Errorf("trial %d: %w", t, err)
			}
			if add {
				res.Added.Add(d)
			} else {
				res.Removed.Add(d)
			}
		}
	}
	o.Log("%s\n%s", res.Added.Summary(), res.Removed.Summary())
	return res, nil
}

// waitTraefik polls every instance's API (every 2 ms) until ok holds for
// the service's server URLs, and returns the slowest instance's time.
func waitTraefik(ctx context.Context, procs []*traefikProc, start time.Time, ok func([]string) bool) (time.Duration, error) {
	type result struct {
		d   time.Duration
		err error
	}
	out := make(chan result, len(procs))
	client := &http.Client{Timeout: time.Second}
	for _, p := range procs {
		go func() {
			var last error
			for {
				urls, err := traefikServers(ctx, client, p.api)
				if err == nil && ok(urls) {
					out <- result{d: time.Since(start)}
					return
				}
				last = err
				select {
				case <-ctx.Done():
					out <- result{err: fmt.Errorf("%s: %w (last: %v)", p.api, ctx.Err(), last)}
					return
				case <-time.After(2 * time.Millisecond):
				}
			}
		}()
	}
	var slowest time.Duration
	var errs []error
	for range procs {
		r := <-out
		if r.err != nil {
			errs = append(errs, r.err)
		}
		slowest = max(slowest, r.d)
	}
	return slowest, errors.Join(errs...)
}

func traefikServers(ctx context.Context, client *http.Client, api string) ([]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, api, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", api, resp.Status)
	}
	var svc struct {
		LoadBalancer struct {
			Servers []struct {
				URL string `json:"url"`
			} `json:"servers"`
		} `json:"loadBalancer"`
	}
	if err := json.Unmarshal(b, &svc); err != nil {
		return nil, err
	}
	var urls []string
	for _, s := range svc.LoadBalancer.Servers {
		urls = append(urls, s.URL)
	}
	return urls, nil
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

// freePorts returns n free loopback ports.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
