# The NixOS options nix/nixos-module.nix sets, declared with NixOS's types (from nixpkgs'
# nixos/lib/systemd-unit-options.nix, nixos/modules/config/users-groups.nix,
# nixos/modules/services/networking/firewall.nix, nixos/modules/config/nix.nix,
# nixos/modules/misc/assertions.nix, …), so a definition NixOS would reject fails here too.
# Only the options the module uses are declared, plus what a service's unit text is made of.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption types;

  # NixOS's `unitOption`: a value of a unit's section; definitions that are lists are
  # concatenated (repeatable settings such as SystemCallFilter=), others must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs;
      in
      if lib.any (d: builtins.isList d.value) defs'
      then lib.concatMap (d: lib.toList d.value) defs'
      else lib.mergeEqualOption loc defs';
  };

  # NixOS checks these two values of [Service] (checkService).
  serviceConfigType = types.addCheck (types.attrsOf unitOption) (attrs:
    let
      plain = v: if builtins.isAttrs v && v ? content then v.content else v;
      oneOf = name: allowed: !(attrs ? ${name}) || builtins.elem (plain attrs.${name}) allowed;
    in
    oneOf "Type" [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ]
    && oneOf "Restart" [ "no" "on-success" "on-failure" "on-abnormal" "on-watchdog" "on-abort" "always" ]);

  unitNames = mkOption { type = types.listOf types.str; default = [ ]; };

  serviceModule = { name, ... }: {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      description = mkOption { type = types.singleLineStr; default = ""; };
      documentation = mkOption { type = types.listOf types.str; default = [ ]; };
      wantedBy = unitNames;
      requiredBy = unitNames;
      after = unitNames;
      before = unitNames;
      wants = unitNames;
      requires = unitNames;
      bindsTo = unitNames;
      partOf = unitNames;
      conflicts = unitNames;
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      environment = mkOption {
        type = with types; attrsOf (nullOr (oneOf [ str path package ]));
        default = { };
      };
      path = mkOption { type = with types; listOf (oneOf [ package str ]); default = [ ]; };
      serviceConfig = mkOption { type = serviceConfigType; default = { }; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      reloadTriggers = mkOption { type = types.listOf unitOption; default = [ ]; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      startAt = mkOption { type = with types; either str (listOf str); default = [ ]; };
    };
  };

  userModule = { name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      isSystemUser = mkOption { type = types.bool; default = false; };
      isNormalUser = mkOption { type = types.bool; default = false; };
      group = mkOption { type = types.str; default = ""; };
      extraGroups = mkOption { type = types.listOf types.str; default = [ ]; };
      description = mkOption { type = types.passwdEntry types.str; default = ""; };
      home = mkOption { type = types.passwdEntry types.path; default = "/var/empty"; };
      createHome = mkOption { type = types.bool; default = false; };
      uid = mkOption { type = with types; nullOr int; default = null; };
    };
  };

  groupModule = { name, ... }: {
    options = {
      name = mkOption { type = types.passwdEntry types.str; default = name; };
      gid = mkOption { type = with types; nullOr int; default = null; };
      members = mkOption { type = with types; listOf (passwdEntry str); default = [ ]; };
    };
  };

  # nix.settings: NixOS's freeform `semanticConfType` with its typed keys.
  confAtom = with types; nullOr (oneOf [ bool int float str path package ]) // {
    description = "Nix config atom (null, bool, int, float, str, path or package)";
  };
  semanticConfType = with types; attrsOf (either confAtom (listOf confAtom));
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; internal = true; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; internal = true; default = [ ]; };

    systemd.services = mkOption { type = types.attrsOf (types.submodule serviceModule); default = { }; };
    systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };

    users.users = mkOption { type = types.attrsOf (types.submodule userModule); default = { }; };
    users.groups = mkOption { type = types.attrsOf (types.submodule groupModule); default = { }; };

    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };

    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
      apply = ports: lib.unique (builtins.sort builtins.lessThan ports);
    };

    nix.package = mkOption { type = types.package; default = pkgs.nix; };
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = semanticConfType;
        options = {
          substituters = mkOption { type = types.listOf types.str; default = [ ]; };
          trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; };
          trusted-users = mkOption { type = types.listOf types.str; default = [ ]; };
          allowed-users = mkOption { type = types.listOf types.str; default = [ "*" ]; };
        };
      };
      default = { };
    };
  };
}
