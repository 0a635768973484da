# A worker node (nix-infra's worker type): runs apps and consumes the
# backends and services groups.
{ config, lib, pkgs, ... }:
{
  imports = [
    ../../nixos-module.nix
    ./app-pod.nix
  ];

  networking.hostName = "worker001";

  services.meshd = {
    enable = true;
    openFirewall = true;
    # Kept outside the Nix store (provisioned by the deploy tool, mode 0400).
    etcd = {
      caFile = "/var/lib/secrets/etcd/ca.pem";
      certFile = "/var/lib/secrets/etcd/worker001.pem";
      keyFile = "/var/lib/secrets/etcd/worker001-key.pem";
    };
    settings = {
      etcd.endpoints = [ "https://10.1.0.2:2379" "https://10.1.0.3:2379" "https://10.1.0.4:2379" ];
      consume = [ "backends" "services" ];
      publicIPv4 = "203.0.113.21";
    };
  };
}
