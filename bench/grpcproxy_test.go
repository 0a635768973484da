package bench

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/etcdtest"
)

// TestProxyKeepsMeshdConnection holds a client built as meshd builds its
// own (pkg/etcdclient: keep-alive pings every 10 s once gRPC's floor
// applies) idle behind the proxy for longer than three pings: the proxy,
// run with `etcd grpc-proxy start`'s default keep-alive policy, keeps the
// connection (gRPC's own default would close it for too many pings after
// the third), and the watch still delivers.
func TestProxyKeepsMeshdConnection(t *testing.T) {
	t.Parallel()
	s := etcdtest.New(t)
	proxy, err := StartGRPCProxy(s.Endpoint(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	cli, err := etcdclient.New(etcdclient.Options{Endpoints: []string{proxy.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	wch := cli.Watch(ctx, "/k", clientv3.WithCreatedNotify())
	if wr := <-wch; !wr.Created {
		t.Fatalf("watch not created: %v", wr.Err())
	}
	conn := cli.ActiveConnection()
	if st := conn.GetState(); st != connectivity.Ready {
		t.Fatalf("connection %v after the watch was created", st)
	}
	// Four idle ping intervals and a margin: under gRPC's default policy
	// the proxy sends its GOAWAY at the third ping (30 s, seen when this
	// test was written against a proxy without the policy).
	idle, icancel := context.WithTimeout(ctx, 45*time.Second)
	defer icancel()
	if conn.WaitForStateChange(idle, connectivity.Ready) {
		t.Fatalf("the proxy closed an idle meshd connection: state %v", conn.GetState())
	}
	ctl, err := s.Client()
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	if _, err := ctl.Put(ctx, "/k", "v"); err != nil {
		t.Fatal(err)
	}
	if wr := <-wch; len(wr.Events) != 1 || string(wr.Events[0].Kv.Value) != "v" {
		t.Fatalf("after the idle period: %+v, %v", wr.Events, wr.Err())
	}
}
