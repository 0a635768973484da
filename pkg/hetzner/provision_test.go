package hetzner_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"

	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
)

// served is RequestsTo without the requests the rate limit turned away.
func served(f *hcloudfake.Server, method, path string) []hcloudfake.Request {
	return slices.DeleteFunc(f.RequestsTo(method, path), func(r hcloudfake.Request) bool { return r.Status == http.StatusTooManyRequests })
}

func TestProvisionCreatesAndRerunCreatesNothing(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	var sl sleeps
	var progress bytes.Buffer
	p := &hetzner.Provisioner{Client: newClient(t, f, &sl), Progress: hetzner.NewProgress(&progress, false)}
	// The project has one request left of 3600 an hour: every further
	// request is answered 429 until one has come back (a second later,
	// by the fake's clock, which the recorded waits move on). A 502 on
	// the firewall lookup and a dropped connection on the key lookup
	// must be retried as well.
	f.SetRateLimit(3600, 1)
	f.Inject(hcloudfake.Fault{Method: "GET", Path: "/firewalls", Status: http.StatusBadGateway,
		Code: "bad_gateway", Message: "try again"})
	f.Inject(hcloudfake.Fault{Method: "GET", Path: "/ssh_keys", Reset: true})
	opts := baseOptions(t, "node1", "node2", "node3")

	res, err := p.Provision(context.Background(), opts)
	if err != nil {
		t.Fatalf("provision: %v\n%s", err, progress.String())
	}
	var limited int
	for _, r := range f.Requests() {
		if r.Status == http.StatusTooManyRequests {
			limited++
		}
	}
	if limited == 0 {
		t.Error("the fake never answered 429")
	}
	for i, d := range sl.all() {
		if d != time.Second {
			t.Errorf("wait %d = %v, want 1s (one request of RateLimit-Reset, or the first backoff)", i, d)
		}
	}
	for _, path := range []string{"/firewalls", "/ssh_keys"} {
		reqs := slices.DeleteFunc(f.RequestsTo("GET", path), func(r hcloudfake.Request) bool { return r.Status == 429 })
		if len(reqs) < 2 || reqs[0].Status == 200 || reqs[1].Status != 200 {
			t.Errorf("GET %s was not retried after the injected error: %+v", path, statuses(reqs))
		}
	}

	// Shared resources: created once, labelled, with the expected shape.
	fwReqs := served(f, "POST", "/firewalls")
	if len(fwReqs) != 1 {
		t.Fatalf("firewall creates = %d, want 1", len(fwReqs))
	}
	fw := decodeBody[schema.FirewallCreateRequest](t, fwReqs[0])
	if diff := cmp.Diff(map[string]string{hetzner.LabelCluster: "prod"}, *fw.Labels); diff != "" {
		t.Errorf("firewall labels (-want +got):\n%s", diff)
	}
	var rules []string
	for _, r := range fw.Rules {
		rules = append(rules, r.Direction+" "+r.Protocol+" "+*r.Port+" "+strings.Join(r.SourceIPs, ","))
	}
	if diff := cmp.Diff([]string{"in tcp 22 0.0.0.0/0,::/0", "in udp 51820 0.0.0.0/0,::/0"}, rules); diff != "" {
		t.Errorf("firewall rules (-want +got):\n%s", diff)
	}
	if len(fw.ApplyTo) != 1 || fw.ApplyTo[0].Type != "label_selector" || fw.ApplyTo[0].LabelSelector.Selector != "meshd/cluster=prod" {
		t.Errorf("firewall apply_to = %+v, want the label selector meshd/cluster=prod", fw.ApplyTo)
	}
	nwReqs := served(f, "POST", "/networks")
	if len(nwReqs) != 1 {
		t.Fatalf("network creates = %d, want 1", len(nwReqs))
	}
	nw := decodeBody[schema.NetworkCreateRequest](t, nwReqs[0])
	if nw.IPRange != "172.20.0.0/16" || len(nw.Subnets) != 1 || nw.Subnets[0].IPRange != "172.20.1.0/24" ||
		nw.Subnets[0].NetworkZone != "eu-central" || nw.Subnets[0].Type != "cloud" || (*nw.Labels)[hetzner.LabelCluster] != "prod" {
		t.Errorf("network create = %+v", nw)
	}
	pgReqs := served(f, "POST", "/placement_groups")
	if len(pgReqs) != 1 {
		t.Fatalf("placement group creates = %d, want 1", len(pgReqs))
	}
	if pg := decodeBody[schema.PlacementGroupCreateRequest](t, pgReqs[0]); pg.Type != "spread" || (*pg.Labels)[hetzner.LabelCluster] != "prod" {
		t.Errorf("placement group create = %+v", pg)
	}
	keyReqs := served(f, "POST", "/ssh_keys")
	if len(keyReqs) != 1 {
		t.Fatalf("ssh key uploads = %d, want 1", len(keyReqs))
	}
	if k := decodeBody[schema.SSHKeyCreateRequest](t, keyReqs[0]); (*k.Labels)[hetzner.LabelCluster] != "prod" ||
		k.PublicKey != opts.SSHKeyFiles[0].Line {
		t.Errorf("ssh key upload = %+v", k)
	}

	// Servers: three creates with every reference and label.
	pg, _ := f.PlacementGroup("prod-spread")
	fwState, _ := f.Firewall("prod-meshd")
	nwState, _ := f.Network("prod-net")
	srvReqs := served(f, "POST", "/servers")
	if len(srvReqs) != 3 {
		t.Fatalf("server creates = %d, want 3", len(srvReqs))
	}
	var names []string
	for _, r := range srvReqs {
		// The placement group goes as a bare ID, as the API expects.
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(r.Body, &raw); err != nil {
			t.Fatal(err)
		}
		if string(raw["placement_group"]) != itoa(pg.ID) {
			t.Errorf("placement_group sent as %s, want the ID %d", raw["placement_group"], pg.ID)
		}
		req := decodeBody[schema.ServerCreateRequest](t, r)
		names = append(names, req.Name)
		wantLabels := map[string]string{hetzner.LabelCluster: "prod", hetzner.LabelRole: "worker", "team": "infra"}
		if diff := cmp.Diff(wantLabels, *req.Labels); diff != "" {
			t.Errorf("%s labels (-want +got):\n%s", req.Name, diff)
		}
		if len(req.Firewalls) != 0 {
			t.Errorf("%s firewalls = %+v, want none: the label selector applies it", req.Name, req.Firewalls)
		}
		if srv, _ := f.ServerByName(req.Name); len(srv.PublicNet.Firewalls) != 1 || srv.PublicNet.Firewalls[0].ID != fwState.ID {
			t.Errorf("%s has firewalls %+v, want [%d] through the selector", req.Name, srv.PublicNet.Firewalls, fwState.ID)
		}
		if !slices.Equal(req.Networks, []int64{nwState.ID}) || len(req.SSHKeys) != 1 {
			t.Errorf("%s networks %v ssh keys %v", req.Name, req.Networks, req.SSHKeys)
		}
		want, _ := hetzner.CloudInit{Cluster: "prod", Name: req.Name, Role: "worker", WireGuardPort: 51820,
			NixChannel: hetzner.DefaultNixChannel, InfectURL: hetzner.DefaultInfectURL, InfectSHA256: hetzner.DefaultInfectSHA256}.Render()
		if req.UserData != want {
			t.Errorf("%s user data is not the rendered cloud-config:\n%s", req.Name, req.UserData)
		}
	}
	slices.Sort(names)
	if diff := cmp.Diff([]string{"node1", "node2", "node3"}, names); diff != "" {
		t.Errorf("created (-want +got):\n%s", diff)
	}
	for _, r := range res {
		if r.Outcome != hetzner.OutcomeCreated || r.Status != "running" || r.IPv4 == "" || r.IPv6 == "" {
			t.Errorf("result %+v", r)
		}
		if a, err := netip.ParseAddr(r.PrivateIP); err != nil || !netip.MustParsePrefix("172.20.1.0/24").Contains(a) {
			t.Errorf("%s private ip %q not in the subnet", r.Name, r.PrivateIP)
		}
	}
	if !strings.Contains(progress.String(), "node2: created (id") {
		t.Errorf("progress lacks per-server lines:\n%s", progress.String())
	}

	// Re-run: every server is reported as existing and nothing is written.
	before := len(f.Requests())
	res, err = p.Provision(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	var lists int
	for _, r := range f.Requests()[before:] {
		if r.Method != "GET" {
			t.Errorf("re-run sent %s %s", r.Method, r.Path)
		}
		if r.Path == "/servers" && r.Status == http.StatusOK {
			lists++
		}
	}
	if lists != 2 {
		t.Errorf("re-run listed servers in %d pages, want 2 (3 servers, page size 2)", lists)
	}
	for _, r := range res {
		if r.Outcome != hetzner.OutcomeExists || r.ID == 0 {
			t.Errorf("re-run result %+v, want exists", r)
		}
	}
}

func TestProvisionPartialFailureThenRerunCompletes(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	f.Inject(hcloudfake.Fault{Method: "POST", Path: "/servers", BodyContains: `"name":"node2"`,
		Status: http.StatusForbidden, Code: "resource_limit_exceeded", Message: "server limit reached"})
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "node1", "node2", "node3")

	res, err := p.Provision(context.Background(), opts)
	if err == nil {
		t.Fatal("provision succeeded despite the injected failure")
	}
	for _, want := range []string{"1 of 3 servers failed", "server node2", "server limit reached (resource_limit_exceeded)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	outcomes := map[string]hetzner.Outcome{}
	for _, r := range res {
		outcomes[r.Name] = r.Outcome
	}
	if diff := cmp.Diff(map[string]hetzner.Outcome{"node1": "created", "node2": "failed", "node3": "created"}, outcomes); diff != "" {
		t.Errorf("outcomes (-want +got):\n%s", diff)
	}

	before := len(f.RequestsTo("POST", "/servers"))
	res, err = p.Provision(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	creates := f.RequestsTo("POST", "/servers")[before:]
	if len(creates) != 1 || decodeBody[schema.ServerCreateRequest](t, creates[0]).Name != "node2" {
		t.Errorf("re-run created %d servers, want only node2", len(creates))
	}
	if diff := cmp.Diff([]string{"node1", "node2", "node3"}, f.ServerNames()); diff != "" {
		t.Errorf("servers (-want +got):\n%s", diff)
	}
	for _, r := range res {
		want := hetzner.OutcomeExists
		if r.Name == "node2" {
			want = hetzner.OutcomeCreated
		}
		if r.Outcome != want {
			t.Errorf("%s: %s, want %s", r.Name, r.Outcome, want)
		}
	}
	if n := len(f.RequestsTo("POST", "/firewalls")) + len(f.RequestsTo("POST", "/networks")) + len(f.RequestsTo("POST", "/placement_groups")); n != 3 {
		t.Errorf("shared resources created %d times over two runs, want once each", n)
	}
}

func TestProvisionReusesKeyByFingerprintAndRepairsFirewall(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "node1")
	opts.Network, opts.PlacementGroup = nil, ""
	// The same key already exists under another name.
	keyID := f.AddSSHKey("someones-laptop", opts.SSHKeyFiles[0].Line)
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	if n := len(f.RequestsTo("POST", "/ssh_keys")); n != 0 {
		t.Errorf("uploaded the key %d times though its fingerprint exists", n)
	}
	req := decodeBody[schema.ServerCreateRequest](t, f.RequestsTo("POST", "/servers")[0])
	if !slices.Equal(req.SSHKeys, []int64{keyID}) {
		t.Errorf("ssh keys = %v, want [%d]", req.SSHKeys, keyID)
	}
	if _, ok := rawField(t, f.RequestsTo("POST", "/servers")[0].Body, "placement_group"); ok {
		t.Error("placement_group sent without --placement-group")
	}

	// Someone opens port 80 in the console; the next provisioning resets it.
	port := "80"
	f.SetFirewallRules("prod-meshd", []schema.FirewallRule{{Direction: "in", Protocol: "tcp", Port: &port, SourceIPs: []string{"0.0.0.0/0"}}})
	opts.Names = []string{"node2"}
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	set := f.RequestsTo("POST", "/firewalls/"+itoa(mustFirewall(t, f).ID)+"/actions/set_rules")
	if len(set) != 1 {
		t.Fatalf("set_rules requests = %d, want 1", len(set))
	}
	if got := len(mustFirewall(t, f).Rules); got != 2 {
		t.Errorf("firewall has %d rules after repair, want 2", got)
	}
}

func TestProvisionRefusesWhatIsNotOurs(t *testing.T) {
	tests := []struct {
		name  string
		setup func(f *hcloudfake.Server)
		want  string
	}{
		{"server of another cluster", func(f *hcloudfake.Server) {
			f.AddServer("node1", map[string]string{hetzner.LabelCluster: "staging"})
		}, `server "node1" exists but is not labelled meshd/cluster=prod`},
		{"network without subnet in zone", func(f *hcloudfake.Server) {
			f.AddNetwork("prod-net", "172.20.0.0/16", nil)
		}, `network "prod-net" has no subnet in network zone eu-central`},
		{"bad server type", func(*hcloudfake.Server) {}, "server type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := hcloudfake.New(t, testToken)
			tt.setup(f)
			p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
			opts := baseOptions(t, "node1")
			if tt.name == "bad server type" {
				opts.ServerType = "cx999"
			}
			_, err := p.Provision(context.Background(), opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error = %v, want it to contain %q", err, tt.want)
			}
			if tt.name != "bad server type" && !strings.Contains(err.Error(), "node1") {
				t.Errorf("error %q does not name the server", err)
			}
		})
	}
}

