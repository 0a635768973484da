# The few parts of nixpkgs' `pkgs` nixos-module.nix and nix/package.nix
# use, for evaluation without nixpkgs. Deliberately no `meshd`: nixpkgs has
# none, so the module must fall back to nix/package.nix.
#   - buildGoModule records its arguments and its Go's version (the
#     harness checks them) and returns a derivation-shaped value; nothing
#     is built.
#   - fakePackage stands for packages that cannot be built here (haproxy,
#     systemd, coreutils): fake derivations with store-shaped paths.
#   - formats.json, writeShellScript, runCommand compute real store paths
#     (builtins.toFile works with the dummy store in read-only evaluation),
#     so the harness can tie a unit's ExecStart to the exact file contents
#     the module generated; formats.json's type is nixpkgs'
#     (pkgs/pkgs-lib/formats.nix).
{ lib }:
let
  storePath = name: seed: "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" seed)}-${name}";
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = storePath name name;
    meta.mainProgram = builtins.head (builtins.split "-[0-9]" name);
  };
  pkgs = {
    inherit lib;
    callPackage = lib.callPackageWith pkgs;
    stdenv.hostPlatform.system = "x86_64-linux";

    # nixpkgs' buildGoModule builds with pkgs.go; buildGo126Module (absent
    # here unless a test adds it) with go_1_26.
    go.version = "1.26.8";
    buildGoModule = pkgs.recordGoModule pkgs.go.version;
    recordGoModule = goVersion: args: {
      type = "derivation";
      name = "${args.pname}-${args.version}";
      outPath = storePath "${args.pname}-${args.version}" (builtins.toJSON (removeAttrs args [ "src" ]) + args.src);
      inherit (args) meta;
      buildGoModuleArgs = args;
      inherit goVersion;
    };

    haproxy = fakePackage "haproxy-2.8.5";
    systemd = fakePackage "systemd-256.8";
    coreutils = fakePackage "coreutils-9.5";

    formats.json = { }: {
      type = with lib.types;
        let
          valueType = nullOr (oneOf [ bool int float str path (attrsOf valueType) (listOf valueType) ])
            // { description = "JSON value"; };
        in
        valueType;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };

    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";

    # Real runCommand builds `text` in a sandbox; here it only records it.
    runCommand = name: env: text: {
      type = "derivation";
      inherit name text env;
      outPath = storePath name (name + text);
    };
  };
in
pkgs
