# The larder package: one binary (server and client), its shell completions and man pages.
# Built from this checkout with Cargo.lock; the tests need real Nix, PostgreSQL and Garage, so
# they run in CI (.ci/run), not here (doCheck = false).
{ lib
, stdenv
, rustPlatform
, installShellFiles
, pkg-config
, xz
}:

rustPlatform.buildRustPackage {
  pname = "larder";
  version = (lib.importTOML ../Cargo.toml).workspace.package.version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "--package" "larder" ];

  nativeBuildInputs = [ installShellFiles pkg-config ];
  buildInputs = [ xz ];

  doCheck = false;

  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd larder \
      --bash <($out/bin/larder completions bash) \
      --fish <($out/bin/larder completions fish) \
      --zsh <($out/bin/larder completions zsh)
    $out/bin/larder manpages man
    installManPage man/*.1
  '';

  meta = {
    description = "Self-hosted Nix binary cache server and client";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "larder";
    platforms = lib.platforms.linux;
  };
}