func TestProvisionValidatesBeforeCallingTheAPI(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	for name, mutate := range map[string]func(*hetzner.ProvisionOptions){
		"no cluster":      func(o *hetzner.ProvisionOptions) { o.Cluster = "" },
		"bad name":        func(o *hetzner.ProvisionOptions) { o.Names = []string{"bad_name"} },
		"two dots":        func(o *hetzner.ProvisionOptions) { o.Names = []string{"a..b"} },
		"label with -":    func(o *hetzner.ProvisionOptions) { o.Names = []string{"web.-1"} },
		"trailing dot":    func(o *hetzner.ProvisionOptions) { o.Names = []string{"web1."} },
		"label too long":  func(o *hetzner.ProvisionOptions) { o.Names = []string{strings.Repeat("a", 64) + ".b"} },
		"no sha256":       func(o *hetzner.ProvisionOptions) { o.InfectSHA256 = "" },
		"duplicate name":  func(o *hetzner.ProvisionOptions) { o.Names = []string{"a", "a"} },
		"bad role":        func(o *hetzner.ProvisionOptions) { o.Role = "boss" },
		"no ssh key":      func(o *hetzner.ProvisionOptions) { o.SSHKeyFiles = nil },
		"subnet outside":  func(o *hetzner.ProvisionOptions) { o.Network.Subnet = netip.MustParsePrefix("10.0.0.0/24") },
		"user data large": func(o *hetzner.ProvisionOptions) { o.UserData = make([]byte, hetzner.MaxUserData+1) },
		"bad channel":     func(o *hetzner.ProvisionOptions) { o.NixChannel = "nixos-24.05; rm -rf /" },
	} {
		opts := baseOptions(t, "node1")
		mutate(&opts)
		if _, err := p.Provision(context.Background(), opts); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if n := len(f.Requests()); n != 0 {
		t.Errorf("invalid options sent %d requests", n)
	}
}

func statuses(rs []hcloudfake.Request) []int {
	var out []int
	for _, r := range rs {
		out = append(out, r.Status)
	}
	return out
}

func itoa(i int64) string {
	b, _ := json.Marshal(i)
	return string(b)
}

func rawField(t *testing.T, body []byte, field string) (json.RawMessage, bool) {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatal(err)
	}
	v, ok := raw[field]
	return v, ok
}

