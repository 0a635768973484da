// Package hetzner provisions and destroys the Hetzner Cloud servers of a
// meshd cluster with hcloud-go. Everything it creates carries the cluster's
// label, and it lists, changes and deletes only what carries that label.
package hetzner

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/meshd/meshd/pkg/registry"
)

// Label keys set on every resource meshctl creates. The "meshd/" prefix
// keeps them apart from labels operators set for their own purposes.
const (
	LabelCluster = "meshd/cluster"
	LabelRole    = "meshd/role"
)

// Roles returns the roles a server can have. They match nix-infra's node
// types.
func Roles() []string { return []string{"worker", "ingress", "service", "control"} }

// ErrInvalid is returned (wrapped) for bad options: nothing was changed.
var ErrInvalid = errors.New("invalid option")

// ClusterSelector is the label selector of every resource of cluster.
func ClusterSelector(cluster string) string { return LabelCluster + "=" + cluster }

// ResourceLabels returns the labels of a resource meshctl creates: the
// operator's extra labels plus the cluster and, when set, the role.
func ResourceLabels(cluster, role string, extra map[string]string) map[string]string {
	l := maps.Clone(extra)
	if l == nil {
		l = map[string]string{}
	}
	l[LabelCluster] = cluster
	if role != "" {
		l[LabelRole] = role
	}
	return l
}

// ValidateCluster checks a cluster name: it becomes a label value and part
// of resource names.
func ValidateCluster(c string) error {
	if c == "" {
		return fmt.Errorf("%w: --cluster (or MESHCTL_CLUSTER) is required", ErrInvalid)
	}
	if err := validLabelValue(c); err != nil {
		return fmt.Errorf("%w: cluster %q: %v", ErrInvalid, c, err)
	}
	return nil
}

// ValidateRole checks a role against Roles.
func ValidateRole(r string) error {
	if !slices.Contains(Roles(), r) {
		return fmt.Errorf("%w: role %q: want one of %s", ErrInvalid, r, strings.Join(Roles(), ", "))
	}
	return nil
}

// ValidateServerName checks a server name. It becomes the Hetzner server
// name, which the API requires to be a valid hostname (RFC 1123: labels of
// 1 to 63 letters, digits and '-', not starting or ending with '-',
// separated by single dots), the NixOS hostname and the meshd node name,
// so it must satisfy all three. It is checked before any API call.
func ValidateServerName(n string) error {
	if err := registry.ValidName(n); err != nil {
		return fmt.Errorf("%w: server name: %v", ErrInvalid, err)
	}
	if len(n) > 253 {
		return fmt.Errorf("%w: server name %q is longer than 253 characters", ErrInvalid, n)
	}
	for _, label := range strings.Split(n, ".") {
		switch {
		case label == "":
			return fmt.Errorf("%w: server name %q: empty label (two dots, or a dot at an end): not a hostname", ErrInvalid, n)
		case len(label) > 63:
			return fmt.Errorf("%w: server name %q: label %q is longer than 63 characters", ErrInvalid, n, label)
		case strings.ContainsRune(label, '_'):
			return fmt.Errorf("%w: server name %q: '_' is not allowed in a hostname", ErrInvalid, n)
		case label[0] == '-' || label[len(label)-1] == '-':
			return fmt.Errorf("%w: server name %q: label %q must start and end with a letter or digit", ErrInvalid, n, label)
		}
	}
	return nil
}

// ParseLabels parses k=v pairs given on the command line. Keys under the
// meshd/ prefix are reserved.
func ParseLabels(pairs []string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range pairs {
		for _, kv := range strings.Split(p, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("%w: label %q: want key=value", ErrInvalid, kv)
			}
			if strings.HasPrefix(k, "meshd/") {
				return nil, fmt.Errorf("%w: label %q: the meshd/ prefix is reserved", ErrInvalid, k)
			}
			if err := validLabelKey(k); err != nil {
				return nil, fmt.Errorf("%w: label key %q: %v", ErrInvalid, k, err)
			}
			if err := validLabelValue(v); err != nil {
				return nil, fmt.Errorf("%w: label %q value %q: %v", ErrInvalid, k, v, err)
			}
			out[k] = v
		}
	}
	return out, nil
}

// validLabelValue applies Hetzner's rule: at most 63 characters, letters,
// digits, '-', '_' and '.', starting and ending with a letter or digit.
func validLabelValue(v string) error {
	if v == "" {
		return nil
	}
	if len(v) > 63 {
		return fmt.Errorf("longer than 63 characters")
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && ((c != '-' && c != '_' && c != '.') || i == 0 || i == len(v)-1) {
			return fmt.Errorf("character %q at %d not allowed", c, i)
		}
	}
	return nil
}

// validLabelKey applies Hetzner's rule: an optional DNS-subdomain prefix
// and '/', then a name like a label value (not empty).
func validLabelKey(k string) error {
	name := k
	if prefix, rest, ok := strings.Cut(k, "/"); ok {
		if prefix == "" || len(prefix) > 253 {
			return fmt.Errorf("bad prefix")
		}
		for _, part := range strings.Split(prefix, ".") {
			if part == "" || validLabelValue(part) != nil || strings.Contains(part, "_") {
				return fmt.Errorf("prefix %q is not a DNS subdomain", prefix)
			}
		}
		name = rest
	}
	if name == "" {
		return fmt.Errorf("empty name")
	}
	return validLabelValue(name)
}
