//! Caches: their settings (compression, signing, size limit, upstream keys and URLs), creating,
//! changing and deleting one (with everything published in it), and their size.

use larder_nix::compression::Compression;
use larder_nix::signing::VerifyingKey;
use sqlx::FromRow;

use super::columns::{
    keys_text, scopes_text, urls_text, CacheScope, Flag, SecretKey, SigningMode, Stored,
};
use super::tokens::end_scope;
use super::{decoding, now_unix, retry, Metadata, Result, FOREIGN_KEY};

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct CacheRow {
    pub id: i64,
    pub name: String,
    #[sqlx(try_from = "Flag")]
    pub private: bool,
    pub priority: i64,
    /// How uploads to it are compressed by default.
    #[sqlx(try_from = "Stored<Compression>")]
    pub compression: Compression,
    pub max_size: Option<i64>,
    /// Managed: the server holds `secret_key`; client: only `public_key` is known.
    #[sqlx(try_from = "Stored<SigningMode>")]
    pub signing_mode: SigningMode,
    #[sqlx(try_from = "Stored<Option<VerifyingKey>>")]
    pub public_key: Option<VerifyingKey>,
    #[sqlx(try_from = "Stored<Option<SecretKey>>")]
    pub secret_key: Option<SecretKey>,
    pub created_at: i64,
    /// Public keys trusted as upstream for this cache, beside the server's.
    #[sqlx(try_from = "Stored<Vec<VerifyingKey>>")]
    pub upstream_keys: Vec<VerifyingKey>,
    /// Upstream caches asked on a narinfo miss, in order (pull-through; empty: none). What
    /// they serve is trusted only when signed by one of the upstream keys.
    #[sqlx(try_from = "Stored<Vec<String>>")]
    pub upstreams: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct NewCache {
    pub name: String,
    pub private: bool,
    pub priority: i64,
    pub compression: Compression,
    pub max_size: Option<i64>,
    pub signing_mode: SigningMode,
    pub public_key: Option<VerifyingKey>,
    pub secret_key: Option<SecretKey>,
    pub upstream_keys: Vec<VerifyingKey>,
    pub upstreams: Vec<String>,
}

impl Default for NewCache {
    /// A public, managed, zstd cache without keys: fill in at least the name and keys.
    fn default() -> NewCache {
        NewCache {
            name: String::new(),
            private: false,
            priority: 0,
            compression: Compression::Zstd,
            max_size: None,
            signing_mode: SigningMode::Managed,
            public_key: None,
            secret_key: None,
            upstream_keys: Vec::new(),
            upstreams: Vec::new(),
        }
    }
}

/// Changes to a cache; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CacheUpdate {
    pub private: Option<bool>,
    pub priority: Option<i64>,
    pub compression: Option<Compression>,
    /// `Some(None)` removes the limit.
    pub max_size: Option<Option<i64>>,
    /// Switch to client signing with this public key (`Some`), dropping the managed secret.
    pub client_public_key: Option<VerifyingKey>,
    /// Replace the cache's own upstream keys.
    pub upstream_keys: Option<Vec<VerifyingKey>>,
    /// Replace the cache's upstream URLs.
    pub upstreams: Option<Vec<String>>,
}

/// What a cache's published paths hold (kept as counters, see `meta/sizes.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, FromRow)]
pub struct CacheStats {
    pub paths: i64,
    /// Bytes of the paths' NAR files (compressed), each path counted: what the size limit
    /// counts.
    pub size: i64,
    /// Uncompressed NAR bytes.
    pub nar_size: i64,
    /// What the NAR files occupy after deduplication: each chunk they use counted once.
    pub stored_size: i64,
}

/// The columns a [`CacheRow`] reads.
const CACHE_COLS: &str = "id, name, private, priority, compression, max_size, signing_mode, \
                          public_key, secret_key, created_at, upstream_keys, upstreams";