func mustFirewall(t *testing.T, f *hcloudfake.Server) schema.Firewall {
	t.Helper()
	fw, ok := f.Firewall("prod-meshd")
	if !ok {
		t.Fatal("no firewall prod-meshd")
	}
	return fw
}

func TestProvisionBoundsParallelismAndReportsFailedActions(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	f.CreateDelay = 30 * time.Millisecond
	f.FailAction("start_server", "n3", "server_error", "host unavailable")
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "n1", "n2", "n3", "n4", "n5")
	opts.Parallel = 2

	res, err := p.Provision(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "server n3") || !strings.Contains(err.Error(), "start_server: host unavailable (server_error") {
		t.Fatalf("error = %v", err)
	}
	if got := f.MaxConcurrentCreates(); got > 2 {
		t.Errorf("%d creates ran at once with --parallel 2", got)
	}
	for _, r := range res {
		if (r.Name == "n3") != (r.Outcome == hetzner.OutcomeFailed) {
			t.Errorf("%s: %s %s", r.Name, r.Outcome, r.Error)
		}
	}
	if s, _ := f.ServerByName("n3"); s.Status != "off" {
		t.Fatalf("n3 is %s after the failed start, want off", s.Status)
	}
	// The server exists but is off, so cloud-init never ran: a re-run
	// powers it on (not a second create) and reports it only once it
	// runs.
	before := len(f.RequestsTo("POST", "/servers"))
	res, err = p.Provision(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(f.RequestsTo("POST", "/servers")) - before; n != 0 {
		t.Errorf("re-run created %d servers", n)
	}
	if s, _ := f.ServerByName("n3"); len(f.RequestsTo("POST", "/servers/"+itoa(s.ID)+"/actions/poweron")) != 1 {
		t.Errorf("n3 was not powered on once")
	}
	if res[2].Name != "n3" || res[2].Outcome != hetzner.OutcomeStarted || res[2].Status != "running" {
		t.Errorf("n3 on re-run: %+v", res[2])
	}
	for _, r := range res[:2] {
		if r.Outcome != hetzner.OutcomeExists || r.Status != "running" {
			t.Errorf("%s on re-run: %+v", r.Name, r)
		}
	}
}

