package main

import (
	clientv3 "go.etcd.io/etcd/client/v3"

	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/etcdauth"
	"github.com/meshd/meshd/pkg/pki"
	"github.com/meshd/meshd/pkg/registry"
)

func lifetime(days int) (time.Duration, error) {
	if days < 0 {
		return 0, usagef("--days %d: must be positive", days)
	}
	return time.Duration(days) * 24 * time.Hour, nil
}

func pkiInit(e *env, args []string) error {
	fs := flags(e, "pki init")
	dir := fs.String("dir", "", "PKI directory (created 0700; required)")
	cluster := fs.String("cluster", "", "cluster name recorded in the CA's subject")
	keyType := fs.String("key-type", string(pki.ECDSAP256), "key algorithm: ecdsa-p256 or ed25519 (Go clients only)")
	days := fs.Int("days", 0, "CA lifetime in days (default 3650)")
	force := fs.Bool("force", false, "replace an existing CA (every certificate it signed stops working)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() != 0 {
		return usagef("usage: meshctl pki init --dir D [--cluster NAME] [--key-type T] [--days N] [--force]")
	}
	kt, err := pki.ParseKeyType(*keyType)
	if err != nil {
		return usageError{err}
	}
	lt, err := lifetime(*days)
	if err != nil {
		return err
	}
	d := pki.Dir{Path: *dir}
	ca, err := d.Init(pki.CAOptions{Cluster: *cluster, KeyType: kt, Lifetime: lt, Now: time.Now()}, pki.WriteOptions{Force: *force})
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "wrote %s (CA %q, expires %s)\n", filepath.Join(d.Path, pki.CACertFile), ca.Cert.Subject.CommonName, ca.Cert.NotAfter.Format(time.DateOnly))
	fmt.Fprintf(e.Stdout, "wrote %s (mode 0600: keep it offline, it signs every etcd identity)\n", filepath.Join(d.Path, pki.CAKeyFile))
	return nil
}

func pkiIssue(e *env, args []string, usage pki.Usage) error {
	name := "pki issue"
	if usage == pki.Server {
		name = "pki issue-server"
	}
	fs := flags(e, name)
	dir := fs.String("dir", "", "PKI directory holding the CA (required)")
	keyType := fs.String("key-type", string(pki.ECDSAP256), "key algorithm: ecdsa-p256 or ed25519 (Go clients only)")
	days := fs.Int("days", 0, "lifetime in days (default 365; never past the CA's)")
	force := fs.Bool("force", false, "replace an existing certificate and key (rotation)")
	var ips, dns []string
	if usage == pki.Server {
		fs.StringSliceVar(&ips, "ip", nil, "IP address the server is reached at (repeatable)")
		fs.StringSliceVar(&dns, "dns", nil, "DNS name the server is reached at (repeatable)")
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() != 1 {
		if usage == pki.Server {
			return usagef("usage: meshctl pki issue-server NAME --dir D --ip IP... --dns NAME... [--days N] [--force]")
		}
		return usagef("usage: meshctl pki issue NAME --dir D [--days N] [--key-type T] [--force]")
	}
	cn := fs.Arg(0)
	if _, _, err := pki.ParseNodeCN(cn); err != nil {
		return usagef("name: %v", err)
	}
	kt, err := pki.ParseKeyType(*keyType)
	if err != nil {
		return usageError{err}
	}
	lt, err := lifetime(*days)
	if err != nil {
		return err
	}
	req := pki.Request{CommonName: cn, Usage: usage, KeyType: kt, Lifetime: lt, Now: time.Now()}
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return usagef("--ip %q: not an IP address", s)
		}
		req.IPs = append(req.IPs, ip)
	}
	for _, s := range dns {
		if s == "" || strings.ContainsAny(s, " \t\n/\\\"'") {
			return usagef("--dns %q: not a DNS name", s)
		}
		req.DNSNames = append(req.DNSNames, s)
	}
	d := pki.Dir{Path: *dir}
	ca, err := d.LoadCA()
	if err != nil {
		return err
	}
	is, err := ca.Issue(req)
	if err != nil {
		return err
	}
	if err := d.Write(cn, is, pki.WriteOptions{Force: *force}); err != nil {
		return err
	}
	kind := "client"
	switch {
	case usage == pki.Server:
		kind = "server"
	case cn == etcdauth.RootUser:
		kind = "operator (root)"
	}
	fmt.Fprintf(e.Stdout, "wrote %s (CN %s, %s, expires %s)\n", d.CertPath(cn), cn, kind, is.Cert.NotAfter.Format(time.DateOnly))
	fmt.Fprintf(e.Stdout, "wrote %s (mode 0600)\n", d.KeyPath(cn))
	return nil
}

