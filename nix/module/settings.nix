# services.meshd.settings: meshd's JSON config file as a freeform
# attribute set, with typed options for what nixos-module.nix depends on.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types literalExpression;
  inherit (import ./types.nix { inherit lib; }) nameType groupType durationType interfaceType pathType listenAddrType checkOptions instanceFields runDir haproxyRunDir;
  supervise = cfg.settings.haproxy.supervise;
  socketDir = if supervise then runDir else haproxyRunDir;
  cfg = config.services.meshd;
  settingsFormat = pkgs.formats.json { };

  instanceSettingsModule = {
    options = instanceFields // {
      app = mkOption {
        type = nameType;
        example = "mongodb";
        description = "The app's name in the registry.";
      };
      check = mkOption {
        type = types.submodule checkOptions;
        default = { };
        example = { unit = "podman-mongodb.service"; interval = "2s"; };
        description = "The local health check that decides whether this instance is advertised. The instance is advertised while `unit` (if set) is active and a TCP connect succeeds to `tcp`, or else to the address the instance is advertised with (the node's overlay IP and `port`: the app itself, not the node's HAProxy on 127.0.0.1).";
      };
    };
  };

  section = { description, example, options }: mkOption {
    type = types.submodule { freeformType = settingsFormat.type; inherit options; };
    default = { };
    inherit description example;
  };
