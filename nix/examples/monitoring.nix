# A node that also runs the cluster's Prometheus and scrapes every node's
# meshd over the overlay. Each node (this one included) serves its metrics
# beyond loopback and opens the port on the WireGuard interface only.
{ config, lib, pkgs, ... }:
let
  # Each node's overlay address: `meshctl node list` (OVERLAY IP), the first
  # address of the node's subnet, which it keeps until `meshctl node remove`.
  nodes = {
    ingress001 = "10.10.1.0";
    monitor001 = "10.10.2.0";
    service001 = "10.10.3.0";
    worker001 = "10.10.4.0";
  };
in
{
  imports = [ ../../nixos-module.nix ];

  networking.hostName = "monitor001";

  services.meshd = {
    enable = true;
    openFirewall = true;
    # On every node: open the metrics port on the overlay...
    openMetricsFirewall = true;
    etcd = {
      caFile = "/var/lib/secrets/etcd/ca.pem";
      certFile = "/var/lib/secrets/etcd/monitor001.pem";
      keyFile = "/var/lib/secrets/etcd/monitor001-key.pem";
    };
    settings = {
      etcd.endpoints = [ "https://10.1.0.2:2379" "https://10.1.0.3:2379" "https://10.1.0.4:2379" ];
      consume = [ "services" ];
      publicIPv4 = "203.0.113.40";
      # ...and serve metrics beyond loopback.
      metricsAddr = "0.0.0.0:9464";
    };
  };

  services.prometheus.scrapeConfigs = [
    {
      job_name = "meshd";
      static_configs = lib.mapAttrsToList
        (node: ip: {
          targets = [ "${ip}:9464" ];
          labels.node = node;
        })
        nodes;
    }
  ];
}