func pkiList(e *env, args []string) error {
	fs := flags(e, "pki list")
	dir := fs.String("dir", "", "PKI directory (required)")
	expiring := fs.Int("expiring", -1, "fail (exit 1) if a certificate expires within DAYS days")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() != 0 {
		return usagef("usage: meshctl pki list --dir D [--expiring DAYS]")
	}
	infos, err := pki.Dir{Path: *dir}.List()
	if err != nil {
		return err
	}
	now := time.Now()
	tw := newTable(e.Stdout)
	fmt.Fprintln(tw, "FILE\tCN\tUSAGE\tEXPIRES\tDAYS LEFT")
	var soon []string
	for _, c := range infos {
		if c.Err != nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t(%v)\n", c.File, c.Err)
			continue
		}
		left := int(c.NotAfter.Sub(now).Hours() / 24)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\n", c.File, c.CommonName, c.Usage, c.NotAfter.Format(time.DateOnly), left)
		if *expiring >= 0 && left < *expiring {
			soon = append(soon, c.File)
		}
	}
	tw.Flush()
	if len(soon) > 0 {
		return fmt.Errorf("expiring within %d days: %s", *expiring, strings.Join(soon, ", "))
	}
	return nil
}

const etcdUsage = `usage: meshctl etcd roles apply [--node N...] [--operator NAME...] [--open-subnets] [--subnet-min A --subnet-max A --subnet-len N] [--no-enable] [--dry-run]
       meshctl etcd roles show [--node N...]
       meshctl etcd roles revoke NODE
       meshctl etcd roles admit NODE
       meshctl etcd roles rotate NODE@GEN`

