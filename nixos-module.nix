# NixOS module for meshd: one daemon per node that joins the cluster's etcd
# registry, programs the WireGuard overlay, renders the service-mesh HAProxy
# and delivers secrets as systemd credentials. See docs/nixos.md.
#
# Written against nixpkgs' module system only (lib.mkOption, lib.types,
# lib.mkIf, ...); nix/nixtest evaluates it with nixpkgs' real lib.
# services.meshd.settings is declared in nix/module/settings.nix, the shared
# option types in nix/module/types.nix, the HAProxy unit in
# nix/module/haproxy.nix.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkPackageOption mkIf mkMerge mkDefault types literalExpression;

  cfg = config.services.meshd;
  settingsFormat = pkgs.formats.json { };
  inherit (import ./nix/module/types.nix { inherit lib; })
    nameRegex nameType unitType checkOptions instanceFields secretFileType runDir haproxyUser;

  storeDir = builtins.storeDir;
  inStore = p: p == storeDir || lib.hasPrefix "${storeDir}/" p;

  # Every leaf of the freeform settings, with its option path: no Nix path
  # may be among them (toJSON would copy the file into the world-readable
  # store), and no *File may point into the store.
  leaves = loc: v:
    if builtins.isAttrs v && !(lib.isDerivation v) then lib.concatLists (lib.mapAttrsToList (n: leaves (loc ++ [ n ])) v)
    else if builtins.isList v then lib.concatLists (lib.imap1 (i: leaves (loc ++ [ "[${toString i}]" ])) v)
    else [{ inherit loc; value = v; }];
  settingsLeaves = leaves [ "services" "meshd" "settings" ] cfg.settings;
  showLoc = loc: lib.concatStringsSep "." loc;

  # The etcd TLS files and their credential ids. systemd copies each into the
  # service's credentials directory; meshd's config names them there.
  etcdFiles = builtins.filter (f: f.path != null) [
    { id = "etcd-ca.pem"; option = "caFile"; path = cfg.etcd.caFile; }
    { id = "etcd-cert.pem"; option = "certFile"; path = cfg.etcd.certFile; }
    { id = "etcd-key.pem"; option = "keyFile"; path = cfg.etcd.keyFile; }
  ];
  credPath = id: "\${CREDENTIALS_DIRECTORY}/${id}";

  # The file meshd reads: settings with every null dropped (null means
  # "leave meshd's default").
  dropNulls = v:
    if builtins.isAttrs v then builtins.mapAttrs (_: dropNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then map dropNulls v
    else v;
  configFile = settingsFormat.generate "meshd.json" (dropNulls cfg.settings);

  overlay = cfg.settings.overlay;
  haproxy = cfg.settings.haproxy;
  secrets = cfg.settings.secrets;
  userspaceWireGuard = overlay.enable && overlay.mode != "kernel";
  tpm = secrets.enable && secrets.withKey != "host" && secrets.withKey != "tpm2-absent";
  haproxyUnit = haproxy.enable && !haproxy.supervise;
  # The metrics port, and whether metricsAddr listens on loopback only.
  metricsMatch = builtins.match "(.*):([0-9]+)" cfg.settings.metricsAddr;
  metricsPort = if metricsMatch == null then null else lib.toIntBase10 (builtins.elemAt metricsMatch 1);
  metricsLoopback = metricsMatch != null && builtins.match "127\\..*|\\[::1]|localhost" (builtins.head metricsMatch) != null;
  caps = [ "CAP_NET_ADMIN" ] ++ lib.optional (haproxy.enable && haproxy.supervise) "CAP_NET_BIND_SERVICE";

  instanceHelperModule = { name, ... }: {
    options = instanceFields // {
      app = mkOption {
        type = nameType;
        default = name;
        defaultText = literalExpression "<name>";
        example = "mongodb";
        description = "The app's name in the registry (default: the attribute name).";
      };
      unit = mkOption {
        type = types.nullOr unitType;
        default = null;
        example = "podman-mongodb.service";
        description = "The systemd unit serving the app: the instance is advertised only while it is active (and its port answers).";
      };
      check = mkOption {
        type = types.submodule checkOptions;
        default = { };
        example = { interval = "2s"; timeout = "1s"; };
        description = "Further settings of the instance's health check (`unit` is set from the option above).";
      };
    };
  };

  secretModule = {
    options = {
      units = mkOption {
        type = types.listOf unitType;
        default = [ ];
        example = [ "podman-app.service" ];
        description = "The units that load this credential (with `LoadCredentialEncrypted=` or `ImportCredential=`).";
      };
      action = mkOption {
        type = types.enum [ "restart" "reload" "none" ];
        default = "restart";
        example = "reload";
        description = "What meshd does to those units when the secret changes.";
      };
    };
  };

