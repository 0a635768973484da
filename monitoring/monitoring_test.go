package monitoring

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

func reference(t *testing.T) map[string]Metric {
	t.Helper()
	b, err := os.ReadFile("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := ParseReference(string(b))
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

// scrapeSeries are series Prometheus itself adds to every target.
var scrapeSeries = []string{"up"}

// unknownMetrics returns the metrics expr uses that the reference does
// not list.
func unknownMetrics(ref map[string]Metric, expr string) ([]string, error) {
	names, err := MetricNames(expr)
	if err != nil {
		return nil, err
	}
	var unknown []string
	for _, n := range names {
		if _, ok := Lookup(ref, n); !ok && !slices.Contains(scrapeSeries, n) {
			unknown = append(unknown, n)
		}
	}
	return unknown, nil
}

func TestMetricNames(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
	}{
		{`up{job="meshd"} == 0`, []string{"up"}},
		{`time() - meshd_x{a="}b{"} > 180`, []string{"meshd_x"}},
		{`sum by (instance, le) (rate(m_bucket{i=~"$instance"}[$__rate_interval]))`, []string{"m_bucket"}},
		{`a == 0 and on (instance, app) b{state="down"} > 0`, []string{"a", "b"}},
		{`count(a > 0) or vector(0)`, []string{"a"}},
		{`sum(a) without (x) / ignoring(y) group_left(z) b offset 5m`, []string{"a", "b"}},
		{`histogram_quantile(0.99, x) * 1e3 + 0x1f`, []string{"x"}},
		{`c{l="it's \"q\""} unless d`, []string{"c", "d"}},
		{`ns:rule:rate5m`, []string{"ns:rule:rate5m"}},
	} {
		got, err := MetricNames(tc.expr)
		if err != nil {
			t.Errorf("%s: %v", tc.expr, err)
			continue
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.expr, diff)
		}
	}
	for _, bad := range []string{`{__name__=~"meshd_.+"}`, `a{b="c}`, `rate(a[5m)`} {
		if _, err := MetricNames(bad); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

func TestUnknownMetricIsCaught(t *testing.T) {
	ref := reference(t)
	got, err := unknownMetrics(ref, `rate(meshd_reconcile_seconds_bucket[5m]) + meshd_no_such_metric + meshd_applied_revision_count`)
	if err != nil {
		t.Fatal(err)
	}
	// _bucket of a histogram is known; _count of a gauge is not.
	if want := []string{"meshd_applied_revision_count", "meshd_no_such_metric"}; !slices.Equal(got, want) {
		t.Errorf("unknown = %v, want %v", got, want)
	}
}

func promtool(t *testing.T, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		sandboxtest.Missing(t, "promtool not installed (Debian's prometheus package ships it): skipping")
	}
	out, err := exec.Command("promtool", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func TestPromtoolCheckRules(t *testing.T) {
	promtool(t, "check", "rules", "meshd-alerts.yml")
}

func TestPromtoolTestRules(t *testing.T) {
	promtool(t, "test", "rules", "meshd-alerts.test.yml")
}

type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert  string            `json:"alert"`
			Record string            `json:"record"`
			Expr   string            `json:"expr"`
			For    string            `json:"for"`
			Labels map[string]string `json:"labels"`
			Ann    map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

func TestRulesUseKnownMetrics(t *testing.T) {
	ref := reference(t)
	b, err := os.ReadFile("meshd-alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.UnmarshalStrict(b, &rf); err != nil {
		t.Fatal(err)
	}
	var alerts []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			unknown, err := unknownMetrics(ref, r.Expr)
			if err != nil {
				t.Errorf("%s: %v", r.Alert, err)
			} else if len(unknown) > 0 {
				t.Errorf("%s uses %v, which docs/metrics.md does not list", r.Alert, unknown)
			}
		}
	}
	// The reference page lists every alert.
	page, _ := os.ReadFile("../docs/metrics.md")
	for _, a := range alerts {
		if !strings.Contains(string(page), "`"+a+"`") {
			t.Errorf("alert %s is not described in docs/metrics.md", a)
		}
	}
}

// dashboardQueries walks a Grafana dashboard's panels (rows included) and
// template variables and returns every query, named by where it is.
func dashboardQueries(t *testing.T, d map[string]any) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(panels []any)
	walk = func(panels []any) {
		for _, p := range panels {
			p, ok := p.(map[string]any)
			if !ok {
				t.Fatalf("panel is %T", p)
			}
			title, _ := p["title"].(string)
			if sub, ok := p["panels"].([]any); ok {
				walk(sub)
			}
			targets, _ := p["targets"].([]any)
			if p["type"] != "row" && len(targets) == 0 {
				t.Errorf("panel %q has no query", title)
			}
			for i, tg := range targets {
				expr, _ := tg.(map[string]any)["expr"].(string)
				if expr == "" {
					t.Errorf("panel %q target %d has no expr", title, i)
				}
				out[fmt.Sprintf("panel %q target %d", title, i)] = expr
			}
		}
	}
	panels, ok := d["panels"].([]any)
	if !ok || len(panels) == 0 {
		t.Fatal("dashboard has no panels")
	}
	walk(panels)
	tmpl, _ := d["templating"].(map[string]any)
	vars, _ := tmpl["list"].([]any)
	for _, v := range vars {
		v := v.(map[string]any)
		if v["type"] != "query" {
			continue
		}
		q, _ := v["definition"].(string)
		// label_values(metric, label) is Grafana's, not PromQL.
		if inner, ok := strings.CutPrefix(q, "label_values("); ok {
			metric, _, _ := strings.Cut(inner, ",")
			q = strings.TrimSpace(metric)
		}
		out[fmt.Sprintf("variable %v", v["name"])] = q
	}
	return out
}

