//! `larder import CACHE SOURCE [PATH…]`: copy another Nix binary cache into a cache.
//!
//! The source's narinfos give the closure; the push pipeline does the rest (parallel uploads,
//! publishing in dependency order, retries, multi-part for large NARs, progress, `--json`),
//! with NARs read from the source by [`larder_client::import::Source`], which checks each one
//! against its narinfo while streaming. Paths the cache already has are skipped (one bulk
//! query), so an interrupted import resumes where it stopped.

use std::sync::Arc;

use anyhow::Context;
use larder_client::import::Source;
use larder_client::push::{PushOptions, SourceRef};
use larder_nix::store_path::StorePath;

use crate::client_config::target;
use crate::output::fail_with_hint;
use larder_ops::plan::{ImportPlanner, UploadSettings};

use crate::push_cmd::{run_rounds, upload_settings, Run};

#[derive(clap::Args)]
pub struct ImportArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE) to import into.
    cache: String,
    /// The binary cache to copy: `file:///dir` (e.g. made by `nix copy --to file:///dir`) or
    /// `http(s)://host/cache`.
    source: String,
    /// Import only these store paths and their closures. A `file://` source imports everything
    /// it has when none is given; an HTTP cache cannot be listed, so it needs them (or pipe
    /// them on standard input, e.g. `nix path-info -r --store URL ATTR`).
    paths: Vec<String>,
    /// Bearer token for a private HTTP source.
    #[arg(
        long,
        env = "LARDER_SOURCE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    source_token: Option<String>,
    /// Uploads in parallel.
    #[arg(short = 'j', long, default_value_t = 8)]
    jobs: usize,
    /// Compression of the imported NARs in CACHE (they are recompressed).
    /// [default: the cache's preferred compression]
    #[arg(long, value_parser = ["zstd", "xz", "none"])]
    compression: Option<String>,
    /// Compression level. [default: 3 for zstd, 6 for xz]
    #[arg(long)]
    level: Option<i32>,
    /// Show what would be imported and its size, without importing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object per line (events), the last one the summary.
    #[arg(long)]
    json: bool,
}

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let UploadSettings {
        compression,
        level,
        signing_key,
        ..
    } = upload_settings(&t, &args.cache, args.compression.as_deref(), args.level).await?;
    let source = Source::open(&args.source, args.source_token.clone())?;
    source.check().await?;
    let mut raw = args.paths.clone();
    if raw.is_empty() && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        raw = crate::push_cmd::read_stdin_paths()?;
    }
    let roots: Vec<StorePath> = if raw.is_empty() {
        source.list().await?.ok_or_else(|| {
            fail_with_hint(
                format!("{} is an HTTP cache, which cannot be listed", args.source),
                "name the store paths to import (their closures come along), e.g. \
                 `larder import CACHE URL /nix/store/…-hello`",
            )
        })?
    } else {
        raw.iter()
            .map(|a| {
                StorePath::from_absolute(a.trim_end_matches('/'))
                    .or_else(|_| StorePath::from_basename(a))
                    // A local symlink to the path (./result), as push and pin take.
                    .or_else(|_| {
                        crate::retention_cmd::store_path_arg(a)
                            .and_then(|p| Ok(StorePath::from_absolute(&p)?))
                    })
                    .with_context(|| format!("{a:?} is not a store path"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if !args.json {
        eprintln!(
            "reading the closure of {} from {}",
            crate::output::count(roots.len() as u64, "path"),
            source.url()
        );
    }
    let infos = source.closure(&roots).await?;
    let opts = PushOptions {
        jobs: args.jobs.max(1),
        compression,
        level,
        closure: true,
        include_upstream: true,
        signing_key,
        source: Some(SourceRef(Arc::new(source))),
        ..PushOptions::default()
    };
    let mut planner = ImportPlanner {
        client: &t.client,
        cache: &t.cache,
        infos,
    };
    let how = Run {
        json: args.json,
        dry_run: args.dry_run,
        verb: "import",
    };
    run_rounds(&t, &opts, &how, &mut planner).await
}
