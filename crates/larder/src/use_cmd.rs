//! `larder use CACHE` and `larder remove CACHE`: make Nix substitute from a cache, and undo it.
//!
//! Modes (see the README's "Using a cache"):
//! - `user-nixconf`: the user's nix.conf — `LARDER_NIX_CONF`, else the first file of
//!   `NIX_USER_CONF_FILES` (the one Nix gives the last word), else
//!   `$XDG_CONFIG_HOME/nix/nix.conf`. Default for everyone but root.
//! - `root-nixconf`: `$NIX_CONF_DIR/nix.conf` (`/etc/nix/nix.conf`), read by the daemon too.
//!   Default for root, except on NixOS.
//! - `nixos`: a module file `<folder>/larder-<cache>.nix` to import. Default for root on NixOS,
//!   where `/etc/nix/nix.conf` is generated and read-only.
//! - `print`: the nix.conf lines, one-shot `--option` flags and a flake `nixConfig` block.
//!
//! A private cache also gets a netrc entry (`machine HOST login larder password TOKEN`, mode
//! 0600) in the file nix.conf's `netrc-file` names, or in larder's own netrc which `netrc-file`
//! is then pointed at. The edits themselves live in [`larder_ops::nixconf`] and
//! [`larder_ops::use_cache`]; this module decides what to do and says what it did.

use std::path::{Path, PathBuf};

use anyhow::Context;
use larder_client::api::{CacheInfo, Perm};
use larder_client::ApiClient;

use larder_ops::nixconf::{self, same_value, NixConf, Trust};
use larder_ops::use_cache::{
    self, file_mode, read_existing, writable_target, write_atomic, CacheEntry, NetrcRemoved, Scope,
};

use crate::client_config::target;
use crate::output::{fail_with_hint, print};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The user's nix.conf ($XDG_CONFIG_HOME/nix/nix.conf).
    UserNixconf,
    /// The system nix.conf (/etc/nix/nix.conf), which the daemon reads too.
    RootNixconf,
    /// A NixOS module file to import from configuration.nix.
    Nixos,
    /// Print the lines; write nothing.
    Print,
}

#[derive(clap::Args)]
pub struct UseArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Where to configure the cache. [default: user-nixconf; as root root-nixconf, or nixos on
    /// NixOS]
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Folder for the NixOS module file (`--mode nixos`).
    #[arg(long, default_value = "/etc/nixos")]
    nixos_folder: PathBuf,
}

/// The modes of [`Mode`] that write something (what `remove` can undo).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WrittenMode {
    /// The user's nix.conf ($XDG_CONFIG_HOME/nix/nix.conf).
    UserNixconf,
    /// The system nix.conf (/etc/nix/nix.conf), which the daemon reads too.
    RootNixconf,
    /// A NixOS module file to import from configuration.nix.
    Nixos,
}

impl From<WrittenMode> for Mode {
    fn from(m: WrittenMode) -> Mode {
        match m {
            WrittenMode::UserNixconf => Mode::UserNixconf,
            WrittenMode::RootNixconf => Mode::RootNixconf,
            WrittenMode::Nixos => Mode::Nixos,
        }
    }
}

#[derive(clap::Args)]
pub struct RemoveArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Where `use` configured the cache. [default: wherever `use` could have: the user's
    /// nix.conf, the system's, and a NixOS module file]
    #[arg(long, value_enum)]
    mode: Option<WrittenMode>,
    /// Folder of the NixOS module file (`--mode nixos`).
    #[arg(long, default_value = "/etc/nixos")]
    nixos_folder: PathBuf,
}

fn is_root() -> bool {
    nixconf::current_uid() == 0
}

/// The default mode: what works without sudo for a user, and what the daemon reads for root.
fn default_mode() -> Mode {
    if !is_root() {
        Mode::UserNixconf
    } else if Path::new("/etc/NIXOS").exists() {
        Mode::Nixos
    } else {
        Mode::RootNixconf
    }
}

impl Mode {
    /// Whose configuration the mode edits.
    fn scope(self) -> Scope {
        match self {
            Mode::UserNixconf => Scope::User,
            _ => Scope::System,
        }
    }
}

/// The nix.conf a mode edits.
fn conf_path(mode: Mode) -> anyhow::Result<PathBuf> {
    Ok(use_cache::conf_path(
        mode.scope(),
        crate::env::var(crate::env::NIX_CONF),
    )?)
}