// grafanaVars are the variables the queries use, with a value each that
// makes the query plain PromQL.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "1h")

func TestDashboard(t *testing.T) {
	ref := reference(t)
	b, err := os.ReadFile("meshd-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d map[string]any
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("meshd-dashboard.json is not valid JSON: %v", err)
	}
	queries := dashboardQueries(t, d)
	// Every area the dashboard promises has a row.
	var rows []string
	for _, p := range d["panels"].([]any) {
		if p := p.(map[string]any); p["type"] == "row" {
			rows = append(rows, p["title"].(string))
		}
	}
	want := []string{"Cluster overview", "Per-node components", "Peer handshake matrix", "HAProxy servers per app", "Convergence"}
	if diff := cmp.Diff(want, rows); diff != "" {
		t.Errorf("rows (-want +got):\n%s", diff)
	}
	used := map[string]bool{}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	n := 0
	for where, q := range queries {
		q = grafanaVars.Replace(q)
		if strings.Contains(q, "$__") {
			t.Errorf("%s: a Grafana variable the test does not know: %s", where, q)
		}
		unknown, err := unknownMetrics(ref, q)
		if err != nil {
			t.Errorf("%s: %v", where, err)
		} else if len(unknown) > 0 {
			t.Errorf("%s uses %v, which docs/metrics.md does not list", where, unknown)
		}
		names, _ := MetricNames(q)
		for _, m := range names {
			used[m] = true
		}
		n++
		qj, _ := json.Marshal(q)
		fmt.Fprintf(&rules, "      - record: dashboard:query:%d\n        expr: %s\n", n, qj)
	}
	for _, m := range []string{"meshd_wireguard_peer_last_handshake_timestamp_seconds", "meshd_haproxy_servers", "meshd_applied_revision", "meshd_component_consecutive_failures"} {
		if !used[m] {
			t.Errorf("the dashboard does not show %s", m)
		}
	}
	// promtool parses every query with Prometheus' own parser.
	path := filepath.Join(t.TempDir(), "dashboard-queries.yml")
	if err := os.WriteFile(path, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	promtool(t, "check", "rules", path)
}
