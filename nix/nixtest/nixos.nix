# The NixOS options nixos-module.nix and the examples touch, declared as
# nixpkgs declares them (names, types, defaults, merge behaviour), for
# evaluating the module with nixpkgs' real lib.evalModules without NixOS:
#   systemd units     nixos/lib/systemd-unit-options.nix (unitOption,
#                     commonUnitOptions, serviceOptions), systemd-lib.nix
#                     (unitNameType)
#   systemd.*         nixos/modules/system/boot/systemd.nix, systemd/tmpfiles.nix,
#                     networkd.nix (systemd.network.networks)
#   networking.*      services/networking/firewall.nix, dhcpcd.nix,
#                     networkmanager.nix, tasks/network-interfaces.nix
#   users.*           config/users-groups.nix (and its assertions on
#                     isSystemUser/isNormalUser and the primary group)
#   services.prometheus.scrapeConfigs  services/monitoring/prometheus (untyped here)
#   assertions        misc/assertions.nix; system.checks: system/activation/top-level.nix
# serviceConfig is attrsOf unitOption without NixOS' checkService (which
# only checks Type= and Restart= values); systemd-analyze verify checks
# the rendered units instead (systemd_test.go).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # nixpkgs' unitOption: list definitions concatenate, scalars must agree;
  # priorities (mkDefault, mkForce) are resolved first.
  unitOption = types.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if builtins.isList (builtins.head defs').value
      then builtins.concatMap
        (def:
          if builtins.isList def.value then def.value
          else throw "The definitions for systemd unit options should be either all lists, representing repeatable options, or all non-lists, but for the option ${lib.showOption loc}, the definitions are a mix of list and non-list ${lib.options.showDefs defs'}")
        defs'
      else lib.mergeEqualOption loc defs';
  };
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitList = mkOption { type = types.listOf unitNameType; default = [ ]; };
  sharedOptions = {
    enable = mkOption { type = types.bool; default = true; };
    wantedBy = unitList;
    requiredBy = unitList;
    upheldBy = unitList;
    aliases = unitList;
  };
  commonUnitOptions = sharedOptions // {
    description = mkOption { type = types.singleLineStr; default = ""; };
    documentation = mkOption { type = types.listOf types.str; default = [ ]; };
    requires = unitList;
    wants = unitList;
    upholds = unitList;
    after = unitList;
    before = unitList;
    bindsTo = unitList;
    partOf = unitList;
    conflicts = unitList;
    requisite = unitList;
    onFailure = unitList;
    onSuccess = unitList;
    unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    # No default, as in nixpkgs: unset means "not written".
    startLimitBurst = mkOption { type = types.int; };
    startLimitIntervalSec = mkOption { type = types.int; };
    restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    reloadTriggers = mkOption { type = types.listOf unitOption; default = [ ]; };
  };
  serviceOptions = { name, ... }: {
    options = commonUnitOptions // {
      environment = mkOption { type = with types; attrsOf (nullOr (oneOf [ str path package ])); default = { }; };
      path = mkOption { type = with types; listOf (oneOf [ package str ]); default = [ ]; };
      serviceConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      reloadIfChanged = mkOption { type = types.bool; default = false; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
    };
  };
  targetOptions = { name, ... }: { options = commonUnitOptions; };

  firewallPorts = {
    allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; apply = lib.unique; };
    allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; apply = lib.unique; };
  };

  userOptions = { name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      description = mkOption { type = types.passwdEntry types.str; default = ""; };
      uid = mkOption { type = types.nullOr types.int; default = null; };
      isSystemUser = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      group = mkOption { type = types.str; default = ""; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; };
      createHome = mkOption { type = types.bool; default = false; };
    };
  };
  groupOptions = { name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      gid = mkOption { type = types.nullOr types.int; default = null; };
      members = mkOption { type = types.listOf (types.passwdEntry types.str); default = [ ]; };
    };
  };

  linkOptions = {
    options = {
      matchConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      linkConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      networkConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
    };
  };
in
{
  options = {
    networking.hostName = mkOption { type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$"; default = "nixos"; };
    networking.firewall = firewallPorts // {
      enable = mkOption { type = types.bool; default = true; };
      interfaces = mkOption { type = types.attrsOf (types.submodule { options = firewallPorts; }); default = { }; };
    };
    networking.dhcpcd.denyInterfaces = mkOption { type = types.nullOr (types.listOf types.str); default = null; };
    networking.networkmanager.unmanaged = mkOption { type = types.listOf types.str; default = [ ]; };
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };
    assertions = mkOption { type = types.listOf types.unspecified; internal = true; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; internal = true; default = [ ]; };
    system.checks = mkOption { type = types.listOf types.package; default = [ ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    systemd.package = mkOption { type = types.package; default = pkgs.systemd; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
    systemd.services = mkOption { type = types.attrsOf (types.submodule serviceOptions); default = { }; };
    systemd.targets = mkOption { type = types.attrsOf (types.submodule targetOptions); default = { }; };
    systemd.network.enable = mkOption { type = types.bool; default = false; };
    systemd.network.networks = mkOption { type = types.attrsOf (types.submodule linkOptions); default = { }; };
    # services/monitoring/prometheus: a list of Prometheus scrape_config
    # sets (NixOS types each field; the examples only fill it).
    services.prometheus.scrapeConfigs = mkOption { type = types.listOf (types.attrsOf types.anything); default = [ ]; };
    users.users = mkOption { type = types.attrsOf (types.submodule userOptions); default = { }; };
    users.groups = mkOption { type = types.attrsOf (types.submodule groupOptions); default = { }; };
  };

  # users-groups.nix's assertions on the users a module declares.
  config.assertions = lib.concatLists (lib.mapAttrsToList
    (name: user: [
      {
        assertion = user.isNormalUser != user.isSystemUser;
        message = "Exactly one of users.users.${name}.isSystemUser and users.users.${name}.isNormalUser must be set.";
      }
      {
        assertion = user.group != "";
        message = "users.users.${name}.group is unset. This used to default to nogroup, but this is unsafe.";
      }
      {
        assertion = user.group == "" || config.users.groups ? ${user.group};
        message = "users.users.${name}.group = \"${user.group}\": the group is not declared in users.groups.";
      }
    ])
    config.users.users);
}
