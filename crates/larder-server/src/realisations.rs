//! Realisations of content-addressed derivations in the Nix binary cache protocol:
//! `/<cache>/realisations/<id>.doi`, where `<id>` is `sha256:<drv hash>!<output>`.
//!
//! Nix 2.8 (`experimental-features = ca-derivations`) looks a derivation output up with `GET`
//! (`BinaryCacheStore::queryRealisationUncached`: a 404 or 403 is "not there") before it
//! builds, and its uploader (`nix copy --to http://…`, `BinaryCacheStore::registerDrvOutput`)
//! writes one with `PUT`, after the paths and after the realisations it depends on; `larder
//! push` writes the local store's realisations of the paths it pushes the same way. See Nix's
//! src/libstore/binary-cache-store.cc and realisation.cc.
//!
//! Every stored realisation is checked ([`put_realisation`]): the body's `id` is the file
//! name's, its out path is a published path of the cache, each dependent realisation exists
//! in the cache with the out path it names, and it is signed by the cache's key: a managed
//! cache signs it (refusing a signature in its key's name that does not verify: a document
//! changed after it was signed), a client-signed cache requires the key owner's signature.
//! Nix 2.8 does not check a realisation's signatures when it substitutes (see the README), so
//! this is what keeps a cache from serving a derivation output mapped to a path its owner
//! did not sign. Reads and writes go through the `access::CacheAccess` extractor, so a private cache's
//! realisations are as hidden as its narinfos.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use larder_nix::realisation::{DrvOutput, Realisation};
use larder_store::meta::{PutRealisation, RealisationRow};

use crate::access::{CacheAccess, Pull, Push};
use crate::error::{ApiError, Rejection};
use crate::ingest::truncate;
use crate::publish::managed_key;
use crate::routes::Routes;
use crate::AppState;

/// Largest `.doi` accepted by `PUT` (a realisation with thousands of dependencies fits).
const MAX_DOI_BYTES: usize = 1 << 20;

pub fn routes() -> Routes {
    Routes::new()
        .get("/{cache}/realisations/{file}", get_realisation)
        .put("/{cache}/realisations/{file}", put_realisation)
}

/// The output id of a `<id>.doi` file name.
fn doi_id(file: &str) -> Result<DrvOutput, ApiError> {
    let id = file
        .strip_suffix(".doi")
        .ok_or_else(|| ApiError::not_found(format!("no such file {:?}", truncate(file))))?;
    DrvOutput::parse(id).map_err(|e| ApiError::bad(format!("invalid realisation name: {e}")))
}

async fn get_realisation(
    State(state): State<AppState>,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Pull>,
) -> Result<Response, ApiError> {
    let id = doi_id(&file)?;
    let row = state
        .meta
        .get_realisation(cache.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such realisation in this cache"))?;
    let json = render(&row);
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(json),
    )
        .into_response())
}

/// A stored realisation as served: what Nix's uploader would have written.
pub fn render(row: &RealisationRow) -> String {
    let mut r = Realisation {
        id: row.drv_output.clone(),
        out_path: row.out_path.clone(),
        signatures: Vec::new(),
        dependent_realisations: row.deps.iter().cloned().collect(),
    };
    for sig in &row.sigs {
        r.add_signature(sig.clone());
    }
    r.to_json()
}

async fn put_realisation(
    State(state): State<AppState>,
    Path((_name, file)): Path<(String, String)>,
    CacheAccess { cache, .. }: CacheAccess<Push>,
    body: Body,
) -> Result<Response, ApiError> {
    let id = doi_id(&file)?;
    let bytes = axum::body::to_bytes(body, MAX_DOI_BYTES)
        .await
        .map_err(|e| ApiError::bad(format!("cannot read realisation: {e}")))?;
    let mut r = Realisation::parse(&bytes)
        .map_err(|e| ApiError::bad(format!("invalid realisation: {e}")))?;
    if r.id != id {
        return Err(ApiError::bad(format!(
            "realisation id {} does not match its file name {}",
            r.id,
            truncate(&file)
        )));
    }
    sign_or_check(&cache, &mut r)?;
    let row = RealisationRow {
        drv_output: r.id.clone(),
        out_path: r.out_path.clone(),
        sigs: r.signatures.clone(),
        deps: r
            .dependent_realisations
            .iter()
            .map(|(d, p)| (d.clone(), p.clone()))
            .collect(),
    };
    match state.meta.put_realisation(cache.id, &row).await? {
        PutRealisation::Created | PutRealisation::AlreadyPresent => {
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        PutRealisation::Conflict { existing_out_path } => Err(ApiError::Conflict(format!(
            "{} is already realised in cache {:?} as {existing_out_path}; an existing \
             realisation is never changed",
            r.id, cache.name
        ))),
        PutRealisation::MissingPath => Err(ApiError::rejected(
            Rejection::MissingReferences,
            format!(
                "realisation {} names {}, which is not in cache {:?} (push the path first)",
                r.id, r.out_path, cache.name
            ),
        )),
        PutRealisation::MissingDependencies(missing) => Err(ApiError::rejected(
            Rejection::MissingReferences,
            format!(
                "realisation {} depends on {} realisation(s) not in cache {:?} with the out \
                 path it names (push them first): {}",
                r.id,
                missing.len(),
                cache.name,
                missing
                    .iter()
                    .take(5)
                    .map(DrvOutput::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )),
    }
}

/// Sign `r` with a managed cache's key, or check a client-signed cache's signature.
fn sign_or_check(
    cache: &larder_store::meta::CacheRow,
    r: &mut Realisation,
) -> Result<(), ApiError> {
    match managed_key(cache) {
        Some(key) => {
            // A signature in our key's name that does not verify: the document was changed
            // after the cache signed it.
            let ours = key.verifying_key();
            let fingerprint = r.fingerprint();
            if r.signatures
                .iter()
                .any(|s| s.key_name() == key.name() && !ours.verify(&fingerprint, s))
            {
                return Err(ApiError::rejected(
                    Rejection::Invalid,
                    format!(
                        "realisation {} carries a signature by {} that does not match its \
                         content (changed after it was signed?)",
                        r.id,
                        key.name()
                    ),
                ));
            }
            r.signatures.retain(|s| s.key_name() != key.name());
            r.sign(key);
            Ok(())
        }
        None => {
            let pk = cache.public_key.as_ref().ok_or_else(|| {
                ApiError::Conflict(format!(
                    "cache {:?} has no signing key registered (hint: larder generate-keypair {})",
                    cache.name, cache.name
                ))
            })?;
            if r.verify(pk) {
                return Ok(());
            }
            Err(ApiError::rejected(
                Rejection::BadSignature,
                format!(
                    "realisation {} must be signed by the cache's key {} (hint: set \
                     LARDER_SIGNING_KEY)",
                    r.id,
                    pk.name()
                ),
            ))
        }
    }
}
