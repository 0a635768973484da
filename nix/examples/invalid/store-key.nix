# Must fail: the etcd client key would be in the world-readable Nix store.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    etcd = {
      certFile = "/var/lib/secrets/etcd/worker002.pem";
      keyFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-worker002-key.pem";
    };
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
  };
}
