package e2e

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// legacyFlannelNode is a TEST FIXTURE standing in for a nix-infra node
// that runs flanneld (WireGuard backend) and confd + HAProxy. It is not
// flannel: flanneld's WireGuard backend needs the kernel's wireguard
// module, which this machine lacks. It does what flanneld v0.28 does,
// step by step, with userspace WireGuard (meshd's device host) in the
// node's namespace, and renders HAProxy as nix-infra's confd template
// does (../shared/NIX-INFRA.md). The sandbox node's meshd stays stopped
// while the fixture runs.
type legacyFlannelNode struct {
	n     *sandbox.Node
	cli   *clientv3.Client
	meshd string // binary hosting the userspace device
	iface string

	keyFile string
	subnet  netip.Prefix

	cancel context.CancelFunc
	wg     sync.WaitGroup
	dev    *exec.Cmd
	hap    *exec.Cmd
}

// flannelNetworkConfig is nix-infra's /coreos.com/network/config.
const flannelNetworkConfig = `{"Backend":{"PersistentKeepaliveInterval":60,"Type":"wireguard"},"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0"}`

func newLegacyFlannelNode(c *sandbox.Cluster, n *sandbox.Node, meshdBin string) *legacyFlannelNode {
	return &legacyFlannelNode{n: n, cli: c.Client(), meshd: meshdBin,
		iface: c.Name() + "fl", keyFile: legacyKeyFile(n.Dir)}
}

// legacyKeyFile is where the fixture keeps its WireGuard key: flanneld's
// WIREGUARD_KEY_FILE.
func legacyKeyFile(nodeDir string) string { return filepath.Join(nodeDir, "flannel-wgkey") }

// startOverlay brings the fixture's overlay up as flanneld does.
func (l *legacyFlannelNode) startOverlay(ctx context.Context) error {
	// pkg/backend/wireguard/device.go, setupKeys: read WIREGUARD_KEY_FILE,
	// or generate a key and write it there (mode 0400, no newline).
	if _, err := os.Stat(l.keyFile); os.IsNotExist(err) {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return err
		}
		if err := os.WriteFile(l.keyFile, []byte(k.String()), 0o400); err != nil {
			return err
		}
	}
	b, err := os.ReadFile(l.keyFile)
	if err != nil {
		return err
	}
	key, err := wgtypes.ParseKey(string(b))
	if err != nil {
		return fmt.Errorf("key file: %w", err)
	}
	// device.go, newWGDevice/ensureLink: a WireGuard link (here a
	// userspace device in the node's namespace, with the node's private
	// /run/wireguard), MTU = uplink MTU - 80; then ConfigureDevice with
	// the private key and ListenPort 51820.
	wgDir := filepath.Join(l.n.RunDir, "wireguard")
	if err := os.MkdirAll(wgDir, 0o700); err != nil {
		return err
	}
	l.dev = exec.Command("ip", "netns", "exec", l.n.NS, "sh", "-c",
		`mount --bind "$WGDIR" /run/wireguard && exec "$0" "$1"`, l.meshd, "--meshd-wireguard-device="+l.iface)
	l.dev.Env = append(os.Environ(), "WGDIR="+wgDir)
	l.dev.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := l.dev.Start(); err != nil {
		return err
	}
	go l.dev.Wait() // reaped; stopOverlay waits on the interface
	if _, err := eventually(10*time.Second, 50*time.Millisecond, func() error {
		_, err := l.n.Exec(ctx, "wg", "show", l.iface)
		return err
	}); err != nil {
		return fmt.Errorf("legacy device: %w", err)
	}
	if _, err := l.n.Exec(ctx, "wg", "set", l.iface, "private-key", l.keyFile, "listen-port", "51820"); err != nil {
		return err
	}
	// pkg/subnet/etcd/local_manager.go, tryAcquireLease: reuse the lease
	// whose PublicIP is ours (updateSubnet: a fresh 24 h lease, put), or
	// take a free subnet (createSubnet: put only if the key is absent).
	if err := l.acquireLease(ctx, key.PublicKey().String()); err != nil {
		return err
	}
	// device.go, Configure: the subnet's .0 as a /32 on the link, link up,
	// a link-scope route for the whole network through it.
	for _, args := range [][]string{
		{"-n", l.n.NS, "link", "set", l.iface, "mtu", "1420"},
		{"-n", l.n.NS, "addr", "replace", l.subnet.Addr().String() + "/32", "dev", l.iface},
		{"-n", l.n.NS, "link", "set", l.iface, "up"},
		{"-n", l.n.NS, "route", "replace", "10.0.0.0/8", "dev", l.iface, "scope", "link"},
	} {
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	// wireguard_network.go, Run/handleSubnetEvents: watch the leases and
	// add every other WireGuard lease as a peer.
	wctx, cancel := context.WithCancel(context.Background())
	prev := l.cancel // a running confd HAProxy's watch (rollback order)
	l.cancel = func() {
		cancel()
		if prev != nil {
			prev()
		}
	}
	l.wg.Add(1)
	go func() { defer l.wg.Done(); l.watchLeases(wctx) }()
	return nil
}

