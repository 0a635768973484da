# Must fail: under ProtectSystem=strict meshd may write its HAProxy config
# only in /run/meshd; anywhere else the units would fail at start.
{ ... }:
{
  imports = [ ../../../nixos-module.nix ];
  networking.hostName = "worker002";
  services.meshd = {
    enable = true;
    settings.etcd.endpoints = [ "https://10.1.0.2:2379" ];
    settings.haproxy.configPath = "/var/lib/haproxy/meshd.cfg";
  };
}
