//! Retention: an eviction's report (`POST /caches/{c}/gc[?dry_run=true]`) and pins
//! (`/caches/{c}/pins`), which keep a path's closure from eviction.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why a path is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Its closure recency is the oldest of what remains.
    LeastRecentlyUsed,
    /// It references a path that goes (`because_of`), so it must go with it.
    ReferencesEvicted,
}

/// One path in an eviction, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Victim {
    pub store_path: String,
    /// Stored (compressed) bytes freed.
    pub file_size: i64,
    /// Last use of the path or of anything referencing it (upload time if never used).
    pub last_used_at: i64,
    pub reason: Reason,
    /// For `references-evicted`: the least recently used path it depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because_of: Option<String>,
}

/// What an eviction did or, in a dry run, would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GcReport {
    pub cache: String,
    pub dry_run: bool,
    pub max_size: Option<i64>,
    pub size_before: i64,
    pub size_after: i64,
    pub paths_before: usize,
    pub paths_after: usize,
    /// Paths in the closures of pins (never evicted).
    pub pinned_paths: usize,
    pub evicted: Vec<Victim>,
    /// Set when the cache is (still) over 85 % of its limit, or cannot get under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// How long the revisions of a pin are kept (the newest revision is always kept): `forever`,
/// or `{"revisions": N}` / `{"days": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Keep {
    Forever,
    /// The newest N revisions.
    Revisions(i64),
    /// Revisions younger than N days.
    Days(i64),
}

impl std::fmt::Display for Keep {
    /// `forever`, `3 revisions`, `1 day`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, noun) = match self {
            Keep::Forever => return f.write_str("forever"),
            Keep::Revisions(n) => (n, "revision"),
            Keep::Days(n) => (n, "day"),
        };
        write!(f, "{n} {noun}{}", if *n == 1 { "" } else { "s" })
    }
}

/// `POST /caches/{cache}/pins`: pin a path of the cache (the same name again makes a new
/// revision). At most one of `keep_revisions`, `keep_days`, `keep_forever` (the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    #[schema(pattern = "^[A-Za-z0-9._+-]{1,100}$")]
    pub name: String,
    /// Absolute store path or basename.
    pub store_path: String,
    pub keep_revisions: Option<i64>,
    pub keep_days: Option<i64>,
    #[serde(default)]
    pub keep_forever: bool,
}

/// A pin revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Pin {
    pub name: String,
    pub revision: i64,
    pub store_path: String,
    pub keep: Keep,
    pub created_at: i64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn keep_reads_as_written_and_as_words() {
        for (k, json, words) in [
            (Keep::Forever, r#""forever""#, "forever"),
            (Keep::Revisions(1), r#"{"revisions":1}"#, "1 revision"),
            (Keep::Days(30), r#"{"days":30}"#, "30 days"),
        ] {
            assert_eq!(serde_json::to_string(&k).unwrap(), json);
            assert_eq!(serde_json::from_str::<Keep>(json).unwrap(), k);
            assert_eq!(k.to_string(), words);
        }
    }

    #[test]
    fn a_report_without_a_field_fails_to_decode() {
        let r = r#"{"cache":"c","dry_run":true,"max_size":null,"size_before":1,"size_after":0,
            "paths_before":1,"paths_after":0,"pinned_paths":0,"evicted":[{"store_path":"/nix/store/x",
            "file_size":1,"last_used_at":0,"reason":"references-evicted","because_of":"y"}]}"#;
        let report: GcReport = serde_json::from_str(r).unwrap();
        assert_eq!(report.evicted[0].reason, Reason::ReferencesEvicted);
        let renamed = r.replace("size_before", "bytes_before");
        assert!(serde_json::from_str::<GcReport>(&renamed).is_err());
    }
}
