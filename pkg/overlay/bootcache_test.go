package overlay

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

func sampleState() desired.State {
	return desired.State{
		Addresses:  []netip.Prefix{netip.MustParsePrefix("10.10.1.0/32")},
		ListenPort: 51820,
		RouteTable: 51820,
		Network:    netip.MustParsePrefix("10.0.0.0/8"),
		Peers: []desired.Peer{{
			Name:       "b",
			PublicKey:  "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE=",
			Endpoint:   netip.MustParseAddrPort("192.0.2.1:51820"),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.10.2.0/24")},
			Keepalive:  25 * time.Second,
		}},
		Routes: []netip.Prefix{netip.MustParsePrefix("10.10.2.0/24")},
	}
}

func TestCacheRoundTrip(t *testing.T) {
	dir := t.TempDir()
	if _, err := loadCache(dir); !errors.Is(err, ErrNoCache) {
		t.Fatalf("empty dir: err = %v, want ErrNoCache", err)
	}
	want := cacheFile{Interface: "wg0", Revision: 42, State: sampleState()}
	want.State.Problems = []desired.Problem{{Member: "x", Err: "not stored"}}
	if err := saveCache(dir, want); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(filepath.Join(dir, CacheFile))
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("cache mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := loadCache(dir)
	if err != nil {
		t.Fatal(err)
	}
	want.Version = cacheVersion
	want.State.Problems = nil
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
		cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}
}

func TestCacheRejectsBadFiles(t *testing.T) {
	hijack := sampleState()
	hijack.Peers[0].AllowedIPs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}
	for name, content := range map[string]string{
		"garbage":     "{not json",
		"old version": `{"version": 0, "state": {}}`,
		"no address":  `{"version": 1, "state": {"listenPort": 51820}}`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, CacheFile), []byte(content), 0o600)
			if _, err := loadCache(dir); err == nil || errors.Is(err, ErrNoCache) {
				t.Errorf("err = %v, want a decode error", err)
			}
		})
	}
	t.Run("allowed ips outside network", func(t *testing.T) {
		dir := t.TempDir()
		if err := saveCache(dir, cacheFile{State: hijack}); err != nil {
			t.Fatal(err)
		}
		if _, err := loadCache(dir); err == nil {
			t.Error("a cache routing 0.0.0.0/0 to a peer was accepted")
		}
	})
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
