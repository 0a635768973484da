# lib.evalModules and the property machinery, simplified from nixpkgs'
# lib/modules.nix: module collection with imports (deduplicated by path),
# option declaration merging, mkIf/mkMerge push-down, priorities, type
# checks, freeform types and a report of definitions for undeclared options.
{ lib, showDefs }:
let
  inherit (builtins) isAttrs isFunction isPath isString isBool attrNames concatMap filter
    length head mapAttrs foldl' listToAttrs genericClosure functionArgs intersectAttrs;
  inherit (lib) isOption showOption imap0 unique optional nameValuePair;

  typeOf' = x: if isAttrs x then x._type or "" else "";

  pushDownProperties = cfg:
    if typeOf' cfg == "merge" then concatMap pushDownProperties cfg.contents
    else if typeOf' cfg == "if" then map (mapAttrs (n: v: lib.mkIf cfg.condition v)) (pushDownProperties cfg.content)
    else if typeOf' cfg == "override" then map (mapAttrs (n: v: lib.mkOverride cfg.priority v)) (pushDownProperties cfg.content)
    else [ cfg ];

  dischargeProperties = def:
    if typeOf' def == "merge" then concatMap dischargeProperties def.contents
    else if typeOf' def == "if" then
      (if isBool def.condition
       then (if def.condition then dischargeProperties def.content else [ ])
       else throw "‘mkIf’ called with a non-Boolean condition")
    else [ def ];

  filterOverrides = defs:
    let
      getPrio = def: if typeOf' def.value == "override" then def.value.priority else lib.defaultOverridePriority;
      highest = foldl' (p: def: let q = getPrio def; in if q < p then q else p) 9999 defs;
      strip = def: if typeOf' def.value == "override" then def // { value = def.value.content; } else def;
    in
    concatMap (def: if getPrio def == highest then [ (strip def) ] else [ ]) defs;

  mergeDefinitions = loc: type: defs:
    let
      discharged = concatMap (d: map (v: { inherit (d) file; value = v; }) (dischargeProperties d.value)) defs;
      values = filterOverrides discharged;
      bad = filter (d: !(type.check d.value)) values;
      isDefined = length values > 0;
      mergedValue =
        if length bad > 0
        then throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs bad}"
        else if isDefined then type.merge loc values
        else throw "The option `${showOption loc}' is used but not defined.";
    in
    { inherit isDefined mergedValue; optionalValue = if isDefined then { value = mergedValue; } else { }; };

  evalOptionValue = loc: opt: defs:
    let
      type = if opt.type or null == null then lib.types.unspecified else opt.type;
      defaults = optional (opt ? default) { file = "<default>"; value = lib.mkOptionDefault opt.default; };
      v = (mergeDefinitions loc type (defaults ++ defs)).mergedValue;
    in
    if opt.apply or null != null then opt.apply v else v;

  # Normalises one module (path, function or attribute set).
  normalise = args: parentKey: idx: file: m:
    let
      isP = isPath m || isString m;
      f = if isP then import m else m;
      v = if isFunction f then f (intersectAttrs (functionArgs f) args) else f;
      structured = v ? config || v ? options;
    in
    {
      key = if isP then toString m else "${parentKey}#${toString idx}";
      file = if isP then toString m else v._file or file;
      imports = v.imports or [ ];
      options = if structured then v.options or { } else { };
      config = if structured then v.config or { } else removeAttrs v [ "_file" "key" "imports" "freeformType" ];
      freeformType = v.freeformType or null;
    };

  collect = args: modules:
    let
      entry = parentKey: file: i: m: let n = normalise args parentKey i file m; in { inherit (n) key; mod = n; };
    in
    map (e: e.mod) (genericClosure {
      startSet = imap0 (entry "root" "<unknown-file>") modules;
      operator = e: imap0 (entry e.key e.mod.file) e.mod.imports;
    });

  mergeDecls = loc: decls:
    let names = unique (concatMap (d: attrNames d.value) decls); in
    listToAttrs (map
      (n:
        let
          sub = concatMap (d: optional (d.value ? ${n}) { inherit (d) file; value = d.value.${n}; }) decls;
          opts = filter (d: isOption d.value) sub;
        in
        nameValuePair n (
          if opts == [ ] then mergeDecls (loc ++ [ n ]) sub
          else if length sub == 1 then (head opts).value // { loc = loc ++ [ n ]; declarations = [ (head opts).file ]; }
          else throw "The option `${showOption (loc ++ [ n ])}' in `${(lib.last sub).file}' is already declared in `${(head sub).file}'."
        ))
      names);

  pushAll = loc: defs: map
    (d: if isAttrs d.value then d else throw "The option path `${showOption loc}' is an attribute set of options, but it is defined as a non-attribute set in `${d.file}'.")
    (concatMap (d: map (v: { inherit (d) file; value = v; }) (pushDownProperties d.value)) defs);
  defsFor = n: pushed: concatMap (d: optional (d.value ? ${n}) { inherit (d) file; value = d.value.${n}; }) pushed;

  evalTree = loc: decls: freeform: defs:
    if isOption decls then evalOptionValue loc decls defs
    else
      let
        pushed = pushAll loc defs;
        declared = mapAttrs (n: d: evalTree (loc ++ [ n ]) d null (defsFor n pushed)) decls;
        rest = filter (d: d.value != { }) (map (d: d // { value = removeAttrs d.value (attrNames decls); }) pushed);
      in
      if freeform == null then declared
      else declared // (if rest == [ ] then { } else (mergeDefinitions loc freeform rest).mergedValue);

  unmatchedAt = loc: decls: freeform: defs:
    if isOption decls then [ ]
    else
      let
        pushed = pushAll loc defs;
        names = unique (concatMap (d: attrNames d.value) pushed);
      in
      concatMap
        (n:
          if decls ? ${n} then unmatchedAt (loc ++ [ n ]) decls.${n} null (defsFor n pushed)
          else if freeform != null then [ ]
          else [ (loc ++ [ n ]) ])
        names;

  evalModules = { modules, specialArgs ? { }, prefix ? [ ] }:
    let
      args = specialArgs // { inherit lib config options; };
      mods = collect args modules;
      options = mergeDecls prefix (map (m: { inherit (m) file; value = m.options; }) mods);
      freeforms = filter (t: t != null) (map (m: m.freeformType) mods);
      freeform = if length freeforms == 0 then null else lib.last freeforms;
      defs = map (m: { inherit (m) file; value = m.config; }) mods;
      config = evalTree prefix options freeform defs;
    in
    { inherit config options; unmatched = unmatchedAt prefix options freeform defs; };
in
{
  inherit evalModules pushDownProperties dischargeProperties filterOverrides mergeDefinitions;
}
