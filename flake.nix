{
  description = "meshd: cluster mesh daemon for NixOS (etcd registry, WireGuard overlay, HAProxy service mesh, secrets as systemd credentials)";

  # Go >= 1.26.8 (go.mod's go directive): nixos-26.05's go_1_26 has it
  # (docs/nixos.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      version = "0.1.0-${self.shortRev or self.dirtyShortRev or "dirty"}";
      meshdFor = pkgs: pkgs.callPackage ./nix/package.nix { inherit version; };
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          meshd = meshdFor pkgs;
          default = self.packages.${system}.meshd;
        }
      );

      overlays.default = final: prev: { meshd = meshdFor final; };

      # The module, with its package defaulting to this flake's.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module.nix ];
          services.meshd.package = lib.mkDefault (
            self.packages.${pkgs.stdenv.hostPlatform.system}.meshd or (meshdFor pkgs)
          );
        };
      nixosModules.meshd = self.nixosModules.default;

      checks = forAllSystems (
        system: pkgs:
        let
          # A whole NixOS system with each example node: evaluates the module
          # against NixOS' own modules and builds meshd --check-config.
          node =
            example:
            (lib.nixosSystem {
              inherit system;
              modules = [
                self.nixosModules.default
                example
                {
                  boot.loader.grub.enable = false;
                  fileSystems."/".device = "/dev/disk/by-label/nixos";
                  system.stateVersion = "26.05";
                }
              ];
            }).config.system.build.toplevel;
        in
        {
          package = self.packages.${system}.meshd;
          worker = node ./nix/examples/worker.nix;
          ingress = node ./nix/examples/ingress.nix;
          service = node ./nix/examples/service.nix;
          monitoring = node ./nix/examples/monitoring.nix;
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              pkgs.go
              pkgs.gopls
              pkgs.haproxy
              pkgs.wireguard-tools
              pkgs.etcd
            ];
            env.GOTOOLCHAIN = "local";
          };
        }
      );
    };
}
