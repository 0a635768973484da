# Must fail: a Nix path would be copied into the store; the option takes a
# string.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    etcd.keyFile = ./worker002-key.pem;
    etcd.certFile = "/var/lib/secrets/etcd/worker002.pem";
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
  };
}
