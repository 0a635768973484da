package registry

import (
	"errors"
	"fmt"
)

// MaxNameLen bounds node, app and secret names. HAProxy accepts longer
// identifiers, but nothing legitimate needs more and short names keep
// rendered configs and etcd keys readable.
const MaxNameLen = 63

// ErrBadName is returned (wrapped) for names that are not safe to put into
// an etcd key, a config file or a file name.
var ErrBadName = errors.New("invalid name")

// ValidName reports whether s may be used as a node, app or secret name.
//
// Names reach HAProxy configs, systemd credential file names and etcd keys,
// so the alphabet is deliberately small: ASCII letters, digits, '-', '_'
// and '.', starting with a letter or digit, at most MaxNameLen bytes.
// Whitespace, quotes, '#', '/', and any non-ASCII (look-alike) character
// are rejected.
func ValidName(s string) error {
	if s == "" {
		return fmt.Errorf("%w: empty", ErrBadName)
	}
	if len(s) > MaxNameLen {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadName, len(s), MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '-' || c == '_' || c == '.') && i > 0:
		default:
			return fmt.Errorf("%w: %s has forbidden character %q at byte %d", ErrBadName, Quoted([]byte(s)), c, i)
		}
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%w: %s", ErrBadName, Quoted([]byte(s)))
	}
	return nil
}

// Group is one of the nix-infra app groups. A node consumes groups: its
// HAProxy gets a listener for every app of the groups it consumes.
type Group string

// The three groups nix-infra knows. Node types map onto them: ingress nodes
// consume frontends, workers consume backends and services, service nodes
// consume services.
const (
	GroupFrontends Group = "frontends"
	GroupBackends  Group = "backends"
	GroupServices  Group = "services"
)

// Groups lists the valid groups in a stable order.
var Groups = []Group{GroupFrontends, GroupBackends, GroupServices}

// ErrBadGroup is returned (wrapped) for an unknown group.
var ErrBadGroup = errors.New("invalid group")

// ParseGroup validates a group name.
func ParseGroup(s string) (Group, error) {
	for _, g := range Groups {
		if string(g) == s {
			return g, nil
		}
	}
	return "", fmt.Errorf("%w: %s (want frontends, backends or services)", ErrBadGroup, Quoted([]byte(s)))
}
