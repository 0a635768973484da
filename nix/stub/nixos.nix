# Declarations of the NixOS options nixos-module.nix and the examples set,
# with nixpkgs' names, types and merge behaviour (nixos/modules/system/boot/
# systemd.nix, systemd-unit-options.nix, services/networking/firewall.nix,
# misc/assertions.nix). A stand-in for the rest of NixOS.
{ lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # nixpkgs' unitOption: lists from several definitions concatenate,
  # scalars must agree.
  unitOption = types.mkOptionType {
    name = "systemd option";
    check = v:
      let scalar = x: builtins.isString x || builtins.isInt x || builtins.isBool x || lib.isDerivation x || builtins.isPath x;
      in scalar v || (builtins.isList v && builtins.all scalar v);
    merge = loc: defs:
      if builtins.any (d: builtins.isList d.value) defs
      then builtins.concatMap (d: lib.toList d.value) defs
      else lib.mergeEqualOption loc defs;
  };
  unitList = mkOption { type = types.listOf types.str; default = [ ]; };
  commonUnitOptions = {
    enable = mkOption { type = types.bool; default = true; };
    description = mkOption { type = types.str; default = ""; };
    wantedBy = unitList;
    requiredBy = unitList;
    upheldBy = unitList;
    before = unitList;
    after = unitList;
    wants = unitList;
    requires = unitList;
    bindsTo = unitList;
    partOf = unitList;
    conflicts = unitList;
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    reloadTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
  };
  serviceOptions = { name, ... }: {
    options = commonUnitOptions // {
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      environment = mkOption { type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ])); default = { }; };
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      reloadIfChanged = mkOption { type = types.bool; default = false; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
      startLimitIntervalSec = mkOption { type = types.nullOr types.int; default = null; };
      startLimitBurst = mkOption { type = types.nullOr types.int; default = null; };
    };
  };
  targetOptions = { name, ... }: { options = commonUnitOptions; };
in
{
  options = {
    networking.hostName = mkOption { type = types.str; default = "nixos"; };
    networking.firewall = {
      enable = mkOption { type = types.bool; default = true; };
      allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    };
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    system.checks = mkOption { type = types.listOf types.package; default = [ ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    systemd.package = mkOption { type = types.package; default = pkgs.systemd; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.services = mkOption { type = types.attrsOf (types.submodule serviceOptions); default = { }; };
    systemd.targets = mkOption { type = types.attrsOf (types.submodule targetOptions); default = { }; };
  };
}
