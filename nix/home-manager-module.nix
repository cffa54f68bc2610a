# home-manager module: `programs.larder`, the larder client for one user. It does what
# `larder use` does, declaratively (substituters, keys, and a netrc for private caches), and
# runs the push daemon as a user service. See "Deploying" in the README.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    mkOption mkEnableOption mkIf mkMerge types literalExpression attrValues filter
    concatMapStrings optional unique;

  larderLib = import ./lib.nix { inherit lib; };
  cfg = config.programs.larder;
  daemonCfg = cfg.pushDaemon;
  larderExe = "${cfg.package}/bin/larder";

  caches = attrValues cfg.caches;
  privateCaches = filter (c: c.tokenFile != null) caches;

  # One `machine` line per private cache, written with the token read from its file at
  # activation (the token never enters the Nix store). Written to a temporary file of mode
  # 0600, then moved over the netrc.
  netrcScript = ''
    larderWriteNetrc() {
      local netrc=${lib.escapeShellArg cfg.netrcFile} tmp token
      umask 077
      mkdir -p "$(dirname "$netrc")"
      tmp="$netrc.tmp"
      : > "$tmp"
      ${concatMapStrings (c: ''
        if [ -r ${lib.escapeShellArg c.tokenFile} ]; then
          token=$(< ${lib.escapeShellArg c.tokenFile})
          printf 'machine %s login larder password %s\n' ${lib.escapeShellArg (larderLib.urlHost c.url)} "$token" >> "$tmp"
        else
          echo "larder: cannot read ${c.tokenFile}; ${c.url} gets no netrc entry" >&2
        fi
      '') privateCaches}
      mv "$tmp" "$netrc"
    }
    if [ -n "''${DRY_RUN:-}" ]; then
      echo "would write ${cfg.netrcFile}"
    else
      larderWriteNetrc
    fi
  '';

  daemonSocket = daemonCfg.socket;

  daemonStart = pkgs.writeShellScript "larder-daemon-start" (larderLib.daemonScript {
    larder = larderExe;
    target = "${daemonCfg.server}/${daemonCfg.cache}";
    socket = daemonSocket;
    tokenFile = lib.escapeShellArg daemonCfg.tokenFile;
    signingKeyFile = if daemonCfg.signingKeyFile == null then null else lib.escapeShellArg daemonCfg.signingKeyFile;
  });

  hook = pkgs.writeShellScript "larder-post-build-hook" (larderLib.hookScript {
    larder = larderExe;
    nixStore = daemonCfg.nixStore;
    socket = daemonSocket;
  });

  cacheModule = { name, ... }: {
    options = {
      url = mkOption {
        type = larderLib.httpUrl;
        example = "http://shoshin:8080/modular-workspace";
        description = "The cache's URL (as `larder cache info` shows it).";
      };
      publicKey = mkOption {
        type = larderLib.publicKey;
        example = "modular-workspace.shoshin-1:…";
        description = "The cache's public key (`larder cache info`), added to trusted-public-keys.";
      };
      tokenFile = mkOption {
        type = types.nullOr larderLib.secretFile;
        default = null;
        description = ''
          For a private cache: a file holding a token that may pull from it. Its line goes
          into {option}`programs.larder.netrcFile` at activation, and nix.conf's netrc-file
          points there.
        '';
      };
    };
  };
in
{
  options.programs.larder = {
    enable = mkEnableOption "the larder client (the `larder` command)";

    package = lib.mkPackageOption pkgs "larder" { };

    caches = mkOption {
      type = types.attrsOf (types.submodule cacheModule);
      default = { };
      example = literalExpression ''
        {
          modular-workspace = {
            url = "http://shoshin:8080/modular-workspace";
            publicKey = "modular-workspace.shoshin-1:…";
          };
        }
      '';
      description = ''
        Caches Nix substitutes from: each URL goes into `extra-substituters` and each key
        into `extra-trusted-public-keys` of this user's nix.conf (`nix.settings`), like
        `larder use --mode user-nixconf`. On a multi-user install nix-daemon honours them
        only for a trusted user; see "Using a cache" in larder's README.
      '';
    };

    netrcFile = mkOption {
      type = types.str;
      default = "${config.xdg.configHome}/larder/netrc";
      defaultText = literalExpression ''"''${config.xdg.configHome}/larder/netrc"'';
      description = "The netrc written for private caches (mode 0600).";
    };

    pushDaemon = {
      enable = mkEnableOption "the larder push daemon as a user service (`larder daemon run`)";
      server = mkOption {
        type = larderLib.httpUrl;
        example = "http://shoshin:8080";
        description = "The larder server to push to.";
      };
      cache = mkOption {
        type = larderLib.cacheName;
        example = "modular-workspace";
        description = "The cache to push to.";
      };
      tokenFile = mkOption {
        type = larderLib.secretFile;
        description = "File holding a token that may push to the cache, read when the service starts.";
      };
      signingKeyFile = mkOption {
        type = types.nullOr larderLib.secretFile;
        default = null;
        description = "File holding the cache's client-held secret key (`larder generate-keypair`), if it has one.";
      };
      socket = mkOption {
        type = types.str;
        default = "${config.xdg.stateHome}/larder/daemon.sock";
        defaultText = literalExpression ''"''${config.xdg.stateHome}/larder/daemon.sock"'';
        description = "The daemon's socket; its queue is the file next to it (`daemon.queue.db`).";
      };
      postBuildHook = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Set `post-build-hook` in this user's nix.conf to a hook that queues every build's
          outputs for the daemon. Nix honours it only where this user's settings are trusted
          (a single-user install, or a user in nix-daemon's trusted-users); elsewhere set it in
          /etc/nix/nix.conf (the NixOS module's `services.larder.pushDaemon` does) or use
          `larder watch-store`.
        '';
      };
      nixStore = mkOption {
        type = types.str;
        default = "nix-store";
        example = literalExpression ''"''${pkgs.nix}/bin/nix-store"'';
        description = "The nix-store command the hook runs when Nix passes no OUT_PATHS (Nix 2.8.0).";
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      home.packages = [ cfg.package ];
    })

    (mkIf (caches != [ ]) {
      nix.settings = {
        extra-substituters = unique (map (c: c.url) caches);
        extra-trusted-public-keys = unique (map (c: c.publicKey) caches);
      } // lib.optionalAttrs (privateCaches != [ ]) { netrc-file = cfg.netrcFile; };
    })

    (mkIf (privateCaches != [ ]) {
      home.activation.larderNetrc = lib.hm.dag.entryAfter [ "writeBoundary" ] netrcScript;
    })

    (mkIf daemonCfg.enable {
      systemd.user.services.larder-daemon = {
        Unit = {
          Description = "larder push daemon (pushes queued builds to ${daemonCfg.server}/${daemonCfg.cache})";
          Documentation = [ "man:larder-daemon(1)" ];
          After = [ "network-online.target" ];
        };
        Service = {
          ExecStart = "${daemonStart}";
          Restart = "on-failure";
          RestartSec = 5;
          NoNewPrivileges = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          RestrictNamespaces = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
          UMask = "0077";
        };
        Install.WantedBy = [ "default.target" ];
      };
    })

    (mkIf (daemonCfg.enable && daemonCfg.postBuildHook) {
      nix.settings.post-build-hook = hook;
    })
  ];
}
