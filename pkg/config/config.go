// Package config is meshd's configuration file: what a NixOS module (or an
// operator) writes, as JSON. Flags override a few fields; everything has a
// sane default so that a minimal file is a node name and etcd endpoints.
package config

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

// Duration is a time.Duration that reads and writes as a Go duration
// string ("10s") in JSON.
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
// Errors are *json.UnmarshalTypeError so that encoding/json names the field.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return &json.UnmarshalTypeError{Value: string(b) + " (want a duration string such as \"10s\")", Type: reflect.TypeFor[Duration]()}
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return &json.UnmarshalTypeError{Value: fmt.Sprintf("%q (want a duration such as \"10s\")", s), Type: reflect.TypeFor[Duration]()}
	}
	*d = Duration(v)
	return nil
}

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Config is meshd's whole configuration.
type Config struct {
	// NodeName is this node's name in the registry (default: hostname).
	NodeName string `json:"nodeName"`
	// PublicIPv4 is written as the node entry's "ipv4" (nix-infra's field).
	PublicIPv4 string `json:"publicIPv4,omitempty"`
	// Consume lists the groups whose apps this node's HAProxy listens for.
	Consume []registry.Group `json:"consume,omitempty"`
	// StateDir keeps the WireGuard key, the age identity and the overlay
	// cache across restarts.
	StateDir string `json:"stateDir"`
	// LeaseTTL is the presence lease: a node that stops renewing it
	// vanishes from every other node's view after this long.
	LeaseTTL Duration `json:"leaseTTL"`
	// OnStop is what a clean stop (SIGTERM) does with the node's lease:
	// OnStopRevoke gives it back, so every node drops this node's entry
	// and instances at once; OnStopKeep leaves it for the next meshd
	// process to resume, so a restart changes nothing anywhere (a node
	// that does not come back vanishes after LeaseTTL, its instances with
	// it); OnStopAuto (the default) keeps it unless systemd reports that
	// the system is shutting down, and revokes it where there is no
	// systemd to ask.
	OnStop string `json:"onStop"`
	// Coalesce is the reconcile loop's burst window: an event after a
	// quiet period is applied at once; events during a pass or within
	// this window after it are applied together by the next pass.
	Coalesce Duration `json:"coalesce"`
	// MetricsAddr serves /metrics and /healthz ("" disables).
	MetricsAddr string `json:"metricsAddr"`
	// Pprof also serves Go's profiler (/debug/pprof/) on MetricsAddr: for
	// profiling a node, off by default (it exposes stacks and costs CPU
	// while a profile runs).
	Pprof bool `json:"pprof,omitempty"`

	Etcd      Etcd       `json:"etcd"`
	Instances []Instance `json:"instances,omitempty"`
	Overlay   Overlay    `json:"overlay"`
	HAProxy   HAProxy    `json:"haproxy"`
	Secrets   Secrets    `json:"secrets"`
}

// Etcd says how to reach the cluster's etcd.
type Etcd struct {
	Endpoints   []string `json:"endpoints"`
	CAFile      string   `json:"caFile,omitempty"`
	CertFile    string   `json:"certFile,omitempty"`
	KeyFile     string   `json:"keyFile,omitempty"`
	DialTimeout Duration `json:"dialTimeout"`
}

// Instance is an app instance this node serves. meshd advertises it, on
// its lease, while its check passes.
type Instance struct {
	App   string         `json:"app"`
	Group registry.Group `json:"group"`
	Port  int            `json:"port"`
	// Check decides whether the instance is advertised.
	Check Check `json:"check"`
}

// Check is an instance's local health check. The instance is advertised
// while every part passes: Unit (when set) is active, and a TCP connect
// succeeds to TCP when set, otherwise to the address the instance is
// advertised with (the node's overlay IP, or publicIPv4 without overlay,
// and Port), so that the app itself answers, not the node's HAProxy on
// 127.0.0.1.
type Check struct {
	// TCP is an address to connect to instead of the advertised address.
	TCP string `json:"tcp,omitempty"`
	// Unit is a systemd unit that must be active.
	Unit string `json:"unit,omitempty"`
	// Disable advertises the instance unconditionally.
	Disable bool `json:"disable,omitempty"`
	// Interval is how often the check runs (0: 1s).
	Interval Duration `json:"interval,omitempty"`
	// Timeout bounds one run of the check (0: the interval, at most 2s).
	Timeout Duration `json:"timeout,omitempty"`
}

