package registry

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestProblemReasons(t *testing.T) {
	key := "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	kvs := []KV{
		{Key: "/cluster/backends/x y/meta_data", Value: []byte(`{"publish":{"port":81}}`)},
		{Key: "/cluster/backends/badjson/meta_data", Value: []byte(`{"publish":`)},
		{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"victim"}`)},
		{Key: "/cluster/meshd/members/victim", Value: []byte(`{"name":"victim","publicKey":"` + key + `","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)},
		{Key: "/cluster/meshd/members/thief", Value: []byte(`{"name":"thief","publicKey":"` + key + `","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)},
		{Key: "/cluster/backends/api/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
		{Key: "/cluster/backends/api/instances/victim", Value: []byte(`{"ipv4":"10.10.7.0","node":"victim","port":8080}`)},
	}
	got := map[string]string{}
	for _, p := range SnapshotOf(kvs, 1).Problems {
		got[p.Key] = p.Reason
	}
	want := map[string]string{
		"/cluster/backends/x y/meta_data":        ReasonBadKey,
		"/cluster/backends/badjson/meta_data":    ReasonBadValue,
		"/cluster/meshd/members/thief":           ReasonSubnetConflict,
		"/cluster/backends/api/instances/victim": ReasonForeignAddress,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("reasons (-want +got):\n%s", diff)
	}
}
