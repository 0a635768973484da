// Package nixtest checks the Nix side of meshd offline: it parses every Nix
// file (flake.nix, default.nix, nix/package.nix, the module, the examples),
// evaluates each example configuration under nix/examples with nixpkgs'
// real lib.evalModules (harness.nix, with the NixOS option declarations of
// nixos.nix and the test pkgs of pkgs.nix), checks the generated systemd
// units, config file, firewall and users, verifies the units with
// systemd-analyze, feeds every rendered config to the real
// `meshd --check-config`, boots the units under systemd-nspawn (root),
// checks nix/package.nix's arguments and the flake's outputs, and
// recomputes the package's vendorHash from `go mod vendor`.
//
// The package has only tests. They need nix-instantiate and nix-hash
// (Debian's nix-bin) and nixpkgs' lib (../shared/nixpkgs-lib/lib or
// MESHD_NIXPKGS_LIB), and skip without them unless MESHD_REQUIRE_NIX is set
// (CI), where they fail instead.
package nixtest