func (l *legacyFlannelNode) acquireLease(ctx context.Context, pub string) error {
	val, err := registry.EncodeFlannelLease(l.n.Addr, pub, 51820)
	if err != nil {
		return err
	}
	resp, err := l.cli.Get(ctx, registry.FlannelSubnetPrefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	used := map[netip.Prefix]bool{}
	for _, kv := range resp.Kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil || pk.Kind != registry.KindFlannelLease {
			continue
		}
		used[pk.Subnet] = true
		if fl, err := registry.DecodeFlannelLease(pk.Subnet, kv.Value); err == nil && fl.PublicIP == l.n.Addr.String() {
			g, err := l.cli.Grant(ctx, int64(registry.FlannelLeaseTTL/time.Second))
			if err != nil {
				return err
			}
			l.subnet = pk.Subnet
			_, err = l.cli.Put(ctx, string(kv.Key), string(val), clientv3.WithLease(g.ID))
			return err
		}
	}
	for {
		p, err := registry.PickSubnet(registry.DefaultPool, used, netip.Prefix{})
		if err != nil {
			return err
		}
		g, err := l.cli.Grant(ctx, int64(registry.FlannelLeaseTTL/time.Second))
		if err != nil {
			return err
		}
		key := registry.FlannelSubnetKey(p)
		tr, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.Version(key), "=", 0)).
			Then(clientv3.OpPut(key, string(val), clientv3.WithLease(g.ID))).Commit()
		if err != nil {
			return err
		}
		if tr.Succeeded {
			l.subnet = p
			return nil
		}
		used[p] = true
	}
}

// watchLeases keeps the peers in line with the leases: EventAdded ->
// addPeer (endpoint PublicIP:Port, AllowedIPs the subnet, keepalive
// PersistentKeepaliveInterval), EventRemoved -> removePeer, skipping our
// own subnet and other backends, as handleSubnetEvents does.
func (l *legacyFlannelNode) watchLeases(ctx context.Context) {
	have := map[netip.Prefix]string{}
	for ctx.Err() == nil {
		resp, err := l.cli.Get(ctx, registry.FlannelSubnetPrefix, clientv3.WithPrefix())
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		want := map[netip.Prefix]registry.FlannelLease{}
		for _, kv := range resp.Kvs {
			pk, err := registry.ParseKey(string(kv.Key))
			if err != nil || pk.Kind != registry.KindFlannelLease || pk.Subnet == l.subnet {
				continue
			}
			if fl, err := registry.DecodeFlannelLease(pk.Subnet, kv.Value); err == nil && fl.WireGuard != nil {
				want[pk.Subnet] = fl
			}
		}
		for p, fl := range want {
			ep := registry.FlannelEndpoint(fl, nil)
			if have[p] == fl.WireGuard.PublicKey+ep.String() {
				continue
			}
			if _, err := l.n.Exec(ctx, "wg", "set", l.iface, "peer", fl.WireGuard.PublicKey, "endpoint", ep.String(),
				"allowed-ips", p.String(), "persistent-keepalive", "60"); err == nil {
				have[p] = fl.WireGuard.PublicKey + ep.String()
			}
		}
		for p, k := range have {
			if _, ok := want[p]; !ok {
				l.n.Exec(ctx, "wg", "set", l.iface, "peer", k[:44], "remove") // retried next round
				delete(have, p)
			}
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		w := l.cli.Watch(wctx, registry.FlannelSubnetPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		select {
		case <-w:
		case <-wctx.Done():
		}
		cancel()
	}
}

// stopOverlay stops the fixture's overlay as flanneld's exit does
// (newWGDevice: the link is removed when flanneld ends); the lease stays.
func (l *legacyFlannelNode) stopOverlay(ctx context.Context) {
	if l.cancel != nil {
		l.cancel()
		l.wg.Wait()
	}
	exec.CommandContext(ctx, "ip", "-n", l.n.NS, "link", "del", l.iface).Run() // gone already is fine
	if l.dev != nil && l.dev.Process != nil {
		l.dev.Process.Signal(syscall.SIGTERM) // exits when its link goes
	}
	eventually(5*time.Second, 20*time.Millisecond, func() error { // best effort
		if _, err := l.n.Exec(ctx, "wg", "show", l.iface); err == nil {
			return fmt.Errorf("still there")
		}
		return nil
	})
}

// confdRender is nix-infra's confd template for this node: a stats
// socket; mode tcp, timeouts 5 s/50 s/50 s; per consumed group, per app
// with meta_data, a listener tcp-in-<group>-<app> on 127.0.0.1:<port> and
// a backend <app>, roundrobin, one "server <node> <ipv4>:<port> check"
// per instance.
func (l *legacyFlannelNode) confdRender(ctx context.Context, groups []registry.Group) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "global\n    stats socket %s mode 600 level admin expose-fd listeners\n", filepath.Join(l.n.Dir, "confd-stats.sock"))
	b.WriteString("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 50s\n    timeout server 50s\n")
	for _, g := range groups {
		resp, err := l.cli.Get(ctx, registry.ClusterPrefix+string(g)+"/", clientv3.WithPrefix())
		if err != nil {
			return "", err
		}
		snap := registry.SnapshotOf(kvs(resp), resp.Header.Revision)
		for _, id := range slices.SortedFunc(maps.Keys(snap.Apps), func(a, b registry.AppID) int { return strings.Compare(a.Name, b.Name) }) {
			app := snap.Apps[id]
			if app.Meta == nil {
				continue
			}
			fmt.Fprintf(&b, "frontend tcp-in-%s-%s\n    bind 127.0.0.1:%d\n    default_backend %s\n", g, id.Name, app.Meta.Publish.Port, id.Name)
			fmt.Fprintf(&b, "backend %s\n    balance roundrobin\n", id.Name)
			for _, in := range app.SortedInstances() {
				fmt.Fprintf(&b, "    server %s %s:%d check\n", in.Node, in.IPv4, in.Port)
			}
		}
	}
	return b.String(), nil
}

