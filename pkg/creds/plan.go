package creds

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"slices"
	"strings"

	"github.com/meshd/meshd/pkg/registry"
)

// Actions a secret's units can take when it changes.
const (
	ActionRestart = "restart"
	ActionReload  = "reload"
	ActionNone    = "none"
)

// delivered is what the manifest remembers of one credential meshd wrote.
type delivered struct {
	Version int64 `json:"version"`
	// Sum is the SHA-256 of the sealed ciphertext (public data): it tells
	// a secret removed and put again at the same version apart.
	Sum string `json:"sum"`
	// Pending is set while the units declared for the secret have not yet
	// been told about this version.
	Pending bool `json:"pending,omitempty"`
}

// sealedSum is the manifest's fingerprint of a sealed secret.
func sealedSum(s registry.SealedSecret) string {
	h := sha256.Sum256([]byte(s.Ciphertext))
	return hex.EncodeToString(h[:])
}

// plan is what one Apply has to do with the credential files.
type plan struct {
	// Write lists the secrets to (re)deliver, sorted.
	Write []string
	// Remove lists the credentials meshd wrote whose secret is gone, sorted.
	Remove []string
}

// planDelivery compares the wanted secrets with what the manifest says was
// delivered. A secret is written when its version or ciphertext differ or
// its file is missing; a credential is removed when meshd wrote it and the
// secret is no longer there. Credentials meshd did not write are never in
// have, so they are never touched; nor are those named in keep (their key
// is in etcd but does not decode: the last good credential stays).
func planDelivery(want map[string]registry.SealedSecret, have map[string]delivered, missing, keep map[string]bool) plan {
	var p plan
	for name, s := range want {
		d, ok := have[name]
		if !ok || d.Version != s.Version || d.Sum != sealedSum(s) || missing[name] {
			p.Write = append(p.Write, name)
		}
	}
	for name := range have {
		if _, ok := want[name]; !ok && !keep[name] {
			p.Remove = append(p.Remove, name)
		}
	}
	slices.Sort(p.Write)
	slices.Sort(p.Remove)
	return p
}

// unitAction is one unit to restart or reload, and the secrets that cause it.
type unitAction struct {
	Unit    string
	Action  string // ActionRestart or ActionReload
	Secrets []string
}

// unitActions returns, sorted by unit, what to do for the secrets whose
// new version the units have not yet seen. A unit declared for several of
// them is acted on once; restart wins over reload.
func unitActions(changed []string, uses map[string]SecretUse) []unitAction {
	byUnit := map[string]*unitAction{}
	for _, name := range changed {
		use, ok := uses[name]
		if !ok {
			continue
		}
		action := cmp.Or(use.Action, ActionRestart)
		if action == ActionNone {
			continue
		}
		for _, u := range use.Units {
			a := byUnit[u]
			if a == nil {
				a = &unitAction{Unit: u, Action: action}
				byUnit[u] = a
			}
			if action == ActionRestart {
				a.Action = ActionRestart
			}
			if !slices.Contains(a.Secrets, name) {
				a.Secrets = append(a.Secrets, name)
			}
		}
	}
	out := make([]unitAction, 0, len(byUnit))
	for _, u := range slices.Sorted(maps.Keys(byUnit)) {
		a := byUnit[u]
		slices.Sort(a.Secrets)
		out = append(out, *a)
	}
	return out
}

// invalidSecrets returns the names of self's secrets whose keys are in the
// snapshot's problems (present in etcd, but not decodable), with why.
func invalidSecrets(snap *registry.Snapshot, self string) map[string]string {
	out := map[string]string{}
	for _, pr := range snap.Problems {
		if !strings.HasPrefix(pr.Key, registry.SecretsNodePrefix(self)) {
			continue
		}
		name := strings.TrimPrefix(pr.Key, registry.SecretsNodePrefix(self))
		if registry.ValidName(name) == nil {
			out[name] = pr.Err
		}
	}
	return out
}
