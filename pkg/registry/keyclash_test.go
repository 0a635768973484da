package registry_test

import (
	"context"
	"encoding/base64"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// TestKeyClashOlderClaimWins: a node that copies another node's WireGuard
// public key into its own member record is dropped and reported; the
// node whose subnet claim is older keeps its place. Checked both for a
// one-shot read (ReadSnapshot) and for a node's watch, where the clash
// arrives as a put event after the first listing.
func TestKeyClashOlderClaimWins(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	key := func(b byte) string {
		return base64.StdEncoding.EncodeToString([]byte(strings.Repeat(string(rune(b)), 32)))
	}
	put := func(k, v string) {
		t.Helper()
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	member := func(name, subnet, pub string) {
		p := netip.MustParsePrefix(subnet)
		put(registry.MemberKey(name), `{"name":"`+name+`","publicKey":"`+pub+`","subnet":"`+subnet+`","overlayIp":"`+p.Addr().String()+`"}`)
	}
	// The victim claimed first; the thief joined later.
	put(registry.SubnetKey(netip.MustParsePrefix("10.10.1.0/24")), `{"node":"victim"}`)
	member("victim", "10.10.1.0/24", key('v'))
	put(registry.SubnetKey(netip.MustParsePrefix("10.10.2.0/24")), `{"node":"thief"}`)
	member("thief", "10.10.2.0/24", key('t'))

	store, ch, _ := startWatcher(t, srv.Endpoint())
	waitFor(t, ch, "both members", func() bool { return len(store.Snapshot().Members) == 2 })

	member("thief", "10.10.2.0/24", key('v')) // copies the victim's key
	check := func(how string, snap *registry.Snapshot) {
		t.Helper()
		if _, ok := snap.Members["victim"]; !ok {
			t.Errorf("%s: the victim (older claim) was dropped", how)
		}
		if _, ok := snap.Members["thief"]; ok {
			t.Errorf("%s: the thief (younger claim) kept the victim's key", how)
		}
		found := false
		for _, p := range snap.Problems {
			found = found || p.Key == registry.MemberKey("thief") && strings.Contains(p.Err, "victim")
		}
		if !found {
			t.Errorf("%s: clash not reported: %v", how, snap.Problems)
		}
	}
	waitFor(t, ch, "the thief's record", func() bool {
		_, ok := store.Snapshot().Members["thief"]
		return !ok
	})
	check("watch", store.Snapshot())
	snap, err := registry.ReadSnapshot(ctx, cli)
	if err != nil {
		t.Fatal(err)
	}
	check("read", snap)
}
