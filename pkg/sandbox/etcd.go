package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/meshd/meshd/pkg/etcdembed"
)

// startEtcd starts the in-process etcd with its listeners inside the hub
// namespace (the embed package creates them synchronously, on the calling
// thread).
func (c *Cluster) startEtcd() error {
	return inNetns(c.HubNS(), func() error {
		s, err := etcdembed.Start(etcdembed.Options{
			Dir:       filepath.Join(c.workDir, "etcd"),
			ClientURL: "http://" + netip.AddrPortFrom(hubAddr, EtcdPort).String(),
			PeerURL:   "http://127.0.0.1:2380",
		})
		if err != nil {
			return err
		}
		c.etcd = s
		return nil
	})
}

// StopEtcd stops etcd, keeping its data: nodes lose their registry until
// StartEtcd.
func (c *Cluster) StopEtcd() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.etcd != nil {
		c.etcd.Stop()
	}
}

// StartEtcd starts a stopped etcd again on the same address and data.
func (c *Cluster) StartEtcd() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.etcd == nil {
		return errors.New("etcd was never started")
	}
	return inNetns(c.HubNS(), c.etcd.Restart)
}

// newClient returns an etcd client whose connections are opened inside the
// hub namespace.
func (c *Cluster) newClient() (*clientv3.Client, error) {
	hub := c.HubNS()
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{c.EtcdEndpoint()},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialIn(ctx, hub, "tcp", addr)
		})},
	})
}

// NewClient returns a further etcd client of the sandbox (benchmarks give
// each simulated watcher its own connection); the caller closes it.
func (c *Cluster) NewClient() (*clientv3.Client, error) { return c.newClient() }

// forwarder accepts on a host loopback address and splices each
// connection to one dialed by dial (inside the hub namespace).
type forwarder struct {
	l    net.Listener
	dial func(context.Context) (net.Conn, error)
	log  *slog.Logger
	wg   sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

func newForwarder(addr string, dial func(context.Context) (net.Conn, error), log *slog.Logger) (*forwarder, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("forward address %q: want a loopback address:port", addr)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("forwarder: %w", err)
	}
	f := &forwarder{l: l, dial: dial, log: log, conns: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go f.serve()
	return f, nil
}

func (f *forwarder) Addr() net.Addr { return f.l.Addr() }

func (f *forwarder) serve() {
	defer f.wg.Done()
	for {
		in, err := f.l.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			f.splice(in)
		}()
	}
}

func (f *forwarder) track(c net.Conn, add bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns == nil {
		return false
	}
	if add {
		f.conns[c] = struct{}{}
	} else {
		delete(f.conns, c)
	}
	return true
}

func (f *forwarder) splice(in net.Conn) {
	defer in.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	out, err := f.dial(ctx)
	cancel()
	if err != nil {
		f.log.Warn("forward to etcd", "err", err)
		return
	}
	defer out.Close()
	if !f.track(in, true) || !f.track(out, true) {
		return
	}
	defer f.track(in, false)
	defer f.track(out, false)
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(out, in)
	go cp(in, out)
	<-done
	<-done
}

// Close stops accepting and cuts every forwarded connection.
func (f *forwarder) Close() {
	f.l.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.conns = nil
	f.mu.Unlock()
	f.wg.Wait()
}
