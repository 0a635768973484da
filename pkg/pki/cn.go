package pki

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/meshd/meshd/pkg/registry"
)

// etcd takes a request's user from the client certificate's common name
// and nothing else: a second certificate with the same CN is the same
// user, and an old certificate keeps working for as long as its CN is a
// user. So a rotated certificate gets a new CN, <node>@<generation>, and
// etcdauth.RotateNode moves the node's role to that user and deletes the
// old one: from then on the old certificate authenticates as nobody.

// CNSep separates a node's name from its certificate generation in a CN.
// It cannot occur in a node name (registry.ValidName).
const CNSep = "@"

// NodeCN is the common name of generation gen of node's certificate: the
// node's name for the first (gen <= 1), node@gen after rotations.
func NodeCN(node string, gen int) string {
	if gen <= 1 {
		return node
	}
	return node + CNSep + strconv.Itoa(gen)
}

// ParseNodeCN splits a node certificate's CN into the node name and the
// generation (1 for a CN without one).
func ParseNodeCN(cn string) (node string, gen int, err error) {
	node, g, ok := strings.Cut(cn, CNSep)
	if err := registry.ValidName(node); err != nil {
		return "", 0, fmt.Errorf("certificate name %s: %w", registry.Quoted([]byte(cn)), err)
	}
	if !ok {
		return node, 1, nil
	}
	gen, err = strconv.Atoi(g)
	if err != nil || gen < 2 || strconv.Itoa(gen) != g {
		return "", 0, fmt.Errorf("certificate name %s: generation after %q must be a number >= 2", registry.Quoted([]byte(cn)), CNSep)
	}
	return node, gen, nil
}
