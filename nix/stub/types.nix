# lib.types, simplified from nixpkgs' lib/types.nix: the same names, checks
# and merge behaviour for the types nixos-module.nix and the NixOS option
# stubs use.
{ lib, showVal }:
let
  inherit (builtins) isAttrs isList isString isBool isInt isFloat isFunction isPath
    all elem length match concatStringsSep mapAttrs;
  inherit (lib) showOption mergeEqualOption mergeOneOption mergeDefaultOption
    isDerivation last imap1;
  mergeDefinitions = loc: type: defs: lib.mergeDefinitions loc type defs;

  mkOptionType =
    { name
    , description ? name
    , check ? (_: true)
    , merge ? mergeDefaultOption
    , getSubOptions ? (_: { })
    , nestedTypes ? { }
    }:
    { _type = "option-type"; inherit name description check merge getSubOptions nestedTypes; };

  addCheck = t: extra: t // { check = x: t.check x && extra x; };

  between = lo: hi: mkOptionType {
    name = "intBetween";
    description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
    check = x: isInt x && x >= lo && x <= hi;
    merge = mergeEqualOption;
  };

  types = rec {
    inherit mkOptionType;
    isType = name: t: isAttrs t && (t._type or null) == "option-type" && t.name == name;

    unspecified = mkOptionType { name = "unspecified"; };
    anything = mkOptionType { name = "anything"; description = "anything"; };
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; merge = mergeEqualOption; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; merge = mergeEqualOption; };
    float = mkOptionType { name = "float"; description = "floating point number"; check = isFloat; merge = mergeEqualOption; };
    ints = {
      inherit between;
      unsigned = addCheck int (x: x >= 0) // { name = "unsignedInt"; description = "unsigned integer, meaning >=0"; };
      positive = addCheck int (x: x > 0) // { name = "positiveInt"; description = "positive integer, meaning >0"; };
      u16 = between 0 65535 // { name = "u16"; description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)"; };
    };
    port = ints.u16;
    str = mkOptionType { name = "str"; description = "string"; check = isString; merge = mergeEqualOption; };
    nonEmptyStr = addCheck str (x: match "[[:space:]]*" x == null) // { name = "nonEmptyStr"; description = "non-empty string"; };
    strMatching = pattern: mkOptionType {
      name = "strMatching ${lib.escapeShellArg pattern}";
      description = "string matching the pattern ${pattern}";
      check = x: isString x && match pattern x != null;
      merge = mergeEqualOption;
    };
    path = mkOptionType {
      name = "path";
      description = "path";
      check = x: (isString x || isPath x) && builtins.substring 0 1 (toString x) == "/";
      merge = mergeEqualOption;
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = x: isDerivation x || lib.isStorePath x;
      merge = mergeOneOption;
    };
    enum = values: mkOptionType {
      name = "enum";
      description = "one of ${concatStringsSep ", " (map showVal values)}";
      check = x: elem x values;
      merge = mergeEqualOption;
    };

    listOf = elemType: mkOptionType {
      name = "listOf";
      description = "list of ${elemType.description}";
      check = isList;
      merge = loc: defs:
        map (x: x.value) (builtins.filter (x: x ? value) (builtins.concatLists (imap1
          (n: def: imap1
            (m: v: (mergeDefinitions (loc ++ [ "[definition ${toString n}-entry ${toString m}]" ]) elemType
              [{ inherit (def) file; value = v; }]).optionalValue)
            def.value)
          defs)));
      getSubOptions = prefix: elemType.getSubOptions (prefix ++ [ "*" ]);
      nestedTypes.elemType = elemType;
    };

    attrsOf = elemType: mkOptionType {
      name = "attrsOf";
      description = "attribute set of ${elemType.description}";
      check = isAttrs;
      merge = loc: defs:
        mapAttrs (n: v: v.value) (lib.filterAttrs (n: v: v ? value) (builtins.zipAttrsWith
          (name: defs': (mergeDefinitions (loc ++ [ name ]) elemType defs').optionalValue)
          (map (def: mapAttrs (n: v: { inherit (def) file; value = v; }) def.value) defs)));
      getSubOptions = prefix: elemType.getSubOptions (prefix ++ [ "<name>" ]);
      nestedTypes.elemType = elemType;
    };

    nullOr = elemType: mkOptionType {
      name = "nullOr";
      description = "null or ${elemType.description}";
      check = x: x == null || elemType.check x;
      merge = loc: defs:
        let nulls = builtins.filter (d: d.value == null) defs; in
        if nulls == defs then null
        else if nulls == [ ] then elemType.merge loc defs
        else throw "The option `${showOption loc}' is defined both null and not null, in ${concatStringsSep ", " (map (d: "`${d.file}'") defs)}.";
      getSubOptions = elemType.getSubOptions;
      nestedTypes.elemType = elemType;
    };

    either = t1: t2: mkOptionType {
      name = "either";
      description = "${t1.description} or ${t2.description}";
      check = x: t1.check x || t2.check x;
      merge = loc: defs:
        let values = map (d: d.value) defs; in
        if all t1.check values then t1.merge loc defs
        else if all t2.check values then t2.merge loc defs
        else mergeOneOption loc defs;
      nestedTypes = { left = t1; right = t2; };
    };
    oneOf = ts: builtins.foldl' either (builtins.head ts) (builtins.tail ts);

    submoduleWith = { modules, specialArgs ? { }, shorthandOnlyDefinesConfig ? false, description ? null }:
      let
        defModules = defs: map
          ({ file, value }:
            if isAttrs value && shorthandOnlyDefinesConfig
            then { _file = file; config = value; }
            else { _file = file; imports = [ value ]; })
          defs;
        eval = loc: name: defs: lib.evalModules {
          modules = modules ++ defModules defs;
          specialArgs = specialArgs // { inherit name; };
          prefix = loc;
        };
      in
      mkOptionType {
        name = "submodule";
        description = if description != null then description else "submodule";
        check = x: isAttrs x || isFunction x || isPath x;
        merge = loc: defs:
          let r = eval loc (last loc) defs; in
          if r.unmatched == [ ] then r.config
          else throw "The option `${showOption (builtins.head r.unmatched)}' does not exist.";
        getSubOptions = prefix: (eval prefix "<name>" [ ]).options;
      };
    submodule = m: submoduleWith { shorthandOnlyDefinesConfig = true; modules = lib.toList m; };
  };
in
types
