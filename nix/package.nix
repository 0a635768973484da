# meshd and meshctl, built with nixpkgs' buildGoModule.
#
#   pkgs.callPackage ./nix/package.nix { }
#
# vendorHash is the NAR hash of `go mod vendor` over nix/source.nix's files
# (nixpkgs' goModules output); nix/nixtest fails when go.sum moves and it
# does not. The go directive (go.mod) needs Go >= 1.26.8: see docs/nixos.md.
{
  lib,
  buildGoModule,
  go,
  buildGo126Module ? null,
  version ? "0.1.0",
}:

let
  source = import ./source.nix { inherit lib; };
  # go.mod's go directive: buildGoModule builds with GOTOOLCHAIN=local, so
  # its Go must be at least this. When pkgs' default Go is older, take
  # nixpkgs' Go 1.26 (whose patch releases nixpkgs backports to stable).
  goMin = builtins.head (builtins.match ".*\ngo ([0-9.]+)\n.*" (builtins.readFile ../go.mod));
  build = if lib.versionAtLeast go.version goMin || buildGo126Module == null then buildGoModule else buildGo126Module;
in
build {
  pname = "meshd";
  inherit version;

  src = lib.fileset.toSource {
    inherit (source) root fileset;
  };

  vendorHash = "sha256-nB5TeFMY+7mlOzYWfxr5O/O+SztgEPHiR8ysK9CYZ3c=";

  subPackages = [
    "meshd"
    "meshctl"
  ];

  env.CGO_ENABLED = 0;
  ldflags = [
    "-s"
    "-w"
    "-X main.version=${version}"
  ];

  # The tests need root, network namespaces, WireGuard and haproxy; they run
  # in the repository's CI (make test), not in the build sandbox.
  doCheck = false;

  meta = {
    description = "Cluster mesh daemon for NixOS: etcd registry, WireGuard overlay, HAProxy service mesh, secrets as systemd credentials";
    homepage = "https://github.com/meshd/meshd";
    license = lib.licenses.asl20;
    mainProgram = "meshd";
    platforms = lib.platforms.linux;
  };
}
