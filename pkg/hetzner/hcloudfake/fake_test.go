package hcloudfake_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
)

const token = "fake-test-token"

// call sends a raw request, not through hcloud-go: the rules must hold
// for whatever a client sends.
func call(t *testing.T, f *hcloudfake.Server, method, path, body string) (int, http.Header, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(method, f.URL()+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var v map[string]any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("%s %s: body is not JSON: %q", method, path, raw)
	}
	return resp.StatusCode, resp.Header, v
}

// apiErr returns code, and the first details.fields name if any.
func apiErr(v map[string]any) (code, field string) {
	e, _ := v["error"].(map[string]any)
	if e == nil {
		return "", ""
	}
	code, _ = e["code"].(string)
	if d, ok := e["details"].(map[string]any); ok {
		if fs, ok := d["fields"].([]any); ok && len(fs) > 0 {
			field, _ = fs[0].(map[string]any)["name"].(string)
		}
	}
	return code, field
}

func mustCreate(t *testing.T, f *hcloudfake.Server, path, body string) map[string]any {
	t.Helper()
	st, _, v := call(t, f, "POST", path, body)
	if st != http.StatusCreated {
		t.Fatalf("POST %s %s: %d %v", path, body, st, v)
	}
	return v
}

func server(name, typ, image string, extra string) string {
	return fmt.Sprintf(`{"name":%q,"server_type":%q,"image":%q,"location":"hel1"%s}`, name, typ, image, extra)
}

