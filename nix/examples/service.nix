# A service node (nix-infra's service type): runs shared services (here a
# database) and consumes the services group.
{ config, lib, pkgs, ... }:
{
  imports = [ ../../nixos-module.nix ];

  networking.hostName = "service001";

  services.meshd = {
    enable = true;
    openFirewall = true;
    extraArgs = [ "--log-level" "debug" ];
    etcd = {
      caFile = "/var/lib/secrets/etcd/ca.pem";
      certFile = "/var/lib/secrets/etcd/service001.pem";
      keyFile = "/var/lib/secrets/etcd/service001-key.pem";
    };
    settings = {
      etcd = {
        endpoints = [ "https://10.1.0.2:2379" "https://10.1.0.3:2379" "https://10.1.0.4:2379" ];
        dialTimeout = "3s";
      };
      consume = [ "services" ];
      publicIPv4 = "203.0.113.30";
      leaseTTL = "15s";
      metricsAddr = "127.0.0.1:9464";
      # No kernel WireGuard on this host: wireguard-go on /dev/net/tun.
      overlay = { mode = "userspace"; listenPort = 51821; };
      # Seal credentials to the TPM when there is one.
      secrets.withKey = "auto";
    };
    # What nix-infra did with etcdctl in ExecStartPre/postStart.
    instances.mongodb = {
      group = "services";
      port = 27017;
      unit = "podman-mongodb.service";
      # The unit must be active and mongodb answer on the node's overlay
      # address (where it binds) at port 27017.
      check = { interval = "2s"; timeout = "1s"; };
    };
    secrets.mongodb-root-password.units = [ "podman-mongodb.service" ];
  };

  systemd.services.podman-mongodb = {
    description = "mongodb container";
    wantedBy = [ "multi-user.target" ];
    serviceConfig = {
      LoadCredentialEncrypted = [ "mongodb-root-password:/etc/credstore.encrypted/mongodb-root-password" ];
      ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
    };
  };
}
