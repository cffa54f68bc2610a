{
  description = "larder: a self-hosted Nix binary cache server and client";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # A module whose `package` defaults to this flake's build for the host's system.
      withPackage = module: option: { lib, pkgs, ... }: {
        imports = [ module ];
        config = lib.setAttrByPath option
          (lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default);
      };
    in
    {
      packages = forAllSystems (pkgs: rec {
        larder = pkgs.callPackage ./nix/package.nix { };
        default = larder;
      });

      overlays.default = import ./nix/overlay.nix;

      nixosModules.default = withPackage ./nix/nixos-module.nix [ "services" "larder" "package" ];
      homeManagerModules.default = withPackage ./nix/home-manager-module.nix [ "programs" "larder" "package" ];
    };
}