// Overlay configures the WireGuard mesh.
type Overlay struct {
	Enable bool `json:"enable"`
	// Network is the cluster prefix; node subnets are carved from
	// [SubnetMin, SubnetMax] with SubnetLen bits. Defaults match
	// nix-infra's flannel network so overlay addresses survive migration.
	Network   netip.Prefix `json:"network"`
	SubnetMin netip.Addr   `json:"subnetMin"`
	SubnetMax netip.Addr   `json:"subnetMax"`
	SubnetLen int          `json:"subnetLen"`
	// RouteNetwork routes the whole Network through the interface instead
	// of one route per peer subnet. Off by default: 10.0.0.0/8 swallows a
	// Hetzner private network.
	RouteNetwork bool   `json:"routeNetwork,omitempty"`
	Interface    string `json:"interface"`
	ListenPort   int    `json:"listenPort"`
	// Endpoint is the host:port peers dial; default PublicIPv4:ListenPort.
	Endpoint string `json:"endpoint,omitempty"`
	// MTU of the interface; 0 means uplink MTU - 80.
	MTU       int      `json:"mtu,omitempty"`
	Keepalive Duration `json:"keepalive"`
	// Mode is "auto" (kernel if available, else userspace), "kernel" or
	// "userspace".
	Mode string `json:"mode"`
	// RouteTable holds meshd's routes, away from the main table that
	// systemd-networkd manages.
	RouteTable int `json:"routeTable"`
	// ImportKeyFile is flanneld's WireGuard private key file (flannel's
	// WIREGUARD_KEY_FILE, default /run/flannel/wgkey). On meshd's first
	// start, when the state directory has no key yet, the key is taken
	// from there so a migrating node keeps its public key. Empty: a new
	// key.
	ImportKeyFile string `json:"importKeyFile,omitempty"`
}

// HAProxy configures the service mesh proxy.
type HAProxy struct {
	Enable bool `json:"enable"`
	// ConfigPath is the file meshd renders. Not /etc/haproxy.cfg: the OS
	// configuration owns that and replaces it on every rebuild.
	ConfigPath   string `json:"configPath"`
	MasterSocket string `json:"masterSocket"`
	StatsSocket  string `json:"statsSocket"`
	Binary       string `json:"binary"`
	// Supervise makes meshd start and own the haproxy master process;
	// otherwise (systemd runs haproxy) meshd only talks to its master socket.
	Supervise bool `json:"supervise"`
	// ReservedPorts are loopback ports this node's own services use; an app
	// publishing one of them is reported and skipped.
	ReservedPorts []int `json:"reservedPorts,omitempty"`
	// AllowLowPorts are ports below 1024 apps may publish on this node
	// (80 and 443 on an ingress node); any other port below 1024 is
	// refused. meshd's own metrics port is always reserved.
	AllowLowPorts []int `json:"allowLowPorts,omitempty"`
	// User and Group are what HAProxy's worker runs as (rendered as its
	// user/group directives; it drops root after binding). The NixOS
	// module sets them to its meshd-haproxy user.
	User  string `json:"user,omitempty"`
	Group string `json:"group,omitempty"`
	// ServerSlots is how many server slots each backend pre-allocates so
	// that instance changes need no reload.
	ServerSlots int `json:"serverSlots"`
	// HardStopAfter bounds how long an old worker may drain connections
	// after a reload (0: 30s).
	HardStopAfter Duration `json:"hardStopAfter,omitempty"`
	// MaxReloads is mworker-max-reloads: old workers kept at most (0: 3).
	MaxReloads int `json:"maxReloads,omitempty"`
}

// Secrets configures delivery of sealed secrets as systemd credentials.
type Secrets struct {
	Enable bool `json:"enable"`
	// CredstoreDir receives the encrypted credentials.
	CredstoreDir string `json:"credstoreDir"`
	// WithKey is systemd-creds' --with-key: host, tpm2, host+tpm2, auto.
	WithKey string `json:"withKey"`
	// Units says, per secret name, which units use it and what to do when it
	// changes.
	Units map[string]SecretUse `json:"units,omitempty"`
}

// SecretUse lists the units that use one secret; pkg/creds owns it.
type SecretUse = creds.SecretUse

// The values of Config.OnStop.
const (
	OnStopAuto   = "auto"
	OnStopRevoke = "revoke"
	OnStopKeep   = "keep"
)