in
{
  options.services.meshd.settings = mkOption {
    default = { };
    example = literalExpression ''
      {
        etcd.endpoints = [ "https://10.0.0.2:2379" ];
        consume = [ "backends" "services" ];
        publicIPv4 = "203.0.113.10";
      }
    '';
    description = "meshd's configuration, rendered to its JSON config file (see pkg/config). Typed options below cover what the module depends on; any other field of meshd's config may be set too (meshd rejects unknown fields).";
    type = types.submodule {
      freeformType = settingsFormat.type;
      options = {
        consume = mkOption {
          type = types.listOf groupType;
          default = [ ];
          example = [ "backends" "services" ];
          description = "The groups whose apps this node's HAProxy listens for (ingress: frontends; worker: backends, services; service node: services).";
        };
        leaseTTL = mkOption {
          type = durationType;
          default = "10s";
          example = "15s";
          description = "The presence lease: a node that stops renewing it vanishes from every other node's view after this long.";
        };
        metricsAddr = mkOption {
          type = listenAddrType;
          default = "127.0.0.1:9464";
          example = "0.0.0.0:9464";
          description = "Where meshd serves Prometheus metrics (`/metrics`) and `/healthz`; `\"\"` turns it off. For a central Prometheus listen beyond loopback and set `openMetricsFirewall`.";
        };
        stateDir = mkOption {
          type = pathType;
          default = "/var/lib/meshd";
          example = "/var/lib/meshd";
          description = "Where meshd keeps its WireGuard key, age identity and overlay cache across reboots.";
        };
        instances = mkOption {
          type = types.listOf (types.submodule instanceSettingsModule);
          default = [ ];
          example = [{ app = "mongodb"; group = "services"; port = 27017; }];
          description = "App instances this node serves (prefer `services.meshd.instances`).";
        };
        etcd = section {
          description = "How meshd reaches etcd. The TLS files come from `services.meshd.etcd`.";
          example = { endpoints = [ "https://10.0.0.2:2379" ]; dialTimeout = "5s"; };
          options.endpoints = mkOption {
            type = types.listOf types.nonEmptyStr;
            example = [ "https://10.0.0.2:2379" "https://10.0.0.3:2379" ];
            description = "The etcd client URLs.";
          };
        };
        overlay = section {
          description = "The WireGuard overlay.";
          example = { mode = "userspace"; mtu = 1420; };
          options = {
            enable = mkOption {
              type = types.bool;
              default = true;
              example = false;
              description = "Whether meshd programs the WireGuard overlay. Secrets need it: a node's age recipient is published in its overlay member record.";
            };
            network = mkOption {
              type = types.str;
              default = "10.0.0.0/8";
              example = "10.0.0.0/8";
              description = "The cluster prefix node subnets are carved from (flannel's `Network`).";
            };
            interface = mkOption {
              type = interfaceType;
              default = "meshd-wg";
              example = "flannel-wg";
              description = "The WireGuard interface (at most 15 characters).";
            };
            listenPort = mkOption {
              type = types.port;
              default = 51820;
              example = 51821;
              description = "The WireGuard UDP port (opened by `openFirewall`).";
            };
            mode = mkOption {
              type = types.enum [ "auto" "kernel" "userspace" ];
              default = "auto";
              example = "userspace";
              description = "`kernel` WireGuard, `userspace` wireguard-go on /dev/net/tun, or `auto` (kernel when available). Anything but `kernel` lets the service open /dev/net/tun.";
            };
          };
        };
        haproxy = section {
          description = "The service-mesh HAProxy. By default the module runs it as the `meshd-haproxy` unit.";
          example = { reservedPorts = [ 9100 ]; serverSlots = 16; };
          options = {
            enable = mkOption {
              type = types.bool;
              default = true;
              example = false;
              description = "Whether meshd renders and applies the HAProxy config.";
            };
            supervise = mkOption {
              type = types.bool;
              default = false;
              example = true;
              description = "Let meshd start the HAProxy master itself instead of the module's `meshd-haproxy` unit.";
            };
            configPath = mkOption {
              type = pathType;
              default = "${runDir}/haproxy.cfg";
              example = "${runDir}/haproxy.cfg";
              description = "The file meshd renders and HAProxy runs: a file in ${runDir} (the only place meshd may write it; owned by meshd, readable by the meshd-haproxy user), never under /etc.";
            };
            masterSocket = mkOption {
              type = pathType;
              default = "${socketDir}/master.sock";
              defaultText = literalExpression ''if supervise then "${runDir}/master.sock" else "${haproxyRunDir}/master.sock"'';
              example = "${haproxyRunDir}/master.sock";
              description = "HAProxy's master CLI socket, through which meshd reloads it: in ${haproxyRunDir} (the meshd-haproxy unit's runtime directory), or in ${runDir} when meshd supervises HAProxy.";
            };
            statsSocket = mkOption {
              type = pathType;
              default = "${socketDir}/stats.sock";
              defaultText = literalExpression ''if supervise then "${runDir}/stats.sock" else "${haproxyRunDir}/stats.sock"'';
              example = "${haproxyRunDir}/stats.sock";
              description = "HAProxy's runtime API socket, through which meshd fills server slots: in the same directory as `masterSocket`.";
            };
            binary = mkOption {
              type = types.str;
              default = "${cfg.haproxy.package}/bin/haproxy";
              defaultText = literalExpression ''"''${config.services.meshd.haproxy.package}/bin/haproxy"'';
              example = "/run/current-system/sw/bin/haproxy";
              description = "The haproxy executable meshd uses to validate configs (and to run it when supervising).";
            };
          };
        };
        secrets = section {
          description = "Delivery of sealed secrets as systemd credentials.";
          example = { withKey = "host"; };
          options = {
            enable = mkOption {
              type = types.bool;
              default = true;
              example = false;
              description = "Whether meshd delivers secrets as encrypted credentials.";
            };
            credstoreDir = mkOption {
              type = pathType;
              default = "/etc/credstore.encrypted";
              example = "/etc/credstore.encrypted";
              description = "Where the encrypted credentials are written (systemd's search path for `LoadCredentialEncrypted=`).";
            };
            withKey = mkOption {
              type = types.enum [ "host" "tpm2" "host+tpm2" "auto" "tpm2-absent" ];
              default = "host";
              example = "host+tpm2";
              description = "`systemd-creds encrypt --with-key=`.";
            };
          };
        };
      };
    };
  };
}