// TestFakeRejectsWhatTheAPIRejects: one case per documented rule, each
// answered with the documented status, code and invalid_input field.
func TestFakeRejectsWhatTheAPIRejects(t *testing.T) {
	f := hcloudfake.New(t, token)
	nw := mustCreate(t, f, "/networks", `{"name":"net","ip_range":"10.0.0.0/16","subnets":[{"type":"cloud","ip_range":"10.0.1.0/24","network_zone":"eu-central"}]}`)
	nwID := int64(nw["network"].(map[string]any)["id"].(float64))
	tests := []struct {
		name, method, path, body string
		status                   int
		code, field              string
	}{
		// Servers: Create a Server — a valid hostname (RFC 1123).
		{"hostname with two dots", "POST", "/servers", server("a..b", "cpx22", "debian-12", ""), 400, "invalid_input", "name"},
		{"hostname label starting with -", "POST", "/servers", server("web.-1", "cpx22", "debian-12", ""), 400, "invalid_input", "name"},
		{"hostname with _", "POST", "/servers", server("web_1", "cpx22", "debian-12", ""), 400, "invalid_input", "name"},
		// Labels.
		{"label key with a space", "POST", "/servers", server("n1", "cpx22", "debian-12", `,"labels":{"bad key":"v"}`), 400, "invalid_input", "labels"},
		{"label value ending in -", "POST", "/ssh_keys", `{"name":"k","public_key":"ssh-ed25519 AAAA","labels":{"k":"v-"}}`, 400, "invalid_input", "labels"},
		{"reserved label prefix", "POST", "/firewalls", `{"name":"fw","labels":{"hetzner.cloud/x":"y"}}`, 400, "invalid_input", "labels"},
		{"label value too long", "POST", "/placement_groups", `{"name":"pg","type":"spread","labels":{"k":"` + strings.Repeat("a", 64) + `"}}`, 400, "invalid_input", "labels"},
		// Networks.
		{"network range with host bits", "POST", "/networks", `{"name":"n2","ip_range":"10.1.0.1/16"}`, 400, "invalid_input", "ip_range"},
		{"network range not RFC 1918", "POST", "/networks", `{"name":"n2","ip_range":"100.64.0.0/16"}`, 400, "invalid_input", "ip_range"},
		{"network smaller than /24", "POST", "/networks", `{"name":"n2","ip_range":"10.1.0.0/25"}`, 400, "invalid_input", "ip_range"},
		{"overlapping subnets at create", "POST", "/networks", `{"name":"n2","ip_range":"10.1.0.0/16","subnets":[{"type":"cloud","ip_range":"10.1.0.0/23","network_zone":"eu-central"},{"type":"cloud","ip_range":"10.1.1.0/24","network_zone":"us-east"}]}`, 400, "invalid_input", "subnets.ip_range"},
		{"added subnet overlapping", "POST", fmt.Sprintf("/networks/%d/actions/add_subnet", nwID), `{"type":"cloud","ip_range":"10.0.1.0/24","network_zone":"us-east"}`, 400, "invalid_input", "ip_range"},
		{"subnet with host bits", "POST", fmt.Sprintf("/networks/%d/actions/add_subnet", nwID), `{"type":"cloud","ip_range":"10.0.2.7/24","network_zone":"us-east"}`, 400, "invalid_input", "ip_range"},
		{"subnet outside the range", "POST", fmt.Sprintf("/networks/%d/actions/add_subnet", nwID), `{"type":"cloud","ip_range":"10.9.0.0/24","network_zone":"us-east"}`, 400, "invalid_input", "ip_range"},
		// Firewalls: rules.
		{"inbound rule without source_ips", "POST", "/firewalls", `{"name":"fw","rules":[{"direction":"in","protocol":"tcp","port":"22"}]}`, 400, "invalid_input", "rules"},
		{"outbound rule without destination_ips", "POST", "/firewalls", `{"name":"fw","rules":[{"direction":"out","protocol":"tcp","port":"22"}]}`, 400, "invalid_input", "rules"},
		{"source with host bits", "POST", "/firewalls", `{"name":"fw","rules":[{"direction":"in","protocol":"tcp","port":"22","source_ips":["10.0.0.1/8"]}]}`, 400, "invalid_input", "rules"},
		{"tcp rule without port", "POST", "/firewalls", `{"name":"fw","rules":[{"direction":"in","protocol":"tcp","source_ips":["0.0.0.0/0"]}]}`, 400, "invalid_input", "rules"},
		{"icmp rule with port", "POST", "/firewalls", `{"name":"fw","rules":[{"direction":"in","protocol":"icmp","port":"1","source_ips":["0.0.0.0/0"]}]}`, 400, "invalid_input", "rules"},
		{"label selector without selector", "POST", "/firewalls", `{"name":"fw","apply_to":[{"type":"label_selector"}]}`, 400, "invalid_input", "apply_to"},
		// Server types, images and architecture.
		{"retired type in an EU location", "POST", "/servers", server("n1", "cpx21", "debian-12", ""), 503, "resource_unavailable", ""},
		{"type not sold in the location", "POST", "/servers", strings.Replace(server("n1", "cx23", "debian-12", ""), "hel1", "ash", 1), 503, "resource_unavailable", ""},
		{"image no longer available", "POST", "/servers", server("n1", "cpx22", "ubuntu-20.04", ""), 400, "invalid_input", "image"},
		{"x86 image ID for an arm type", "POST", "/servers", server("n1", "cax11", "114690387", ""), 400, "invalid_input", "image"},
		{"user data over 32 KiB", "POST", "/servers", server("n1", "cpx22", "debian-12", `,"user_data":"`+strings.Repeat("x", 32<<10+1)+`"`), 400, "invalid_input", "user_data"},
		// Request bodies.
		{"a field the API does not have", "POST", "/servers", server("n1", "cpx22", "debian-12", `,"firewall_ids":[1]`), 400, "invalid_input", "firewall_ids"},
		{"a field of the wrong type", "POST", "/placement_groups", `{"name":"pg","type":"spread","labels":[]}`, 400, "invalid_input", "labels"},
		{"malformed JSON", "POST", "/ssh_keys", `{"name":`, 400, "json_error", ""},
		{"unknown resource", "GET", "/servers/999999", ``, 404, "not_found", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, _, v := call(t, f, tt.method, tt.path, tt.body)
			code, field := apiErr(v)
			if st != tt.status || code != tt.code || field != tt.field {
				t.Errorf("got %d %s field %q, want %d %s field %q: %v", st, code, field, tt.status, tt.code, tt.field, v)
			}
			if code == "invalid_input" {
				msg := v["error"].(map[string]any)["message"].(string)
				if !strings.HasPrefix(msg, "invalid input in field '"+tt.field+"': ") {
					t.Errorf("message %q is not the documented shape", msg)
				}
			}
		})
	}
	if names := f.ServerNames(); len(names) != 0 {
		t.Errorf("rejected requests created servers: %v", names)
	}
	// What the same rules accept.
	mustCreate(t, f, "/servers", strings.Replace(server("ok.example-1", "cpx21", "debian-12", ""), "hel1", "ash", 1))
	mustCreate(t, f, "/servers", server("arm1", "cax11", "debian-12", `,"labels":{"example.com/my":"label","just-a-key":""}`))
	mustCreate(t, f, "/servers", server("old", "cpx22", "debian-11", ""))
}

