# NixOS module: `services.larder`, the larder server (with declarative caches) and its push
# daemon. See "Deploying" in the README for a builder's and a consumer's configuration.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    mkOption mkEnableOption mkIf mkMerge types literalExpression optional optionals
    optionalAttrs filterAttrs mapAttrs mapAttrsToList hasPrefix removePrefix;

  larderLib = import ./lib.nix { inherit lib; };
  cfg = config.services.larder;
  daemonCfg = cfg.pushDaemon;

  format = pkgs.formats.toml { };

  dataDir = cfg.settings.data_dir;
  listen = larderLib.parseListen cfg.settings.listen;
  port = listen.port;
  # Binding a port below 1024 needs CAP_NET_BIND_SERVICE in the host's user namespace.
  privilegedPort = port != 0 && port < 1024;

  # Directories the server writes besides its data directory: a `file://` store or a SQLite
  # database placed elsewhere by the settings.
  pathOf = prefix: url:
    if url != null && hasPrefix prefix url then removePrefix prefix url else null;
  stateDirectory = if hasPrefix "/var/lib/" dataDir then removePrefix "/var/lib/" dataDir else null;
  # What ProtectSystem=strict must leave writable besides the StateDirectory.
  writablePaths = lib.unique (builtins.filter (p: p != null) (
    optional (stateDirectory == null) dataDir
    ++ map (p: if p == null || hasPrefix "${dataDir}/" "${p}/" then null else p) [
      (pathOf "file://" cfg.settings.storage)
      (let db = pathOf "sqlite://" cfg.settings.database; in if db == null then null else dirOf db)
    ]
  ));

  cacheToml = _name: c: {
    private = !c.public;
    inherit (c) priority compression;
    max_size = if c.maxSize == null then "none" else toString c.maxSize;
    upstream_keys = c.upstreamKeys;
    inherit (c) upstreams;
  };

  # The file `larder serve --config` reads: every setting given (unset ones are left to the
  # server's defaults), the declared caches, and delete_undeclared_caches when asked.
  settingsFile = format.generate "larder.toml" (
    filterAttrs (_: v: v != null) cfg.settings
    // optionalAttrs (cfg.settings.oidc != null) {
      oidc = filterAttrs (_: v: v != null) cfg.settings.oidc;
    }
    // optionalAttrs (cfg.caches != { }) { caches = mapAttrs cacheToml cfg.caches; }
    // optionalAttrs cfg.deleteUndeclaredCaches { delete_undeclared_caches = true; }
  );

  larderExe = "${cfg.package}/bin/larder";

  # Loopback for a wildcard address, so a push daemon on this machine reaches the server.
  localUrl =
    let host =
      if listen.host == "0.0.0.0" then "127.0.0.1"
      else if listen.host == "[::]" then "[::1]"
      else listen.host;
    in "http://${host}:${toString port}";

  daemonState = "/var/lib/larder-daemon";
  daemonSocket = "${daemonState}/daemon.sock";

  hook = pkgs.writeShellScript "larder-post-build-hook" (larderLib.hookScript {
    larder = larderExe;
    nixStore = "${config.nix.package}/bin/nix-store";
    tr = "${pkgs.coreutils}/bin/tr";
    socket = daemonSocket;
  });

  daemonStart = pkgs.writeShellScript "larder-daemon-start" (larderLib.daemonScript {
    larder = larderExe;
    target = "${daemonCfg.server}/${daemonCfg.cache}";
    socket = daemonSocket;
    tokenFile = ''"$CREDENTIALS_DIRECTORY/token"'';
    signingKeyFile = if daemonCfg.signingKeyFile == null then null else ''"$CREDENTIALS_DIRECTORY/signing-key"'';
  });

  # Sandboxing shared by both services: `systemd-analyze security` rates the server "OK".
  hardening = {
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
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    RemoveIPC = true;
    UMask = "0077";
  };

  cacheModule = { name, ... }: {
    options = {
      public = mkOption {
        type = types.bool;
        default = true;
        description = "Whether anyone may pull from the cache (false: only tokens that may pull it).";
      };
      priority = mkOption {
        type = types.ints.between 0 1000000;
        default = 41;
        description = "Priority in nix-cache-info (lower wins; cache.nixos.org is 40).";
      };
      maxSize = mkOption {
        type = types.nullOr larderLib.size;
        default = null;
        example = "50GiB";
        description = "Size limit; the least recently used paths are evicted beyond it. null: no limit.";
      };
      compression = mkOption {
        type = larderLib.compression;
        default = "zstd";
        description = "Compression of the NARs pushed to the cache.";
      };
      upstreamKeys = mkOption {
        type = types.listOf larderLib.publicKey;
        default = [ ];
        description = ''
          Public keys of upstream caches for this cache, added to the server-wide
          `settings.upstream_keys`: a pushed path may reference paths they sign without them
          being in the cache, and a path fetched from `upstreams` is served only when one of
          them signed it.
        '';
      };
      upstreams = mkOption {
        type = types.listOf larderLib.httpUrl;
        default = [ ];
        example = [ "https://cache.nixos.org" ];
        description = ''
          Upstream caches asked, in order, for the paths this cache lacks (pull-through): what
          one serves, signed by a trusted upstream key, is fetched once and kept, so clients
          need this cache as their only substituter. At most 8.
        '';
      };
    };
  };

  nullOr = type: description: mkOption { type = types.nullOr type; default = null; inherit description; };
