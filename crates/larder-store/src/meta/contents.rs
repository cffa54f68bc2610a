//! Browsing a cache's contents: the paginated, searchable path list, one path's usage times,
//! its referrers (direct and transitive, through `path_refs`) and the pins whose closures hold
//! it.
//!
//! Pagination is by keyset, not offset: a page is "the next `limit` paths after (name, hash)",
//! so paths published or deleted between two page requests never shift a page: no path that
//! stays is listed twice or skipped. The order is the store path's name, then its hash part,
//! which index `paths_by_name` (migration 3) serves. Transitive walks use `WITH RECURSIVE`,
//! which SQLite and PostgreSQL both accept in the same spelling.

use larder_nix::compression::Compression;
use sqlx::FromRow;

use super::columns::Stored;
use super::{decoding_with_nar, placeholders, Metadata, Result, IN_BATCH};

/// A path as the contents list shows it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct PathEntry {
    pub hash: String,
    pub name: String,
    /// Its NAR's row: a NAR fetch is a use of the paths that have it.
    pub nar_id: i64,
    pub nar_size: i64,
    /// Stored (compressed) bytes.
    pub file_size: i64,
    #[sqlx(try_from = "Stored<Compression>")]
    pub compression: Compression,
    /// Upload (publication) time.
    pub created_at: i64,
    /// Last narinfo or NAR fetch as the database has it, which may be behind the uses a server
    /// holds in memory (a minute in a cache with a size limit; larder-server's
    /// `retention::Usage` merges them).
    pub last_used_at: Option<i64>,
    /// The upstream cache it was fetched from (pull-through); `None`: pushed.
    pub upstream: Option<String>,
}

impl PathEntry {
    /// `<hash>-<name>`.
    pub fn basename(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }
}

/// The position after which a page starts: the last entry of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathCursor {
    pub name: String,
    pub hash: String,
}

const ENTRY_COLS: &str = "p.hash, p.name, p.nar_id, n.nar_size, n.file_size, n.compression, \
                          p.created_at, (SELECT u.last_used_at FROM path_uses u \
                          WHERE u.path_id = p.id) AS last_used_at, p.upstream";

/// A `LIKE` pattern matching `text` anywhere, case-insensitively once both sides are lowered;
/// `\` escapes the pattern's own wildcards (`_` is common in store path names).
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// The recursive walk from `$2` up through everything that references it (itself included).
const REFERRERS_CTE: &str = "WITH RECURSIVE up(h) AS (SELECT CAST($2 AS TEXT) UNION \
     SELECT r.referrer FROM path_refs r JOIN up ON r.ref_hash = up.h WHERE r.cache_id = $1)";

impl Metadata {
    /// Up to `limit` paths of a cache after `after`, in (name, hash) order, whose basename
    /// `<hash>-<name>` contains `query` (case-insensitive).
    pub async fn list_paths(
        &self,
        cache_id: i64,
        query: Option<&str>,
        after: Option<&PathCursor>,
        limit: i64,
    ) -> Result<Vec<PathEntry>> {
        let mut sql = format!(
            "SELECT {ENTRY_COLS} FROM paths p JOIN nars n ON n.id = p.nar_id WHERE p.cache_id = $1"
        );
        let mut next = 2;
        if query.is_some() {
            sql.push_str(&format!(
                " AND LOWER(p.hash || '-' || p.name) LIKE ${next} ESCAPE '\\'"
            ));
            next += 1;
        }
        if after.is_some() {
            sql.push_str(&format!(
                " AND (p.name > ${a} OR (p.name = ${a} AND p.hash > ${b}))",
                a = next,
                b = next + 1
            ));
            next += 2;
        }
        sql.push_str(&format!(" ORDER BY p.name, p.hash LIMIT ${next}"));
        let mut q = sqlx::query_as(&sql).bind(cache_id);
        if let Some(text) = query {
            q = q.bind(like_pattern(text));
        }
        if let Some(c) = after {
            q = q.bind(&c.name).bind(&c.hash);
        }
        q.bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding_with_nar("paths"))
    }

    /// How many paths of a cache match `query` (all of them without one).
    pub async fn count_paths(&self, cache_id: i64, query: Option<&str>) -> Result<i64> {
        let n = match query {
            None => {
                sqlx::query_scalar("SELECT COUNT(*) FROM paths WHERE cache_id = $1")
                    .bind(cache_id)
                    .fetch_one(&self.pool)
                    .await?
            }
            Some(text) => {
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM paths WHERE cache_id = $1 \
                     AND LOWER(hash || '-' || name) LIKE $2 ESCAPE '\\'",
                )
                .bind(cache_id)
                .bind(like_pattern(text))
                .fetch_one(&self.pool)
                .await?
            }
        };
        Ok(n)
    }

    /// One path of a cache as the contents list shows it.
    pub async fn path_entry(&self, cache_id: i64, hash: &str) -> Result<Option<PathEntry>> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM paths p JOIN nars n ON n.id = p.nar_id \
             WHERE p.cache_id = $1 AND p.hash = $2"
        );
        sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding_with_nar("paths"))
    }

    /// The paths of a cache that reference `hash` directly (at most `limit`, by name), and
    /// how many there are.
    pub async fn direct_referrers(
        &self,
        cache_id: i64,
        hash: &str,
        limit: i64,
    ) -> Result<(Vec<PathEntry>, i64)> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM path_refs r JOIN paths p ON p.cache_id = r.cache_id \
             AND p.hash = r.referrer JOIN nars n ON n.id = p.nar_id \
             WHERE r.cache_id = $1 AND r.ref_hash = $2 ORDER BY p.name, p.hash LIMIT $3"
        );
        let entries = sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(hash)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding_with_nar("paths"))?;
        let total: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM path_refs WHERE cache_id = $1 AND ref_hash = $2",
        )
        .bind(cache_id)
        .bind(hash)
        .fetch_one(&self.pool)
        .await?;
        Ok((entries, total))
    }

    /// Every path of a cache that references `hash`, directly or through other paths
    /// (`hash` itself excluded), by name.
    pub async fn transitive_referrers(&self, cache_id: i64, hash: &str) -> Result<Vec<PathEntry>> {
        let sql = format!(
            "{REFERRERS_CTE} SELECT {ENTRY_COLS} FROM up JOIN paths p ON p.cache_id = $1 \
             AND p.hash = up.h JOIN nars n ON n.id = p.nar_id WHERE up.h <> $2 \
             ORDER BY p.name, p.hash"
        );
        sqlx::query_as(&sql)
            .bind(cache_id)
            .bind(hash)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding_with_nar("paths"))
    }

    /// Which of `pinned` (hash parts of pinned paths) have `hash` in their closure: the path
    /// itself, or one that (transitively) references it.
    pub async fn closures_holding(
        &self,
        cache_id: i64,
        hash: &str,
        pinned: &[String],
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for batch in pinned.chunks(IN_BATCH) {
            let sql = format!(
                "{REFERRERS_CTE} SELECT h FROM up WHERE h IN ({})",
                placeholders(3, batch.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql)
                .bind(cache_id)
                .bind(hash);
            for h in batch {
                q = q.bind(h);
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn like_patterns_escape_wildcards_and_lower_case() {
        assert_eq!(like_pattern("Hello"), "%hello%");
        assert_eq!(like_pattern("a_b%c\\"), "%a\\_b\\%c\\\\%");
    }
}
