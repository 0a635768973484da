package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/registry"
)

// hzFlags are the flags every Hetzner command shares.
type hzFlags struct {
	cluster      string
	tokenFile    string
	output       string
	pollInterval time.Duration
	timeout      time.Duration
}

func addHzFlags(e *env, fs *pflag.FlagSet, timeout time.Duration) *hzFlags {
	f := &hzFlags{}
	fs.StringVar(&f.cluster, "cluster", e.Getenv("MESHCTL_CLUSTER"), "cluster name, the value of the meshd/cluster label (env MESHCTL_CLUSTER)")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the Hetzner Cloud API token (default: env HCLOUD_TOKEN)")
	fs.StringVarP(&f.output, "output", "o", "table", outputUsage)
	fs.DurationVar(&f.pollInterval, "poll-interval", time.Second, "how often running actions are polled; also the first retry backoff")
	fs.DurationVar(&f.timeout, "timeout", timeout, "give up after this long")
	return f
}

// hzSession is what a Hetzner command works with: a client, the token to
// keep out of every output, and writers that enforce that.
type hzSession struct {
	prov   *hetzner.Provisioner
	token  string
	stdout io.Writer
	stderr io.Writer
}

// redactor replaces the API token in everything written through it. The
// token should never reach an output in the first place; this is the
// guard for an API or proxy error that echoes it back.
type redactor struct {
	w     io.Writer
	token string
}

func (r redactor) Write(p []byte) (int, error) {
	if r.token == "" || !strings.Contains(string(p), r.token) {
		return r.w.Write(p)
	}
	if _, err := io.WriteString(r.w, strings.ReplaceAll(string(p), r.token, "[REDACTED]")); err != nil {
		return 0, err
	}
	return len(p), nil
}

// redactedError carries an error whose message has the token removed.
type redactedError struct {
	msg string
	err error
}

func (r redactedError) Error() string { return r.msg }
func (r redactedError) Unwrap() error { return r.err }

func (s *hzSession) redact(err error) error {
	if err == nil || s.token == "" || !strings.Contains(err.Error(), s.token) {
		return err
	}
	return redactedError{strings.ReplaceAll(err.Error(), s.token, "[REDACTED]"), err}
}

// hzError maps the package's validation errors to usage errors (exit 2).
func hzError(err error) error {
	if errors.Is(err, hetzner.ErrInvalid) || errors.Is(err, hetzner.ErrNotInCluster) {
		return usageError{err}
	}
	return err
}

