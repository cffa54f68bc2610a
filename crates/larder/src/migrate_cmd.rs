//! `larder migrate --from URL --to URL`: move a deployment's data to other backends, e.g. the
//! embedded default's SQLite database to PostgreSQL when scaling out.
//!
//! The URL scheme says what is moved: `sqlite://` and `postgres://` name metadata databases;
//! `file://`, an absolute path and `s3://` name object stores. Both ends must be of the same
//! kind. Metadata is copied in one target transaction and verified before it commits (see
//! `larder_store::meta::transfer`); objects one by one, each verified against the SHA-256 its
//! key names, skipping those already there (see `migrate.rs`).

use anyhow::Context;
use larder_store::meta::transfer::{self, CopyReport, TransferError};
use larder_store::meta::{redact_url, Engine};
use larder_store::Metadata;

use crate::output::{self, fail_with_hint};

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Where the data is now: a metadata database (sqlite://PATH, postgres://USER:PW@HOST/DB)
    /// or an object store (file:///DIR, /DIR, s3://BUCKET?…).
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    from: Endpoint,
    /// Where it goes, of the same kind as --from. A database must be empty unless --overwrite;
    /// an object store keeps what it has (objects are named by their hash).
    #[arg(long, value_name = "URL", value_parser = parse_endpoint)]
    to: Endpoint,
    /// Replace whatever the target holds (in the same transaction as the copy).
    #[arg(long)]
    overwrite: bool,
    /// Print the verification report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// One end of a migration: what kind of data, and where.
#[derive(Debug, Clone)]
enum Endpoint {
    Metadata(String),
    Objects(String),
}

fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    if Engine::of_url(url).is_some() {
        Ok(Endpoint::Metadata(url.to_owned()))
    } else if url.starts_with("file://") || url.starts_with("s3://") || url.starts_with('/') {
        Ok(Endpoint::Objects(url.to_owned()))
    } else {
        Err(
            "expected a metadata database (sqlite://PATH, postgres://…) or an object store \
             (file:///DIR, /DIR, s3://BUCKET?…)"
                .into(),
        )
    }
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    match (&args.from, &args.to) {
        (Endpoint::Metadata(from), Endpoint::Metadata(to)) => {
            metadata(from, to, args.overwrite, args.json).await
        }
        (Endpoint::Objects(from), Endpoint::Objects(to)) => {
            crate::migrate::migrate_objects(from, to, args.json).await
        }
        (from, _) => clap::Error::raw(
            clap::error::ErrorKind::ArgumentConflict,
            match from {
                Endpoint::Metadata(_) => {
                    "--from names a metadata database but --to an object \
                                          store; migrate metadata and objects separately\n"
                }
                Endpoint::Objects(_) => {
                    "--from names an object store but --to a metadata \
                                         database; migrate metadata and objects separately\n"
                }
            },
        )
        .exit(),
    }
}

async fn metadata(from: &str, to: &str, overwrite: bool, json: bool) -> anyhow::Result<()> {
    let (from_shown, to_shown) = (redact_url(from), redact_url(to));
    if from == to {
        return Err(fail_with_hint(
            format!("--from and --to are the same database ({from_shown})"),
            "give the new database as --to",
        ));
    }
    if let Some(path) = from.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).exists() {
            return Err(fail_with_hint(
                format!("no database at {path}"),
                "the embedded default keeps it in DATA/larder.db (e.g. \
                 sqlite://$HOME/.local/share/larder/larder.db)",
            ));
        }
    }
    if !json {
        eprintln!("larder: copying metadata {from_shown} -> {to_shown}");
    }
    // Connecting migrates both schemas to this larder's version, as `larder serve` would.
    let source = Metadata::connect(from)
        .await
        .with_context(|| format!("cannot open the source database {from_shown}"))?;
    let target = Metadata::connect(to)
        .await
        .with_context(|| format!("cannot open the target database {to_shown}"))?;
    let report = match transfer::copy(&source, &target, overwrite).await {
        Ok(r) => r,
        Err(e @ TransferError::TargetNotEmpty { .. }) => {
            return Err(fail_with_hint(
                format!("{e}; nothing was copied"),
                "migrate into an empty database, or pass --overwrite to replace its contents",
            ))
        }
        Err(e) => return Err(e).context("the copy failed; the target is unchanged"),
    };
    source.close().await;
    target.close().await;
    if json {
        /// `larder migrate metadata --json`.
        #[derive(serde::Serialize)]
        struct Copied<'a> {
            kind: &'static str,
            from: &'a str,
            to: &'a str,
            verified: bool,
            schema_version: i64,
            overwritten: bool,
            tables: &'a [transfer::TableSum],
        }
        output::print_json(&Copied {
            kind: "metadata",
            from: &from_shown,
            to: &to_shown,
            verified: true,
            schema_version: report.schema_version,
            overwritten: report.overwritten,
            tables: &report.tables,
        })
    } else {
        output::print(&human(&report))
    }
}

fn human(report: &CopyReport) -> String {
    let mut out = format!("{:<14} {:>10}  digest\n", "table", "rows");
    for t in &report.tables {
        out.push_str(&format!(
            "{:<14} {:>10}  {}\n",
            t.table,
            t.rows,
            &t.digest[..16]
        ));
    }
    let rows: i64 = report.tables.iter().map(|t| t.rows).sum();
    out.push_str(&format!(
        "verified: {} tables, {rows} rows, identical on both sides (schema version {}){}; committed\n",
        report.tables.len(),
        report.schema_version,
        if report.overwritten {
            ", the target's previous contents replaced"
        } else {
            ""
        }
    ));
    out
}
