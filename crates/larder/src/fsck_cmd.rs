//! `larder fsck`: read every stored NAR back and check it against its metadata, on the
//! server's own database and object store (the configuration `larder serve` reads: the same
//! `--config` file, `LARDER_*` variables and `--data`). The check is
//! [`larder_store::fsck`]; this verb adds the checkpoint file, progress on stderr, the report
//! on stdout and `--repair` ([`larder_store::Metadata::unpublish_damaged`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use larder_server::config::{Config, Settings};
use larder_store::fsck::{self, Checkpoint, DamagedNar};
use larder_store::meta::{chunk_object_key, Unpublished};
use larder_store::{Metadata, ObjectStore};

use crate::env;
use crate::output::{self, fail_with_hint, human_size};

/// The checkpoint's file name in the data directory.
const CHECKPOINT_FILE: &str = "fsck-checkpoint.json";
/// How often progress is printed and the checkpoint saved.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The arguments of `larder fsck` (its help is on `Command::Fsck` in main.rs).
#[derive(clap::Args)]
pub struct FsckArgs {
    /// The server's TOML config file (as for `larder serve`).
    #[arg(long, env = "LARDER_SERVE_CONFIG")]
    config: Option<PathBuf>,
    /// The server's data directory. [default: $XDG_DATA_HOME/larder]
    #[arg(long = "data", env = "LARDER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The metadata database, if not the config's: sqlite://PATH or postgres://…
    #[arg(long, env = "LARDER_DATABASE")]
    database: Option<String>,
    /// The object store, if not the config's: file:///DIR or s3://BUCKET?endpoint=…&region=…
    #[arg(long, env = "LARDER_STORAGE")]
    storage: Option<String>,
    /// Check only this cache's NARs (and repair only its paths).
    #[arg(long, value_name = "NAME")]
    cache: Option<String>,
    /// Unpublish every path whose NAR is damaged, and every path of the same cache that
    /// depends on one (Nix could not substitute it), so that the cache never serves a broken
    /// path: Nix then misses and builds or fetches it elsewhere, and pushing it again stores
    /// it anew. Chunk objects holding wrong bytes are deleted, so that the next upload
    /// rewrites them. Printed, one line per path, with the reason.
    #[arg(long)]
    repair: bool,
    /// Start over, ignoring (and replacing) the checkpoint of an interrupted run.
    #[arg(long)]
    restart: bool,
}

pub async fn fsck(args: FsckArgs) -> anyhow::Result<()> {
    let config = resolve(&args)?;
    let meta = Metadata::connect(&config.database).await.with_context(|| {
        format!(
            "cannot open the database {}",
            larder_store::meta::redact_url(&config.database)
        )
    })?;
    let objects = ObjectStore::open(
        &config.storage,
        larder_store::OpenOptions {
            staging_dir: config.data_dir.join("tmp"),
            s3_credentials: config.s3_credentials.clone(),
        },
    )
    .context("cannot open the object store")?;
    objects
        .ping()
        .await
        .context("the object store does not answer")?;
    let scope = match &args.cache {
        None => None,
        Some(name) => Some(
            meta.get_cache(name)
                .await?
                .ok_or_else(|| {
                    fail_with_hint(
                        format!("no cache named {name:?}"),
                        "`larder cache list` names them",
                    )
                })?
                .id,
        ),
    };
    let path = config.data_dir.join(CHECKPOINT_FILE);
    if args.restart {
        Checkpoint::remove(&path)?;
    }
    let mut state = match Checkpoint::load(&path)? {
        Some(saved) if saved.scope == args.cache => {
            eprintln!(
                "larder: fsck: continuing the interrupted run ({} NARs checked, {} damaged); \
                 --restart starts over",
                saved.checked,
                saved.damaged.len()
            );
            saved
        }
        other => {
            if let Some(saved) = other {
                eprintln!(
                    "larder: fsck: the interrupted run checked {}; starting over for {}",
                    scope_text(saved.scope.as_deref()),
                    scope_text(args.cache.as_deref())
                );
            }
            Checkpoint {
                scope: args.cache.clone(),
                started_at: larder_store::now_unix(),
                ..Checkpoint::default()
            }
        }
    };
    let (total, total_bytes) = meta.fsck_totals(scope).await?;
    eprintln!(
        "larder: fsck: checking {} NARs ({}) in {}",
        total,
        human_size(total_bytes),
        scope_text(args.cache.as_deref())
    );
    let start = Instant::now();
    let mut last = Instant::now();
    let result = fsck::run(&objects, &meta, scope, &mut state, |state, damaged| {
        if let Some(d) = damaged {
            report_damaged(d);
        }
        if damaged.is_some() || last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            state.save(&path)?;
            eprintln!(
                "larder: fsck: {}/{} NARs checked ({} of {}), {} damaged",
                state.checked,
                total,
                human_size(state.bytes as i64),
                human_size(total_bytes),
                state.damaged.len()
            );
        }
        Ok(())
    })
    .await;
    if let Err(e) = result {
        state.save(&path)?;
        return Err(fail_with_hint(
            format!(
                "fsck stopped after {} NARs: {}",
                state.checked,
                error_chain(&e)
            ),
            "run the same command again: it continues where it stopped",
        ));
    }
    eprintln!(
        "larder: fsck: {} NARs ({}) checked in {:.1} s",
        state.checked,
        human_size(state.bytes as i64),
        start.elapsed().as_secs_f64()
    );
    if state.damaged.is_empty() {
        Checkpoint::remove(&path)?;
        return output::print("no damage found\n");
    }
    if args.repair {
        repair(&meta, &objects, scope, &state.damaged).await?;
    }
    Checkpoint::remove(&path)?;
    let damaged = state.damaged.len();
    let msg = format!(
        "{} damaged{}",
        output::count(damaged as u64, "NAR"),
        if args.repair {
            "; their paths and the paths depending on them are unpublished"
        } else {
            ""
        }
    );
    if args.repair {
        Err(fail_with_hint(
            msg,
            "push the paths again from a machine that has them; the cache serves nothing broken meanwhile",
        ))
    } else {
        Err(fail_with_hint(
            msg,
            "run `larder fsck --repair` to unpublish them (Nix then builds or fetches them \
             elsewhere), then push them again",
        ))
    }
}

