# An ingress node (nix-infra's ingress type): consumes the frontends group;
# internet traffic enters through its proxy, which reaches each frontend at
# 127.0.0.1:<port> through the mesh HAProxy.
{ config, lib, pkgs, ... }:
{
  imports = [ ../../nixos-module.nix ];

  networking.hostName = "ingress001";
  networking.firewall.allowedTCPPorts = [ 80 443 ];

  services.meshd = {
    enable = true;
    openFirewall = true;
    etcd = {
      caFile = "/var/lib/secrets/etcd/ca.pem";
      certFile = "/var/lib/secrets/etcd/ingress001.pem";
      keyFile = "/var/lib/secrets/etcd/ingress001-key.pem";
    };
    settings = {
      etcd.endpoints = [ "https://10.1.0.2:2379" "https://10.1.0.3:2379" "https://10.1.0.4:2379" ];
      consume = [ "frontends" ];
      publicIPv4 = "203.0.113.10";
      # This host has kernel WireGuard: no /dev/net/tun for the service.
      overlay.mode = "kernel";
      # Ports the ingress proxy itself uses: an app publishing one is skipped.
      haproxy.reservedPorts = [ 80 443 ];
    };
    secrets.ingress-tls-key = {
      units = [ "ingress-proxy.service" ];
      action = "reload";
    };
  };

  # The public proxy (stands for nginx/traefik). It needs the mesh
  # listeners, and takes its TLS key from the credential meshd delivers
  # (ImportCredential= needs systemd >= 254, as in current nixpkgs).
  systemd.services.ingress-proxy = {
    description = "public ingress proxy";
    wantedBy = [ "multi-user.target" ];
    wants = [ "meshd-online.target" ];
    after = [ "meshd-online.target" ];
    serviceConfig = {
      ImportCredential = [ "ingress-tls-key" ];
      ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
      ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
    };
  };
}