func (f *hzFlags) session(e *env) (*hzSession, error) {
	if err := hetzner.ValidateCluster(f.cluster); err != nil {
		return nil, usageError{err}
	}
	if err := checkOutput(f.output); err != nil {
		return nil, err
	}
	token := strings.TrimSpace(e.Getenv("HCLOUD_TOKEN"))
	if f.tokenFile != "" {
		b, err := os.ReadFile(f.tokenFile)
		if err != nil {
			return nil, fmt.Errorf("read --token-file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	c, err := hetzner.NewClient(hetzner.ClientOptions{
		Token: token, Endpoint: e.Getenv("HCLOUD_ENDPOINT"), PollInterval: f.pollInterval,
		Retry: hetzner.RetryOptions{Base: f.pollInterval},
	})
	if err != nil {
		return nil, hzError(err)
	}
	s := &hzSession{token: token, stdout: redactor{e.Stdout, token}, stderr: redactor{e.Stderr, token}}
	s.prov = &hetzner.Provisioner{Client: c, Progress: hetzner.NewProgress(s.stderr, hetzner.IsTerminal(e.Stderr))}
	return s, nil
}

func cmdProvision(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "provision")
	hf := addHzFlags(e, fs, 20*time.Minute)
	var o hetzner.ProvisionOptions
	var sshFiles, labels []string
	var network, ipRange, subnet, userData string
	var noPG bool
	fs.StringVar(&o.ServerType, "type", hetzner.DefaultServerType, "server type (looked up: a deprecated or unorderable one is refused)")
	fs.StringVar(&o.Location, "location", hetzner.DefaultLocation, "location")
	fs.StringVar(&o.Image, "image", hetzner.DefaultImage, "image name or ID the cloud-config converts to NixOS (a deprecated one is refused)")
	fs.StringVar(&o.Role, "role", "worker", "node role: worker, ingress, service or control")
	fs.StringArrayVar(&o.SSHKeys, "ssh-key", nil, "name of an SSH key in the project (repeatable)")
	fs.StringArrayVar(&sshFiles, "ssh-key-file", nil, "public key file, uploaded unless a key with its fingerprint exists (repeatable)")
	fs.StringArrayVar(&labels, "labels", nil, "extra server labels k=v[,k=v] (repeatable)")
	fs.StringVar(&network, "network", "", "private network to attach (created if missing)")
	fs.StringVar(&ipRange, "network-ip-range", "172.20.0.0/16", "IP range of a network that is created")
	fs.StringVar(&subnet, "network-subnet", "172.20.1.0/24", "cloud subnet of the network in the location's zone")
	fs.StringVar(&o.PlacementGroup, "placement-group", "", "spread placement group (created if missing; default CLUSTER-spread)")
	fs.BoolVar(&noPG, "no-placement-group", false, "do not use a placement group")
	fs.StringVar(&o.Firewall, "firewall", "", "cluster firewall (created if missing; default CLUSTER-meshd)")
	fs.IntVar(&o.WireGuardPort, "wireguard-port", 51820, "WireGuard UDP port the firewall opens")
	fs.StringVar(&userData, "user-data", "", "cloud-init user data file used instead of the generated cloud-config")
	fs.StringVar(&o.NixChannel, "nix-channel", hetzner.DefaultNixChannel, "NixOS channel the cloud-config installs")
	fs.StringVar(&o.InfectURL, "nixos-infect-url", hetzner.DefaultInfectURL, "nixos-infect script URL, pinned to a reviewed commit")
	fs.StringVar(&o.InfectSHA256, "nixos-infect-sha256", hetzner.DefaultInfectSHA256, "sha256 the script must have to run (required with --nixos-infect-url)")
	fs.IntVar(&o.Parallel, "parallel", 5, "servers created at once")
	if err := parse(fs, args); err != nil {
		return err
	}
	o.Cluster, o.Names, o.PollInterval = hf.cluster, fs.Args(), hf.pollInterval
	if len(o.Names) == 0 {
		return usagef("usage: meshctl provision NAME... --cluster C [flags]")
	}
	if fs.Changed("nixos-infect-url") && !fs.Changed("nixos-infect-sha256") {
		return usagef("--nixos-infect-url needs --nixos-infect-sha256: the script runs as root only if its sha256 matches")
	}
	if o.PlacementGroup == "" && !noPG {
		o.PlacementGroup = hf.cluster + "-spread"
	}
	if noPG {
		o.PlacementGroup = ""
	}
	if o.Firewall == "" {
		o.Firewall = hf.cluster + "-meshd"
	}
	for _, p := range sshFiles {
		b, err := os.ReadFile(p)
		if err != nil {
			return usagef("--ssh-key-file: %v", err)
		}
		pk, err := hetzner.ParsePublicKey(string(b))
		if err != nil {
			return usagef("--ssh-key-file %s: %v", p, err)
		}
		o.SSHKeyFiles = append(o.SSHKeyFiles, pk)
	}
	var err error
	if o.Labels, err = hetzner.ParseLabels(labels); err != nil {
		return usageError{err}
	}
	if network != "" {
		spec := hetzner.NetworkSpec{Name: network}
		if spec.IPRange, err = netip.ParsePrefix(ipRange); err != nil {
			return usagef("--network-ip-range: %v", err)
		}
		if spec.Subnet, err = netip.ParsePrefix(subnet); err != nil {
			return usagef("--network-subnet: %v", err)
		}
		o.Network = &spec
	}
	if userData != "" {
		if o.UserData, err = os.ReadFile(userData); err != nil {
			return usagef("--user-data: %v", err)
		}
	}
	s, err := hf.session(e)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, hf.timeout)
	defer cancel()
	res, perr := s.prov.Provision(ctx, o)
	if res != nil {
		if err := hzWrite(s.stdout, hf.output, res, hetzner.WriteServerTable); err != nil {
			return err
		}
	}
	return s.redact(hzError(perr))
}

func hzWrite[T any](w io.Writer, format string, v T, table func(io.Writer, T) error) error {
	if isData(format) {
		return printData(w, format, v)
	}
	return table(w, v)
}

// etcdRegistry is the registry as destroy and cloud see it.
type etcdRegistry struct{ cli *clientv3.Client }

// RemoveNode implements hetzner.NodeRemover.
func (r etcdRegistry) RemoveNode(ctx context.Context, name string) (int64, error) {
	return registry.RemoveNode(ctx, r.cli, name)
}

// exitRegistry is the exit code of destroy and cloud when the Hetzner
// part was done but the registry could not be reached: destroy deleted
// the servers and left their registry keys (it says which, and the
// command that removes them later); cloud showed the servers without
// their registry state.
const exitRegistry = 4

// errRegistryUnreachable marks an error that exits with exitRegistry.
var errRegistryUnreachable = errors.New("registry unreachable")

// registryError is an error that wraps errRegistryUnreachable and keeps
// its own message.
type registryError struct{ err error }

func (r registryError) Error() string { return r.err.Error() }
func (r registryError) Unwrap() []error {
	return []error{r.err, errRegistryUnreachable}
}

