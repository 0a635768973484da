// Package nixtest checks nixos-module.nix offline: it parses the module,
// evaluates each example configuration under nix/examples with the stub lib
// harness (nix/harness.nix), checks the generated systemd units, config file
// and firewall, verifies the units with systemd-analyze, and feeds every
// rendered config to the real `meshd --check-config`.
//
// The package has only tests. They need nix-instantiate (Debian's nix-bin)
// and skip without it.
package nixtest
