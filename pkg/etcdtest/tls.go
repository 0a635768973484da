package etcdtest

import (
	"fmt"
	"net/url"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/meshd/meshd/pkg/etcdclient"
)

// TLSFiles names a certificate, its key and the CA that checks the other
// side, all PEM files.
type TLSFiles struct {
	CAFile   string
	CertFile string
	KeyFile  string
}

// TLSServer is a single-member etcd that serves clients over TLS only and
// requires a client certificate signed by its CA (--client-cert-auth), so
// that, once auth is enabled, the certificate's common name is the etcd
// user. This is how nix-infra's control nodes run etcd.
type TLSServer struct {
	Etcd     *embed.Etcd
	dir      string
	endpoint string
}

// StartTLS starts a TLS server with its data in a new temporary directory.
// server must be a certificate valid for 127.0.0.1.
func StartTLS(server TLSFiles) (*TLSServer, error) {
	dir, err := os.MkdirTemp("", "meshd-etcd-tls-")
	if err != nil {
		return nil, err
	}
	cu, _ := url.Parse("https://127.0.0.1:0")
	pu, _ := url.Parse("http://127.0.0.1:0")
	cfg := embed.NewConfig()
	cfg.Name = "default"
	cfg.Dir = dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = "default=" + pu.String()
	cfg.ClientTLSInfo.CertFile = server.CertFile
	cfg.ClientTLSInfo.KeyFile = server.KeyFile
	cfg.ClientTLSInfo.TrustedCAFile = server.CAFile
	cfg.ClientTLSInfo.ClientCertAuth = true
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start tls etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("tls etcd did not become ready in 30s")
	}
	return &TLSServer{Etcd: e, dir: dir, endpoint: "https://" + e.Clients[0].Addr().String()}, nil
}

// Endpoint is the https client URL.
func (s *TLSServer) Endpoint() string { return s.endpoint }

// Close stops the server and removes its data.
func (s *TLSServer) Close() {
	if s.Etcd != nil {
		s.Etcd.Close()
		s.Etcd = nil
	}
	os.RemoveAll(s.dir)
}

// Client returns a client that authenticates with the given certificate,
// built the way meshd and meshctl build theirs (pkg/etcdclient).
func (s *TLSServer) Client(f TLSFiles) (*clientv3.Client, error) {
	return etcdclient.New(etcdclient.Options{
		Endpoints: []string{s.endpoint},
		CAFile:    f.CAFile, CertFile: f.CertFile, KeyFile: f.KeyFile,
		DialTimeout: 5 * time.Second,
	})
}

// NewTLS starts a TLS server for a test and stops it when the test ends.
func NewTLS(t testing.TB, server TLSFiles) *TLSServer {
	t.Helper()
	s, err := StartTLS(server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// NewTLSClient returns a client of s with certificate f, closed when the
// test ends.
func NewTLSClient(t testing.TB, s *TLSServer, f TLSFiles) *clientv3.Client {
	t.Helper()
	c, err := s.Client(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
