# For users without flakes:
#   nix-build                                             # the package
#   imports = [ (import /path/to/larder { }).nixosModules.default ];
#   imports = [ (import /path/to/larder { }).homeManagerModules.default ];
{ pkgs ? import <nixpkgs> { } }:

let
  package = pkgs.callPackage ./nix/package.nix { };
  withPackage = module: option: { lib, ... }: {
    imports = [ module ];
    config = lib.setAttrByPath option (lib.mkDefault package);
  };
in
package // {
  inherit package;
  overlay = import ./nix/overlay.nix;
  nixosModules.default = withPackage ./nix/nixos-module.nix [ "services" "larder" "package" ];
  homeManagerModules.default = withPackage ./nix/home-manager-module.nix [ "programs" "larder" "package" ];
}