impl Metadata {
    /// Create a cache; `Ok(None)` if the name is taken.
    pub async fn create_cache(&self, c: &NewCache) -> Result<Option<CacheRow>> {
        let sql = format!(
            "INSERT INTO caches (name, private, priority, compression, max_size, signing_mode, \
             public_key, secret_key, created_at, upstream_keys, upstreams) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (name) DO NOTHING RETURNING {CACHE_COLS}"
        );
        let row = sqlx::query(&sql)
            .bind(&c.name)
            .bind(c.private as i64)
            .bind(c.priority)
            .bind(c.compression.as_str())
            .bind(c.max_size)
            .bind(c.signing_mode.as_str())
            .bind(c.public_key.as_ref().map(VerifyingKey::to_string))
            .bind(c.secret_key.as_ref().map(|k| k.0.to_secret_string()))
            .bind(now_unix())
            .bind(keys_text(&c.upstream_keys))
            .bind(urls_text(&c.upstreams))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(CacheRow::from_row)
            .transpose()
            .map_err(decoding("caches"))
    }

    pub async fn get_cache(&self, name: &str) -> Result<Option<CacheRow>> {
        let sql = format!("SELECT {CACHE_COLS} FROM caches WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(CacheRow::from_row)
            .transpose()
            .map_err(decoding("caches"))
    }

    pub async fn list_caches(&self) -> Result<Vec<CacheRow>> {
        let sql = format!("SELECT {CACHE_COLS} FROM caches ORDER BY name");
        sqlx::query_as(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding("caches"))
    }

    pub async fn update_cache(&self, name: &str, u: &CacheUpdate) -> Result<Option<CacheRow>> {
        let mut tx = self.pool.begin().await?;
        if let Some(p) = u.private {
            sqlx::query("UPDATE caches SET private = $1 WHERE name = $2")
                .bind(p as i64)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(p) = u.priority {
            sqlx::query("UPDATE caches SET priority = $1 WHERE name = $2")
                .bind(p)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(c) = u.compression {
            sqlx::query("UPDATE caches SET compression = $1 WHERE name = $2")
                .bind(c.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(m) = u.max_size {
            sqlx::query("UPDATE caches SET max_size = $1 WHERE name = $2")
                .bind(m)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(keys) = &u.upstream_keys {
            sqlx::query("UPDATE caches SET upstream_keys = $1 WHERE name = $2")
                .bind(keys_text(keys))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(urls) = &u.upstreams {
            sqlx::query("UPDATE caches SET upstreams = $1 WHERE name = $2")
                .bind(urls_text(urls))
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(pk) = &u.client_public_key {
            sqlx::query(
                "UPDATE caches SET signing_mode = 'client', public_key = $1, secret_key = NULL \
                 WHERE name = $2",
            )
            .bind(pk.to_string())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        let sql = format!("SELECT {CACHE_COLS} FROM caches WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.as_ref()
            .map(CacheRow::from_row)
            .transpose()
            .map_err(decoding("caches"))
    }

    /// Delete a cache and everything published in it. NARs it alone used become garbage, to
    /// be collected by [`Metadata::collect_garbage`]. Returns whether the cache existed.
    pub async fn delete_cache(&self, name: &str) -> Result<bool> {
        retry(FOREIGN_KEY, || self.delete_cache_once(name)).await
    }

    async fn delete_cache_once(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM caches WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(id) = id else {
            return Ok(false);
        };
        for table in [
            "paths",
            "path_refs",
            "cache_sizes",
            "cache_chunks",
            "uploads",
            "logs",
            "pins",
            "evicted_nars",
            "cache_days",
            "realisations",
            "realisation_deps",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE cache_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM caches WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // End every token scope that named the cache, in the same transaction: a cache
        // created later under the same name is another cache, and no old token reaches it.
        let scoped: Vec<(String, Stored<Option<Vec<CacheScope>>>)> =
            sqlx::query_as("SELECT id, caches FROM tokens WHERE caches IS NOT NULL")
                .fetch_all(&mut *tx)
                .await
                .map_err(decoding("tokens"))?;
        for (token_id, Stored(scopes)) in scoped {
            if let Some(ended) = scopes.and_then(|s| end_scope(&s, name)) {
                sqlx::query("UPDATE tokens SET caches = $1 WHERE id = $2")
                    .bind(scopes_text(&ended))
                    .bind(token_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }
}
