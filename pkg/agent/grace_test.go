package agent

import (
	"testing"

	"github.com/meshd/meshd/pkg/registry"
)

func TestWithInstancesInGrace(t *testing.T) {
	kv := func(k, v string) registry.KV { return registry.KV{Key: k, Value: []byte(v), Lease: 1} }
	prev := registry.SnapshotOf([]registry.KV{
		kv("/cluster/backends/web/meta_data", `{"publish":{"port":8080}}`),
		kv("/cluster/backends/web/instances/a", `{"ipv4":"10.10.1.0","node":"a","port":80}`),
		kv("/cluster/backends/web/instances/b", `{"ipv4":"10.10.2.0","node":"b","port":80}`),
		kv("/cluster/backends/gone/meta_data", `{"publish":{"port":8081}}`),
		kv("/cluster/backends/gone/instances/a", `{"ipv4":"10.10.1.0","node":"a","port":81}`),
	}, 10)
	// After an outage: b's instance expired, a moved port, app "gone" was unregistered.
	cur := registry.SnapshotOf([]registry.KV{
		kv("/cluster/backends/web/meta_data", `{"publish":{"port":8080}}`),
		kv("/cluster/backends/web/instances/a", `{"ipv4":"10.10.1.0","node":"a","port":90}`),
	}, 20)
	got := withInstancesInGrace(cur, prev)
	web := got.Apps[registry.AppID{Group: "backends", Name: "web"}]
	if len(web.Instances) != 2 || web.Instances["b"].Port != 80 || web.Instances["a"].Port != 90 {
		t.Errorf("view in grace: instances = %v, want b kept and a's new port", web.Instances)
	}
	if _, ok := got.Apps[registry.AppID{Group: "backends", Name: "gone"}]; ok {
		t.Error("an unregistered app came back")
	}
	if got.Revision != 20 {
		t.Errorf("revision %d", got.Revision)
	}
	if n := len(cur.Apps[registry.AppID{Group: "backends", Name: "web"}].Instances); n != 1 {
		t.Errorf("the store's snapshot was modified: %d instances", n)
	}
	if same := withInstancesInGrace(prev, prev); same != prev {
		t.Error("nothing to keep still copied the snapshot")
	}
}
