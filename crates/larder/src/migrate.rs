//! The object half of `larder migrate` (the command is in migrate_cmd.rs). Objects are copied
//! with [`larder_store::objects::migrate::copy_all`]: each one verified against the SHA-256 its key names, objects already at the destination skipped, so an
//! interrupted run is simply started again. S3 credentials come from `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` (one key for both ends when both are S3).

use anyhow::Context;
use larder_store::objects::migrate::copy_all;
use larder_store::{ObjectStore, OpenOptions, S3Credentials, Secret};

use crate::env;
use crate::output::{fail_with_hint, human_size, print, print_json};

/// `/DIR` → `file:///DIR`.
fn object_url(url: &str) -> String {
    if url.starts_with('/') {
        format!("file://{url}")
    } else {
        url.to_owned()
    }
}

fn s3_credentials() -> Option<S3Credentials> {
    Some(S3Credentials {
        access_key_id: env::var("AWS_ACCESS_KEY_ID")?,
        secret_access_key: Secret::new(env::var("AWS_SECRET_ACCESS_KEY")?),
    })
}

/// Copy every object of `from` to `to` (object store URLs), verified and resumable.
pub(crate) async fn migrate_objects(from: &str, to: &str, json: bool) -> anyhow::Result<()> {
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
    let (from, to) = (open(from, "from")?, open(to, "to")?);
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
    if json {
        /// `larder migrate objects --json`.
        #[derive(serde::Serialize)]
        struct Copied {
            kind: &'static str,
            copied: u64,
            bytes: u64,
            skipped: u64,
            seconds: f64,
        }
        print_json(&Copied {
            kind: "objects",
            copied: report.copied,
            bytes: report.bytes,
            skipped: report.skipped,
            seconds: start.elapsed().as_secs_f64(),
        })
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
    fn plain_paths_are_file_urls() {
        assert_eq!(object_url("/d/store"), "file:///d/store");
        assert_eq!(object_url("s3://b?region=r"), "s3://b?region=r");
    }
}
