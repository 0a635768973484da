# Option types shared by nixos-module.nix and nix/module/settings.nix:
# the alphabets meshd accepts, and the fields of an app instance.
{ lib }:
let
  inherit (lib) mkOption types;
in
rec {
  # meshd's registry.ValidName: the only alphabet allowed into etcd keys,
  # config files and credential file names.
  nameRegex = "[A-Za-z0-9][A-Za-z0-9._-]{0,62}";
  nameType = types.strMatching nameRegex;
  groupType = types.enum [ "frontends" "backends" "services" ];
  durationType = types.strMatching "([0-9]+(\\.[0-9]+)?(ns|us|ms|s|m|h))+";
  unitType = types.strMatching "[A-Za-z0-9:_.@\\\\-]+\\.(service|socket|target|timer|path|mount)";
  interfaceType = types.strMatching "[A-Za-z0-9][A-Za-z0-9._-]{0,14}";
  # Paths that reach unit lines and shell commands unquoted.
  pathType = types.strMatching "/[A-Za-z0-9/._-]*";
  # A key or certificate: an absolute path as a string, outside the Nix
  # store (a Nix path literal would be copied into the world-readable store).
  secretFileType = types.pathWith { inStore = false; absolute = true; };
  # host:port, [v6]:port or :port; "" turns the endpoint off.
  listenAddrType = types.strMatching "|[A-Za-z0-9.-]*:[0-9]{1,5}|\\[[0-9A-Fa-f:.]+]:[0-9]{1,5}";

  # meshd's runtime directory (root, group meshd-haproxy, 0750): the HAProxy
  # config meshd renders. The meshd-haproxy unit's own runtime directory
  # holds HAProxy's sockets (mode 0660, group meshd-haproxy).
  runDir = "/run/meshd";
  haproxyRunDir = "/run/meshd-haproxy";
  haproxyUser = "meshd-haproxy";

  checkOptions = {
    options = {
      tcp = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1:9216";
        description = "Address (`ip:port`) to connect to instead of the address the instance is advertised with (the node's overlay IP and `port`), e.g. a health or exporter port of the app. Never the app's published port on 127.0.0.1: on a node that consumes the group, HAProxy answers there.";
      };
      unit = mkOption {
        type = types.nullOr unitType;
        default = null;
        example = "podman-mongodb.service";
        description = "A systemd unit that must be active for the instance to be advertised, in addition to the TCP connect.";
      };
      disable = mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = "Advertise the instance unconditionally, without a check.";
      };
      interval = mkOption {
        type = types.nullOr durationType;
        default = null;
        example = "2s";
        description = "How often the check runs (Go duration; null: meshd's default).";
      };
      timeout = mkOption {
        type = types.nullOr durationType;
        default = null;
        example = "1s";
        description = "How long one check may take (Go duration; null: meshd's default).";
      };
    };
  };

  # Fields shared by settings.instances entries and services.meshd.instances.
  instanceFields = {
    group = mkOption {
      type = groupType;
      example = "services";
      description = "The nix-infra group the app belongs to; nodes consuming this group get a listener for it.";
    };
    port = mkOption {
      type = types.port;
      example = 27017;
      description = "The port the app listens on, on this node, and publishes to the mesh.";
    };
  };

}
