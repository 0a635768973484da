package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdauth"
	"github.com/meshd/meshd/pkg/registry"
)

// defaultEnvPrefix follows nix-infra's naming: APP_<NAME>.
func defaultEnvPrefix(app string) string {
	var b strings.Builder
	b.WriteString("APP_")
	for _, r := range strings.ToUpper(app) {
		if r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}

// metaValue renders an app's meta_data exactly as nix-infra writes it.
func metaValue(port int, protocol, envPrefix string) ([]byte, error) {
	env := registry.Env{}
	for k, v := range map[string]any{"HOST": "127.0.0.1", "PATH": "", "PORT": port, "PROTOCOL": protocol} {
		b, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		env[k] = b
	}
	m := registry.AppMeta{Env: env, EnvPrefix: envPrefix, Publish: registry.Publish{Port: port}}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	// Round-trip through the decoder: never write what meshd would reject.
	if _, err := registry.DecodeMeta(b); err != nil {
		return nil, err
	}
	return b, nil
}

func appRegister(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "app register")
	group := fs.String("group", "", "group: frontends, backends or services (required)")
	port := fs.Int("port", 0, "port the app is published on, 127.0.0.1:<port> on consuming nodes (required)")
	protocol := fs.String("protocol", "http", "protocol recorded in env.PROTOCOL")
	envPrefix := fs.String("env-prefix", "", "environment variable prefix (default APP_<NAME>)")
	force := fs.Bool("force", false, "register even if another app publishes the same port")
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl app register NAME --group G --port P [--protocol P] [--env-prefix P] [--wait]")
	}
	name := fs.Arg(0)
	if err := registry.ValidName(name); err != nil {
		return usagef("app name: %w", err)
	}
	g, err := registry.ParseGroup(*group)
	if err != nil {
		return usagef("--group: %w", err)
	}
	if *port < 1 || *port > 65535 {
		return usagef("--port %d: want 1-65535", *port)
	}
	if strings.ContainsAny(*protocol, "\"\\\n\r\t ") || len(*protocol) > 32 {
		return usagef("--protocol %q: want a short word such as http or tcp", *protocol)
	}
	if *envPrefix == "" {
		*envPrefix = defaultEnvPrefix(name)
	}
	val, err := metaValue(*port, *protocol, *envPrefix)
	if err != nil {
		return usagef("%w", err)
	}
	cli, snap, err := e.readSnapshot(ctx)
	if err != nil {
		return err
	}
	for _, a := range snap.SortedApps() {
		if a.Meta != nil && a.Meta.Publish.Port == *port && a.ID != (registry.AppID{Group: g, Name: name}) && !*force {
			return fmt.Errorf("port %d is already published by %s: choose another port (or --force)", *port, a.ID)
		}
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	resp, err := cli.Put(rctx, registry.MetaKey(g, name), string(val))
	if err != nil {
		return fmt.Errorf("register %s/%s: %w", g, name, err)
	}
	fmt.Fprintf(e.Stdout, "registered %s/%s on port %d (revision %d)\n", g, name, *port, resp.Header.Revision)
	// With etcd auth on, each node's role lists the instance keys it may
	// write, one per app: a new app needs the roles refreshed.
	if _, err := etcdauth.RefreshIfEnabled(rctx, cli, etcdauth.Options{}); err != nil {
		return fmt.Errorf("registered, but refreshing etcd roles failed (nodes cannot advertise %s/%s until `meshctl etcd roles apply` succeeds): %w", g, name, err)
	}
	return wf.waitFor(ctx, e, cli, resp.Header.Revision, nil)
}

func appUnregister(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "app unregister")
	group := fs.String("group", "", "group of the app (required)")
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl app unregister NAME --group G [--wait]")
	}
	name := fs.Arg(0)
	if err := registry.ValidName(name); err != nil {
		return usagef("app name: %w", err)
	}
	g, err := registry.ParseGroup(*group)
	if err != nil {
		return usagef("--group: %w", err)
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	resp, err := cli.Delete(rctx, registry.AppPrefix(g, name), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("unregister %s/%s: %w", g, name, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("no app %s/%s in the registry", g, name)
	}
	fmt.Fprintf(e.Stdout, "unregistered %s/%s (%d keys)\n", g, name, resp.Deleted)
	return wf.waitFor(ctx, e, cli, resp.Header.Revision, nil)
}

// appRow is one app as `app list` shows it.
type appRow struct {
	Group     registry.Group      `json:"group"`
	Name      string              `json:"name"`
	Port      int                 `json:"port,omitempty"`
	Protocol  string              `json:"protocol,omitempty"`
	EnvPrefix string              `json:"envPrefix,omitempty"`
	Instances []registry.Instance `json:"instances"`
}

func appList(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "app list")
	out := outputFlag(fs)
	group := fs.String("group", "", "only this group")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	if *group != "" {
		if _, err := registry.ParseGroup(*group); err != nil {
			return usagef("--group: %w", err)
		}
	}
	_, snap, err := e.readSnapshot(ctx)
	if err != nil {
		return err
	}
	rows := []appRow{}
	for _, a := range snap.SortedApps() {
		if *group != "" && string(a.ID.Group) != *group {
			continue
		}
		r := appRow{Group: a.ID.Group, Name: a.ID.Name, Instances: a.SortedInstances()}
		if a.Meta != nil {
			r.Port, r.Protocol, r.EnvPrefix = a.Meta.Publish.Port, a.Meta.Protocol(), a.Meta.EnvPrefix
		}
		rows = append(rows, r)
	}
	if isData(*out) {
		return printData(e.Stdout, *out, rows)
	}
	wide := *out == "wide"
	t := newTable(e.Stdout)
	fmt.Fprint(t, "GROUP\tAPP\tPORT\tPROTOCOL\tINSTANCES")
	if wide {
		fmt.Fprint(t, "\tENV PREFIX")
	}
	fmt.Fprintln(t)
	for _, r := range rows {
		var ins []string
		for _, in := range r.Instances {
			ins = append(ins, fmt.Sprintf("%s=%s", in.Node, in.Addr()))
		}
		port := "-"
		if r.Port != 0 {
			port = fmt.Sprint(r.Port)
		} else {
			port = "(no meta_data)"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s", r.Group, r.Name, port, dash(r.Protocol), dash(strings.Join(ins, " ")))
		if wide {
			fmt.Fprintf(t, "\t%s", dash(r.EnvPrefix))
		}
		fmt.Fprintln(t)
	}
	return t.Flush()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
