//! What `larder pull` asks of the cache before Nix realises anything: whether Nix itself, with
//! the credentials it will send, may read the cache, and which of the paths Nix plans to fetch
//! the cache has (and how big they are).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use larder_client::{ApiClient, ClientError};
use larder_nix::narinfo::NarInfo;
use larder_nix::store_path::StorePath;

use crate::nix::NixSettings;
use crate::nixconf;

/// Narinfo lookups in flight at once.
const LOOKUPS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "Nix would be refused by {url} ({status}): {why}, so every path would look missing and \
         be built locally"
    )]
    NixRefused {
        url: String,
        status: u16,
        why: String,
        /// How the user named the cache, for the hint.
        cache_arg: String,
    },
    #[error("narinfo lookup")]
    Lookup(#[source] ClientError),
    #[error("cannot make an HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("narinfo lookup")]
    Join(#[source] tokio::task::JoinError),
}

impl PullError {
    /// The fix to try.
    pub fn hint(&self) -> Option<String> {
        match self {
            PullError::NixRefused { cache_arg, .. } => Some(format!(
                "run `larder use {cache_arg}` with a token that can pull it (`larder login URL \
                 TOKEN` first, or LARDER_TOKEN); `larder doctor {cache_arg}` checks the result"
            )),
            _ => None,
        }
    }
}

/// Ask the cache at `url` for a narinfo with the credentials Nix will send (its `netrc-file`
/// entry for the host, if any), before a plan that would otherwise report a private cache Nix
/// cannot read as a cache miss: an absent path is 404 to whoever may read the cache, 401/403
/// to anyone else. `cache_arg` is how the user named the cache.
pub async fn nix_can_read(
    settings: &NixSettings,
    url: &str,
    cache: &str,
    cache_arg: &str,
) -> Result<(), PullError> {
    let netrc = settings.netrc_file();
    let host = nixconf::url_host(url).unwrap_or_default();
    let entry = nixconf::read_optional(Path::new(&netrc))
        .and_then(|text| nixconf::netrc_lookup(&text, host));
    let http = larder_client::api::http_builder()
        .map_err(PullError::Lookup)?
        .build()
        .map_err(PullError::Http)?;
    let mut probe = http
        .get(format!("{url}/{}.narinfo", "0".repeat(32)))
        .timeout(Duration::from_secs(10));
    if let Some(e) = &entry {
        probe = probe.basic_auth(e.login.clone().unwrap_or_default(), e.password.clone());
    }
    let Ok(answer) = probe.send().await else {
        return Ok(()); // Reachability was checked just before; Nix will say what it sees.
    };
    let status = answer.status().as_u16();
    if !matches!(status, 401 | 403) {
        return Ok(());
    }
    let why = match &entry {
        None => format!("Nix's netrc-file {netrc} has no entry for {host}"),
        Some(_) => {
            format!("the token in Nix's netrc-file {netrc} for {host} cannot read cache {cache}")
        }
    };
    Err(PullError::NixRefused {
        url: url.to_owned(),
        status,
        why,
        cache_arg: cache_arg.to_owned(),
    })
}

/// A path's sizes in the cache: (FileSize, NarSize).
pub type Sizes = HashMap<String, (u64, u64)>;

/// Which of `paths` the cache has, with their sizes: narinfo lookups, [`LOOKUPS`] at a time.
pub async fn in_cache(
    client: &ApiClient,
    cache: &str,
    paths: &[String],
) -> Result<Sizes, PullError> {
    let mut found = HashMap::new();
    let mut todo = paths.iter();
    let mut set = tokio::task::JoinSet::new();
    loop {
        while set.len() < LOOKUPS {
            let Some(p) = todo.next() else { break };
            let Ok(sp) = StorePath::from_absolute(p) else {
                continue;
            };
            let (client, cache, p) = (client.clone(), cache.to_owned(), p.clone());
            set.spawn(async move {
                let text = client.narinfo(&cache, &sp.hash_part()).await;
                (p, text)
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (p, text) = r.map_err(PullError::Join)?;
        let text = text.map_err(PullError::Lookup)?;
        if let Some(info) = text.and_then(|t| NarInfo::parse(&t).ok()) {
            found.insert(p, (info.file_size.unwrap_or(info.nar_size), info.nar_size));
        }
    }
    Ok(found)
}

/// How many of `paths` are in `sizes`, and their total (FileSize, NarSize).
pub fn sum_sizes<'a>(sizes: &Sizes, paths: impl Iterator<Item = &'a String>) -> (usize, u64, u64) {
    paths
        .filter_map(|p| sizes.get(p))
        .fold((0, 0, 0), |(n, f, s), (file, nar)| {
            (n + 1, f + file, s + nar)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up_over_the_paths_the_cache_has() {
        let sizes: Sizes = [("/a".to_owned(), (10, 30)), ("/b".to_owned(), (5, 7))]
            .into_iter()
            .collect();
        let paths = ["/a".to_owned(), "/b".to_owned(), "/c".to_owned()];
        assert_eq!(sum_sizes(&sizes, paths.iter()), (2, 15, 37));
        assert_eq!(sum_sizes(&sizes, [].iter()), (0, 0, 0));
    }
}