in
{
  options.services.larder = {
    enable = mkEnableOption "larder, a Nix binary cache server";

    package = lib.mkPackageOption pkgs "larder" { };

    settings = mkOption {
      default = { };
      description = ''
        The server's settings, rendered to the TOML file `larder serve --config` reads (see
        "Server configuration" in larder's README for each key). Every key is declared with a
        type, so a bad value fails at evaluation; unset keys (null) keep the server's default.
        Secrets belong in {option}`services.larder.environmentFile`, not here: the file is in
        the world-readable Nix store.
      '';
      type = types.submodule {
        freeformType = format.type;
        options = {
          listen = mkOption {
            type = larderLib.listen;
            default = "127.0.0.1:8080";
            description = "Address to listen on. Its port is the one `openFirewall` opens.";
          };
          data_dir = mkOption {
            type = types.addCheck types.str (hasPrefix "/") // { description = "absolute path"; };
            default = "/var/lib/larder";
            description = ''
              Database, objects and the bootstrap admin token (`admin-token`, mode 0600, owned by
              user larder). Below /var/lib it is the unit's StateDirectory; elsewhere it is
              made writable for the service and created by systemd-tmpfiles.
            '';
          };
          public_url = nullOr larderLib.httpUrl "Base URL clients use (names each cache's signing key). Default: http://LISTEN.";
          database = nullOr (types.strMatching "(sqlite|postgres|postgresql)://.*" // {
            description = "database URL sqlite://PATH or postgres://USER@HOST:PORT/DB";
          }) "Metadata database. A password belongs in LARDER_DATABASE in the environment file.";
          database_max_connections = nullOr types.ints.positive "Connection pool size, per server.";
          storage = nullOr (types.strMatching "(file|s3)://.*" // {
            description = "storage URL file:///DIR or s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME";
          }) "NAR object storage.";
          s3_access_key_id = nullOr types.str "S3 access key id (better: AWS_ACCESS_KEY_ID in the environment file).";
          s3_secret_access_key = nullOr types.str "S3 secret key. Do not set it here: it would be world-readable in the Nix store; use AWS_SECRET_ACCESS_KEY in the environment file.";
          nar_redirect = nullOr (types.enum [ "stream" "presigned" ]) "NAR downloads streamed by the server, or a 307 to a presigned S3 URL.";
          compression = nullOr larderLib.compression "Preferred compression of new caches.";
          compression_level = nullOr types.int "Compression level clients use by default.";
          max_upload_size = nullOr larderLib.size "Largest accepted upload.";
          max_nar_size = nullOr larderLib.size "Largest NAR accepted once decompressed.";
          gc_interval = nullOr larderLib.duration "How often unreferenced objects are collected.";
          evicted_nar_grace = nullOr (larderLib.durationAtLeast 10 "10s") "How long an evicted path's NAR stays servable.";
          orphan_scan_interval = nullOr (types.either (types.enum [ "off" ]) larderLib.duration) "How often the orphan scan runs (\"off\": never).";
          orphan_grace = nullOr (larderLib.durationAtLeast 3600 "1h") "How old an orphaned object must be before the scan deletes it.";
          backend_timeout = nullOr (larderLib.durationAtLeast 1 "1s") "How long a GET or HEAD waits for the backends before a 503.";
          header_timeout = nullOr (larderLib.durationAtLeast 1 "1s") "How long a connection may take to send a request head, or stay silent in a request body.";
          max_connections = nullOr types.ints.positive "Most connections open at once.";
          max_connections_per_client = nullOr types.ints.positive "Most connections open at once from one client address.";
          multipart_max_open = nullOr types.ints.positive "Most unfinished multi-part uploads per cache and per token on a server.";
          multipart_max_staged = nullOr larderLib.size "Most bytes of unfinished multi-part uploads per cache and per token on a server, and of unassembled larder push chunks per cache (server default: max_upload_size).";
          multipart_idle_ttl = nullOr (larderLib.durationAtLeast 60 "1m") "How long an unfinished multi-part upload is kept without a new part.";
          upstream_keys = nullOr (types.listOf larderLib.publicKey) "Keys of upstream caches (server default: cache.nixos.org's).";
          tls_cert = nullOr larderLib.secretFile "PEM certificate chain; with tls_key, larder serves HTTPS. Reloaded on `systemctl reload larder`.";
          tls_key = nullOr larderLib.secretFile "PEM private key, readable by user larder (e.g. security.acme.certs.NAME.group = \"larder\").";
          oidc = nullOr (types.submodule {
            options = {
              max_lifetime = nullOr (larderLib.durationAtLeast 1 "1s") "Lifetime of the tokens the exchange makes; at most 1h (the default).";
              issuers = mkOption {
                default = [ ];
                description = "OIDC issuers whose ID tokens CI jobs trade for short-lived tokens.";
                type = types.listOf (types.submodule {
                  options = {
                    issuer = mkOption { type = larderLib.httpUrl; description = "The issuer's URL, as its tokens' iss claim says it."; };
                    audience = mkOption { type = types.str; description = "The aud its tokens must carry (what the CI job asks for; e.g. public_url)."; };
                    rules = mkOption {
                      default = [ ];
                      description = "Claims that, all matching (exactly, or `*` for any run of characters), grant perm on caches.";
                      type = types.listOf (types.submodule {
                        options = {
                          claims = mkOption { type = types.attrsOf types.str; example = { repository = "mitsio/dotfiles"; ref = "refs/heads/main"; }; description = "Claim name = pattern."; };
                          perm = mkOption { type = types.enum [ "pull" "push" ]; description = "The permission granted."; };
                          caches = mkOption { type = types.listOf larderLib.cacheName; description = "The caches it is granted on."; };
                        };
                      });
                    };
                  };
                });
              };
            };
          }) "CI identity: trusted OIDC issuers and the rules mapping their claims to permissions (`[oidc]` in the README).";
        };
      };
    };

    environmentFile = mkOption {
      type = types.nullOr larderLib.secretFile;
      default = null;
      example = "/run/secrets/larder.env";
      description = ''
        Environment file (systemd's EnvironmentFile) for secrets: `AWS_ACCESS_KEY_ID`,
        `AWS_SECRET_ACCESS_KEY`, and `LARDER_DATABASE` (a PostgreSQL URL with its password;
        it overrides `settings.database`).
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the TCP port of `settings.listen` in the firewall.";
    };

    caches = mkOption {
      type = types.attrsOf (types.submodule cacheModule);
      default = { };
      example = literalExpression ''{ modular-workspace = { maxSize = "200GiB"; }; }'';
      description = ''
        Caches the server creates at start when missing, and whose settings it sets when they
        exist. A cache removed from here is kept (with its paths) unless
        {option}`services.larder.deleteUndeclaredCaches` is set.
      '';
    };

    deleteUndeclaredCaches = mkOption {
      type = types.bool;
      default = false;
      description = "Delete, at start, every cache not declared in {option}`services.larder.caches`, with its paths.";
    };

    pushDaemon = {
      enable = mkEnableOption ''
        the larder push daemon and a Nix post-build hook that queues every build's outputs
        for it (pushed in the background; a build never waits on the network)'';
      server = mkOption {
        type = larderLib.httpUrl;
        example = "http://shoshin:8080";
        description = ''
          The larder server to push to. With {option}`services.larder.enable` on this machine
          the default is `settings.public_url`, or else `http://` and `settings.listen` (a
          wildcard address as loopback); otherwise it must be set.
        '';
      };
      cache = mkOption {
        type = larderLib.cacheName;
        example = "modular-workspace";
        description = "The cache to push to.";
      };
      tokenFile = mkOption {
        type = larderLib.secretFile;
        example = "/run/secrets/larder-push-token";
        description = ''
          File holding a token that may push to the cache (read at start as a systemd
          credential). With {option}`services.larder.enable` on this machine the default is
          the server's bootstrap admin token, `''${settings.data_dir}/admin-token`; otherwise it
          must be set.
        '';
      };
      signingKeyFile = mkOption {
        type = types.nullOr larderLib.secretFile;
        default = null;
        description = "File holding the cache's client-held secret key (`larder generate-keypair`), if it has one.";
      };
    };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      assertions =
        mapAttrsToList (name: _: {
          assertion = larderLib.isCacheName name;
          message = "services.larder.caches.\"${name}\": not a valid cache name (lower-case letters, digits and dashes, starting with a letter or digit, at most 63; not api, ui, static, metrics or healthz)";
        }) cfg.caches
        ++ [
          {
            assertion = (cfg.settings.tls_cert == null) == (cfg.settings.tls_key == null);
            message = "services.larder.settings: set both tls_cert and tls_key, or neither";
          }
          {
            assertion = !(cfg.openFirewall && port == 0);
            message = "services.larder.openFirewall: settings.listen has port 0 (a random port), which cannot be opened";
          }
        ];

      warnings = optional (cfg.settings.s3_secret_access_key != null)
        "services.larder.settings.s3_secret_access_key is world-readable in the Nix store; put AWS_SECRET_ACCESS_KEY in services.larder.environmentFile instead";

      users.users.larder = {
        isSystemUser = true;
        group = "larder";
        home = dataDir;
        description = "larder Nix binary cache server";
      };
      users.groups.larder = { };

      environment.systemPackages = [ cfg.package ];

      networking.firewall.allowedTCPPorts = optional cfg.openFirewall port;

      systemd.tmpfiles.rules = optional (stateDirectory == null) "d ${dataDir} 0700 larder larder - -";

      systemd.services.larder = {
        description = "larder Nix binary cache server";
        documentation = [ "man:larder-serve(1)" ];
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        serviceConfig = hardening // {
          Type = "notify";
          ExecStart = "${larderExe} serve --config ${settingsFile}";
          Restart = "on-failure";
          RestartSec = 5;
          User = "larder";
          Group = "larder";
          PrivateUsers = !privilegedPort;
          CapabilityBoundingSet = if privilegedPort then "CAP_NET_BIND_SERVICE" else "";
          AmbientCapabilities = if privilegedPort then "CAP_NET_BIND_SERVICE" else "";
        }
        // optionalAttrs (stateDirectory != null) {
          StateDirectory = stateDirectory;
          StateDirectoryMode = "0700";
        }
        // optionalAttrs (writablePaths != [ ]) { ReadWritePaths = writablePaths; }
        // optionalAttrs (cfg.environmentFile != null) { EnvironmentFile = cfg.environmentFile; }
        // optionalAttrs (cfg.settings.tls_cert != null) {
          # Re-reads the certificate and key without dropping connections.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        };
      };
    })

    (mkIf (cfg.enable && daemonCfg.enable) {
      # Pushing to the server of this machine needs no more settings.
      services.larder.pushDaemon = {
        server = lib.mkDefault (if cfg.settings.public_url != null then cfg.settings.public_url else localUrl);
        tokenFile = lib.mkDefault "${dataDir}/admin-token";
      };
    })

    (mkIf daemonCfg.enable {
      # The hook runs as nix-daemon's user (root): post-build-hook is a trusted setting, so
      # /etc/nix/nix.conf is the place for it.
      nix.settings.post-build-hook = hook;

      systemd.services.larder-daemon = {
        description = "larder push daemon (pushes every build to ${daemonCfg.server}/${daemonCfg.cache})";
        documentation = [ "man:larder-daemon(1)" ];
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" "nix-daemon.socket" ] ++ optional cfg.enable "larder.service";
        wants = [ "network-online.target" ];
        environment = {
          # The store is read through nix-daemon: the database is read-only in this sandbox.
          NIX_REMOTE = "daemon";
          HOME = daemonState;
        };
        # Root, like the hook: both write the queue file next to the socket, and root reaches
        # nix-daemon whatever `allowed-users` says. No capabilities and a read-only system.
        serviceConfig = hardening // {
          ExecStart = daemonStart;
          Restart = "on-failure";
          RestartSec = 5;
          StateDirectory = "larder-daemon";
          StateDirectoryMode = "0700";
          LoadCredential = [ "token:${daemonCfg.tokenFile}" ]
            ++ optional (daemonCfg.signingKeyFile != null) "signing-key:${daemonCfg.signingKeyFile}";
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
        };
      };
    })
  ];
}
