# An app module, as a cluster's app definitions would write it: the unit
# that runs the app, the mesh registration (replacing nix-infra's
# ExecStartPre/postStart etcdctl calls) and a secret meshd delivers as an
# encrypted credential.
{ config, lib, pkgs, ... }:
{
  services.meshd.instances.app-pod = {
    group = "backends";
    port = 11311;
    unit = "podman-app-pod.service";
  };

  # meshd writes /etc/credstore.encrypted/app-db-password and restarts the
  # unit when the secret changes.
  services.meshd.secrets.app-db-password = {
    units = [ "podman-app-pod.service" ];
    action = "restart";
  };

  systemd.services.podman-app-pod = {
    description = "app-pod container";
    wantedBy = [ "multi-user.target" ];
    # Talks to other apps through 127.0.0.1:<port> (the mesh HAProxy).
    wants = [ "meshd-online.target" ];
    after = [ "meshd-online.target" ];
    serviceConfig = {
      # Decrypted by systemd into $CREDENTIALS_DIRECTORY/app-db-password.
      LoadCredentialEncrypted = [ "app-db-password:/etc/credstore.encrypted/app-db-password" ];
      ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
    };
  };
}
