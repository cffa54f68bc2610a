# Evaluate nix/nixos-module.nix or nix/home-manager-module.nix the way NixOS and home-manager
# do (lib.evalModules with the stubs of this directory), and render what they would install.
#
#   nix-instantiate --eval --strict --json tests/nixos/eval.nix --arg configuration ./x.nix \
#     --argstr larder /path/with/bin/larder -A summary
#   nix-build tests/nixos/eval.nix … -A files      # the unit files, TOML and scripts
#
# As NixOS's top level does, a failed assertion throws "Failed assertions: - …".
{ kind ? "nixos"
, configuration
, larder
, nix ? "/usr"
, coreutils ? "/usr"
}:

let
  lib0 = import ./nixpkgs-lib/lib;
  # home-manager's `lib.hm.dag`.
  lib = lib0.extend (self: super: {
    hm.dag = {
      entryAnywhere = data: { inherit data; after = [ ]; before = [ ]; };
      entryAfter = after: data: { inherit data after; before = [ ]; };
      entryBefore = before: data: { inherit data before; after = [ ]; };
    };
  });
  pkgs = import ./fake-pkgs.nix { inherit lib larder nix coreutils; };

  module = if kind == "nixos" then ../../nix/nixos-module.nix else ../../nix/home-manager-module.nix;
  stub = if kind == "nixos" then ./nixos-stub.nix else ./home-manager-stub.nix;

  evaluated = lib.evalModules {
    modules = [ module stub configuration { _module.args.pkgs = pkgs; } ];
  };
  raw = evaluated.config;
  failed = map (a: a.message) (builtins.filter (a: !a.assertion) raw.assertions);
  config =
    if failed == [ ] then raw
    else throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}";

  # NixOS's rendering of a value in a unit (systemd-lib.nix: toOption, attrsToSection).
  toOption = x: if x == true then "true" else if x == false then "false" else toString x;
  attrsToSection = as: lib.concatStrings (lib.concatLists (lib.mapAttrsToList
    (name: value: map (x: "${name}=${toOption x}\n") (lib.toList value)) as));

  # The unit file NixOS writes for systemd.services.NAME (its [Unit] keys come from the
  # service's description, documentation and dependencies; wantedBy becomes a symlink).
  nixosUnit = name: def:
    let
      deps = lib.filterAttrs (_: v: v != "") {
        Description = def.description;
        Documentation = toString def.documentation;
        After = toString def.after;
        Wants = toString def.wants;
        Requires = toString def.requires;
        Before = toString def.before;
      };
    in
    "[Unit]\n" + attrsToSection (deps // def.unitConfig)
    + "\n[Service]\n"
    + lib.concatStrings (lib.mapAttrsToList (n: v: "Environment=\"${n}=${toString v}\"\n")
        (lib.filterAttrs (_: v: v != null) def.environment))
    + attrsToSection def.serviceConfig;

  # home-manager's rendering (modules/systemd.nix, toSystemdIni): sections of key=value,
  # lists as repeated keys, null and [] left out.
  hmUnit = name: def:
    let
      clean = lib.filterAttrs (_: v: v != { })
        (lib.mapAttrs (_: lib.filterAttrs (_: v: v != null && v != [ ])) def);
    in
    lib.concatStringsSep "\n" (lib.mapAttrsToList (section: keys:
      "[${section}]\n" + attrsToSection keys) clean);

  units =
    if kind == "nixos"
    then lib.mapAttrs' (n: d: lib.nameValuePair "${n}.service" (nixosUnit n d)) config.systemd.services
    else lib.mapAttrs' (n: d: lib.nameValuePair "${n}.service" (hmUnit n d)) config.systemd.user.services;

  # A store path value (a derivation, a path) as the string a unit or nix.conf would hold.
  plain = v:
    if lib.isDerivation v then toString v
    else if builtins.isList v then map plain v
    else if builtins.isAttrs v then lib.mapAttrs (_: plain) v
    else if builtins.isPath v then toString v
    else v;

  nixosSummary = {
    services = lib.mapAttrs (_: d: {
      inherit (d) description documentation wantedBy after wants environment;
      serviceConfig = plain d.serviceConfig;
    }) config.systemd.services;
    users = lib.mapAttrs (_: u: { inherit (u) isSystemUser group home description; }) config.users.users;
    groups = builtins.attrNames config.users.groups;
    firewall.allowedTCPPorts = config.networking.firewall.allowedTCPPorts;
    nixSettings = plain config.nix.settings;
    systemPackages = map toString config.environment.systemPackages;
    tmpfiles = config.systemd.tmpfiles.rules;
    inherit (config) warnings;
  };

  hmSummary = {
    services = plain config.systemd.user.services;
    nixSettings = plain config.nix.settings;
    packages = map toString config.home.packages;
    activation = config.home.activation;
    inherit (config) warnings;
  };

  # Every rendered file in one directory (the settings file, the hook and the start scripts
  # come along as the units' and nix.conf's references).
  rendered = units // {
    "nix.conf" = lib.concatStrings (lib.mapAttrsToList (k: v: "${k} = ${toString (plain v)}\n") config.nix.settings);
    "activation.sh" = lib.concatStrings (lib.mapAttrsToList (_: e: e.data) (config.home.activation or { }));
  };
  files = derivation {
    name = "larder-deploy-test-files";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ("set -e; mkdir \"$out\"\n" + lib.concatStrings (lib.mapAttrsToList
      (name: text: "cp ${pkgs.writeText name text} \"$out/${name}\"\n") rendered)) ];
  };
in
{
  summary = if kind == "nixos" then nixosSummary else hmSummary;
  inherit units config files;
}
