package etcdauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// SettingsKey holds the settings of the last `roles apply` (operator
// only: no node role covers /meshd/roles/), so that a refresh made as a
// side effect (after `meshctl app register`) applies the same policy
// instead of defaults: the same subnet pool and mode, the same operators.
const SettingsKey = "/meshd/roles/settings"

// Settings are the parts of Options that describe the cluster rather
// than one run.
type Settings struct {
	Operators   []string `json:"operators,omitempty"`
	OpenSubnets bool     `json:"openSubnets,omitempty"`
	PoolMin     string   `json:"subnetMin"`
	PoolMax     string   `json:"subnetMax"`
	PoolBits    int      `json:"subnetLen"`
}

// ErrNoSettings is returned (wrapped) by a refresh on a cluster where
// `roles apply` never stored its settings.
var ErrNoSettings = errors.New("no stored etcd role settings: run meshctl etcd roles apply once")

func settingsOf(o Options) Settings {
	s := Settings{Operators: slices.Clone(o.Operators), OpenSubnets: o.Subnets == OpenSubnets,
		PoolMin: o.Pool.Min.String(), PoolMax: o.Pool.Max.String(), PoolBits: o.Pool.Bits}
	slices.Sort(s.Operators)
	s.Operators = slices.Compact(s.Operators)
	return s
}

// apply copies the stored settings into o.
func (s Settings) apply(o *Options) error {
	var err error
	if o.Pool.Min, err = netip.ParseAddr(s.PoolMin); err != nil || !o.Pool.Min.Is4() {
		return fmt.Errorf("stored settings: subnetMin %s: want an IPv4 address", registry.Quoted([]byte(s.PoolMin)))
	}
	if o.Pool.Max, err = netip.ParseAddr(s.PoolMax); err != nil || !o.Pool.Max.Is4() {
		return fmt.Errorf("stored settings: subnetMax %s: want an IPv4 address", registry.Quoted([]byte(s.PoolMax)))
	}
	if s.PoolBits < 8 || s.PoolBits > 30 {
		return fmt.Errorf("stored settings: subnetLen %d: want 8..30", s.PoolBits)
	}
	o.Pool.Bits = s.PoolBits
	o.Operators = s.Operators
	o.Subnets = Preclaim
	if s.OpenSubnets {
		o.Subnets = OpenSubnets
	}
	return nil
}

// storeSettings records o's settings unless they are stored already.
func storeSettings(ctx context.Context, cli *clientv3.Client, o Options) error {
	b, err := json.Marshal(settingsOf(o))
	if err != nil {
		return err
	}
	r, err := cli.Get(ctx, SettingsKey)
	if err != nil {
		return fmt.Errorf("read role settings: %w", err)
	}
	if len(r.Kvs) == 1 && string(r.Kvs[0].Value) == string(b) {
		return nil
	}
	if _, err := cli.Put(ctx, SettingsKey, string(b)); err != nil {
		return fmt.Errorf("store role settings: %w", err)
	}
	return nil
}

// LoadSettings reads the stored settings into a fresh Options.
func LoadSettings(ctx context.Context, cli *clientv3.Client) (Options, error) {
	r, err := cli.Get(ctx, SettingsKey)
	if err != nil {
		return Options{}, fmt.Errorf("read role settings: %w", err)
	}
	if len(r.Kvs) == 0 {
		return Options{}, ErrNoSettings
	}
	var s Settings
	if err := json.Unmarshal(r.Kvs[0].Value, &s); err != nil {
		return Options{}, fmt.Errorf("stored role settings %s: %w", registry.Quoted(r.Kvs[0].Value), err)
	}
	var o Options
	if err := s.apply(&o); err != nil {
		return Options{}, err
	}
	for _, op := range o.Operators {
		if err := registry.ValidName(op); err != nil {
			return Options{}, fmt.Errorf("stored settings: operator: %w", err)
		}
	}
	return o, nil
}
