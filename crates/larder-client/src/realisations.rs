//! Pushing the realisations of content-addressed derivations along with their paths.
//!
//! The push plan reads the local store's realisations of the paths it considers
//! ([`crate::local_store::LocalStore::realisations_of`]); once the paths are in the cache, each
//! realisation is written as Nix's uploader writes it, `PUT /<cache>/realisations/<id>.doi`
//! (see `BinaryCacheStore::registerDrvOutput` in Nix 2.8), dependencies first, signed with the
//! push's signing key when there is one (client-signed caches). The server checks each one
//! against the cache's paths and realisations and signs it itself on a managed cache.

use std::collections::HashSet;

use larder_nix::realisation::{DrvOutput, Realisation};
use larder_nix::signing::SigningKey;
use larder_nix::store_path::StorePath;

use crate::api::ApiClient;
use crate::upload::{error_line, Failure, PushError};

/// The realisations (dependencies first) that can be in the cache once `in_cache` is: those
/// whose out path is there and whose dependencies are kept too.
pub fn pushable(realisations: Vec<Realisation>, in_cache: &HashSet<StorePath>) -> Vec<Realisation> {
    let mut kept: HashSet<DrvOutput> = HashSet::new();
    realisations
        .into_iter()
        .filter(|r| {
            let ok = in_cache.contains(&r.out_path)
                && r.dependent_realisations.keys().all(|d| kept.contains(d));
            if ok {
                kept.insert(r.id.clone());
            }
            ok
        })
        .collect()
}

/// Upload `realisations` in order, skipping those whose out path (absolute) failed to push
/// and those depending on a skipped or failed one. Returns what failed.
pub async fn push(
    client: &ApiClient,
    cache: &str,
    realisations: &[Realisation],
    signing_key: Option<&SigningKey>,
    failed_paths: &HashSet<String>,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let mut stored: HashSet<&DrvOutput> = HashSet::new();
    for r in realisations {
        if failed_paths.contains(&r.out_path.to_absolute())
            || !r.dependent_realisations.keys().all(|d| stored.contains(d))
        {
            continue;
        }
        let mut r2 = r.clone();
        if let Some(key) = signing_key {
            r2.sign(key);
        }
        let rb = client
            .request(
                reqwest::Method::PUT,
                &format!("/{cache}/realisations/{}.doi", r.id),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(r2.to_json());
        match client.send(rb).await {
            Ok(_) => {
                stored.insert(&r.id);
            }
            Err(e) => failures.push(Failure {
                path: format!("realisation {} ({})", r.id, r.out_path),
                error: error_line(&PushError::Client(e)),
            }),
        }
    }
    failures
}