in
{
  imports = [ ./nix/module/settings.nix ./nix/module/haproxy.nix ];

  options.services.meshd = {
    enable = mkEnableOption "meshd, the cluster mesh daemon (WireGuard overlay, HAProxy service mesh, secrets as systemd credentials)";

    package = mkOption {
      type = types.package;
      # nixpkgs has no meshd: an overlay (this flake's overlays.default) may
      # provide pkgs.meshd, else this repository's own package expression.
      default = pkgs.meshd or (pkgs.callPackage ./nix/package.nix { });
      defaultText = literalExpression "pkgs.meshd or (pkgs.callPackage <meshd>/nix/package.nix { })";
      example = literalExpression "inputs.meshd.packages.\${pkgs.stdenv.hostPlatform.system}.default";
      description = "The meshd package (meshd and meshctl). The flake's `nixosModules.default` sets it to the flake's package.";
    };

    nodeName = mkOption {
      type = nameType;
      default = config.networking.hostName;
      defaultText = literalExpression "config.networking.hostName";
      example = "worker001";
      description = "This node's name in the registry (letters, digits, `-`, `_`, `.`; at most 63 bytes).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Open the WireGuard UDP port (`settings.overlay.listenPort`) in the firewall. Without it peers cannot reach this node over the overlay.";
    };

    openMetricsFirewall = mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Open the TCP port of `settings.metricsAddr` on the WireGuard interface (`settings.overlay.interface`), for a central Prometheus that scrapes every node over the overlay. `metricsAddr` must then listen beyond loopback (e.g. `0.0.0.0:9464`).";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = "Validate the generated config file with `meshd --check-config` when the system is built.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--log-level" "debug" ];
      description = "Extra command-line arguments for meshd.";
    };

    etcd = {
      caFile = mkOption {
        type = types.nullOr secretFileType;
        default = null;
        example = "/var/lib/secrets/etcd/ca.pem";
        description = "CA certificate of the etcd cluster. A path outside the Nix store (a string, never copied into the store), handed to meshd with `LoadCredential=`.";
      };
      certFile = mkOption {
        type = types.nullOr secretFileType;
        default = null;
        example = "/var/lib/secrets/etcd/client.pem";
        description = "Client certificate for etcd. A path outside the Nix store, handed to meshd with `LoadCredential=`.";
      };
      keyFile = mkOption {
        type = types.nullOr secretFileType;
        default = null;
        example = "/var/lib/secrets/etcd/client-key.pem";
        description = "Client private key for etcd. A path outside the Nix store (the store is world-readable), handed to meshd with `LoadCredential=`.";
      };
    };

    instances = mkOption {
      type = types.attrsOf (types.submodule instanceHelperModule);
      default = { };
      example = literalExpression ''
        {
          mongodb = { group = "services"; port = 27017; unit = "podman-mongodb.service"; };
        }
      '';
      description = "Apps this node serves, for app modules to declare (\"this unit serves app X in group G on port P\"). meshd advertises each on its lease while the check passes; this replaces nix-infra's ExecStartPre/postStart etcdctl calls. Appended to `settings.instances`.";
    };

    secrets = mkOption {
      type = types.attrsOf (types.submodule secretModule);
      default = { };
      example = literalExpression ''{ db-password = { units = [ "podman-app.service" ]; action = "restart"; }; }'';
      description = "Secrets meshd delivers as credentials in `/etc/credstore.encrypted/<name>`, with the units that use them and what to do to those units when a secret changes (meshd's `secrets.units`).";
    };

    haproxy.package = mkPackageOption pkgs "haproxy" {
      example = "pkgs.haproxy.override { useLua = false; }";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      services.meshd.settings = {
        nodeName = cfg.nodeName;
        instances = lib.mapAttrsToList
          (_: i: {
            inherit (i) app group port;
            check = i.check // lib.optionalAttrs (i.unit != null) { inherit (i) unit; };
          })
          cfg.instances;
        etcd = {
          caFile = mkIf (cfg.etcd.caFile != null) (credPath "etcd-ca.pem");
          certFile = mkIf (cfg.etcd.certFile != null) (credPath "etcd-cert.pem");
          keyFile = mkIf (cfg.etcd.keyFile != null) (credPath "etcd-key.pem");
        };
        secrets.units = mkIf (cfg.secrets != { })
          (builtins.mapAttrs (_: s: { inherit (s) units action; }) cfg.secrets);
      };

      assertions =
        map
          (l: {
            assertion = !(builtins.isPath l.value);
            message = "${showLoc l.loc} = ${toString l.value} is a Nix path: building the system would copy the file into the Nix store, which every local user can read. Give the path of a file outside the store as a string (e.g. \"/var/lib/secrets/etcd/client-key.pem\"); for the etcd TLS files use services.meshd.etcd.*.";
          })
          settingsLeaves
        ++ map
          (l: {
            assertion = !(lib.hasSuffix "File" (lib.last l.loc) && builtins.isString l.value && inStore l.value);
            message = "${showLoc l.loc} = \"${l.value}\" points into the Nix store, which every local user can read; for the etcd TLS files set services.meshd.etcd.* to paths outside it.";
          })
          settingsLeaves
        ++ [
          {
            assertion = (cfg.etcd.certFile == null) == (cfg.etcd.keyFile == null);
            message = "services.meshd.etcd: certFile and keyFile go together.";
          }
          {
            assertion = lib.all (n: builtins.match nameRegex n != null) (builtins.attrNames cfg.secrets);
            message = "services.meshd.secrets: names must match ${nameRegex}.";
          }
          {
            assertion =
              let ids = map (i: "${i.group}/${i.app}") cfg.settings.instances;
              in builtins.length ids == builtins.length (lib.unique ids);
            message = "services.meshd: an app is declared twice in the same group (services.meshd.instances / settings.instances).";
          }
          {
            assertion = !cfg.openMetricsFirewall || (metricsPort != null && !metricsLoopback);
            message = "services.meshd.openMetricsFirewall: services.meshd.settings.metricsAddr = \"${cfg.settings.metricsAddr}\" ${if metricsPort == null then "serves no metrics" else "listens on loopback only"}; set it to an address Prometheus can reach (e.g. \"0.0.0.0:9464\").";
          }
          {
            assertion = !cfg.openMetricsFirewall || overlay.enable;
            message = "services.meshd.openMetricsFirewall opens the metrics port on the WireGuard interface, but services.meshd.settings.overlay.enable is false.";
          }
        ];

      warnings = lib.optional (overlay.enable && !cfg.openFirewall && config.networking.firewall.enable)
        "services.meshd: the firewall is on but services.meshd.openFirewall is false: WireGuard UDP port ${toString overlay.listenPort} is closed and peers cannot reach this node.";

      system.checks = lib.optional cfg.checkConfig (pkgs.runCommand "meshd-check-config" { } ''
        ${cfg.package}/bin/meshd --check-config --config ${configFile}
        touch $out
      '');

      # meshctl for the operator.
      environment.systemPackages = [ cfg.package ];

      systemd.services.meshd = {
        description = "meshd cluster mesh daemon";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
        after = [ "network-online.target" "nss-lookup.target" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
        before = [ "meshd-online.target" ];
        startLimitIntervalSec = mkDefault 0;
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStartPre = lib.optional secrets.enable "+${config.systemd.package}/bin/systemd-creds setup";
          ExecStart = "${cfg.package}/bin/meshd --config ${configFile}"
            + lib.optionalString (cfg.extraArgs != [ ]) " ${lib.escapeShellArgs cfg.extraArgs}";
          # Tunables: a plain definition elsewhere overrides them.
          Restart = mkDefault "always";
          RestartSec = mkDefault "2s";
          WatchdogSec = mkDefault "30s";
          TimeoutStopSec = mkDefault "30s";
          # A userspace WireGuard device and a supervised HAProxy master
          # run in child processes that must outlive a meshd restart
          # (traffic keeps flowing meanwhile); with a kernel device and
          # HAProxy in its own unit nothing must, so the whole group stops.
          KillMode = if userspaceWireGuard || (haproxy.enable && haproxy.supervise) then "process" else "control-group";
          StateDirectory = "meshd";
          StateDirectoryMode = "0700";
          # /run/meshd (the HAProxy config, meshd's own sockets) comes from
          # tmpfiles, not RuntimeDirectory=: systemd would reset its group,
          # which lets the meshd-haproxy user read the config.
          LoadCredential = map (f: "${f.id}:${f.path}") etcdFiles;
          UMask = "0077";
          # Reaches HAProxy's sockets in /run/meshd-haproxy (mode 0660).
          SupplementaryGroups = lib.optional haproxyUnit haproxyUser;

          CapabilityBoundingSet = caps;
          AmbientCapabilities = caps;
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ReadWritePaths = [ runDir ]
            ++ lib.optional secrets.enable secrets.credstoreDir
            ++ lib.optional userspaceWireGuard "/run/wireguard"
            ++ lib.optional (cfg.settings.stateDir != "/var/lib/meshd") cfg.settings.stateDir;
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = !(userspaceWireGuard || tpm);
          DevicePolicy = "closed";
          DeviceAllow = lib.optional userspaceWireGuard "/dev/net/tun rw" ++ lib.optional tpm "/dev/tpmrm0 rw";
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
          SystemCallErrorNumber = "EPERM";
        };
      };

      # Units that need the mesh (HAProxy listeners, overlay routes,
      # credentials) order themselves after this target.
      systemd.targets.meshd-online = {
        description = "meshd has joined the mesh";
        wantedBy = [ "multi-user.target" ];
        wants = [ "meshd.service" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
        after = [ "meshd.service" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
      };

      systemd.tmpfiles.rules = [ "d ${runDir} 0750 root ${if haproxyUnit then haproxyUser else "root"} - -" ]
        ++ lib.optional secrets.enable "d ${secrets.credstoreDir} 0700 root root - -"
        ++ lib.optional (cfg.settings.stateDir != "/var/lib/meshd") "d ${cfg.settings.stateDir} 0700 root root - -"
        ++ lib.optional userspaceWireGuard "d /run/wireguard 0700 root root - -";
    }

    (mkIf (overlay.enable && cfg.openFirewall) {
      networking.firewall.allowedUDPPorts = [ overlay.listenPort ];
    })

    (mkIf (cfg.openMetricsFirewall && metricsPort != null) {
      networking.firewall.interfaces.${overlay.interface}.allowedTCPPorts = [ metricsPort ];
    })

    (mkIf overlay.enable {
      # The service cannot load modules (ProtectKernelModules).
      boot.kernelModules = if overlay.mode == "userspace" then [ "tun" ] else [ "wireguard" ];

      # meshd alone configures its WireGuard interface: keep the network
      # managers off it, as nixpkgs' tailscale and netbird modules do.
      networking.dhcpcd.denyInterfaces = [ overlay.interface ];
      networking.networkmanager.unmanaged = [ "interface-name:${overlay.interface}" ];
      systemd.network.networks."50-meshd" = mkIf config.systemd.network.enable {
        matchConfig.Name = overlay.interface;
        linkConfig = {
          Unmanaged = true;
          ActivationPolicy = "manual";
        };
      };
    })
  ]);
}
