# `pkgs.larder`, for the modules' default `package` (the flake's modules set it themselves).
final: _prev: {
  larder = final.callPackage ./package.nix { };
}