func rolesApply(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "etcd roles apply")
	nodes := fs.StringSlice("node", nil, "node to set up (repeatable; default every node the registry knows)")
	operators := fs.StringSlice("operator", nil, "extra operator user (certificate CN) granted root (repeatable)")
	open := fs.Bool("open-subnets", false, "let a node without a subnet claim write any claim (instead of the operator pre-claiming one)")
	poolMin := fs.String("subnet-min", registry.DefaultPool.Min.String(), "first subnet of the pool (meshd's overlay.subnetMin)")
	poolMax := fs.String("subnet-max", registry.DefaultPool.Max.String(), "last subnet of the pool (meshd's overlay.subnetMax)")
	bits := fs.Int("subnet-len", registry.DefaultPool.Bits, "subnet prefix length (meshd's overlay.subnetLen)")
	noEnable := fs.Bool("no-enable", false, "set up users and roles but leave auth disabled")
	dry := fs.Bool("dry-run", false, "print the changes without making them")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usagef("%s", etcdUsage)
	}
	pool := registry.Pool{Bits: *bits}
	var err error
	if pool.Min, err = netip.ParseAddr(*poolMin); err != nil || !pool.Min.Is4() {
		return usagef("--subnet-min %q: want an IPv4 address", *poolMin)
	}
	if pool.Max, err = netip.ParseAddr(*poolMax); err != nil || !pool.Max.Is4() {
		return usagef("--subnet-max %q: want an IPv4 address", *poolMax)
	}
	if pool.Bits < 8 || pool.Bits > 30 {
		return usagef("--subnet-len %d: want 8..30", pool.Bits)
	}
	for _, n := range *nodes {
		if err := etcdauth.CheckNodeName(n, *operators); err != nil {
			return usageError{err}
		}
	}
	for _, op := range *operators {
		if err := registry.ValidName(op); err != nil {
			return usagef("--operator: %v", err)
		}
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	o := etcdauth.Options{Nodes: *nodes, Operators: *operators, Pool: pool, KeepAuthState: *noEnable, DryRun: *dry,
		Logger: slog.New(slog.NewTextHandler(e.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	if *open {
		o.Subnets = etcdauth.OpenSubnets
	}
	actx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	res, err := etcdauth.Apply(actx, cli, o)
	prefix := ""
	if *dry {
		prefix = "would "
	}
	for _, c := range res.Changes {
		fmt.Fprintf(e.Stdout, "%s%s\n", prefix, c)
	}
	for _, p := range res.Problems {
		fmt.Fprintf(e.Stderr, "warning: %s\n", p)
	}
	if err != nil {
		return err
	}
	state := "disabled"
	if res.AuthEnabled {
		state = "enabled"
	}
	fmt.Fprintf(e.Stdout, "%d nodes (%s), %d changes, auth %s\n", len(res.Nodes), strings.Join(res.Nodes, ", "), len(res.Changes), state)
	return nil
}

func rolesShow(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "etcd roles show")
	nodes := fs.StringSlice("node", nil, "node whose role to show (repeatable; default every node role)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	st, err := cli.AuthStatus(actx)
	if err != nil {
		return fmt.Errorf("auth status: %w", err)
	}
	fmt.Fprintf(e.Stdout, "auth enabled: %v\n", st.Enabled)
	roles := *nodes
	if len(roles) == 0 {
		rl, err := cli.RoleList(actx)
		if err != nil {
			return fmt.Errorf("list roles: %w", err)
		}
		for _, r := range rl.Roles {
			if n, ok := strings.CutPrefix(r, etcdauth.RolePrefix); ok {
				roles = append(roles, n)
			}
		}
	}
	for _, n := range roles {
		rg, err := cli.RoleGet(actx, etcdauth.NodeRole(n))
		if err != nil {
			return fmt.Errorf("role of %s: %w", n, err)
		}
		fmt.Fprintf(e.Stdout, "role %s (user %s)\n", etcdauth.NodeRole(n), n)
		for _, p := range rg.Perm {
			fmt.Fprintf(e.Stdout, "  %s\n", etcdauth.Perm{Key: string(p.Key), RangeEnd: string(p.RangeEnd), Type: etcdauth.PermType(p.PermType)})
		}
	}
	return nil
}

// oneNodeCommand is the preamble of `etcd roles VERB NODE`: its flags,
// the one node name, checked, and the etcd client.
func oneNodeCommand(e *env, verb string, args []string) (string, *clientv3.Client, error) {
	fs := flags(e, "etcd roles "+verb)
	if err := parse(fs, args); err != nil {
		return "", nil, err
	}
	if fs.NArg() != 1 {
		return "", nil, usagef("usage: meshctl etcd roles %s NODE", verb)
	}
	if err := etcdauth.CheckNodeName(fs.Arg(0), nil); err != nil {
		return "", nil, usageError{err}
	}
	cli, err := e.etcd()
	return fs.Arg(0), cli, err
}

func rolesRevoke(ctx context.Context, e *env, args []string) error {
	node, cli, err := oneNodeCommand(e, "revoke", args)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	done, err := etcdauth.RevokeNode(actx, cli, node)
	for _, d := range done {
		fmt.Fprintln(e.Stdout, d)
	}
	if err != nil {
		return err
	}
	if len(done) == 0 {
		return errors.New("no user, role or key for " + node)
	}
	fmt.Fprintf(e.Stdout, "%s's certificates no longer authenticate and its keys are gone; it stays revoked until meshctl etcd roles admit %s\n", node, node)
	return nil
}

// rolesAdmit lifts a revocation so that the next roles apply sets the
// node up again.
func rolesAdmit(ctx context.Context, e *env, args []string) error {
	node, cli, err := oneNodeCommand(e, "admit", args)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	was, err := etcdauth.AdmitNode(actx, cli, node)
	if err != nil {
		return err
	}
	if !was {
		return errors.New(node + " is not revoked")
	}
	fmt.Fprintf(e.Stdout, "%s re-admitted; set it up with meshctl etcd roles apply --node %s\n", node, node)
	return nil
}

// rolesRotate moves a node's role to the user of its new certificate
// (CN NODE@GEN, issued with meshctl pki issue NODE@GEN) and deletes the
// old user: etcd knows a certificate only by its CN.
func rolesRotate(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "etcd roles rotate")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl etcd roles rotate NODE@GEN")
	}
	if _, _, err := pki.ParseNodeCN(fs.Arg(0)); err != nil {
		return usageError{err}
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	done, err := etcdauth.RotateNode(actx, cli, fs.Arg(0))
	for _, d := range done {
		fmt.Fprintln(e.Stdout, d)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "only the certificate with CN %s authenticates for its node now\n", fs.Arg(0))
	return nil
}
