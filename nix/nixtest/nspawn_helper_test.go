package nixtest

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/registry"
)

// etcdHelperEnv, when set, makes the test binary act as the cluster's etcd
// inside the booted machine of TestNspawnModuleUnitsRun instead of running
// tests: a TLS etcd with client-certificate auth on 127.0.0.1:2379 (the
// machine's private loopback), seeded with one app, ready by sd_notify.
// Once meshd has published its member record it seals MDT_NIX_SECRET to
// it, as `meshctl secret put` would.
const etcdHelperEnv = "MDT_NIX_ETCD_HELPER"

// etcdHelperEndpoint is where the helper serves, inside the machine.
const etcdHelperEndpoint = "https://127.0.0.1:2379"

func runEtcdHelper() error {
	dir := os.Getenv("MDT_NIX_ETCD_DIR")
	ca, cert, key := os.Getenv("MDT_NIX_ETCD_CA"), os.Getenv("MDT_NIX_ETCD_CERT"), os.Getenv("MDT_NIX_ETCD_KEY")
	port, err := strconv.Atoi(os.Getenv("MDT_NIX_APP_PORT"))
	if err != nil {
		return fmt.Errorf("MDT_NIX_APP_PORT: %w", err)
	}
	cu, _ := url.Parse(etcdHelperEndpoint)
	pu, _ := url.Parse("http://127.0.0.1:2380")
	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir = "default", dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = "default=" + pu.String()
	cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile, cfg.ClientTLSInfo.TrustedCAFile = cert, key, ca
	cfg.ClientTLSInfo.ClientCertAuth = true
	cfg.TickMs, cfg.ElectionMs = 10, 100
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		return fmt.Errorf("etcd not ready in 30s")
	}
	// The server certificate is also a client certificate (pki.Server).
	cli, err := etcdclient.New(etcdclient.Options{Endpoints: []string{etcdHelperEndpoint},
		CAFile: ca, CertFile: cert, KeyFile: key, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	g := registry.GroupServices
	if _, err := cli.Txn(ctx).Then(
		clientv3.OpPut(registry.MetaKey(g, "mongodb"), fmt.Sprintf(`{"env":{"HOST":"127.0.0.1","PORT":%d,"PROTOCOL":"tcp"},"env_prefix":"APP_MONGODB_POD","publish":{"port":%d}}`, port, port)),
		clientv3.OpPut(registry.InstanceKey(g, "mongodb", "service001"), `{"ipv4":"10.10.21.0","node":"service001","port":27017}`),
	).Commit(); err != nil {
		return fmt.Errorf("seed: %w", err)
	}
	if _, err := sddaemon.SdNotify(false, sddaemon.SdNotifyReady); err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	go func() {
		if err := putSecretWhenMember(cli, os.Getenv("MDT_NIX_NODE"), os.Getenv("MDT_NIX_SECRET_NAME"), os.Getenv("MDT_NIX_SECRET")); err != nil {
			fmt.Fprintln(os.Stderr, "etcd helper: put secret:", err)
		}
	}()
	<-sig
	return nil
}

// putSecretWhenMember waits until node has published its age recipient,
// then seals the secret to it.
func putSecretWhenMember(cli *clientv3.Client, node, name, value string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := cli.Watch(ctx, registry.MemberKey(node))
	for {
		if r, err := cli.Get(ctx, registry.MemberKey(node)); err == nil && len(r.Kvs) == 1 {
			if m, err := registry.DecodeMember(node, r.Kvs[0].Value); err == nil && m.Recipient != "" {
				_, err := creds.PutSecret(ctx, cli, name, []byte(value), creds.Targets{Nodes: []string{node}})
				return err
			}
		}
		select {
		case <-w:
		case <-ctx.Done():
			return fmt.Errorf("no member record with a recipient for %s: %w", node, ctx.Err())
		}
	}
}