// Default returns the configuration with every default filled in.
func Default() Config {
	host, _ := os.Hostname()
	return Config{
		NodeName:    host,
		StateDir:    "/var/lib/meshd",
		LeaseTTL:    Duration(10 * time.Second),
		OnStop:      OnStopAuto,
		Coalesce:    Duration(5 * time.Millisecond),
		MetricsAddr: "127.0.0.1:9464",
		Etcd: Etcd{
			Endpoints:   []string{"http://127.0.0.1:2379"},
			DialTimeout: Duration(5 * time.Second),
		},
		Overlay: Overlay{
			Enable:     true,
			Network:    netip.MustParsePrefix("10.0.0.0/8"),
			SubnetMin:  netip.MustParseAddr("10.10.0.0"),
			SubnetMax:  netip.MustParseAddr("10.99.0.0"),
			SubnetLen:  24,
			Interface:  "meshd-wg",
			ListenPort: 51820,
			Keepalive:  Duration(25 * time.Second),
			Mode:       "auto",
			RouteTable: 51820,
		},
		HAProxy: HAProxy{
			Enable:       true,
			ConfigPath:   "/run/meshd/haproxy.cfg",
			MasterSocket: "/run/meshd/haproxy-master.sock",
			StatsSocket:  "/run/meshd/haproxy-stats.sock",
			Binary:       "haproxy",
			Supervise:    true,
			ServerSlots:  8,
		},
		Secrets: Secrets{
			Enable:       true,
			CredstoreDir: "/etc/credstore.encrypted",
			WithKey:      "host",
		},
	}
}

// Load reads a config file over the defaults. Unknown fields are an error:
// a typo must not silently fall back to a default.
func Load(path string) (Config, error) {
	c := Default()
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("read config: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	c.expandCredentials(os.Getenv("CREDENTIALS_DIRECTORY"))
	return c, nil
}

// expandCredentials replaces ${CREDENTIALS_DIRECTORY} in the etcd TLS file
// paths: under systemd those files arrive through LoadCredential= (never
// through the world-readable Nix store) and their directory is known only
// at run time.
func (c *Config) expandCredentials(dir string) {
	for _, p := range []*string{&c.Etcd.CAFile, &c.Etcd.CertFile, &c.Etcd.KeyFile} {
		*p = strings.ReplaceAll(*p, "${CREDENTIALS_DIRECTORY}", dir)
	}
}

// Validate checks the configuration and returns every problem found.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if err := registry.ValidName(c.NodeName); err != nil {
		bad("nodeName: %w", err)
	}
	if c.PublicIPv4 != "" {
		if a, err := netip.ParseAddr(c.PublicIPv4); err != nil || !a.Is4() {
			bad("publicIPv4 %q: not an IPv4 address", c.PublicIPv4)
		}
	}
	for _, g := range c.Consume {
		if _, err := registry.ParseGroup(string(g)); err != nil {
			bad("consume: %w", err)
		}
	}
	if c.StateDir == "" {
		bad("stateDir: empty")
	}
	if c.LeaseTTL.D() < 2*time.Second || c.LeaseTTL.D() > time.Hour {
		bad("leaseTTL %v: want between 2s and 1h", c.LeaseTTL.D())
	}
	switch c.OnStop {
	case OnStopAuto, OnStopRevoke, OnStopKeep:
	default:
		bad("onStop %q: want %q, %q or %q", c.OnStop, OnStopAuto, OnStopRevoke, OnStopKeep)
	}
	if c.Coalesce.D() < 0 || c.Coalesce.D() > 10*time.Second {
		bad("coalesce %v: want between 0 and 10s", c.Coalesce.D())
	}
	if len(c.Etcd.Endpoints) == 0 {
		bad("etcd.endpoints: empty")
	}
	if (c.Etcd.CertFile == "") != (c.Etcd.KeyFile == "") {
		bad("etcd: certFile and keyFile go together")
	}
	seen := map[string]bool{}
	for i, in := range c.Instances {
		if err := registry.ValidName(in.App); err != nil {
			bad("instances[%d].app: %w", i, err)
		}
		if _, err := registry.ParseGroup(string(in.Group)); err != nil {
			bad("instances[%d].group: %w", i, err)
		}
		if in.Port < 1 || in.Port > 65535 {
			bad("instances[%d].port %d: out of range", i, in.Port)
		}
		id := string(in.Group) + "/" + in.App
		if seen[id] {
			bad("instances[%d]: %s declared twice", i, id)
		}
		seen[id] = true
		if in.Check.TCP != "" {
			if _, err := netip.ParseAddrPort(in.Check.TCP); err != nil {
				bad("instances[%d].check.tcp: %w", i, err)
			}
		}
		if in.Check.Interval < 0 || in.Check.Timeout < 0 {
			bad("instances[%d].check: interval and timeout must not be negative", i)
		}
	}
	if len(c.Instances) > 0 && !c.Overlay.Enable && c.PublicIPv4 == "" {
		bad("instances: without overlay.enable they are advertised with publicIPv4, which is not set")
	}
	if o := c.Overlay; o.Enable {
		if o.SubnetLen < o.Network.Bits() || o.SubnetLen > 30 {
			bad("overlay.subnetLen %d: want between the network's %d bits and 30", o.SubnetLen, o.Network.Bits())
		}
		if !o.Network.Contains(o.SubnetMin) || !o.Network.Contains(o.SubnetMax) || o.SubnetMax.Less(o.SubnetMin) {
			bad("overlay.subnetMin/subnetMax: want an ordered range inside %v", o.Network)
		}
		if o.Endpoint != "" {
			if _, err := netip.ParseAddrPort(o.Endpoint); err != nil {
				bad("overlay.endpoint: %w", err)
			}
		}
		section(&errs, "overlay", c.OverlayOptions().Validate())
	}
	if c.HAProxy.Enable {
		o := c.HAProxyOptions()
		o.Self = c.validNodeName()
		section(&errs, "haproxy", o.Validate())
	}
	if c.Secrets.Enable && !c.Overlay.Enable {
		bad("secrets.enable needs overlay.enable: a node's age recipient is published in its overlay member record")
	}
	if s := c.Secrets; s.Enable {
		if s.CredstoreDir == "" {
			bad("secrets.credstoreDir: empty")
		}
		o := c.SecretsOptions()
		o.Self, o.StateDir = c.validNodeName(), cmp.Or(o.StateDir, "/")
		section(&errs, "secrets", o.Validate())
	}
	return errors.Join(errs...)
}

