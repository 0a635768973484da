# NixOS module for meshd: one daemon per node that joins the cluster's etcd
# registry, programs the WireGuard overlay, renders the service-mesh HAProxy
# and delivers secrets as systemd credentials. See docs/nixos.md.
#
# Written against nixpkgs' module system only (lib.mkOption, lib.types,
# lib.mkIf, ...); nix/stub/ holds the offline stand-in the checks use.
# services.meshd.settings is declared in nix/module/settings.nix, the shared
# option types in nix/module/types.nix.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkPackageOption mkIf mkMerge types literalExpression;

  cfg = config.services.meshd;
  settingsFormat = pkgs.formats.json { };
  inherit (import ./nix/module/types.nix { inherit lib; }) nameRegex nameType unitType checkOptions instanceFields;

  storeDir = builtins.storeDir;
  inStore = p: p == storeDir || lib.hasPrefix "${storeDir}/" p;

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
  # What HAProxy runs until meshd renders the real file (after a boot /run
  # is empty; after a restart of the unit meshd's last file is kept).
  haproxyBootstrap = pkgs.writeShellScript "meshd-haproxy-bootstrap" ''
    [ -e ${haproxy.configPath} ] || ${pkgs.coreutils}/bin/install -m 0644 ${./nix/meshd-haproxy-bootstrap.cfg} ${haproxy.configPath}
  '';
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
  imports = [ ./nix/module/settings.nix ];

  options.services.meshd = {
    enable = mkEnableOption "meshd, the cluster mesh daemon (WireGuard overlay, HAProxy service mesh, secrets as systemd credentials)";

    package = mkPackageOption pkgs "meshd" {
      example = "inputs.meshd.packages.\${pkgs.system}.default";
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
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/secrets/etcd/ca.pem";
        description = "CA certificate of the etcd cluster. A path outside the Nix store (a string, never copied into the store), handed to meshd with `LoadCredential=`.";
      };
      certFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/secrets/etcd/client.pem";
        description = "Client certificate for etcd. A path outside the Nix store, handed to meshd with `LoadCredential=`.";
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
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
        lib.concatMap
          (f: [
            {
              assertion = !(inStore f.path);
              message = "services.meshd.etcd.${f.option} = \"${f.path}\" is in the Nix store, which every local user can read. Give the path of a file outside the store as a string (e.g. \"/var/lib/secrets/etcd/client-key.pem\"), not a Nix path.";
            }
            {
              assertion = lib.hasPrefix "/" f.path;
              message = "services.meshd.etcd.${f.option} = \"${f.path}\" must be an absolute path.";
            }
          ])
          etcdFiles
        ++ map
          (f: {
            assertion = !(builtins.isString (cfg.settings.etcd.${f} or null) && inStore cfg.settings.etcd.${f});
            message = "services.meshd.settings.etcd.${f} points into the Nix store; set services.meshd.etcd.${f} to a path outside it instead.";
          }) [ "caFile" "certFile" "keyFile" ]
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
        ];

      warnings = lib.optional (overlay.enable && !cfg.openFirewall && config.networking.firewall.enable)
        "services.meshd: the firewall is on but services.meshd.openFirewall is false: WireGuard UDP port ${toString overlay.listenPort} is closed and peers cannot reach this node.";

      system.checks = lib.optional cfg.checkConfig (pkgs.runCommand "meshd-check-config" { } ''
        ${cfg.package}/bin/meshd --check-config --config ${configFile}
        touch $out
      '');

      systemd.services.meshd = {
        description = "meshd cluster mesh daemon";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
        after = [ "network-online.target" "nss-lookup.target" ] ++ lib.optional haproxyUnit "meshd-haproxy.service";
        before = [ "meshd-online.target" ];
        path = [ config.systemd.package ]; # systemd-creds
        startLimitIntervalSec = 0;
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStartPre = lib.optional secrets.enable "+${config.systemd.package}/bin/systemd-creds setup";
          ExecStart = "${cfg.package}/bin/meshd --config ${configFile}"
            + lib.optionalString (cfg.extraArgs != [ ]) " ${lib.escapeShellArgs cfg.extraArgs}";
          Restart = "always";
          RestartSec = "2s";
          WatchdogSec = "30s";
          # A userspace WireGuard device runs in a child process that must
          # outlive a meshd restart (traffic keeps flowing meanwhile); a
          # kernel device needs no process, so the whole group is stopped.
          KillMode = if userspaceWireGuard then "process" else "control-group";
          StateDirectory = "meshd";
          StateDirectoryMode = "0700";
          # Shared with meshd-haproxy and kept across restarts: the HAProxy
          # config and master socket live here.
          RuntimeDirectory = "meshd";
          RuntimeDirectoryMode = "0750";
          RuntimeDirectoryPreserve = "yes";
          LoadCredential = map (f: "${f.id}:${f.path}") etcdFiles;
          UMask = "0077";

          CapabilityBoundingSet = caps;
          AmbientCapabilities = caps;
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ReadWritePaths = lib.optional secrets.enable secrets.credstoreDir
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

      systemd.tmpfiles.rules = lib.optional secrets.enable "d ${secrets.credstoreDir} 0700 root root - -"
        ++ lib.optional userspaceWireGuard "d /run/wireguard 0700 root root - -";
    }

    (mkIf (overlay.enable && cfg.openFirewall) {
      networking.firewall.allowedUDPPorts = [ overlay.listenPort ];
    })

    # The service cannot load modules (ProtectKernelModules).
    (mkIf overlay.enable {
      boot.kernelModules = if overlay.mode == "userspace" then [ "tun" ] else [ "wireguard" ];
    })

    (mkIf haproxyUnit {
      # HAProxy in master-worker mode on the file meshd renders. It starts
      # before meshd (on a minimal bootstrap file the first time after boot)
      # so that meshd always finds the master socket; meshd then reloads it
      # through that socket. A nixos-rebuild never touches the file (it is
      # in /run/meshd, not /etc) and at most reloads this unit.
      systemd.services.meshd-haproxy = {
        description = "HAProxy for the meshd service mesh";
        wantedBy = [ "multi-user.target" ];
        before = [ "meshd.service" ];
        reloadIfChanged = true;
        startLimitIntervalSec = 0;
        serviceConfig = {
          Type = "notify";
          ExecStartPre = [
            "${haproxyBootstrap}"
            "${cfg.haproxy.package}/bin/haproxy -c -q -f ${haproxy.configPath}"
          ];
          ExecStart = "${cfg.haproxy.package}/bin/haproxy -Ws -S ${haproxy.masterSocket} -f ${haproxy.configPath}";
          ExecReload = [
            "${cfg.haproxy.package}/bin/haproxy -c -q -f ${haproxy.configPath}"
            "${pkgs.coreutils}/bin/kill -USR2 $MAINPID"
          ];
          KillMode = "mixed";
          SuccessExitStatus = "143";
          Restart = "always";
          RestartSec = "2s";
          RuntimeDirectory = "meshd";
          RuntimeDirectoryMode = "0750";
          RuntimeDirectoryPreserve = "yes";
          LimitNOFILE = 1048576;
          UMask = "0077";

          CapabilityBoundingSet = [ "CAP_NET_BIND_SERVICE" ];
          AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ];
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
          SystemCallErrorNumber = "EPERM";
        };
      };
    })
  ]);
}
