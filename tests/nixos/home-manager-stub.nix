# The home-manager options nix/home-manager-module.nix sets, declared with home-manager's types
# (modules/systemd.nix, modules/misc/nix.nix, modules/home-environment.nix, modules/misc/xdg.nix),
# so a definition home-manager would reject fails here too.
{ lib, ... }:

let
  inherit (lib) mkOption types;

  # home-manager's `hm.types.dagOf types.str`: an entry is a string (anywhere) or
  # `lib.hm.dag.entryAfter [ … ] "…"`.
  dagEntry = types.submodule {
    options = {
      data = mkOption { type = types.str; };
      after = mkOption { type = types.listOf types.str; default = [ ]; };
      before = mkOption { type = types.listOf types.str; default = [ ]; };
    };
  };
  dagOf = types.attrsOf (types.coercedTo types.str (data: { inherit data; }) dagEntry);

  # home-manager's unit type: freeform sections of keys, with a few declared keys.
  primitive = with types; oneOf [ bool int str path ];
  unitType = types.submodule {
    freeformType = with types; attrsOf (attrsOf (either primitive (listOf primitive))) // {
      description = "systemd service unit configuration";
    };
    options = {
      Unit.Description = mkOption { type = types.nullOr types.str; default = null; };
      Unit.Documentation = mkOption {
        type = with types; coercedTo str lib.toList (listOf str);
        default = [ ];
      };
      Unit.X-Restart-Triggers = mkOption { type = with types; listOf (either package str); default = [ ]; };
      Unit.X-Reload-Triggers = mkOption { type = with types; listOf (either package str); default = [ ]; };
      Unit.X-SwitchMethod = mkOption {
        type = types.enum [ null "reload" "restart" "stop-start" "keep-old" ];
        default = null;
      };
      Service.Environment = mkOption {
        type = with types; coercedTo str lib.toList (listOf str);
        default = [ ];
      };
      Service.ExecStart = mkOption {
        type = with types; let p = either package str; in either p (listOf p);
        apply = lib.toList;
        default = [ ];
      };
    };
  };

  confAtom = with types; nullOr (oneOf [ bool int float str path package ]) // {
    description = "Nix config atom (null, bool, int, float, str, path or package)";
  };
  semanticConfType = with types; attrsOf (either confAtom (listOf confAtom));
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; internal = true; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; internal = true; default = [ ]; };

    home.username = mkOption { type = types.str; };
    home.homeDirectory = mkOption { type = types.path; };
    home.packages = mkOption { type = types.listOf types.package; default = [ ]; };
    home.activation = mkOption { type = dagOf; default = { }; };

    xdg.configHome = mkOption { type = types.path; };
    xdg.stateHome = mkOption { type = types.path; };

    systemd.user.services = mkOption { type = types.attrsOf unitType; default = { }; };

    nix.settings = mkOption {
      type = types.submodule { freeformType = semanticConfType; };
      default = { };
    };
  };
}
