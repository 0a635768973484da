package hetzner_test

import (
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/hetzner"
)

// FuzzParsePublicKey: a key file is operator input; parsing never panics,
// and what it accepts re-parses to the same key.
func FuzzParsePublicKey(f *testing.F) {
	f.Add(sshKeyLine(1, "ops@laptop"))
	f.Add("ssh-ed25519 AAAA")
	f.Add("-----BEGIN OPENSSH PRIVATE KEY-----")
	f.Add("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x")
	f.Fuzz(func(t *testing.T, line string) {
		pk, err := hetzner.ParsePublicKey(line)
		if err != nil {
			return
		}
		again, err := hetzner.ParsePublicKey(pk.Line)
		if err != nil || again != pk || len(pk.Fingerprint) != 47 {
			t.Fatalf("accepted %q as %+v, re-parsed as %+v, %v", line, pk, again, err)
		}
	})
}

// FuzzCloudInit: whatever names pass validation render a cloud-config
// that is YAML with exactly the two files, and never anything else.
func FuzzCloudInit(f *testing.F) {
	f.Add("prod", "worker-1", "nixos-26.05")
	f.Add("a\"b", "x: y", "nixos-unstable")
	f.Add("c", "n\n- path: /etc/shadow", "nixos-24.05-small")
	f.Fuzz(func(t *testing.T, cluster, name, channel string) {
		ci := hetzner.CloudInit{Cluster: cluster, Name: name, Role: "worker", WireGuardPort: 51820,
			NixChannel: channel, InfectURL: hetzner.DefaultInfectURL, InfectSHA256: hetzner.DefaultInfectSHA256}
		ud, err := ci.Render()
		if err != nil {
			return
		}
		var cc cloudConfig
		if err := yaml.UnmarshalStrict([]byte(ud), &cc); err != nil {
			t.Fatalf("rendered invalid YAML for %q/%q/%q: %v", cluster, name, channel, err)
		}
		if len(cc.WriteFiles) != 2 || len(cc.Runcmd) != 2 || !strings.Contains(cc.WriteFiles[0].Content, `node = "`+name+`"`) {
			t.Fatalf("unexpected structure for %q/%q: %+v", cluster, name, cc)
		}
	})
}
