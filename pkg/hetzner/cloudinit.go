package hetzner

import (
	"bytes"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"text/template"

	"github.com/meshd/meshd/pkg/registry"
)

// MaxUserData is the API's limit on user data.
const MaxUserData = 32 << 10

// Defaults of the NixOS conversion. The channel is a release supported on
// 2026-12-03 (NixOS 26.05, security support until 2026-12-31; 25.11 and
// 25.05 are past their end of life). The script is nixos-infect pinned to
// a reviewed commit (2026-01-21, "Add hostmyserver (#253)"), and the
// cloud-config runs it only if its sha256 matches: no unpinned code runs
// as root.
const (
	DefaultNixChannel   = "nixos-26.05"
	DefaultInfectURL    = "https://raw.githubusercontent.com/elitak/nixos-infect/7563801d3ae68c975e4027f4e31a3906dca95f30/nixos-infect"
	DefaultInfectSHA256 = "4cc3b5f8e4333ab4f02906d80a836c1b36e2887a51abf4eba4d9113b33934393"
)

// CloudInit is what the generated cloud-config needs to know.
type CloudInit struct {
	Cluster       string
	Name          string
	Role          string
	WireGuardPort int
	// NixChannel is the NixOS channel nixos-infect installs.
	NixChannel string
	// InfectURL is where the nixos-infect script is fetched from; pin it
	// to a commit you have reviewed.
	InfectURL string
	// InfectSHA256 is the script's sha256 (hex); the cloud-config runs
	// the script only if it matches.
	InfectSHA256 string
}

// RoleGroups maps a role to the nix-infra groups a node of that role
// consumes (its HAProxy gets a listener for every app of them).
func RoleGroups(role string) []registry.Group {
	switch role {
	case "ingress":
		return []registry.Group{registry.GroupFrontends}
	case "worker":
		return []registry.Group{registry.GroupBackends, registry.GroupServices}
	case "service":
		return []registry.Group{registry.GroupServices}
	}
	return nil // control nodes run etcd only
}

var (
	channelRE = regexp.MustCompile(`^nixos-(unstable|[0-9]{2}\.[0-9]{2})(-small)?$`)
	sha256RE  = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// Validate checks the fields that reach the rendered shell and Nix text.
func (ci CloudInit) Validate() error {
	if err := ValidateCluster(ci.Cluster); err != nil {
		return err
	}
	if err := ValidateServerName(ci.Name); err != nil {
		return err
	}
	if err := ValidateRole(ci.Role); err != nil {
		return err
	}
	if ci.WireGuardPort < 1 || ci.WireGuardPort > 65535 {
		return fmt.Errorf("%w: wireguard port %d", ErrInvalid, ci.WireGuardPort)
	}
	if !channelRE.MatchString(ci.NixChannel) {
		return fmt.Errorf("%w: nix channel %q: want nixos-YY.MM or nixos-unstable", ErrInvalid, ci.NixChannel)
	}
	u, err := url.Parse(ci.InfectURL)
	if err != nil || u.Scheme != "https" || u.Host == "" || strings.ContainsAny(ci.InfectURL, " '\"\\`$;|&<>\n") {
		return fmt.Errorf("%w: nixos-infect URL %q: want a plain https URL", ErrInvalid, ci.InfectURL)
	}
	if !sha256RE.MatchString(ci.InfectSHA256) {
		return fmt.Errorf("%w: nixos-infect sha256 %q: want 64 lowercase hex digits (the script runs as root only if it matches)", ErrInvalid, ci.InfectSHA256)
	}
	return nil
}

// Render returns the cloud-config user data. It is a pure function of ci.
func (ci CloudInit) Render() (string, error) {
	if err := ci.Validate(); err != nil {
		return "", err
	}
	groups := make([]string, 0, 2)
	for _, g := range RoleGroups(ci.Role) {
		groups = append(groups, fmt.Sprintf("%q", string(g)))
	}
	var b bytes.Buffer
	err := cloudInitTmpl.Execute(&b, struct {
		CloudInit
		Groups string
	}{ci, strings.Join(groups, " ")})
	if err != nil {
		return "", err
	}
	if b.Len() > MaxUserData {
		return "", fmt.Errorf("%w: user data is %d bytes, the API takes at most %d", ErrInvalid, b.Len(), MaxUserData)
	}
	return b.String(), nil
}

// Every value interpolated below has been validated to a small alphabet
// (names, ports, channel, URL), so none needs quoting beyond what is here.
var cloudInitTmpl = template.Must(template.New("cloud-init").Parse(`#cloud-config
# Rendered by meshctl provision: node {{.Name}} ({{.Role}}) of meshd cluster {{.Cluster}}.
# It converts this Debian/Ubuntu image to NixOS with nixos-infect, whose
# generated configuration.nix imports /etc/nixos/meshd-host.nix below.
# meshd itself is enabled once the operator has put the meshd repository
# at /etc/nixos/meshd and written /etc/nixos/meshd-node.nix (etcd
# endpoints and certificates), then rebuilt: see docs/provisioning.md.
write_files:
  - path: /etc/nixos/meshd-host.nix
    permissions: "0644"
    content: |
      { lib, ... }:
      {
        imports =
          if builtins.pathExists /etc/nixos/meshd/nixos-module.nix
          then [ /etc/nixos/meshd/nixos-module.nix ./meshd-role.nix ]
            ++ (if builtins.pathExists /etc/nixos/meshd-node.nix then [ /etc/nixos/meshd-node.nix ] else [ ])
          else [ ];
        networking.hostName = lib.mkDefault "{{.Name}}";
        # The cloud firewall allows the same; this is the host's own.
        networking.firewall.allowedTCPPorts = [ 22 ];
        networking.firewall.allowedUDPPorts = [ {{.WireGuardPort}} ];
        boot.kernelModules = [ "wireguard" ];
        services.openssh.enable = true;
        services.openssh.settings.PasswordAuthentication = lib.mkDefault false;
        environment.etc."meshd/provisioned.json".text = builtins.toJSON {
          cluster = "{{.Cluster}}";
          node = "{{.Name}}";
          role = "{{.Role}}";
          groups = [ {{.Groups}} ];
          wireguardPort = {{.WireGuardPort}};
        };
      }
  - path: /etc/nixos/meshd-role.nix
    permissions: "0644"
    content: |
      # What the cloud knows about this node, as meshd module settings.
      # Imported with the meshd module; override in meshd-node.nix.
      { lib, ... }:
      {
        services.meshd.nodeName = lib.mkDefault "{{.Name}}";
        services.meshd.openFirewall = lib.mkDefault true;
        services.meshd.settings.consume = lib.mkDefault [ {{.Groups}} ];
        services.meshd.settings.overlay.listenPort = lib.mkDefault {{.WireGuardPort}};
      }
runcmd:
  - curl -fsSL --retry 5 -o /root/nixos-infect '{{.InfectURL}}'
  - echo '{{.InfectSHA256}}  /root/nixos-infect' | sha256sum -c - && PROVIDER=hetznercloud NIX_CHANNEL={{.NixChannel}} NIXOS_IMPORT=./meshd-host.nix bash /root/nixos-infect 2>&1 | tee /var/log/nixos-infect.log
`))
