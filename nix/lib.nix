# Option types and helpers shared by the NixOS and home-manager modules.
#
# Every type accepts exactly what `larder serve` accepts (crates/larder-server/src/config.rs),
# so a bad value fails at evaluation with the type's description ("is not of type `size like
# "5GiB"…'") instead of at service start.
{ lib }:

let
  inherit (lib) types;

  trim = s:
    let m = builtins.match "[[:space:]]*(.*[^[:space:]])[[:space:]]*" s;
    in if m == null then "" else builtins.head m;

  # `parse_size`: a number (decimals allowed) and an optional unit: B, K/KiB, M/MiB, G/GiB,
  # T/TiB (binary), KB/MB/GB/TB (decimal), any case, spaces allowed before the unit.
  isSizeString = s:
    builtins.match "[0-9]+(\\.[0-9]+)?[[:space:]]*([kmgt](i?b)?|b)?" (lib.toLower (trim s)) != null;

  # A string of decimal digits (leading zeros allowed) as an integer; null if it is too long
  # to be a sensible value.
  parseDecimal = digits:
    if builtins.stringLength digits > 15 then null
    else lib.foldl' (n: c: n * 10 + lib.toInt c) 0 (lib.stringToCharacters digits);

  # `parse_duration`: a whole number and an optional unit s, m, h, d or w (seconds without).
  durationSeconds = s:
    let
      m = builtins.match "([0-9]+)([smhdw]?)" (trim s);
      n = parseDecimal (builtins.head m);
      unit = { "" = 1; s = 1; m = 60; h = 3600; d = 86400; w = 604800; };
    in
    if m == null || n == null then null else n * unit.${builtins.elemAt m 1};

  # HOST:PORT with HOST a name, an IPv4 address or a bracketed IPv6 address.
  parseListen = s:
    let m = builtins.match "(\\[[0-9A-Fa-f:.]+[]]|[A-Za-z0-9._-]+):([0-9]{1,5})" s;
    in
    if m == null then null
    else
      let port = parseDecimal (builtins.elemAt m 1);
      in if port > 65535 then null else { host = builtins.head m; inherit port; };

  # The host of an http(s) URL, without port or brackets (what a netrc's `machine` names).
  urlHost = url:
    let
      m = builtins.match "https?://(\\[([0-9A-Fa-f:.]+)[]]|([^/:?#]+))(:[0-9]+)?(/.*)?" url;
    in
    if m == null then null
    else if builtins.elemAt m 1 != null then builtins.elemAt m 1
    else builtins.elemAt m 2;

  # `valid_cache_name` in crates/larder-server/src/lib.rs.
  isCacheName = n:
    builtins.match "[a-z0-9][a-z0-9-]{0,62}" n != null
    && !(builtins.elem n [ "api" "ui" "static" "metrics" "healthz" ]);

  withDescription = description: type: type // { inherit description; descriptionClass = "noun"; };
in
rec {
  inherit trim parseDecimal isSizeString durationSeconds parseListen urlHost isCacheName;

  listen = withDescription
    "address HOST:PORT, e.g. \"127.0.0.1:8080\", \"0.0.0.0:8080\" or \"[::]:8080\""
    (types.addCheck types.str (s: parseListen s != null));

  size = withDescription
    "size: a number of bytes or a string like \"5GiB\", \"500MB\" or \"1.5G\""
    (types.either types.ints.unsigned (types.addCheck types.str isSizeString));

  duration = withDescription
    "duration like \"90s\", \"30m\", \"1h\", \"7d\" or \"2w\""
    (types.addCheck types.str (s: durationSeconds s != null));

  durationAtLeast = min: text: withDescription
    "duration of at least ${text}, like \"90s\", \"30m\", \"1h\", \"7d\" or \"2w\""
    (types.addCheck types.str (s: let d = durationSeconds s; in d != null && d >= min));

  compression = types.enum [ "zstd" "xz" "none" ];

  publicKey = withDescription
    "Nix public key NAME:BASE64 (as in trusted-public-keys), e.g. \"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\""
    (types.addCheck types.str (s: builtins.match "[^:[:space:]]+:[A-Za-z0-9+/]{43}=" s != null));

  httpUrl = withDescription
    "http:// or https:// URL with a host, e.g. \"http://shoshin:8080\""
    (types.addCheck types.str (s:
      urlHost s != null && builtins.match ".*[[:space:]?#@].*" s == null));

  cacheName = withDescription
    "cache name (lower-case letters, digits and dashes, at most 63, not api, ui, static, metrics or healthz)"
    (types.addCheck types.str isCacheName);

  # A file that must not be copied into the world-readable Nix store: a string, never a Nix
  # path literal (which evaluation would copy into the store).
  secretFile = withDescription
    "absolute path given as a string (not a Nix path: that would copy the secret into the world-readable Nix store)"
    (types.addCheck types.str (lib.hasPrefix "/"));

  # The post-build hook script of `larder daemon hook` (crates/larder/src/daemon.rs,
  # `hook_script`): queue the outputs of every build and never fail the build. Nix 2.8.0 runs
  # the hook with an empty OUT_PATHS, hence the fallback through DRV_PATH.
  hookScript = { larder, nixStore, socket, tr ? "tr" }: ''
    # larder post-build-hook: queue the outputs of every build for `larder daemon run`.
    # It never waits for the network and never fails a build.
    set -f # $OUT_PATHS is a space-separated list; no globbing
    export IFS=' '
    if [ -z "$OUT_PATHS" ] && [ -n "$DRV_PATH" ]; then
      OUT_PATHS=$(${lib.escapeShellArg nixStore} -q --outputs "$DRV_PATH" | ${tr} '\n' ' ')
    fi
    ${lib.escapeShellArg larder} daemon push --socket ${lib.escapeShellArg socket} $OUT_PATHS \
      || echo "larder post-build-hook: could not queue $OUT_PATHS" >&2
    exit 0
  '';

  # The start script of a push daemon: the token (and a client-held signing key) read from
  # files at start, so they never appear in the unit, the environment block of the unit file
  # or the Nix store.
  # `tokenFile` and `signingKeyFile` are shell words (quoted by the caller; they may expand
  # $CREDENTIALS_DIRECTORY).
  daemonScript = { larder, target, socket, tokenFile, signingKeyFile ? null }: ''
    set -eu
    LARDER_TOKEN=$(< ${tokenFile})
    export LARDER_TOKEN
    ${lib.optionalString (signingKeyFile != null) ''
      LARDER_SIGNING_KEY=$(< ${signingKeyFile})
      export LARDER_SIGNING_KEY
    ''}exec ${lib.escapeShellArg larder} daemon run ${lib.escapeShellArg target} --socket ${lib.escapeShellArg socket}
  '';
}
