package dashboard

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

func overlayStatus(t *testing.T, p overlay.PeerSummary) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(overlay.Status{Interface: "wg0", Applied: true, Peers: p})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func member(i int) registry.Member {
	return registry.Member{Name: "n", Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 10, byte(i), 0}), 24),
		OverlayIP: netip.AddrFrom4([4]byte{10, 10, byte(i), 0})}
}

func TestPeerMatrix(t *testing.T) {
	snap := &registry.Snapshot{
		Revision: 9,
		Nodes:    map[string]registry.Node{"a": {}, "b": {}, "c": {}, "d": {}},
		Members:  map[string]registry.Member{"a": member(1), "b": member(2), "c": member(3), "d": member(4)},
		Statuses: map[string]registry.Status{
			// a: every peer recent.
			"a": {Revision: 9, Seen: 9, Components: map[string]json.RawMessage{"overlay": overlayStatus(t, overlay.PeerSummary{Count: 3, Recent: 3})}},
			// b: c is stale, and one more stale peer is not listed.
			"b": {Revision: 9, Seen: 9, Components: map[string]json.RawMessage{"overlay": overlayStatus(t, overlay.PeerSummary{Count: 3, Recent: 1, Stale: []string{"c"}, StaleCount: 2})}},
			// c: has only one peer so far (d not configured yet).
			"c": {Revision: 9, Seen: 9, Components: map[string]json.RawMessage{"overlay": overlayStatus(t, overlay.PeerSummary{Count: 1, Recent: 1})}},
			// d: no status at all.
		},
	}
	v := Build(snap, newMemory(time.Unix(0, 0)), time.Unix(100, 0))
	want := PeerMatrix{
		Nodes: []string{"a", "b", "c", "d"},
		Cells: [][]string{
			{"self", "up", "up", "up"},
			{"unknown", "self", "stale", "unknown"},
			{"unknown", "unknown", "self", "unknown"},
			{"unknown", "unknown", "unknown", "self"},
		},
		Total: 4,
	}
	if diff := cmp.Diff(want, v.Peers); diff != "" {
		t.Errorf("matrix (-want +got):\n%s", diff)
	}
}

// TestLargeMatrixKeepsTheNodesThatMatter: beyond MaxMatrixNodes only the
// nodes in a cell that is not up are kept.
func TestLargeMatrixKeepsTheNodesThatMatter(t *testing.T) {
	const n = 100
	snap := &registry.Snapshot{Nodes: map[string]registry.Node{}, Members: map[string]registry.Member{},
		Statuses: map[string]registry.Status{}}
	for i := range n {
		name := fmt.Sprintf("n%03d", i)
		snap.Nodes[name], snap.Members[name] = registry.Node{}, member(i)
		p := overlay.PeerSummary{Count: n - 1, Recent: n - 1}
		if name == "n050" {
			p = overlay.PeerSummary{Count: n - 1, Recent: n - 2, Stale: []string{"n007"}, StaleCount: 1}
		}
		snap.Statuses[name] = registry.Status{Components: map[string]json.RawMessage{"overlay": overlayStatus(t, p)}}
	}
	v := Build(snap, newMemory(time.Unix(0, 0)), time.Unix(1, 0))
	want := PeerMatrix{Nodes: []string{"n007", "n050"}, Cells: [][]string{{"self", "up"}, {"stale", "self"}}, Total: n}
	if diff := cmp.Diff(want, v.Peers); diff != "" {
		t.Errorf("matrix (-want +got):\n%s", diff)
	}
}

func TestProblemsKeepTheirStart(t *testing.T) {
	mem := newMemory(time.Unix(0, 0))
	app := registry.AppID{Group: registry.GroupBackends, Name: "web"}
	inst := registry.Instance{IPv4: "10.10.1.0", Node: "a", Port: 80}
	snap := func(aUp bool, errText string) *registry.Snapshot {
		s := &registry.Snapshot{
			Nodes:    map[string]registry.Node{"b": {Services: []registry.Group{registry.GroupBackends}}},
			Statuses: map[string]registry.Status{"b": {Revision: 5, Seen: 5}},
			Apps: map[registry.AppID]*registry.App{app: {ID: app, Meta: &registry.AppMeta{Publish: registry.Publish{Port: 8080}},
				Instances: map[string]registry.Instance{}}},
			Problems: []registry.Problem{{Key: "/cluster/nodes/<b>x</b>", Err: "invalid name", Reason: registry.ReasonBadKey}},
		}
		if aUp {
			s.Nodes["a"] = registry.Node{}
			s.Apps[app].Instances["a"] = inst
		}
		if errText != "" {
			s.Statuses["b"] = registry.Status{Revision: 5, Seen: 7, Errors: map[string]string{"haproxy": errText}}
		}
		return s
	}
	v1 := Build(snap(true, ""), mem, time.Unix(10, 0))
	if len(v1.Problems) != 1 || v1.Problems[0].Kind != KindRejectedKey || v1.Problems[0].Subject != "/cluster/nodes/<b>x</b>" {
		t.Fatalf("problems = %+v, want the rejected key only", v1.Problems)
	}
	if got := v1.Groups[0].Apps[0].Instances; len(got) != 1 || got[0].Down {
		t.Errorf("instances = %+v, want a up", got)
	}
	if got := v1.Groups[0].Consumers; !cmp.Equal(got, []string{"b"}) {
		t.Errorf("consumers = %v", got)
	}
	// a dies; b starts failing.
	v2 := Build(snap(false, "bad\x1b[31m config"), mem, time.Unix(20, 0))
	kinds := map[string]time.Time{}
	for _, p := range v2.Problems {
		kinds[p.Kind] = p.Since
	}
	want := map[string]time.Time{
		KindRejectedKey: time.Unix(10, 0), KindNodeDown: time.Unix(20, 0), KindInstanceDown: time.Unix(20, 0),
		KindComponent: time.Unix(20, 0), KindLagging: time.Unix(20, 0),
	}
	if diff := cmp.Diff(want, kinds); diff != "" {
		t.Errorf("problems since (-want +got):\n%s", diff)
	}
	if got := v2.Groups[0].Apps[0].Instances; len(got) != 1 || !got[0].Down {
		t.Errorf("instances = %+v, want a down", got)
	}
	for _, n := range v2.Nodes {
		if n.Name == "a" && n.Up {
			t.Error("a shown up")
		}
		if n.Name == "b" && (n.Components[0].Error != `bad\x1b[31m config` || !n.Lagging) {
			t.Errorf("b = %+v: want the escaped error and lagging", n)
		}
	}
	// Fixed: problems go, and come back with a new start.
	v3 := Build(snap(true, ""), mem, time.Unix(30, 0))
	if len(v3.Problems) != 1 {
		t.Errorf("problems = %+v, want the rejected key only", v3.Problems)
	}
	v4 := Build(snap(false, ""), mem, time.Unix(40, 0))
	for _, p := range v4.Problems {
		if p.Kind == KindNodeDown && !p.Since.Equal(time.Unix(40, 0)) {
			t.Errorf("node down again since %v, want 40", p.Since)
		}
	}
}

func TestTextIsBoundedAndPrintable(t *testing.T) {
	long := strings.Repeat("é", 400) // 800 bytes
	got := text(long)
	if len(got) > maxText+len("…") || !utf8.ValidString(got) || !strings.HasSuffix(got, "…") {
		t.Errorf("text(800 bytes) = %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
	if got := text("a\x00b\nc\x1b[2J"); strings.ContainsAny(got, "\x00\n\x1b") {
		t.Errorf("control characters kept: %q", got)
	}
}