// section adds the problems a component found in its section of the
// config, each named as the config file names it ("haproxy.serverSlots").
func section(errs *[]error, name string, err error) {
	if err == nil {
		return
	}
	all := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		all = j.Unwrap()
	}
	for _, e := range all {
		*errs = append(*errs, fmt.Errorf("%s.%w", name, e))
	}
}

// validNodeName is the node name to hand a component's Validate: a bad
// one is reported once, as nodeName, not again by every section.
func (c *Config) validNodeName() string {
	if registry.ValidName(c.NodeName) != nil {
		return "node"
	}
	return c.NodeName
}

// OverlayOptions maps the overlay section onto the overlay component's
// options. It asks for detached userspace devices, which needs
// overlay.MaybeRunDevice(os.Args[1:]) at the top of main.
func (c *Config) OverlayOptions() overlay.Options {
	o := c.Overlay
	return overlay.Options{
		Self:          c.NodeName,
		StateDir:      c.StateDir,
		Interface:     o.Interface,
		ListenPort:    o.ListenPort,
		MTU:           o.MTU,
		Keepalive:     o.Keepalive.D(),
		Mode:          o.Mode,
		RouteTable:    o.RouteTable,
		RouteNetwork:  o.RouteNetwork,
		Network:       o.Network,
		Pool:          registry.Pool{Min: o.SubnetMin, Max: o.SubnetMax, Bits: o.SubnetLen},
		ImportKeyFile: o.ImportKeyFile,

		DetachUserspace: true,
	}
}

// HAProxyOptions maps the "haproxy" section (and the node's name and
// consumed groups) onto the HAProxy component's options.
func (c *Config) HAProxyOptions() haproxycfg.Options {
	h := c.HAProxy
	return haproxycfg.Options{
		Self: c.NodeName, Consume: c.Consume, ConfigPath: h.ConfigPath, MasterSocket: h.MasterSocket,
		StatsSocket: h.StatsSocket, Binary: h.Binary, Supervise: h.Supervise,
		ReservedPorts: h.ReservedPorts, AllowLowPorts: h.AllowLowPorts, ServerSlots: h.ServerSlots,
		HardStopAfter: h.HardStopAfter.D(), MaxReloads: h.MaxReloads, User: h.User, Group: h.Group,
	}
}

// SecretsOptions maps the "secrets" section (and the node's name and
// state directory) onto the credentials component's options.
func (c *Config) SecretsOptions() creds.Options {
	return creds.Options{
		Self: c.NodeName, StateDir: c.StateDir, CredstoreDir: c.Secrets.CredstoreDir,
		WithKey: c.Secrets.WithKey, Units: c.Secrets.Units,
	}
}
