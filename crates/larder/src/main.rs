//! `larder`: a self-hosted Nix binary cache. `larder serve` runs the server; every other verb
//! is a client of a server's HTTP API.
//!
//! Exit status: 0 success, 1 failure, 2 usage error. Data goes to stdout, diagnostics to
//! stderr. Every environment variable larder reads is listed in [`env`].

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod admin;
mod build_cmd;
mod client_config;
mod contents_cmd;
mod daemon;
mod doctor;
mod env;
mod fsck_cmd;
mod import_cmd;
mod manpages;
mod migrate;
mod migrate_cmd;
mod oidc_login;
mod output;
mod push_cmd;
mod retention_cmd;
mod serve;
mod use_cmd;
mod watch_cmd;

/// A self-hosted Nix binary cache: build once on a strong machine, push to a signed cache,
/// substitute everywhere else.
///
/// Quick start on the server: `larder serve`, then `larder login http://HOST:8080
/// $(cat ~/.local/share/larder/admin-token)` and `larder cache create NAME`.
#[derive(Parser)]
#[command(
    name = "larder",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (zero-config: SQLite + a local directory under the data dir).
    Serve(serve::ServeArgs),
    /// Save a server and a token in the client config, checking the token against the server.
    ///
    /// With --oidc (in a CI job) the token is the one the server trades for the job's OIDC ID
    /// token (LARDER_OIDC_TOKEN, or GitHub Actions' with `permissions: id-token: write`): it
    /// lives at most an hour, and may do what the server's `[oidc]` rules grant this job.
    Login(admin::LoginArgs),
    /// Set the token of the default server (the Cachix habit).
    Authtoken(admin::AuthtokenArgs),
    /// Create, list, inspect, configure and delete caches.
    #[command(subcommand)]
    Cache(admin::CacheCommand),
    /// Create, list and revoke access tokens (server admin).
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// Push store paths and their closures to a cache (reads the local Nix store directly).
    ///
    /// The server and token come from LARDER_SERVER and LARDER_TOKEN, or `larder login`. Only
    /// what the cache lacks goes up, in dependency order: small paths (NARs under 256 KiB) many
    /// to a request, larger ones cut into content-defined chunks of which only those the cache
    /// lacks are sent (a path new to the cache goes whole, in parts above --part-size). A
    /// damaged store path fails alone, with the paths that refer to it; running the same
    /// command again sends only what is still missing.
    ///
    /// In CI, no stored secret is needed: when no token is configured (LARDER_TOKEN, `larder
    /// login`), the job's OIDC ID token is traded for a token that lives at most an hour and
    /// may push only where the server's `[oidc]` rules let this job (repository, branch, …).
    /// The ID token is LARDER_OIDC_TOKEN (GitLab CI: `id_tokens: LARDER_OIDC_TOKEN: aud:
    /// https://cache.example.org`), or GitHub Actions' own (a job with `permissions: id-token:
    /// write`; audience LARDER_OIDC_AUDIENCE, default the server's URL).
    Push(push_cmd::PushArgs),
    /// Make a signing key locally and make CACHE accept only uploads signed by it.
    GenerateKeypair(push_cmd::KeypairArgs),
    /// Make Nix substitute from a cache: its URL in `extra-substituters`, its key in
    /// `extra-trusted-public-keys`, and for a private cache the token in a netrc (0600) that
    /// `netrc-file` points at. Idempotent. Default mode: user-nixconf
    /// (~/.config/nix/nix.conf); as root root-nixconf (/etc/nix/nix.conf), or nixos on NixOS.
    /// Warns when nix-daemon will ignore your substituters and says what works instead.
    Use(use_cmd::UseArgs),
    /// Undo `larder use`: take the cache's URL, key and netrc entry out again.
    Remove(use_cmd::RemoveArgs),
    /// Check the setup, line by line with fixes: nix, config and token, server, and with CACHE
    /// whether Nix will substitute from it. Exit 1 if a check fails.
    Doctor(doctor::DoctorArgs),
    /// List a cache's paths by name with their sizes, upload time and last use (paginated;
    /// --query searches the `<hash>-<name>` of each path).
    Ls(contents_cmd::LsArgs),
    /// Show one path of a cache: narinfo fields, signatures, references, the paths that
    /// reference it, the pins that hold it, and its last use.
    PathInfo(contents_cmd::PathInfoArgs),
    /// Delete paths from a cache: `path delete CACHE PATH [--with-referrers]`.
    #[command(subcommand)]
    Path(contents_cmd::PathCommand),
    /// Evict least recently used closures until CACHE fits its limit (admin on the cache);
    /// --dry-run lists what would go first, and why.
    Gc(retention_cmd::GcArgs),
    /// Pin a store path's closure in a cache so eviction never removes it: `pin CACHE NAME
    /// PATH`, `pin list CACHE`, `pin delete CACHE NAME`. Re-pinning NAME makes a new revision.
    Pin(retention_cmd::PinArgs),
    /// Copy another binary cache (`file:///dir` as made by `nix copy --to file://…`, or
    /// `http(s)://…`) into CACHE: every NAR checked against its narinfo, signatures kept plus
    /// the cache's own; a second run skips what is already there.
    Import(import_cmd::ImportArgs),
    /// Push queue for Nix's post-build-hook: `daemon run CACHE`, `daemon push PATH…`,
    /// `daemon stop`, `daemon status`, and `daemon hook` (writes the hook script).
    #[command(subcommand)]
    Daemon(daemon::DaemonCommand),
    /// Push every new valid store path until stopped (SIGINT/SIGTERM push what is pending
    /// first). Reads the Nix database.
    WatchStore(watch_cmd::WatchArgs),
    /// Run CMD and push what it builds (through a private post-build-hook when Nix trusts you,
    /// else by watching the store); exit with its status once everything is pushed. Example:
    /// `larder watch-exec CACHE -- nix build .#app`.
    WatchExec(watch_cmd::WatchExecArgs),
    /// Build and push, like a `cachix-build-all` script: check prerequisites, then build each
    /// installable in turn and push its closure, reporting build time, push time, paths and bytes; a log
    /// per run in $XDG_CACHE_HOME/larder/builds. Exit 1 if any installable failed.
    Build(build_cmd::BuildArgs),
    /// Pull, like a `cachix-pull` script: check the cache is configured and reachable (if it
    /// is down, warn and build locally), report what will be fetched and what built, realise the installables, report what was fetched and
    /// built, then run CMD (after `--`).
    Pull(build_cmd::PullArgs),
    /// Move a deployment's data to other backends, verifiably: metadata with `--from
    /// sqlite://DATA/larder.db --to postgres://…` (one transaction; row counts and content
    /// checksums of every table compared before committing; the target must be empty unless
    /// --overwrite; stop the servers using either database first), objects with `--from
    /// file://DATA/store --to s3://BUCKET?endpoint=…&region=…` (each verified by its SHA-256,
    /// resumable: objects already there are skipped).
    Migrate(migrate_cmd::MigrateArgs),
    /// Check every stored NAR against its metadata; --repair unpublishes what cannot be served.
    ///
    /// Runs on the server machine against the server's own database and object store (the
    /// configuration `larder serve` would use: --config, LARDER_* variables, --data), directory
    /// or S3, SQLite or PostgreSQL, and may run while the server serves.
    ///
    /// For every NAR that a path, a pending upload or a recently evicted path uses, each chunk
    /// is read where it is stored (its own object, or its range of a pack): the object must
    /// exist and hold the chunk's recorded bytes, which must hash to its name (a `.zst` chunk
    /// decompressed); bytes of a pack no chunk uses are not read. The chunks together must
    /// have the narinfo's FileHash and FileSize
    /// and decompress to its NarHash and NarSize, as Nix checks after a download. Damaged NARs
    /// are printed on stdout with the paths that use them; progress goes to stderr.
    ///
    /// Exit status: 0 when everything is sound, 1 when something is damaged (even once
    /// repaired, so a scheduled run alerts), 2 on a usage error.
    ///
    /// The run is resumable: a checkpoint in DATA/fsck-checkpoint.json records the NARs checked
    /// so far (and the damage found), so running the same command again after an interruption
    /// continues where it stopped. It is removed when a run finishes; --restart starts over.
    ///
    /// Examples:
    ///   larder fsck                      # every cache; report only
    ///   larder fsck --cache main         # one cache
    ///   larder fsck --repair             # and unpublish every path that cannot be served
    #[command(verbatim_doc_comment)]
    Fsck(fsck_cmd::FsckArgs),
    /// Print shell completions, e.g. `larder completions bash > /etc/bash_completion.d/larder`.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write man pages into DIR: larder.1 and one page per verb and nested verb
    /// (larder-push.1, larder-cache.1, larder-cache-create.1, …), made from this help.
    ///
    /// For packagers: a package's install step (a Nix package's postInstall) runs `larder
    /// manpages $out/share/man/man1` next to `larder completions bash|zsh|fish`. DIR is
    /// created if missing.
    Manpages {
        /// Directory to write the pages into, e.g. $out/share/man/man1
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_serve = matches!(cli.command, Command::Serve(_));
    output::init_tracing(is_serve);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Login(args) => admin::login(args).await,
            Command::Authtoken(args) => admin::authtoken(args).await,
            Command::Cache(cmd) => admin::cache(cmd).await,
            Command::Token(cmd) => admin::token(cmd).await,
            Command::Push(args) => push_cmd::push(args).await,
            Command::GenerateKeypair(args) => push_cmd::generate_keypair(args).await,
            Command::Use(args) => use_cmd::use_cache(args).await,
            Command::Remove(args) => use_cmd::remove_cache(args).await,
            Command::Doctor(args) => doctor::doctor(args).await,
            Command::Ls(args) => contents_cmd::ls(args).await,
            Command::PathInfo(args) => contents_cmd::path_info(args).await,
            Command::Path(cmd) => contents_cmd::path(cmd).await,
            Command::Gc(args) => retention_cmd::gc(args).await,
            Command::Pin(args) => retention_cmd::pin(args).await,
            Command::Daemon(cmd) => daemon::daemon(cmd).await,
            Command::WatchStore(args) => watch_cmd::watch_store(args).await,
            Command::WatchExec(args) => watch_cmd::watch_exec(args).await,
            Command::Import(args) => import_cmd::import(args).await,
            Command::Build(args) => build_cmd::build(args).await,
            Command::Pull(args) => build_cmd::pull(args).await,
            Command::Migrate(args) => migrate_cmd::migrate(args).await,
            Command::Fsck(args) => fsck_cmd::fsck(args).await,
            Command::Completions { shell } => {
                let mut cmd = Cli::command();
                clap_complete::generate(shell, &mut cmd, "larder", &mut std::io::stdout());
                Ok(())
            }
            Command::Manpages { dir } => {
                let written = manpages::write_all(Cli::command(), &dir)?;
                eprintln!(
                    "wrote {} to {}",
                    output::count(written.len() as u64, "man page"),
                    dir.display()
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => output::report_error(&e),
    }
}
