package hetzner_test

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"

	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
)

const testToken = "hc-test-token-5ecret"

// sleeps records the waits of the retrying transport instead of waiting,
// and moves a clock on by them that the fake's rate limit refills by.
type sleeps struct {
	mu    sync.Mutex
	d     []time.Duration
	clock time.Duration
}

// epoch is where the test clock starts.
var epoch = time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)

func (s *sleeps) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.d = append(s.d, d)
	s.clock += d
	return ctx.Err()
}

func (s *sleeps) now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return epoch.Add(s.clock)
}

func (s *sleeps) all() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.d...)
}

func newClient(t *testing.T, f *hcloudfake.Server, sl *sleeps) *hcloud.Client {
	t.Helper()
	f.Now = sl.now
	c, err := hetzner.NewClient(hetzner.ClientOptions{
		Token: testToken, Endpoint: f.URL(), PollInterval: time.Millisecond,
		Retry: hetzner.RetryOptions{Sleep: sl.sleep, Now: sl.now, Rand: func() float64 { return 0 }},
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sshKeyLine makes a real ed25519 public key line from a fixed seed.
func sshKeyLine(seed byte, comment string) string {
	priv := ed25519.NewKeyFromSeed(make32(seed))
	pub := priv.Public().(ed25519.PublicKey)
	var blob []byte
	for _, part := range [][]byte{[]byte("ssh-ed25519"), pub} {
		blob = binary.BigEndian.AppendUint32(blob, uint32(len(part)))
		blob = append(blob, part...)
	}
	return "ssh-ed25519 " + base64.StdEncoding.EncodeToString(blob) + " " + comment
}

func make32(b byte) []byte {
	s := make([]byte, 32)
	for i := range s {
		s[i] = b
	}
	return s
}

func baseOptions(t *testing.T, names ...string) hetzner.ProvisionOptions {
	t.Helper()
	pk, err := hetzner.ParsePublicKey(sshKeyLine(1, "ops@laptop"))
	if err != nil {
		t.Fatal(err)
	}
	return hetzner.ProvisionOptions{
		Cluster: "prod", Names: names, ServerType: hetzner.DefaultServerType, Location: "hel1", Image: "debian-12",
		Role: "worker", Labels: map[string]string{"team": "infra"},
		SSHKeyFiles: []hetzner.PublicKey{pk},
		Network: &hetzner.NetworkSpec{Name: "prod-net", IPRange: netip.MustParsePrefix("172.20.0.0/16"),
			Subnet: netip.MustParsePrefix("172.20.1.0/24")},
		PlacementGroup: "prod-spread", Firewall: "prod-meshd", WireGuardPort: 51820,
		NixChannel: hetzner.DefaultNixChannel, InfectURL: hetzner.DefaultInfectURL, InfectSHA256: hetzner.DefaultInfectSHA256,
		Parallel: 2, PollInterval: time.Millisecond,
	}
}

func decodeBody[T any](t *testing.T, r hcloudfake.Request) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(r.Body, &v); err != nil {
		t.Fatalf("%s %s body: %v", r.Method, r.Path, err)
	}
	return v
}
