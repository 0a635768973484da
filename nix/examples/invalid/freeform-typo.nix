# Evaluates (settings is freeform) but meshd rejects the rendered file:
# "wgPort" is not a field of meshd's config. The build-time check
# (services.meshd.checkConfig) runs meshd --check-config and fails.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
    settings.overlay.wgPort = 51821;
  };
}