func TestFakeNeverReusesAPrivateIP(t *testing.T) {
	f := hcloudfake.New(t, token)
	f.ActionPolls = 0
	nw := mustCreate(t, f, "/networks", `{"name":"net","ip_range":"10.0.0.0/16","subnets":[{"type":"cloud","ip_range":"10.0.1.0/24","network_zone":"eu-central"}]}`)
	nwID := strconv.FormatInt(int64(nw["network"].(map[string]any)["id"].(float64)), 10)
	ip := func(v map[string]any) (string, string) {
		s := v["server"].(map[string]any)
		return strconv.FormatInt(int64(s["id"].(float64)), 10), s["private_net"].([]any)[0].(map[string]any)["ip"].(string)
	}
	id1, ip1 := ip(mustCreate(t, f, "/servers", server("a", "cpx22", "debian-12", `,"networks":[`+nwID+`]`)))
	_, ip2 := ip(mustCreate(t, f, "/servers", server("b", "cpx22", "debian-12", `,"networks":[`+nwID+`]`)))
	if st, _, _ := call(t, f, "DELETE", "/servers/"+id1, ""); st != http.StatusOK {
		t.Fatalf("delete: %d", st)
	}
	_, ip3 := ip(mustCreate(t, f, "/servers", server("c", "cpx22", "debian-12", `,"networks":[`+nwID+`]`)))
	if ip1 != "10.0.1.2" || ip2 == ip1 || ip3 == ip1 || ip3 == ip2 {
		t.Errorf("private IPs %s, %s, then after deleting the first %s: want distinct, never reused", ip1, ip2, ip3)
	}
}

func TestFakeRateLimitHeaders(t *testing.T) {
	f := hcloudfake.New(t, token)
	now := time.Unix(1_800_000_000, 0)
	f.Now = func() time.Time { return now }
	f.SetRateLimit(3600, 2)
	st, h, _ := call(t, f, "GET", "/servers", "")
	if st != 200 || h.Get("RateLimit-Limit") != "3600" || h.Get("RateLimit-Remaining") != "1" ||
		h.Get("RateLimit-Reset") != strconv.FormatInt(now.Add(3599*time.Second).Unix(), 10) {
		t.Fatalf("first: %d %v", st, h)
	}
	call(t, f, "GET", "/servers", "")
	st, h, v := call(t, f, "GET", "/servers", "")
	if code, _ := apiErr(v); st != http.StatusTooManyRequests || code != "rate_limit_exceeded" || h.Get("RateLimit-Remaining") != "0" ||
		h.Get("RateLimit-Reset") != strconv.FormatInt(now.Add(3600*time.Second).Unix(), 10) || h.Get("Retry-After") != "" {
		t.Fatalf("over the limit: %d %v %v", st, h, v)
	}
	// One request comes back per second at 3600 an hour.
	now = now.Add(time.Second)
	if st, _, _ := call(t, f, "GET", "/servers", ""); st != 200 {
		t.Errorf("a second later: %d, want 200", st)
	}
}

// TestFakeWritesNullWhereTheAPIDoes: the API writes null, not an absent
// key or a zero value, for a server without placement group, a created
// server's root_password when keys were given, a running action's
// finished and error, a current server type's deprecation, and details
// of an error that has none.
func TestFakeWritesNullWhereTheAPIDoes(t *testing.T) {
	f := hcloudfake.New(t, token)
	key := mustCreate(t, f, "/ssh_keys", `{"name":"k","public_key":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBRpxh7HUDJ5pkLUvXU9/+qfQP3Oel8hL63jwQHzJ9Vx"}`)
	keyID := strconv.FormatInt(int64(key["ssh_key"].(map[string]any)["id"].(float64)), 10)
	v := mustCreate(t, f, "/servers", server("n1", "cpx22", "debian-12", `,"ssh_keys":[`+keyID+`]`))
	isNull := func(what string, m map[string]any, k string) {
		t.Helper()
		if x, ok := m[k]; !ok || x != nil {
			t.Errorf("%s: %q is %v (present %v), want null", what, k, x, ok)
		}
	}
	isNull("create response", v, "root_password")
	isNull("server", v["server"].(map[string]any), "placement_group")
	isNull("running action", v["action"].(map[string]any), "finished")
	isNull("running action", v["action"].(map[string]any), "error")
	_, _, types := call(t, f, "GET", "/server_types?name=cpx22", "")
	isNull("current server type", types["server_types"].([]any)[0].(map[string]any), "deprecation")
	_, _, e := call(t, f, "GET", "/servers/424242", "")
	isNull("not_found error", e["error"].(map[string]any), "details")
	_, _, l := call(t, f, "GET", "/servers", "")
	isNull("first page", l["meta"].(map[string]any)["pagination"].(map[string]any), "previous_page")
}