// startHAProxy runs haproxy (master-worker) in the namespace on the
// confd-rendered config and re-renders and reloads it when /cluster/
// changes, as confd with a reload command does.
func (l *legacyFlannelNode) startHAProxy(ctx context.Context, groups []registry.Group) error {
	cfgPath := filepath.Join(l.n.Dir, "confd-haproxy.cfg")
	sock := filepath.Join(l.n.Dir, "confd-master.sock")
	render := func() (bool, error) {
		cfg, err := l.confdRender(ctx, groups)
		if err != nil {
			return false, err
		}
		old, _ := os.ReadFile(cfgPath)
		if string(old) == cfg {
			return false, nil
		}
		return true, os.WriteFile(cfgPath, []byte(cfg), 0o600)
	}
	if _, err := render(); err != nil {
		return err
	}
	l.hap = exec.Command("ip", "netns", "exec", l.n.NS, "haproxy", "-W", "-S", sock, "-f", cfgPath)
	l.hap.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// HAProxy's alerts and warnings (a listener it could not bind or take
	// over on a reload), for a failing test to show: ConfdHAProxyLog.
	logf, err := os.OpenFile(l.ConfdHAProxyLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	l.hap.Stdout, l.hap.Stderr = logf, logf
	if err := l.hap.Start(); err != nil {
		logf.Close()
		return err
	}
	logf.Close()    // the child holds its own copy
	go l.hap.Wait() // reaped
	if _, err := eventually(10*time.Second, 50*time.Millisecond, func() error {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
		}
		return err
	}); err != nil {
		return fmt.Errorf("confd haproxy: %w", err)
	}
	hctx, cancel := context.WithCancel(context.Background())
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		w := l.cli.Watch(hctx, registry.ClusterPrefix, clientv3.WithPrefix())
		for range w {
			if changed, err := render(); err == nil && changed {
				// One reload at a time, each until HAProxy has its new
				// worker, as a reload command that waits for the service
				// to be ready again does (systemd's for HAProxy's notify
				// unit); a failed one is retried by the next change.
				rctx, rcancel := context.WithTimeout(hctx, 10*time.Second)
				haproxycfg.Master{Socket: sock}.Reload(rctx)
				rcancel()
			}
		}
	}()
	prev := l.cancel
	l.cancel = func() {
		cancel()
		if prev != nil {
			prev()
		}
	}
	return nil
}

// ConfdHAProxyLog is where the confd HAProxy's own output goes.
func (l *legacyFlannelNode) ConfdHAProxyLog() string {
	return filepath.Join(l.n.Dir, "confd-haproxy.log")
}

// stopHAProxy soft-stops the confd HAProxy (SIGUSR1 to the master: the
// workers finish their connections, then exit).
func (l *legacyFlannelNode) stopHAProxy() {
	if l.hap != nil && l.hap.Process != nil {
		syscall.Kill(-l.hap.Process.Pid, syscall.SIGUSR1) // gone already is fine
	}
}

// lookupOverlayIP is nix-infra's CLI lookup of a node's overlay address:
// the lease under /coreos.com/network/subnets whose PublicIP is the
// node's, and the address part of its key.
func lookupOverlayIP(ctx context.Context, cli *clientv3.Client, publicIP netip.Addr) (string, error) {
	resp, err := cli.Get(ctx, registry.FlannelSubnetPrefix, clientv3.WithPrefix())
	if err != nil {
		return "", err
	}
	var found []string
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), registry.FlannelSubnetPrefix)
		p, err := registry.ParsePrefixName(name)
		if err != nil {
			continue
		}
		if fl, err := registry.DecodeFlannelLease(p, kv.Value); err == nil && fl.PublicIP == publicIP.String() {
			found = append(found, p.Addr().String())
		}
	}
	if len(found) != 1 {
		return "", fmt.Errorf("%d leases with PublicIP %s: %v", len(found), publicIP, found)
	}
	return found[0], nil
}