/// The netrc larder writes when nix.conf names none.
fn default_netrc(mode: Mode) -> anyhow::Result<PathBuf> {
    Ok(use_cache::default_netrc(
        mode.scope(),
        crate::env::var(crate::env::NETRC),
    )?)
}

/// What `use` and `remove` need to know about the cache.
struct Facts {
    arg: String,
    cache: String,
    url: String,
    key: Option<String>,
    private: bool,
    host: String,
    client: ApiClient,
}

impl Facts {
    fn from_info(arg: &str, client: ApiClient, info: CacheInfo) -> anyhow::Result<Facts> {
        let host = nixconf::url_host(&info.url)
            .ok_or_else(|| anyhow::anyhow!("the server gave an invalid cache URL {:?}", info.url))?
            .to_owned();
        Ok(Facts {
            arg: arg.to_owned(),
            cache: info.name,
            url: info.url,
            key: info.public_key.filter(|k| !k.is_empty()),
            private: info.private,
            host,
            client,
        })
    }
}

impl Facts {
    fn entry(&self) -> CacheEntry<'_> {
        CacheEntry {
            arg: &self.arg,
            cache: &self.cache,
            url: &self.url,
            key: self.key.as_deref(),
            host: &self.host,
            private: self.private,
        }
    }
}

async fn facts(arg: &str) -> anyhow::Result<Facts> {
    let t = target(arg)?;
    let info = crate::client_config::require_cache(&t).await?;
    Facts::from_info(arg, t.client, info)
}

pub async fn use_cache(args: UseArgs) -> anyhow::Result<()> {
    let f = facts(&args.cache).await?;
    if f.key.is_none() {
        eprintln!(
            "warning: cache {} has no public key registered; Nix will refuse its paths \
             (require-sigs)\nhint: `larder generate-keypair {}`",
            f.cache, f.arg
        );
    }
    let mode = args.mode.unwrap_or_else(default_mode);
    if f.private && mode != Mode::Print {
        check_pull(&f).await?;
    }
    match mode {
        Mode::Print => print(&use_cache::print_lines(&f.entry())),
        Mode::Nixos => use_nixos(&f, &args.nixos_folder),
        Mode::UserNixconf | Mode::RootNixconf => {
            use_nixconf(&f, mode)?;
            if mode == Mode::UserNixconf {
                warn_if_untrusted(&f);
            }
            Ok(())
        }
    }
}

/// A private cache needs a token Nix can send; warn when it cannot read the cache.
async fn check_pull(f: &Facts) -> anyhow::Result<()> {
    if f.client.token().is_none() {
        return Err(fail_with_hint(
            format!("cache {} is private and no token is configured", f.cache),
            "run `larder login URL TOKEN` or set LARDER_TOKEN to a token with pull on it",
        ));
    }
    match f.client.whoami().await {
        Ok(w) => {
            if !w.grants(Perm::Pull, &f.cache) {
                eprintln!(
                    "warning: the current token cannot pull from {}; Nix will get 401/403\n\
                     hint: ask an admin for `larder token create --perm pull --cache {}`",
                    f.cache, f.cache
                );
            } else if w.grants(Perm::Push, &f.cache) {
                // The netrc holds the token in clear for Nix: it should only read.
                let can = if w.grants(Perm::Admin, &f.cache) {
                    "administer"
                } else {
                    "push to"
                };
                eprintln!(
                    "warning: the token written for Nix can also {can} {}; whoever reads the \
                     netrc file can too\n\
                     hint: a pull-only token is enough: `larder token create --perm pull --cache \
                     {}`, then `LARDER_TOKEN=<it> larder use {}`",
                    if w.server_admin && w.caches.is_none() {
                        "every cache"
                    } else {
                        &f.cache
                    },
                    f.cache,
                    f.arg
                );
            }
        }
        Err(e) => eprintln!("warning: cannot check the token: {e}"),
    }
    Ok(())
}

