//! `larder migrate --from URL --to URL`: move an embedded deployment to the scaled-out one.
//! The URLs' schemes say what moves: `sqlite://` / `postgres://` are metadata databases,
//! `file://DIR` (or a plain absolute path) and `s3://…` are object stores.
//!
//! Objects are copied with [`larder_store::objects::migrate::copy_all`]: each one verified
//! against the SHA-256 its key names, objects already at the destination skipped, so an
//! interrupted run is simply started again. S3 credentials come from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` (one key for both ends when both are S3).

use anyhow::Context;
use larder_store::objects::migrate::copy_all;
use larder_store::{ObjectStore, OpenOptions, S3Credentials, Secret};

use crate::env;
use crate::output::{fail_with_hint, human_size, print, print_json};

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// What to copy from: sqlite://PATH or postgres://… (metadata), file:///DIR, /DIR or
    /// s3://BUCKET?endpoint=…&region=… (objects; the embedded store is file://DATA/store).
    #[arg(long)]
    from: String,
    /// Where to copy to: a backend of the same kind as --from.
    #[arg(long)]
    to: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Metadata,
    Objects,
}

fn kind_of(url: &str) -> Option<Kind> {
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Some(Kind::Metadata)
    } else if url.starts_with("file://") || url.starts_with("s3://") || url.starts_with('/') {
        Some(Kind::Objects)
    } else {
        None
    }
}

/// `/DIR` → `file:///DIR`.
fn object_url(url: &str) -> String {
    if url.starts_with('/') {
        format!("file://{url}")
    } else {
        url.to_owned()
    }
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let from = kind_of(&args.from).ok_or_else(|| unknown(&args.from))?;
    let to = kind_of(&args.to).ok_or_else(|| unknown(&args.to))?;
    if from != to {
        return Err(fail_with_hint(
            "--from and --to are different kinds of backend",
            "migrate metadata (sqlite:// → postgres://) and objects (file:// → s3://) in two runs",
        ));
    }
    match from {
        Kind::Objects => migrate_objects(&args).await,
        Kind::Metadata => Err(fail_with_hint(
            "metadata migration is not part of this build",
            "migrate the objects here, the metadata with a build that has it",
        )),
    }
}

fn unknown(url: &str) -> anyhow::Error {
    let shown: String = url
        .split(['?', '@'])
        .next()
        .unwrap_or("")
        .chars()
        .take(60)
        .collect();
    fail_with_hint(
        format!("unsupported backend URL {shown:?}"),
        "use sqlite://PATH, postgres://…, file:///DIR or s3://BUCKET?endpoint=…&region=…",
    )
}

fn s3_credentials() -> Option<S3Credentials> {
    Some(S3Credentials {
        access_key_id: env::var("AWS_ACCESS_KEY_ID")?,
        secret_access_key: Secret::new(env::var("AWS_SECRET_ACCESS_KEY")?),
    })
}

async fn migrate_objects(args: &MigrateArgs) -> anyhow::Result<()> {
    let staging = tempfile::tempdir().context("cannot create a staging directory")?;
    let open = |url: &str, sub: &str| {
        ObjectStore::open(
            &object_url(url),
            OpenOptions {
                staging_dir: staging.path().join(sub),
                s3_credentials: s3_credentials(),
            },
        )
        .map_err(|e| {
            fail_with_hint(
                e,
                "check the URL and, for s3://, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        })
    };
    let (from, to) = (open(&args.from, "from")?, open(&args.to, "to")?);
    for (store, which) in [(&from, "--from"), (&to, "--to")] {
        store
            .ping()
            .await
            .with_context(|| format!("the {which} object store does not answer"))?;
    }
    let start = std::time::Instant::now();
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let report = copy_all(&from, &to, |r| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed().as_secs() >= 2 {
            *last = std::time::Instant::now();
            eprintln!(
                "larder: {} objects copied ({}), {} already there",
                r.copied,
                human_size(r.bytes as i64),
                r.skipped
            );
        }
    })
    .await
    .map_err(|e| {
        fail_with_hint(
            e,
            "run the same command again: objects already copied are skipped",
        )
    })?;
    if args.json {
        print_json(&serde_json::json!({
            "kind": "objects",
            "copied": report.copied,
            "bytes": report.bytes,
            "skipped": report.skipped,
            "seconds": start.elapsed().as_secs_f64(),
        }))
    } else {
        print(&format!(
            "copied {} objects ({}), verified by SHA-256; {} were already there\n",
            report.copied,
            human_size(report.bytes as i64),
            report.skipped
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind_of("sqlite:///d/larder.db"), Some(Kind::Metadata));
        assert_eq!(kind_of("postgres://u@h/db"), Some(Kind::Metadata));
        assert_eq!(kind_of("file:///d/store"), Some(Kind::Objects));
        assert_eq!(kind_of("/d/store"), Some(Kind::Objects));
        assert_eq!(kind_of("s3://b?endpoint=http://h:1"), Some(Kind::Objects));
        assert_eq!(kind_of("ftp://x"), None);
        assert_eq!(object_url("/d/store"), "file:///d/store");
    }
}
