//! `larder gc CACHE [--dry-run]` and `larder pin …`: the retention verbs, thin clients of
//! `POST /api/v1/caches/{c}/gc` and `/api/v1/caches/{c}/pins` (see the README's Retention).

use anyhow::Context;
use larder_client::api::{PinRequest, Reason};

use crate::client_config::target;
use crate::output::{fail_with_hint, human_size, print, print_json};

#[derive(clap::Args)]
pub struct GcArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Only list what would be evicted, in order, and why.
    #[arg(long)]
    dry_run: bool,
    /// Print the result (or, with --dry-run, the plan) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PinArgs {
    #[command(subcommand)]
    command: Option<PinCommand>,
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE) (a cache named `list` or `delete` must be written SERVER:CACHE,
    /// e.g. `default:list`, to tell it from the subcommands)
    #[arg(required = true)]
    cache: Option<String>,
    /// Pin name; pinning the same name again makes a new revision.
    #[arg(required = true)]
    name: Option<String>,
    /// The store path (or a symlink to it, such as ./result); it must be in the cache.
    #[arg(required = true)]
    path: Option<String>,
    /// Keep the newest N revisions of this pin.
    #[arg(long, conflicts_with_all = ["keep_days", "keep_forever"])]
    keep_revisions: Option<i64>,
    /// Keep the revisions of the last N days (the newest is always kept).
    #[arg(long, conflicts_with = "keep_forever")]
    keep_days: Option<i64>,
    /// Keep every revision (the default).
    #[arg(long)]
    keep_forever: bool,
    /// Print the pin and its kept revisions as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum PinCommand {
    /// List the pins of a cache and their kept revisions.
    List {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// Print the pins as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a pin (every revision); its closure may then be evicted.
    Delete {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// The pin's name (from `pin list`).
        name: String,
    },
}

pub(crate) fn when(t: i64) -> String {
    let d = larder_store::now_unix() - t;
    if d < 120 {
        format!("{d}s ago")
    } else if d < 7200 {
        format!("{}m ago", d / 60)
    } else if d < 2 * 86400 {
        format!("{}h ago", d / 3600)
    } else {
        format!("{}d ago", d / 86400)
    }
}

pub async fn gc(args: GcArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let report = t
        .client
        .gc(&t.cache, args.dry_run)
        .await
        .with_context(|| format!("cannot collect garbage in cache {:?}", t.cache))?;
    if args.json {
        return print_json(&report);
    }
    let mut out = String::new();
    for v in &report.evicted {
        let why = match (v.reason, &v.because_of) {
            (Reason::ReferencesEvicted, because_of) => {
                format!("references {}", because_of.as_deref().unwrap_or("?"))
            }
            (Reason::LeastRecentlyUsed, _) => format!(
                "least recently used (closure last used {})",
                when(v.last_used_at)
            ),
        };
        out.push_str(&format!(
            "{:>10}  {}  {why}\n",
            human_size(v.file_size),
            v.store_path,
        ));
    }
    print(&out)?;
    let limit = match report.max_size {
        Some(m) => human_size(m),
        None => "none".into(),
    };
    eprintln!(
        "{} {} path(s); size {} -> {} (limit {limit}; {} pinned path(s))",
        if args.dry_run {
            "would evict"
        } else {
            "evicted"
        },
        report.evicted.len(),
        human_size(report.size_before),
        human_size(report.size_after),
        report.pinned_paths,
    );
    if let Some(w) = &report.warning {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// The store path named by `arg`: a store path (or a path inside one), or a symlink to one.
pub(crate) fn store_path_arg(arg: &str) -> anyhow::Result<String> {
    let store = larder_nix::store_path::STORE_DIR;
    let abs = if arg.starts_with(&format!("{store}/")) {
        arg.to_owned()
    } else {
        std::fs::canonicalize(arg)
            .with_context(|| format!("cannot resolve {arg:?}"))?
            .to_string_lossy()
            .into_owned()
    };
    let rest = abs.strip_prefix(&format!("{store}/")).ok_or_else(|| {
        fail_with_hint(
            format!("{arg:?} is not in the Nix store"),
            "give a store path such as /nix/store/…-hello-2.12 or a ./result symlink",
        )
    })?;
    let base = rest.split('/').next().unwrap_or(rest);
    Ok(format!("{store}/{base}"))
}

pub async fn pin(args: PinArgs) -> anyhow::Result<()> {
    match args.command {
        Some(PinCommand::List { cache, json }) => {
            let t = target(&cache)?;
            let pins = t
                .client
                .list_pins(&t.cache)
                .await
                .with_context(|| format!("cannot list the pins of cache {:?}", t.cache))?;
            if json {
                return print_json(&pins);
            }
            if pins.is_empty() {
                eprintln!("no pins in cache {:?}", t.cache);
                return Ok(());
            }
            let mut out = format!(
                "{:<24} {:>4} {:<14} {:<10} {}\n",
                "NAME", "REV", "KEEP", "CREATED", "STORE PATH"
            );
            for p in &pins {
                out.push_str(&format!(
                    "{:<24} {:>4} {:<14} {:<10} {}\n",
                    p.name,
                    p.revision,
                    p.keep.to_string(),
                    when(p.created_at),
                    p.store_path,
                ));
            }
            print(&out)
        }
        Some(PinCommand::Delete { cache, name }) => {
            let t = target(&cache)?;
            t.client
                .delete_pin(&t.cache, &name)
                .await
                .with_context(|| format!("cannot delete pin {name:?} of cache {:?}", t.cache))?;
            eprintln!("deleted pin {name:?} of cache {:?}", t.cache);
            Ok(())
        }
        None => {
            let (Some(cache), Some(name), Some(path)) = (args.cache, args.name, args.path) else {
                return Err(fail_with_hint(
                    "missing arguments",
                    "usage: larder pin CACHE NAME PATH (or `larder pin list CACHE`)",
                ));
            };
            let t = target(&cache)?;
            let store_path = store_path_arg(&path)?;
            let pin = t
                .client
                .create_pin(
                    &t.cache,
                    &PinRequest {
                        name: name.clone(),
                        store_path: store_path.clone(),
                        keep_revisions: args.keep_revisions,
                        keep_days: args.keep_days,
                        keep_forever: args.keep_forever,
                    },
                )
                .await
                .with_context(|| format!("cannot pin {store_path} in cache {:?}", t.cache))?;
            if args.json {
                return print_json(&pin);
            }
            eprintln!(
                "pinned {store_path} as {name:?} revision {} in cache {:?}",
                pin.revision, t.cache
            );
            Ok(())
        }
    }
}