fn use_nixconf(f: &Facts, mode: Mode) -> anyhow::Result<()> {
    let path = conf_path(mode)?;
    let real = writable_target(&path)?;
    let original = read_existing(&real)?.unwrap_or_default();
    let mut conf = NixConf::parse(&original);
    let dir = real.parent().map(Path::to_path_buf).unwrap_or_default();
    let has = |conf: &NixConf, key: &str, value: &str| {
        conf.list(key, vec![], &dir, &nixconf::read_optional)
            .iter()
            .any(|v| same_value(v, value))
    };
    let present = has(&conf, "substituters", &f.url);
    conf.add_value("substituters", &f.url, present);
    if let Some(key) = &f.key {
        let present = has(&conf, "trusted-public-keys", key);
        conf.add_value("trusted-public-keys", key, present);
    }
    if f.private {
        let netrc = match conf.single("netrc-file") {
            Some(p) => PathBuf::from(p),
            None => {
                let p = default_netrc(mode)?;
                conf.set_if_absent("netrc-file", &p.to_string_lossy());
                p
            }
        };
        write_netrc_entry(f, &netrc)?;
    }
    let text = conf.render();
    if text == original {
        eprintln!("{} is already configured in {}", f.url, path.display());
    } else {
        write_atomic(&real, &text, file_mode(&real))?;
        eprintln!(
            "configured {} (key {}) in {}",
            f.url,
            f.key.as_deref().unwrap_or("none"),
            path.display()
        );
    }
    Ok(())
}

fn write_netrc_entry(f: &Facts, netrc: &Path) -> anyhow::Result<()> {
    let token = f.client.token().unwrap_or_default();
    if use_cache::write_netrc_entry(netrc, &f.host, token)? {
        eprintln!(
            "wrote the token for {} to {} (mode 0600)",
            f.host,
            netrc.display()
        );
    }
    Ok(())
}

fn warn_if_untrusted(f: &Facts) {
    let trust = nixconf::decide_trust(&nixconf::probe_trust(), &f.url, f.key.as_deref());
    if trust.works() {
        return;
    }
    match trust {
        Trust::Untrusted { user } => eprintln!(
            "warning: Nix runs through nix-daemon here and {user:?} is not in `trusted-users`, \
             so the daemon ignores the substituter and key of your nix.conf\n{}",
            nixconf::untrusted_advice(&f.arg, &f.url, f.key.as_deref())
        ),
        Trust::TrustedSubstituter { key_trusted: false } => eprintln!(
            "warning: {} is in the daemon's `trusted-substituters`, but its key is not in the \
             daemon's `trusted-public-keys`, which only an admin can change\n{}",
            f.url,
            nixconf::untrusted_advice(&f.arg, &f.url, f.key.as_deref())
        ),
        _ => {}
    }
}

fn module_path(f: &Facts, folder: &Path) -> PathBuf {
    folder.join(format!("larder-{}.nix", f.cache))
}

fn use_nixos(f: &Facts, folder: &Path) -> anyhow::Result<()> {
    let path = module_path(f, folder);
    let netrc = if f.private {
        let netrc = default_netrc(Mode::Nixos)?;
        write_netrc_entry(f, &netrc)?;
        Some(netrc)
    } else {
        None
    };
    let body = use_cache::nixos_module(&f.entry(), netrc.as_deref());
    if read_existing(&path)?.as_deref() == Some(body.as_str()) {
        eprintln!("{} is already up to date", path.display());
    } else {
        write_atomic(&path, &body, 0o644)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "add it to `imports` in configuration.nix, then run `sudo nixos-rebuild switch`:\n  \
         imports = [ ./larder-{}.nix ];",
        f.cache
    );
    Ok(())
}

pub async fn remove_cache(args: RemoveArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    // The server may be gone or the cache deleted: removal must still work from the URL.
    let f = match t.client.cache_info(&t.cache).await {
        Ok(info) => Facts::from_info(&args.cache, t.client, info)?,
        Err(e) => {
            let url = format!("{}/{}", t.client.base_url(), t.cache);
            eprintln!(
                "warning: cannot look up cache {:?} ({e}); removing {url} but not its key",
                t.cache
            );
            Facts {
                arg: args.cache.clone(),
                host: nixconf::url_host(&url).unwrap_or_default().to_owned(),
                cache: t.cache,
                url,
                key: None,
                private: true,
                client: t.client,
            }
        }
    };
    let Some(mode) = args.mode else {
        return remove_everywhere(&f, &args.nixos_folder);
    };
    match Mode::from(mode) {
        Mode::Nixos => remove_nixos(&f, &args.nixos_folder),
        mode => remove_nixconf(&f, mode).map(drop),
    }
}

