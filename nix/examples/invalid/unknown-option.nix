# Must fail: a typo in a typed option.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    etcd.keyfile = "/var/lib/secrets/etcd/worker002-key.pem";
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
  };
}
