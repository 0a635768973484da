# A stand-in for the few nixpkgs packages and helpers nixos-module.nix uses.
# Packages are fake derivations with store-shaped paths; pkgs.formats.json
# and pkgs.runCommand compute real store paths (builtins.toFile works with
# the dummy store in read-only evaluation) so the harness can tie a unit's
# ExecStart to the exact file contents the module generated.
{ lib }:
let
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" name)}-${name}";
    meta.mainProgram = builtins.head (builtins.split "-[0-9]" name);
  };
  # The recursive JSON value type of nixpkgs' pkgs.formats.json.
  jsonValue = with lib.types;
    let
      valueType = nullOr (oneOf [ bool int float str path (attrsOf valueType) (listOf valueType) ])
        // { description = "JSON value"; };
    in
    valueType;
in
{
  meshd = fakePackage "meshd-0.1.0";
  haproxy = fakePackage "haproxy-2.8.5";
  systemd = fakePackage "systemd-256.8";
  coreutils = fakePackage "coreutils-9.5";

  formats.json = { }: {
    type = jsonValue;
    generate = name: value: builtins.toFile name (builtins.toJSON value);
  };

  writeText = name: text: builtins.toFile name text;
  writeShellScript = name: text: builtins.toFile name "#!/bin/sh\n${text}";

  # Real runCommand builds `text` in a sandbox; here it only records it.
  runCommand = name: env: text: {
    type = "derivation";
    inherit name text env;
    outPath = "${builtins.storeDir}/${builtins.substring 0 32 (builtins.hashString "sha256" (name + text))}-${name}";
  };
}
