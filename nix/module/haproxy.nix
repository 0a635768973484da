# The meshd-haproxy unit: HAProxy in master-worker mode on the file meshd
# renders, as the dedicated meshd-haproxy user with CAP_NET_BIND_SERVICE
# only (as nixpkgs' own haproxy module runs as `haproxy`). It starts before
# meshd (on a minimal bootstrap file the first time after a boot) so that
# meshd always finds the master socket; meshd then reloads it through that
# socket. A nixos-rebuild never touches the file (it is in /run/meshd, not
# /etc) and at most reloads this unit.
#
# Who may touch what:
#   /run/meshd            root:meshd-haproxy 0750 (tmpfiles); meshd writes
#                         haproxy.cfg (0644), HAProxy reads it.
#   /run/meshd-haproxy    meshd-haproxy 0750 (RuntimeDirectory=); HAProxy
#                         creates its master and stats sockets there, mode
#                         0660; meshd reaches them through its supplementary
#                         group meshd-haproxy.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkIf mkDefault;
  inherit (import ./types.nix { inherit lib; }) runDir haproxyRunDir haproxyUser;
  cfg = config.services.meshd;
  haproxy = cfg.settings.haproxy;
  haproxyUnit = haproxy.enable && !haproxy.supervise;
  bin = "${cfg.haproxy.package}/bin/haproxy";
  socketDir = if haproxyUnit then haproxyRunDir else runDir;

  # What HAProxy runs until meshd renders the real file (after a boot /run
  # is empty; after a restart of the unit meshd's last file is kept). Runs
  # as root ("+"): only root writes /run/meshd.
  bootstrap = pkgs.writeShellScript "meshd-haproxy-bootstrap" ''
    [ -d ${runDir} ] || ${pkgs.coreutils}/bin/install -d -m 0750 -g ${haproxyUser} ${runDir}
    [ -e ${haproxy.configPath} ] || ${pkgs.coreutils}/bin/install -m 0644 ${../meshd-haproxy-bootstrap.cfg} ${haproxy.configPath}
  '';
in
{
  config = mkIf (cfg.enable && haproxy.enable) (lib.mkMerge [
    {
      # The paths the units may write: ProtectSystem=strict leaves nothing
      # else writable, so a path elsewhere would fail at start.
      assertions = [
        {
          assertion = dirOf haproxy.configPath == runDir;
          message = "services.meshd.settings.haproxy.configPath = \"${haproxy.configPath}\": meshd may write the HAProxy config only in ${runDir} (e.g. \"${runDir}/haproxy.cfg\").";
        }
      ] ++ map
        (name: {
          assertion = dirOf haproxy.${name} == socketDir;
          message = "services.meshd.settings.haproxy.${name} = \"${haproxy.${name}}\": HAProxy may create its sockets only in ${socketDir}${lib.optionalString haproxyUnit " (the meshd-haproxy unit's runtime directory)"} (e.g. \"${socketDir}/${if name == "masterSocket" then "master" else "stats"}.sock\").";
        }) [ "masterSocket" "statsSocket" ];
    }

    (mkIf haproxyUnit {
      users.users.${haproxyUser} = {
        isSystemUser = true;
        group = haproxyUser;
        description = "HAProxy of the meshd service mesh";
      };
      users.groups.${haproxyUser} = { };

      systemd.services.meshd-haproxy = {
        description = "HAProxy for the meshd service mesh";
        wantedBy = [ "multi-user.target" ];
        before = [ "meshd.service" ];
        reloadIfChanged = true;
        startLimitIntervalSec = mkDefault 0;
        serviceConfig = {
          Type = "notify";
          User = haproxyUser;
          Group = haproxyUser;
          ExecStartPre = [
            "+${bootstrap}"
            "${bin} -c -q -f ${haproxy.configPath}"
          ];
          ExecStart = "${bin} -Ws -S ${haproxy.masterSocket},mode,660 -f ${haproxy.configPath}";
          ExecReload = [
            "${bin} -c -q -f ${haproxy.configPath}"
            "${pkgs.coreutils}/bin/kill -USR2 $MAINPID"
          ];
          KillMode = "mixed";
          SuccessExitStatus = "143";
          # Tunables: a plain definition elsewhere overrides them.
          Restart = mkDefault "always";
          RestartSec = mkDefault "2s";
          LimitNOFILE = mkDefault 1048576;
          RuntimeDirectory = "meshd-haproxy";
          RuntimeDirectoryMode = "0750";
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
          RemoveIPC = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" ];
          SystemCallErrorNumber = "EPERM";
        };
      };
    })
  ]);
}