/// The settings `larder serve` would resolve from these arguments.
fn resolve(args: &FsckArgs) -> anyhow::Result<Config> {
    let file = args.config.as_deref().map(Settings::load).transpose()?;
    let flags = Settings {
        data_dir: args.data_dir.clone(),
        database: args.database.clone(),
        storage: args.storage.clone(),
        ..Settings::default()
    };
    let settings = Settings::layered(flags, file, env::var);
    let default_data = match &settings.data_dir {
        Some(dir) => dir.clone(),
        None => larder_ops::xdg::larder_dir(larder_ops::xdg::Base::Data)
            .map_err(|e| anyhow::anyhow!("{e}; pass --data DIR"))?,
    };
    Ok(Config::resolve(settings, default_data)?)
}

fn scope_text(cache: Option<&str>) -> String {
    match cache {
        Some(c) => format!("cache {c:?}"),
        None => "every cache".to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One line per path using the NAR (or one for the NAR, if no path does), then its damage.
fn report_damaged(d: &DamagedNar) {
    let mut text = String::new();
    if d.paths.is_empty() {
        text.push_str(&format!(
            "damaged: NAR {} (no published path; a pending upload or an evicted path's)\n",
            d.nar_hash
        ));
    }
    for p in &d.paths {
        text.push_str(&format!("damaged: {}/{}\n", p.cache, p.basename));
    }
    for damage in &d.damage {
        text.push_str(&format!("  {damage}\n"));
    }
    // A closed stdout must not stop the check.
    let _ = output::print(&text);
}

async fn repair(
    meta: &Metadata,
    objects: &ObjectStore,
    scope: Option<i64>,
    damaged: &[DamagedNar],
) -> anyhow::Result<()> {
    let ids: Vec<i64> = damaged.iter().map(|d| d.nar_id).collect();
    let unpublished = meta
        .unpublish_damaged(scope, &ids)
        .await
        .context("cannot unpublish the damaged paths; nothing was changed")?;
    let mut text = String::new();
    for u in &unpublished {
        let p = u.path();
        let why = match u {
            Unpublished::Damaged { .. } => "its NAR is damaged".to_owned(),
            Unpublished::Dependant { needs, .. } => {
                format!("it references {needs}, which is unpublished")
            }
        };
        text.push_str(&format!(
            "unpublished: {}/{} ({why})\n",
            p.cache, p.basename
        ));
    }
    let mut corrupt: Vec<&str> = damaged
        .iter()
        .flat_map(|d| d.damage.iter().filter_map(|x| x.corrupt_chunk()))
        .collect();
    corrupt.sort_unstable();
    corrupt.dedup();
    let mut lost: Vec<String> = damaged
        .iter()
        .flat_map(|d| d.damage.iter().flat_map(|x| x.missing_chunks()))
        .map(str::to_owned)
        .collect();
    lost.sort_unstable();
    lost.dedup();
    for chunk in corrupt {
        let packed = meta
            .located_chunks(&[chunk.to_owned()])
            .await?
            .get(chunk)
            .is_some_and(|r| r.pack.is_some());
        // Forgotten: the next upload of the chunk stores it again.
        meta.unlocate_chunk(chunk).await?;
        if packed {
            // Its pack holds other chunks, and stays.
            text.push_str(&format!(
                "forgot corrupt chunk {chunk} (stored in a pack)\n"
            ));
            continue;
        }
        objects
            .delete(&chunk_object_key(chunk))
            .await
            .with_context(|| format!("cannot delete the corrupt chunk {chunk}"))?;
        text.push_str(&format!("deleted corrupt chunk {chunk}\n"));
    }
    // A missing chunk is forgotten too, so that its next upload stores it again.
    for chunk in &lost {
        meta.unlocate_chunk(chunk).await?;
    }
    output::print(&text)?;
    if !unpublished.is_empty() {
        // A running server keeps serving a narinfo it read for up to this long; until then Nix
        // would still find the paths, and `nix copy --to` skip them as present.
        let ttl = larder_server::hot::NARINFO_TTL;
        eprintln!(
            "waiting {} s for running servers to forget the unpublished paths",
            ttl.as_secs()
        );
        tokio::time::sleep(ttl).await;
    }
    Ok(())
}
