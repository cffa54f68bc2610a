//! `GET /caches/{cache}/stats?days=N`: a cache's daily downloads and size.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One day of a cache's series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DayStats {
    /// The UTC day, `YYYY-MM-DD`.
    #[schema(pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    pub date: String,
    /// narinfo_requests + nar_requests.
    #[schema(minimum = 0)]
    pub requests: i64,
    /// Narinfos served.
    #[schema(minimum = 0)]
    pub narinfo_requests: i64,
    /// NARs served (a range request counts once).
    #[schema(minimum = 0)]
    pub nar_requests: i64,
    /// narinfo_bytes + nar_bytes.
    #[schema(minimum = 0)]
    pub bytes: i64,
    /// Body bytes of the narinfos served.
    #[schema(minimum = 0)]
    pub narinfo_bytes: i64,
    /// Body bytes of the NARs served: the file, or the range asked for (with presigned
    /// redirects, what the client was sent to fetch).
    #[schema(minimum = 0)]
    pub nar_bytes: i64,
    /// Stored (compressed) bytes at the end of the day (today: now); a day without a sample
    /// has the size of the day before; null when none was recorded yet (before the cache
    /// existed, or before the server recorded statistics).
    #[schema(minimum = 0)]
    pub size: Option<i64>,
}

/// A cache's series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheStats {
    pub cache: String,
    /// Storage limit in bytes; null: none.
    pub max_size: Option<i64>,
    /// Every day asked for, oldest first; the last is today (UTC).
    pub days: Vec<DayStats>,
}