/// `remove` without `--mode`: undo `use` wherever it could have written, whatever the mode it
/// ran with: the user's nix.conf, the system's, a NixOS module file. A file that does not
/// name the cache is left alone (and not reported).
fn remove_everywhere(f: &Facts, nixos_folder: &Path) -> anyhow::Result<()> {
    let mut looked = Vec::new();
    let mut removed = false;
    for mode in [Mode::UserNixconf, Mode::RootNixconf] {
        let path = conf_path(mode)?;
        if looked.contains(&path) {
            continue;
        }
        looked.push(path.clone());
        let names_it = nixconf::read_optional(&path).is_some_and(|text| text.contains(&f.url));
        if names_it {
            removed |= remove_nixconf(f, mode).map_err(|e| {
                if mode == Mode::RootNixconf && !is_root() {
                    e.context(format!(
                        "{} configures {}: run `sudo larder remove {}`",
                        path.display(),
                        f.url,
                        f.arg
                    ))
                } else {
                    e
                }
            })?;
        }
    }
    let module = module_path(f, nixos_folder);
    if module.exists() {
        remove_nixos(f, nixos_folder)?;
        removed = true;
    }
    looked.push(module);
    if !removed {
        eprintln!(
            "{} is not configured in {}; nothing changed",
            f.url,
            looked
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Take the cache out of the nix.conf of `mode`; whether the file changed.
fn remove_nixconf(f: &Facts, mode: Mode) -> anyhow::Result<bool> {
    let path = conf_path(mode)?;
    let real = writable_target(&path)?;
    let Some(original) = read_existing(&real)? else {
        eprintln!("{} does not exist; nothing to remove", path.display());
        return Ok(false);
    };
    let mut conf = NixConf::parse(&original);
    let removed = conf.remove_value("substituters", &f.url);
    if let Some(key) = &f.key {
        conf.remove_value("trusted-public-keys", key);
    }
    let dir = real.parent().map(Path::to_path_buf).unwrap_or_default();
    let remaining = conf.list("substituters", vec![], &dir, &nixconf::read_optional);
    if remaining.iter().any(|v| same_value(v, &f.url)) {
        eprintln!(
            "warning: {} is still configured by a file {} includes ({}); edit it by hand",
            f.url,
            path.display(),
            conf.includes(&dir)
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // The netrc entry serves every cache of the host: keep it while one is still configured,
    // and leave it alone when this file did not configure the cache (another mode did).
    let host_still_used = remaining
        .iter()
        .any(|v| nixconf::url_host(v) == Some(f.host.as_str()));
    if removed && !host_still_used {
        let netrc = match conf.single("netrc-file") {
            Some(p) => PathBuf::from(p),
            None => default_netrc(mode)?,
        };
        if remove_netrc_entry(f, &netrc)? {
            conf.remove_setting("netrc-file", &netrc.to_string_lossy());
        }
    }
    let text = conf.render();
    if text == original {
        eprintln!(
            "{} is not configured in {}; nothing changed",
            f.url,
            path.display()
        );
        Ok(false)
    } else {
        write_atomic(&real, &text, file_mode(&real))?;
        eprintln!("removed {} from {}", f.url, path.display());
        Ok(true)
    }
}

/// Remove larder's entry for the host; returns true when the netrc file was left empty and
/// deleted.
fn remove_netrc_entry(f: &Facts, netrc: &Path) -> anyhow::Result<bool> {
    match use_cache::remove_netrc_entry(netrc, &f.host)? {
        NetrcRemoved::Nothing => Ok(false),
        NetrcRemoved::File => {
            eprintln!(
                "removed {} (it held only {}'s token)",
                netrc.display(),
                f.host
            );
            Ok(true)
        }
        NetrcRemoved::Entry => {
            eprintln!("removed the token for {} from {}", f.host, netrc.display());
            Ok(false)
        }
    }
}

fn remove_nixos(f: &Facts, folder: &Path) -> anyhow::Result<()> {
    let path = module_path(f, folder);
    match std::fs::remove_file(&path) {
        Ok(()) => eprintln!(
            "removed {}; take `./larder-{}.nix` out of `imports`, then run `sudo nixos-rebuild \
             switch`",
            path.display(),
            f.cache
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{} does not exist; nothing to remove", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
    // Another larder module of the same host still needs the netrc entry.
    let host_still_used = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("larder-") && n.ends_with(".nix")
        })
        .filter_map(|e| nixconf::read_optional(&e.path()))
        .any(|text| text.contains(&format!("://{}", f.host)));
    if !host_still_used {
        remove_netrc_entry(f, &default_netrc(Mode::Nixos)?)?;
    }
    Ok(())
}
