# The files the Nix build sees: go.mod, go.sum and every .go file of the
# module. `go mod vendor` (nixpkgs' goModules) vendors what the module's
# packages and their tests import, so the vendorHash depends on exactly this
# set; nix/nixtest recomputes the hash from it.
{ lib }:
let
  root = ../.;
in
{
  inherit root;
  fileset = lib.fileset.unions [
    (root + "/go.mod")
    (root + "/go.sum")
    (lib.fileset.fileFilter (file: file.hasExt "go") root)
  ];
}
