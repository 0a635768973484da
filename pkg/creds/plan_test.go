package creds

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

func TestPlanDelivery(t *testing.T) {
	s := func(v int64, ct string) registry.SealedSecret {
		return registry.SealedSecret{Version: v, Ciphertext: ct}
	}
	d := func(v int64, ct string) delivered { return delivered{Version: v, Sum: sealedSum(s(v, ct))} }
	tests := []struct {
		name    string
		want    map[string]registry.SealedSecret
		have    map[string]delivered
		missing map[string]bool
		keep    map[string]bool
		plan    plan
	}{
		{name: "nothing", plan: plan{}},
		{
			name: "first delivery",
			want: map[string]registry.SealedSecret{"b": s(1, "x"), "a": s(2, "y")},
			plan: plan{Write: []string{"a", "b"}},
		},
		{
			name: "up to date",
			want: map[string]registry.SealedSecret{"a": s(2, "y")},
			have: map[string]delivered{"a": d(2, "y")},
			plan: plan{},
		},
		{
			name: "new version",
			want: map[string]registry.SealedSecret{"a": s(3, "z")},
			have: map[string]delivered{"a": d(2, "y")},
			plan: plan{Write: []string{"a"}},
		},
		{
			name: "removed and put again at the same version",
			want: map[string]registry.SealedSecret{"a": s(1, "new")},
			have: map[string]delivered{"a": d(1, "old")},
			plan: plan{Write: []string{"a"}},
		},
		{
			name:    "file deleted behind our back",
			want:    map[string]registry.SealedSecret{"a": s(1, "x")},
			have:    map[string]delivered{"a": d(1, "x")},
			missing: map[string]bool{"a": true},
			plan:    plan{Write: []string{"a"}},
		},
		{
			name: "secret gone",
			want: map[string]registry.SealedSecret{"keep": s(1, "x")},
			have: map[string]delivered{"keep": d(1, "x"), "gone": d(4, "q"), "also": d(1, "r")},
			plan: plan{Remove: []string{"also", "gone"}},
		},
		{
			name: "undecodable key keeps its credential",
			have: map[string]delivered{"broken": d(1, "x")},
			keep: map[string]bool{"broken": true},
			plan: plan{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := planDelivery(tt.want, tt.have, tt.missing, tt.keep)
			if diff := cmp.Diff(tt.plan, got); diff != "" {
				t.Errorf("plan (-want +got):\n%s", diff)
			}
		})
	}
}

func TestUnitActions(t *testing.T) {
	uses := map[string]SecretUse{
		"db":    {Units: []string{"app.service", "worker.service"}},
		"tls":   {Units: []string{"haproxy.service", "app.service"}, Action: "reload"},
		"token": {Units: []string{"cron.service"}, Action: "none"},
		"cfg":   {Units: []string{"haproxy.service"}, Action: "reload"},
	}
	tests := []struct {
		name    string
		changed []string
		want    []unitAction
	}{
		{name: "none changed", want: []unitAction{}},
		{name: "undeclared secret", changed: []string{"other"}, want: []unitAction{}},
		{name: "action none", changed: []string{"token"}, want: []unitAction{}},
		{
			name:    "default is restart",
			changed: []string{"db"},
			want: []unitAction{
				{Unit: "app.service", Action: "restart", Secrets: []string{"db"}},
				{Unit: "worker.service", Action: "restart", Secrets: []string{"db"}},
			},
		},
		{
			name:    "restart wins over reload, one action per unit",
			changed: []string{"tls", "db", "cfg"},
			want: []unitAction{
				{Unit: "app.service", Action: "restart", Secrets: []string{"db", "tls"}},
				{Unit: "haproxy.service", Action: "reload", Secrets: []string{"cfg", "tls"}},
				{Unit: "worker.service", Action: "restart", Secrets: []string{"db"}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, unitActions(tt.changed, uses)); diff != "" {
				t.Errorf("actions (-want +got):\n%s", diff)
			}
		})
	}
}

func TestValidUnitName(t *testing.T) {
	for _, ok := range []string{"app.service", "getty@tty1.service", "a-b_c.timer", "x\\x2d.mount"} {
		if err := validUnitName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "app", ".service", "app.exe", "a b.service", "a;rm.service", "a/b.service"} {
		if validUnitName(bad) == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