func TestProvisionRerunNeverReportsAServerThatDoesNotRun(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "n1")
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	// Powered off, and powering on fails again: the re-run must fail.
	f.SetServerStatus("n1", "off")
	f.FailAction("start_server", "n1", "server_error", "host unavailable")
	res, err := p.Provision(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "power on server") {
		t.Fatalf("re-run error = %v, want the failed power on", err)
	}
	if res[0].Outcome != hetzner.OutcomeFailed || res[0].Status != "off" {
		t.Errorf("result %+v, want failed and off", res[0])
	}
	// A server in a state it cannot leave by itself is a failure too.
	f.SetServerStatus("n1", "unknown")
	if res, err := p.Provision(context.Background(), opts); err == nil || res[0].Outcome != hetzner.OutcomeFailed {
		t.Errorf("server in status unknown reported %+v, %v", res[0], err)
	}
}

func TestProvisionWaitsForAStartingServer(t *testing.T) {
	f := hcloudfake.New(t, testToken)
	p := &hetzner.Provisioner{Client: newClient(t, f, &sleeps{})}
	opts := baseOptions(t, "n1")
	if _, err := p.Provision(context.Background(), opts); err != nil {
		t.Fatal(err)
	}
	s, _ := f.ServerByName("n1")
	f.SetServerStatus("n1", "starting")
	// The server becomes running after meshctl has looked at it a few
	// times; until then the re-run must neither report it nor power it on.
	go func() {
		for len(f.RequestsTo("GET", "/servers/"+itoa(s.ID))) < 3 {
			time.Sleep(time.Millisecond)
		}
		f.SetServerStatus("n1", "running")
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := p.Provision(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res[0].Outcome != hetzner.OutcomeExists || res[0].Status != "running" {
		t.Errorf("result %+v", res[0])
	}
	if n := len(f.RequestsTo("POST", "/servers/"+itoa(s.ID)+"/actions/poweron")); n != 0 {
		t.Errorf("powered on a starting server %d times", n)
	}
}
