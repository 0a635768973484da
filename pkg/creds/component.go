package creds

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"filippo.io/age"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/registry"
)

// DefaultCredstoreDir is where systemd looks up LoadCredentialEncrypted=
// and ImportCredential= names without a path.
const DefaultCredstoreDir = "/etc/credstore.encrypted"

// Options configures the delivery component. Everything but Self and
// StateDir has a default.
type Options struct {
	// Self is this node's name.
	Self string
	// StateDir holds the age identity and the manifest of written
	// credentials.
	StateDir string
	// CredstoreDir receives the credentials (default DefaultCredstoreDir).
	CredstoreDir string
	// WithKey is systemd-creds' --with-key (default "host"; Hetzner Cloud
	// has no vTPM). Used only by the default Creds.
	WithKey string
	// Units says, per secret name, which units use it and what to do when
	// it changes.
	Units map[string]SecretUse
	// Creds encrypts credentials (default SystemdCreds{WithKey: WithKey}).
	Creds Encrypter
	// Manager restarts and reloads units (default a DBusManager, which
	// connects on first use).
	Manager UnitManager
}

// Status is what the component publishes in the node's status under
// components.creds. meshctl secret list and --wait read it. It holds
// versions and error messages only, never a value.
type Status struct {
	// Delivered is the version of each secret whose credential file is in
	// place.
	Delivered map[string]int64 `json:"delivered"`
	// Errors holds, per secret name, why its newest version is not
	// delivered (or why its units were not told).
	Errors map[string]string `json:"errors,omitempty"`
	// Recipient is this node's age recipient.
	Recipient string `json:"recipient,omitempty"`
}

// Component delivers this node's sealed secrets as systemd credentials.
// It implements the agent's Component interface.
type Component struct {
	opts    Options
	log     *slog.Logger
	id      *age.X25519Identity
	metrics *metrics

	mu       sync.Mutex
	manifest map[string]delivered // guarded by mu
	errs     map[string]string    // delivery errors, guarded by mu
	unitErrs map[string]string    // unit action errors, guarded by mu
	// unopened remembers the ciphertext sum that failed to open, per
	// secret, so a bad ciphertext is logged once, not on every pass.
	unopened map[string]string // guarded by mu
}

// WithKeys are the values of Options.WithKey: systemd-creds' --with-key
// choices that systemd 252 knows ("tpm2-absent" is 252's name for no key).
var WithKeys = []string{"host", "tpm2", "host+tpm2", "auto", "tpm2-absent"}

// SecretUse lists the units that use one secret (meshd's config file,
// secrets.units).
type SecretUse struct {
	Units []string `json:"units"`
	// Action is "restart" (default), "reload" or "none".
	Action string `json:"action,omitempty"`
}

