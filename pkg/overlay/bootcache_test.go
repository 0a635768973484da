package overlay

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
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

// TestCacheWriterCoalesces: while the writer runs, offer returns without
// writing; offers made during a write end in one more write, of the
// newest state; and the writer writes what is pending when it stops.
func TestCacheWriterCoalesces(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var written []int64 // revisions, in write order
	started, release := make(chan struct{}, 16), make(chan struct{})
	b := &bootCache{dir: dir, iface: "wg0", write: func(d string, c cacheFile) error {
		started <- struct{}{}
		<-release
		err := saveCache(d, c)
		mu.Lock()
		written = append(written, c.Revision)
		mu.Unlock()
		return err
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.run(ctx, slog.New(slog.DiscardHandler)); close(done) }()
	waitFor(t, 10*time.Second, "writer running", func() bool { b.mu.Lock(); defer b.mu.Unlock(); return b.running })
	st := sampleState()
	if err := b.offer(st, 1, 10); err != nil {
		t.Fatal(err)
	}
	<-started // the first write is under way, and blocked
	for i := range 5 {
		st.Peers[0].Keepalive = time.Duration(i+1) * time.Second // a different state each time
		if err := b.offer(st, uint64(2+i), int64(11+i)); err != nil {
			t.Fatal(err)
		}
	}
	release <- struct{}{} // the first write ends
	<-started             // the second starts: the newest offer
	release <- struct{}{}
	waitFor(t, 10*time.Second, "two writes", func() bool { mu.Lock(); defer mu.Unlock(); return len(written) == 2 })
	mu.Lock()
	if want := []int64{10, 15}; !slices.Equal(written, want) {
		t.Errorf("written revisions %v, want %v", written, want)
	}
	mu.Unlock()
	if got, err := loadCache(dir); err != nil || got.Revision != 15 {
		t.Errorf("cache holds revision %d (%v), want 15", got.Revision, err)
	}

	// An offer pending when the writer stops is written before it returns.
	b.mu.Lock()
	b.pending = &cacheEntry{st: sampleState(), gen: 20, rev: 30}
	b.mu.Unlock()
	close(release) // every further write goes through
	cancel()
	<-done
	if got, err := loadCache(dir); err != nil || got.Revision != 30 {
		t.Errorf("after stop the cache holds revision %d (%v), want 30", got.Revision, err)
	}
	// Stopped, offer writes at once; an older generation never replaces a
	// newer one.
	if err := b.offer(sampleState(), 19, 29); err != nil {
		t.Fatal(err)
	}
	if got, _ := loadCache(dir); got.Revision != 30 {
		t.Errorf("an older generation replaced the cache: revision %d, want 30", got.Revision)
	}
}

// TestCacheWriteOutcomeNotifies: the status hears of a write that fails,
// and of the next that works, and of nothing in between.
func TestCacheWriteOutcomeNotifies(t *testing.T) {
	fail := errors.New("read-only file system")
	var werr error
	calls := 0
	b := &bootCache{dir: t.TempDir(), iface: "wg0",
		write:   func(d string, c cacheFile) error { return errors.Join(werr, saveCache(d, c)) },
		changed: func() { calls++ }}
	st := sampleState()
	for i, step := range []struct {
		err   error
		calls int
	}{{nil, 0}, {fail, 1}, {fail, 1}, {nil, 2}, {nil, 2}} {
		werr = step.err
		st.Peers[0].Keepalive = time.Duration(i+1) * time.Second
		if err := b.offer(st, uint64(i+1), int64(i+1)); (err != nil) != (step.err != nil) {
			t.Errorf("write %d: err %v, want %v", i, err, step.err)
		}
		if calls != step.calls || (b.lastErr() != nil) != (step.err != nil) {
			t.Errorf("write %d: %d notifications, lastErr %v; want %d, failing %v", i, calls, b.lastErr(), step.calls, step.err != nil)
		}
	}
}