// snapshotOrWarn reads the registry; when it cannot, it says so on stderr
// and returns nils: destroy and cloud go on with the servers.
func (e *env) snapshotOrWarn(ctx context.Context) (*clientv3.Client, *registry.Snapshot, error) {
	cli, snap, err := e.readSnapshot(ctx)
	if err != nil {
		fmt.Fprintf(e.Stderr, "warning: the registry (etcd) cannot be read: %v\n", err)
		return nil, nil, err
	}
	return cli, snap, nil
}

func cmdDestroy(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "destroy")
	hf := addHzFlags(e, fs, 10*time.Minute)
	yes := fs.Bool("yes", false, "do not ask for confirmation")
	parallel := fs.Int("parallel", 5, "servers deleted at once")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return usagef("usage: meshctl destroy NAME... --cluster C [--yes]")
	}
	for _, n := range fs.Args() {
		if err := registry.ValidName(n); err != nil {
			return usagef("%v", err)
		}
	}
	s, err := hf.session(e)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, hf.timeout)
	defer cancel()
	servers, err := s.prov.ListServers(ctx, hf.cluster)
	if err != nil {
		return s.redact(err)
	}
	// The registry is read but not required: after a failed bootstrap,
	// or when the etcd node is among the servers, the servers must still
	// be deletable. Their keys are then left, and reported.
	cli, snap, snapErr := e.snapshotOrWarn(ctx)
	plan, err := hetzner.PlanDestroy(hf.cluster, fs.Args(), servers, snap)
	if err != nil {
		return hzError(err)
	}
	if !*yes {
		ok, err := hzConfirm(ctx, e, plan, snapErr != nil)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("aborted, nothing deleted")
		}
	}
	var reg hetzner.NodeRemover
	if cli != nil {
		reg = etcdRegistry{cli}
	}
	res, derr := s.prov.Destroy(ctx, plan, reg, *parallel)
	if err := hzWrite(s.stdout, hf.output, res, hetzner.WriteDestroyTable); err != nil {
		return err
	}
	if errors.Is(derr, hetzner.ErrKeysLeft) {
		return registryError{s.redact(derr)}
	}
	return s.redact(derr)
}

// hzConfirm shows what will be deleted and reads the answer from stdin.
// It returns at once when ctx ends (Ctrl-C), whatever stdin does.
func hzConfirm(ctx context.Context, e *env, plan hetzner.DestroyPlan, noRegistry bool) (bool, error) {
	fmt.Fprintf(e.Stderr, "This deletes, in cluster %s:\n", plan.Cluster)
	for _, srv := range plan.Servers {
		what := "and its registry keys"
		if noRegistry {
			what = "(its registry keys stay: the registry cannot be reached)"
		}
		fmt.Fprintf(e.Stderr, "  server %s (id %d, %s) %s\n", srv.Name, srv.ID, hzIPv4(srv), what)
	}
	for _, n := range plan.RegistryOnly {
		fmt.Fprintf(e.Stderr, "  registry keys of %s (no server)\n", n)
	}
	fmt.Fprint(e.Stderr, "Continue? [y/N] ")
	type answer struct {
		line string
		err  error
	}
	ch := make(chan answer, 1)
	go func() {
		// This reader may outlive the prompt when ctx ends first; it
		// only ever sends to a buffered channel, and the process exits.
		line, err := bufio.NewReader(e.Stdin).ReadString('\n')
		ch <- answer{line, err}
	}()
	select {
	case <-ctx.Done():
		fmt.Fprintln(e.Stderr)
		return false, fmt.Errorf("interrupted at the prompt, nothing deleted: %w", ctx.Err())
	case a := <-ch:
		if a.err != nil && !errors.Is(a.err, io.EOF) {
			return false, fmt.Errorf("read confirmation: %w", a.err)
		}
		answer := strings.ToLower(strings.TrimSpace(a.line))
		return answer == "y" || answer == "yes", nil
	}
}

func hzIPv4(s *hcloud.Server) string {
	if s.PublicNet.IPv4.IsUnspecified() {
		return "no IPv4"
	}
	return s.PublicNet.IPv4.IP.String()
}

func cmdCloud(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 && args[0] == "list" {
		args = args[1:]
	}
	fs := flags(e, "cloud")
	hf := addHzFlags(e, fs, 2*time.Minute)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("usage: meshctl cloud [list] --cluster C [-o json]")
	}
	s, err := hf.session(e)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, hf.timeout)
	defer cancel()
	servers, err := s.prov.ListServers(ctx, hf.cluster)
	if err != nil {
		return s.redact(err)
	}
	_, snap, snapErr := e.snapshotOrWarn(ctx)
	if err := hzWrite(s.stdout, hf.output, hetzner.Inventory(servers, snap), hetzner.WriteInventoryTable); err != nil {
		return err
	}
	if snapErr != nil {
		return registryError{fmt.Errorf("servers listed without their registry state (STATE unknown): %w", snapErr)}
	}
	return nil
}
