# The few parts of Nixpkgs that nix/nixos-module.nix and nix/home-manager-module.nix use, for
# evaluating them without Nixpkgs (which cannot be fetched here). Files are real derivations
# built by the machine's Nix (`nix-build`, sandbox off, builder /bin/sh), so the rendered units
# name paths that exist and can be run.
#
# `larder`: a directory whose bin/larder is the binary under test; `nix`: a directory whose
# bin/nix-store is the machine's (Debian's /usr).
{ lib, larder, nix ? "/usr", coreutils ? "/usr" }:

let
  # A derivation-like value for a directory outside the store (`types.package` accepts it).
  fakePackage = name: outPath: {
    type = "derivation";
    inherit name outPath;
    meta.mainProgram = name;
  };

  writeTextFile = { name, text, executable ? false }:
    derivation {
      inherit name text;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      PATH = "/usr/bin:/bin";
      passAsFile = [ "text" ];
      args = [ "-c" ("cp \"$textPath\" \"$out\"" + lib.optionalString executable " && chmod 0555 \"$out\"") ];
    };

  # A small TOML writer for what larder's settings hold: strings, numbers, booleans, lists
  # of those (tables in lists as inline tables), and tables (rendered as [a.b] sections after the plain keys).
  toTOML =
    let
      key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
      value = v:
        if builtins.isList v then "[" + lib.concatMapStringsSep ", " value v + "]"
        else if builtins.isBool v then (if v then "true" else "false")
        else if builtins.isInt v || builtins.isFloat v then toString v
        # A table inside a list (`[[oidc.issuers]]`): an inline table, as valid TOML.
        else if isTable v then
          "{ " + lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${key k} = ${value x}") v) + " }"
        else builtins.toJSON (toString v); # a TOML basic string is a JSON string
      isTable = v: builtins.isAttrs v && !(lib.isDerivation v);
      section = path: attrs:
        let
          plain = lib.filterAttrs (_: v: !(isTable v)) attrs;
          tables = lib.filterAttrs (_: isTable) attrs;
          # A table holding only tables needs no header of its own.
          header = lib.optionalString (path != [ ] && plain != { }) "\n[${lib.concatMapStringsSep "." key path}]\n";
        in
        header
        + lib.concatStrings (lib.mapAttrsToList (k: v: "${key k} = ${value v}\n") plain)
        + lib.concatStrings (lib.mapAttrsToList (k: v: section (path ++ [ k ]) v) tables);
    in
    section [ ];

  # Nixpkgs' `pkgs.formats.toml { }.type`.
  tomlValue = with lib.types;
    let valueType = nullOr (oneOf [ bool int float str path (attrsOf valueType) (listOf valueType) ]) // {
      description = "TOML value";
    };
    in valueType;
in
{
  inherit toTOML;
  formats.toml = { }: {
    type = tomlValue;
    generate = name: value: writeTextFile { inherit name; text = toTOML value; };
  };
  inherit writeTextFile;
  writeText = name: text: writeTextFile { inherit name text; };
  writeShellScript = name: text: writeTextFile {
    inherit name;
    executable = true;
    text = "#!/bin/bash\n" + text;
  };
  larder = fakePackage "larder" larder;
  nix = fakePackage "nix" nix;
  coreutils = fakePackage "coreutils" coreutils;
  stdenv.hostPlatform.system = builtins.currentSystem;
}
