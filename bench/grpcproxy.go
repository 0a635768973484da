package bench

import (
	"context"
	"fmt"
	"math"
	"net"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/proxy/grpcproxy"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// GRPCProxy is etcd's gRPC proxy (`etcd grpc-proxy start`) run in this
// process: the same grpcproxy servers, registered the way etcd's own
// etcdmain.newGRPCProxyServer registers them, with its default gRPC
// server options, on a plain-text listener.
// Its watch proxy coalesces identical watches (same key range, same or
// compatible start revision) into one upstream watch and fans the events
// out to its clients, which is what it is here for.
type GRPCProxy struct {
	// Endpoint is the proxy's client URL.
	Endpoint string
	client   *clientv3.Client
	server   *grpc.Server
	cancel   context.CancelFunc
}

// StartGRPCProxy serves a proxy for the etcd at upstream on 127.0.0.1,
// logging to lg (nil: nowhere). The services are those `etcd grpc-proxy
// start` serves that meshd and the bench use: KV, Watch, Lease and
// Maintenance (Auth too; no cluster registration, election or lock).
func StartGRPCProxy(upstream string, lg *zap.Logger) (*GRPCProxy, error) {
	if lg == nil {
		lg = zap.NewNop()
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{upstream}, Logger: lg})
	if err != nil {
		return nil, fmt.Errorf("grpc proxy: upstream client: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	kvp, _ := grpcproxy.NewKvProxy(cli)
	watchp, _ := grpcproxy.NewWatchProxy(ctx, lg, cli)
	leasep, _ := grpcproxy.NewLeaseProxy(ctx, cli)
	// The keep-alive options of `etcd grpc-proxy start` at its defaults
	// (--grpc-keepalive-min-time, -interval, -timeout). Without the
	// enforcement policy gRPC's own minimum (5 min) applies, and the proxy
	// would close every meshd connection for its keep-alive pings
	// (pkg/etcdclient: every 10 s once gRPC's floor applies) after the
	// third idle ping: TestProxyKeepsMeshdConnection.
	srv := grpc.NewServer(grpc.MaxConcurrentStreams(math.MaxUint32),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: embed.DefaultGRPCKeepAliveMinTime}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: embed.DefaultGRPCKeepAliveInterval, Timeout: embed.DefaultGRPCKeepAliveTimeout}))
	pb.RegisterKVServer(srv, kvp)
	pb.RegisterWatchServer(srv, watchp)
	pb.RegisterLeaseServer(srv, leasep)
	pb.RegisterMaintenanceServer(srv, grpcproxy.NewMaintenanceProxy(cli))
	pb.RegisterAuthServer(srv, grpcproxy.NewAuthProxy(cli))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		cli.Close()
		return nil, fmt.Errorf("grpc proxy: %w", err)
	}
	go srv.Serve(ln)
	return &GRPCProxy{Endpoint: "http://" + ln.Addr().String(), client: cli, server: srv, cancel: cancel}, nil
}

// Close stops the proxy.
func (p *GRPCProxy) Close() {
	p.cancel()
	p.server.Stop()
	p.client.Close()
}
