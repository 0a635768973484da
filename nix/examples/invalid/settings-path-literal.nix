# Must fail: settings is freeform, so a Nix path is a valid JSON value
# there, and rendering it would copy the key into the world-readable store.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
    settings.etcd.keyFile = ./worker002-key.pem;
  };
}
