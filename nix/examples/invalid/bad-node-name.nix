# Must fail: the node name reaches etcd keys and config files.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  services.meshd = {
    enable = true;
    nodeName = "worker 002";
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
  };
}
