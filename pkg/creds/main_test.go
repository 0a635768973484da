package creds

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/registry"
)

// helperEnv, when set, makes the test binary act as a minimal meshd node
// instead of running tests: the nspawn test starts it as a unit inside the
// booted container, where it runs the component with its real defaults
// (systemd-creds with the machine's host key, systemd over D-Bus).
const helperEnv = "MDT_CREDS_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		if err := runHelper(); err != nil {
			fmt.Fprintln(os.Stderr, "helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runHelper applies the node's secrets once, as read from etcd, and writes
// its log and status under MDT_CREDS_OUT.
func runHelper() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out := os.Getenv("MDT_CREDS_OUT")
	logf, err := os.Create(out + "/helper.log")
	if err != nil {
		return err
	}
	defer logf.Close()
	units := map[string]SecretUse{}
	for _, kv := range strings.Fields(os.Getenv("MDT_CREDS_UNITS")) {
		name, unit, _ := strings.Cut(kv, "=")
		units[name] = SecretUse{Units: []string{unit}}
	}
	node := os.Getenv("MDT_CREDS_NODE")
	comp, err := New(Options{Self: node, StateDir: os.Getenv("MDT_CREDS_STATE"), Units: units},
		slog.New(slog.NewJSONHandler(logf, nil)), nil)
	if err != nil {
		return err
	}
	cli, err := etcdclient.New(etcdclient.Options{Endpoints: []string{os.Getenv("MDT_CREDS_ETCD")}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, registry.SecretsNodePrefix(node), clientv3.WithPrefix())
	if err != nil {
		return err
	}
	var kvs []registry.KV
	for _, kv := range resp.Kvs {
		kvs = append(kvs, registry.KV{Key: string(kv.Key), Value: kv.Value})
	}
	applyErr := comp.Apply(ctx, registry.SnapshotOf(kvs, resp.Header.Revision))
	st, _ := json.Marshal(comp.Status())
	if err := os.WriteFile(out+"/helper-status.json", st, 0o644); err != nil {
		return err
	}
	return applyErr
}
