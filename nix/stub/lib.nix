# A small stand-in for nixpkgs' `lib`, enough to evaluate nixos-module.nix
# offline (no nixpkgs here). Every name below exists in nixpkgs' lib with the
# same meaning; nothing is added that nixpkgs lacks, so a module that
# evaluates against this stub uses only real lib functions.
#
# Semantics follow nixpkgs (lib/lists.nix, lib/attrsets.nix, lib/strings.nix,
# lib/options.nix, lib/modules.nix, lib/types.nix) in simplified form:
# priorities (mkOverride/mkDefault/mkForce), mkIf/mkMerge push-down,
# type checks and merges, submodules, freeform types. Not modelled: mkOrder,
# disabledModules, option renames, type merging across declarations.
let
  # Helpers of this stub only (nixpkgs' lib keeps its own equivalents private).
  showVal = v:
    if builtins.isString v then "\"${v}\""
    else if builtins.isInt v || builtins.isFloat v then toString v
    else if builtins.isBool v then (if v then "true" else "false")
    else if v == null then "null"
    else if isDerivation' v then "<derivation ${v.name or "?"}>"
    else if builtins.isList v then "[ ${builtins.concatStringsSep " " (map showVal v)} ]"
    else if builtins.isAttrs v then "{ ${builtins.concatStringsSep " " (map (n: "${n} = ${showVal v.${n}};") (builtins.attrNames v))} }"
    else "<${builtins.typeOf v}>";
  showDefs = defs: builtins.concatStringsSep "" (map (d: "\n- In `${d.file}': ${showVal d.value}") defs);
  isDerivation' = x: builtins.isAttrs x && (x.type or null) == "derivation";

  lib = rec {
    # --- builtins nixpkgs' lib re-exports under the same name ---------------
    inherit (builtins) attrNames attrValues mapAttrs isAttrs isList isString isBool isInt
      isFloat isFunction elemAt genList listToAttrs stringLength substring
      replaceStrings;

    # --- trivial / lists --------------------------------------------------
    id = x: x;
    const = x: _: x;
    flip = f: a: b: f b a;
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    toList = x: if builtins.isList x then x else [ x ];
    last = xs: builtins.elemAt xs (builtins.length xs - 1);
    imap0 = f: xs: builtins.genList (i: f i (builtins.elemAt xs i)) (builtins.length xs);
    imap1 = f: xs: builtins.genList (i: f (i + 1) (builtins.elemAt xs i)) (builtins.length xs);
    concatLists = builtins.concatLists;
    concatMap = builtins.concatMap;
    flatten = x: if builtins.isList x then builtins.concatMap flatten x else [ x ];
    unique = builtins.foldl' (acc: e: if builtins.elem e acc then acc else acc ++ [ e ]) [ ];
    foldl' = builtins.foldl';
    any = builtins.any;
    all = builtins.all;
    elem = builtins.elem;
    filter = builtins.filter;
    head = builtins.head;
    tail = builtins.tail;
    length = builtins.length;
    sort = builtins.sort;

    # --- attrsets ---------------------------------------------------------
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: builtins.listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
    mapAttrsToList = f: set: map (n: f n set.${n}) (builtins.attrNames set);
    filterAttrs = pred: set:
      builtins.listToAttrs (builtins.concatMap
        (n: let v = set.${n}; in if pred n v then [ (nameValuePair n v) ] else [ ])
        (builtins.attrNames set));
    filterAttrsRecursive = pred: set:
      builtins.listToAttrs (builtins.concatMap
        (n:
          let v = set.${n}; in
          if pred n v then [ (nameValuePair n (if builtins.isAttrs v then filterAttrsRecursive pred v else v)) ] else [ ])
        (builtins.attrNames set));
    optionalAttrs = cond: set: if cond then set else { };
    attrByPath = path: default: set:
      if path == [ ] then set
      else if builtins.isAttrs set && set ? ${builtins.head path}
      then attrByPath (builtins.tail path) default set.${builtins.head path}
      else default;
    recursiveUpdate = a: b:
      a // builtins.mapAttrs
        (n: v: if builtins.isAttrs v && builtins.isAttrs (a.${n} or null) && !(isDerivation v) then recursiveUpdate a.${n} v else v)
        b;
    zipAttrsWith = f: sets: builtins.zipAttrsWith f sets;
    isDerivation = x: builtins.isAttrs x && (x.type or null) == "derivation";
    mergeAttrs = a: b: a // b;

    # --- strings ----------------------------------------------------------
    hasPrefix = pref: s: builtins.substring 0 (builtins.stringLength pref) s == pref;
    hasSuffix = suf: s:
      let ls = builtins.stringLength s; lf = builtins.stringLength suf;
      in lf <= ls && builtins.substring (ls - lf) lf s == suf;
    removeSuffix = suf: s:
      if hasSuffix suf s then builtins.substring 0 (builtins.stringLength s - builtins.stringLength suf) s else s;
    optionalString = cond: s: if cond then s else "";
    concatStrings = builtins.concatStringsSep "";
    concatStringsSep = builtins.concatStringsSep;
    concatMapStringsSep = sep: f: xs: builtins.concatStringsSep sep (map f xs);
    escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
    escapeShellArgs = xs: builtins.concatStringsSep " " (map escapeShellArg xs);
    isStorePath = x:
      builtins.isString x && hasPrefix "${builtins.storeDir}/" x
      && builtins.match "[^/]+" (builtins.substring (builtins.stringLength builtins.storeDir + 1) (-1) x) != null;
    getExe' = pkg: name: "${pkg}/bin/${name}";

    # --- options (lib/options.nix) ---------------------------------------
    mkOption = { default ? null, defaultText ? null, example ? null, description ? null
               , type ? null, apply ? null, readOnly ? null, internal ? null, visible ? null
               , relatedPackages ? null }@attrs:
      attrs // { _type = "option"; };
    isOption = x: builtins.isAttrs x && (x._type or null) == "option";
    mkEnableOption = name: mkOption {
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
      type = types.bool;
    };
    mkPackageOption = pkgs: name:
      { nullable ? false, default ? name, example ? null, extraDescription ? "", pkgsText ? "pkgs" }:
      let
        name' = if builtins.isList name then last name else name;
        default' = toList default;
        defaultText = builtins.concatStringsSep "." default';
        defaultValue = attrByPath default' (throw "${defaultText} cannot be found in ${pkgsText}") pkgs;
      in
      mkOption ({
        default = defaultValue;
        defaultText = literalExpression "${pkgsText}.${defaultText}";
        description = "The ${name'} package to use." + (if extraDescription == "" then "" else " " + extraDescription);
        type = if nullable then types.nullOr types.package else types.package;
      } // optionalAttrs (example != null) {
        example = literalExpression (if builtins.isList example then "${pkgsText}.${builtins.concatStringsSep "." example}" else example);
      });
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    literalMD = text: { _type = "literalMD"; inherit text; };
    showOption = parts: builtins.concatStringsSep "." parts;
    getValues = map (d: d.value);

    mergeDefaultOption = loc: defs:
      let list = getValues defs; in
      if builtins.length list == 1 then builtins.head list
      else if builtins.all builtins.isList list then builtins.concatLists list
      else if builtins.all builtins.isAttrs list then builtins.foldl' mergeAttrs { } list
      else if builtins.all builtins.isBool list then builtins.foldl' (a: b: a || b) false list
      else if builtins.all builtins.isString list then builtins.concatStringsSep "" list
      else if builtins.all builtins.isInt list && builtins.all (x: x == builtins.head list) list then builtins.head list
      else throw "Cannot merge definitions of `${showOption loc}'. Definition values:${showDefs defs}";
    mergeEqualOption = loc: defs:
      (builtins.foldl'
        (first: def:
          if def.value != first.value
          then throw "The option `${showOption loc}' has conflicting definition values:${showDefs [ first def ]}"
          else first)
        (builtins.head defs)
        (builtins.tail defs)).value;
    mergeOneOption = loc: defs:
      if builtins.length defs == 1 then (builtins.head defs).value
      else throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\nDefinition values:${showDefs defs}";
    # --- properties (lib/modules.nix) ------------------------------------
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    defaultOverridePriority = 100;

    # --- module system ----------------------------------------------------
    types = import ./types.nix { inherit lib showVal; };
    inherit (import ./modules.nix { inherit lib showDefs; }) evalModules pushDownProperties dischargeProperties filterOverrides mergeDefinitions;
    mkOptionType = types.mkOptionType;
  };
in
lib
