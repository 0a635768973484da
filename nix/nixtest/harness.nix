# Evaluates one NixOS configuration (e.g. nix/examples/worker.nix, which
# imports ../../nixos-module.nix) with nixpkgs' real lib.evalModules, the
# NixOS option declarations of ./nixos.nix and the test pkgs of ./pkgs.nix,
# the way a system build would: unknown options and failed assertions abort
# the evaluation with NixOS' messages. Returns, as JSON, what the Go checks
# in nix/nixtest look at.
#
#   nix-instantiate --store dummy:// --eval --strict --json nix/nixtest/harness.nix \
#     --arg lib 'import ../shared/nixpkgs-lib/lib' --arg configuration ./nix/examples/worker.nix
{ lib, configuration }:
let
  pkgs = import ./pkgs.nix { inherit lib; };
  inherit (builtins) attrNames concatStringsSep filter isAttrs isList length mapAttrs toJSON;

  eval = lib.evalModules {
    modules = [ ./nixos.nix configuration ];
    specialArgs = { inherit pkgs; };
  };
  config = eval.config;

  failed = map (a: a.message) (filter (a: !a.assertion) config.assertions);
  # NixOS' top-level: failed assertions abort the build (misc/assertions.nix).
  checked =
    if failed != [ ] then throw "\nFailed assertions:\n${concatStringsSep "\n" (map (m: "- ${m}") failed)}"
    else true;
  # An option without a default that nobody set (startLimitIntervalSec).
  defined = v: (builtins.tryEval v).success;

  # NixOS' attrsToSection: one Key=value line per value, lists repeated.
  toOption = x: if x == true then "true" else if x == false then "false" else toString x;
  section = as: concatStringsSep "" (lib.concatMap
    (n: map (v: "${n}=${toOption v}\n") (lib.toList as.${n}))
    (attrNames as));
  unitSection = u:
    let
      deps = lib.filterAttrs (_: v: v != [ ]) {
        After = u.after; Before = u.before; Wants = u.wants; Requires = u.requires;
        BindsTo = u.bindsTo; PartOf = u.partOf; Conflicts = u.conflicts;
      };
    in
    "[Unit]\n"
    + lib.optionalString (u.description != "") "Description=${u.description}\n"
    + section (builtins.mapAttrs (_: concatStringsSep " ") deps)
    + lib.optionalString (defined u.startLimitIntervalSec) "StartLimitIntervalSec=${toString u.startLimitIntervalSec}\n"
    + section u.unitConfig;
  renderService = s:
    let
      path = concatStringsSep ":" (lib.concatMap (p: [ "${p}/bin" "${p}/sbin" ]) s.path);
      env = lib.filterAttrs (_: v: v != null) (s.environment // lib.optionalAttrs (s.path != [ ]) { PATH = path; });
    in
    unitSection s
    + "\n[Service]\n"
    + concatStringsSep "" (map (n: "Environment=\"${n}=${toString env.${n}}\"\n") (attrNames env))
    + section s.serviceConfig;

  # A value as Nix source, for the option reference.
  toNix = v:
    if builtins.isString v then "\"${builtins.replaceStrings [ "\\" "\"" "\${" ] [ "\\\\" "\\\"" "\\\${" ] v}\""
    else if builtins.isBool v then (if v then "true" else "false")
    else if v == null then "null"
    else if builtins.isInt v || builtins.isFloat v then toString v
    else if isList v then (if v == [ ] then "[ ]" else "[ ${concatStringsSep " " (map toNix v)} ]")
    else if lib.isDerivation v then v.name
    else if isAttrs v then
      (if v == { } then "{ }" else "{ ${concatStringsSep " " (map (n: "${attrName n} = ${toNix v.${n}};") (attrNames v))} }")
    else "<${builtins.typeOf v}>";
  attrName = n: if builtins.match "[A-Za-z_][A-Za-z0-9_'-]*" n != null then n else toNix n;

  # Every option under services.meshd, submodule options included; like
  # nixpkgs' option docs, without internal or invisible ones (_module.*).
  optionDocs = node:
    if lib.isOption node && ((node.internal or false) || !(node.visible or true)) then [ ]
    else if lib.isOption node then
      [{
        name = lib.showOption node.loc;
        description = node.description or null;
        example =
          if !(node ? example) then null
          else if (node.example._type or null) == "literalExpression" then node.example.text
          else toNix node.example;
        default =
          if node ? defaultText then (if isAttrs node.defaultText then node.defaultText.text else node.defaultText)
          else if node ? default then toNix node.default
          else null;
        type = node.type.description;
      }] ++ optionDocs (node.type.getSubOptions node.loc)
    else if isAttrs node then lib.concatMap (n: optionDocs node.${n}) (attrNames node)
    else [ ];

  dropNulls = v:
    if isAttrs v then mapAttrs (_: dropNulls) (lib.filterAttrs (_: x: x != null) v)
    else if isList v then map dropNulls v
    else v;
  meshd = config.services.meshd;
  settingsJSON = toJSON (dropNulls meshd.settings);
in
assert checked;
{
  services = mapAttrs
    (_: s: {
      inherit (s) wantedBy wants after before requires bindsTo partOf reloadIfChanged restartIfChanged;
      serviceConfig = s.serviceConfig;
      unitText = renderService s;
    })
    config.systemd.services;
  targets = mapAttrs (_: t: { inherit (t) wantedBy wants after before; unitText = unitSection t; }) config.systemd.targets;
  firewall = {
    inherit (config.networking.firewall) enable allowedUDPPorts allowedTCPPorts;
    interfaces = mapAttrs (_: i: { inherit (i) allowedTCPPorts allowedUDPPorts; }) config.networking.firewall.interfaces;
  };
  dhcpcdDenyInterfaces = config.networking.dhcpcd.denyInterfaces;
  networkmanagerUnmanaged = config.networking.networkmanager.unmanaged;
  networkdNetworks = mapAttrs (_: n: { inherit (n) matchConfig linkConfig; }) config.systemd.network.networks;
  users = mapAttrs (_: u: { inherit (u) isSystemUser group; }) config.users.users;
  groups = attrNames config.users.groups;
  prometheusScrapeConfigs = config.services.prometheus.scrapeConfigs;
  systemPackages = map (p: "${p}") config.environment.systemPackages;
  kernelModules = config.boot.kernelModules;
  tmpfiles = config.systemd.tmpfiles.rules;
  inherit (config) warnings;
  checks = map (d: { inherit (d) name; text = d.text or ""; }) config.system.checks;
  meshd = if !meshd.enable then null else {
    inherit settingsJSON;
    # Where pkgs.formats.json puts exactly this text: the unit must name it.
    configFile = (pkgs.formats.json { }).generate "meshd.json" (dropNulls meshd.settings);
    package = "${meshd.package}";
    # What the default package passed to buildGoModule (null: not ours).
    buildGoModuleArgs =
      let a = meshd.package.buildGoModuleArgs or null; in
      if a == null then null else removeAttrs a [ "src" ] // { src = "${a.src}"; };
  };
  options = optionDocs eval.options.services.meshd;
}