// Validate checks the options without touching the system and returns
// every problem found, each naming its field as meshd's config file does.
// New refuses what it refuses, and meshd's config check (pkg/config)
// calls it for the "secrets" section, so the two cannot disagree. An
// empty CredstoreDir or WithKey means the default.
func (o Options) Validate() error {
	var errs []error
	if err := registry.ValidName(o.Self); err != nil {
		errs = append(errs, fmt.Errorf("self: %w", err))
	}
	if o.StateDir == "" {
		errs = append(errs, errors.New("empty state directory"))
	}
	if o.WithKey != "" && !slices.Contains(WithKeys, o.WithKey) {
		errs = append(errs, fmt.Errorf("withKey %q: want host, tpm2, host+tpm2, auto or tpm2-absent", o.WithKey))
	}
	for _, name := range slices.Sorted(maps.Keys(o.Units)) {
		use := o.Units[name]
		if err := registry.ValidName(name); err != nil {
			errs = append(errs, fmt.Errorf("units: secret: %w", err))
		}
		switch use.Action {
		case "", ActionRestart, ActionReload, ActionNone:
		default:
			errs = append(errs, fmt.Errorf("units[%s]: action %q: want restart, reload or none", name, use.Action))
		}
		for _, u := range use.Units {
			if err := validUnitName(u); err != nil {
				errs = append(errs, fmt.Errorf("units[%s]: %w", name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// New builds the component: it validates opts, loads (or creates) the
// node's age identity and reads the manifest of credentials written
// before. It does not touch the credential store until Apply.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer) (*Component, error) {
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("creds: %w", err)
	}
	opts.CredstoreDir = cmp.Or(opts.CredstoreDir, DefaultCredstoreDir)
	opts.WithKey = cmp.Or(opts.WithKey, "host")
	if opts.Creds == nil {
		opts.Creds = SystemdCreds{WithKey: opts.WithKey}
	}
	if opts.Manager == nil {
		opts.Manager = &DBusManager{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	id, err := LoadOrCreateIdentity(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("creds: %w", err)
	}
	man, err := loadManifest(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("creds: %w", err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("creds: %w", err)
	}
	return &Component{
		opts:     opts,
		log:      log.With("component", "creds"),
		id:       id,
		metrics:  m,
		manifest: man,
		errs:     map[string]string{},
		unitErrs: map[string]string{},
		unopened: map[string]string{},
	}, nil
}

// Close releases the D-Bus connection of the default unit manager.
func (c *Component) Close() {
	if m, ok := c.opts.Manager.(*DBusManager); ok {
		m.Close()
	}
}

// Name implements the agent's Component.
func (c *Component) Name() string { return "creds" }

// Recipient returns this node's age recipient, for its member record.
func (c *Component) Recipient() string { return Recipient(c.id) }

// Status implements the agent's Component; it returns a Status.
func (c *Component) Status() any {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := Status{Delivered: map[string]int64{}, Recipient: Recipient(c.id)}
	for name, d := range c.manifest {
		st.Delivered[name] = d.Version
	}
	for name, e := range c.errs {
		if st.Errors == nil {
			st.Errors = map[string]string{}
		}
		st.Errors[name] = e
	}
	for name, e := range c.unitErrs {
		if st.Errors == nil {
			st.Errors = map[string]string{}
		}
		if prev, ok := st.Errors[name]; ok {
			e = prev + "; " + e
		}
		st.Errors[name] = e
	}
	return st
}

// Apply delivers every secret of snap whose version is not yet in place,
// removes the credentials of secrets that are gone, and tells the declared
// units. A ciphertext that does not open is reported and skipped (its old
// credential stays); a failing systemd-creds or unit action is reported and
// returned, so the agent retries.
func (c *Component) Apply(ctx context.Context, snap *registry.Snapshot) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	want := snap.Secrets
	if want == nil {
		want = map[string]registry.SealedSecret{}
	}
	dir := c.opts.CredstoreDir
	missing := map[string]bool{}
	for name := range c.manifest {
		if _, err := os.Lstat(filepath.Join(dir, name)); errors.Is(err, fs.ErrNotExist) {
			missing[name] = true
		}
	}
	invalid := invalidSecrets(snap, c.opts.Self)
	keep := map[string]bool{}
	for name, why := range invalid {
		keep[name] = true
		c.errs[name] = "sealed value in etcd is invalid, keeping the previous credential: " + why
	}
	p := planDelivery(want, c.manifest, missing, keep)
	var errs []error
	if len(p.Write) > 0 {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			err = fmt.Errorf("credential store: %w", err)
			for _, name := range p.Write {
				c.errs[name] = err.Error()
			}
			c.metrics.failing.Set(float64(c.failingLocked()))
			return err
		}
	}
	changed := false
	for _, name := range p.Write {
		if err := c.deliverLocked(ctx, name, want[name]); err != nil {
			errs = append(errs, err)
			continue
		}
		changed = true
	}
	for _, name := range p.Remove {
		if err := c.removeLocked(name); err != nil {
			errs = append(errs, err)
			continue
		}
		changed = true
	}
	for name := range c.errs {
		_, wanted := want[name]
		// Errors are recomputed every pass: a secret that is gone, or
		// already in place and not rewritten, has none.
		if !keep[name] && (!wanted || !slices.Contains(p.Write, name)) {
			delete(c.errs, name)
		}
	}
	for name := range c.unitErrs {
		if _, ok := c.manifest[name]; !ok {
			delete(c.unitErrs, name)
		}
	}
	if changed {
		if err := saveManifest(c.opts.StateDir, c.manifest); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.notifyUnitsLocked(ctx); err != nil {
		errs = append(errs, err)
	}
	c.metrics.failing.Set(float64(c.failingLocked()))
	return errors.Join(errs...)
}

// failingLocked counts the secrets with any error.
func (c *Component) failingLocked() int {
	n := len(c.errs)
	for name := range c.unitErrs {
		if _, ok := c.errs[name]; !ok {
			n++
		}
	}
	return n
}

// deliverLocked opens one secret and writes its credential. An unopenable
// ciphertext is recorded in the status and is not an error (retrying
// cannot fix it); a failing encrypter is both.
func (c *Component) deliverLocked(ctx context.Context, name string, s registry.SealedSecret) error {
	if err := registry.ValidName(name); err != nil {
		c.errs[name] = err.Error()
		return nil
	}
	sum := sealedSum(s)
	value, err := Open(s.Ciphertext, c.id)
	if err != nil {
		c.errs[name] = fmt.Sprintf("version %d: %v", s.Version, err)
		if c.unopened[name] != sum {
			c.unopened[name] = sum
			c.metrics.openFailures.Inc()
			c.log.Warn("cannot open secret, keeping the previous credential", "secret", name, "version", s.Version, "err", err)
		}
		return nil
	}
	delete(c.unopened, name)
	err = c.writeCredential(ctx, name, value)
	clear(value)
	if err != nil {
		c.errs[name] = fmt.Sprintf("version %d: %v", s.Version, err)
		c.log.Error("cannot write credential", "secret", name, "version", s.Version, "err", err)
		return fmt.Errorf("secret %s: %w", name, err)
	}
	old, had := c.manifest[name]
	newVersion := !had || old.Version != s.Version || old.Sum != sum
	c.manifest[name] = delivered{Version: s.Version, Sum: sum, Pending: old.Pending || newVersion}
	delete(c.errs, name)
	c.metrics.deliveries.Inc()
	c.log.Info("delivered credential", "secret", name, "version", s.Version)
	return nil
}

// writeCredential has the encrypter write a pending file in the
// credential store (atomicfile), which is made 0600 and durable and
// renamed over the credential: a unit starting meanwhile sees the old or
// the new one.
func (c *Component) writeCredential(ctx context.Context, name string, value []byte) error {
	p, err := atomicfile.NewPending(filepath.Join(c.opts.CredstoreDir, name), 0o600)
	if err != nil {
		return fmt.Errorf("credential store: %w", err)
	}
	defer p.Abort()
	if err := c.opts.Creds.Encrypt(ctx, name, value, p.Name()); err != nil {
		return err
	}
	if err := p.Commit(); err != nil {
		return fmt.Errorf("credential %s: %w", name, err)
	}
	return nil
}

// removeLocked deletes a credential meshd wrote whose secret is gone.
func (c *Component) removeLocked(name string) error {
	err := os.Remove(filepath.Join(c.opts.CredstoreDir, name))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		c.log.Error("cannot remove credential", "secret", name, "err", err)
		return fmt.Errorf("remove credential %s: %w", name, err)
	}
	delete(c.manifest, name)
	delete(c.unopened, name)
	c.log.Info("removed credential", "secret", name)
	return nil
}

// notifyUnitsLocked restarts or reloads the units of every secret with a
// version they have not seen; a secret stays pending until all of its
// units were told.
func (c *Component) notifyUnitsLocked(ctx context.Context) error {
	var pending []string
	for _, name := range slices.Sorted(maps.Keys(c.manifest)) {
		if c.manifest[name].Pending {
			pending = append(pending, name)
		}
	}
	if len(pending) == 0 {
		return nil
	}
	failed := map[string]error{}
	for _, a := range unitActions(pending, c.opts.Units) {
		var err error
		if a.Action == ActionReload {
			err = c.opts.Manager.ReloadUnit(ctx, a.Unit)
		} else {
			err = c.opts.Manager.RestartUnit(ctx, a.Unit)
		}
		result := "ok"
		if errors.Is(err, ErrJobPending) {
			c.log.Warn(a.Action+" of unit still running, not waiting", "unit", a.Unit, "secrets", a.Secrets, "err", err)
			err, result = nil, "pending"
		}
		if err != nil {
			err = fmt.Errorf("%s %s: %w", a.Action, a.Unit, err)
			result = "error"
			c.log.Error("cannot "+a.Action+" unit", "unit", a.Unit, "secrets", a.Secrets, "err", err)
			for _, s := range a.Secrets {
				failed[s] = errors.Join(failed[s], err)
			}
		} else if result == "ok" {
			c.log.Info(a.Action+"ed unit for new credentials", "unit", a.Unit, "secrets", a.Secrets)
		}
		c.metrics.unitActions.WithLabelValues(a.Action, result).Inc()
	}
	var errs []error
	for _, name := range pending {
		d := c.manifest[name]
		if err := failed[name]; err != nil {
			c.unitErrs[name] = fmt.Sprintf("version %d delivered, units not told: %v", d.Version, err)
			errs = append(errs, fmt.Errorf("secret %s: %w", name, err))
			continue
		}
		d.Pending = false
		c.manifest[name] = d
		delete(c.unitErrs, name)
	}
	if err := saveManifest(c.opts.StateDir, c.manifest); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
