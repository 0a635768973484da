# meshd without flakes:
#
#   nix-build                       # ./result/bin/meshd, ./result/bin/meshctl
#   nix-build --arg pkgs 'import <nixpkgs> { }'
#
# In a NixOS configuration import ./nixos-module.nix instead: its package
# defaults to this same expression (see docs/nixos.md).
{
  pkgs ? import <nixpkgs> { },
}:

pkgs.callPackage ./nix/package.nix { }
