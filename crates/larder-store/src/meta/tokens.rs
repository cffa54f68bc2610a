//! API tokens: the stored hash of each secret, its permissions and cache scope, revocation, and
//! the bootstrap token. A cache's deletion ends every scope that named it (see `caches`).

use std::collections::BTreeSet;

use larder_api::Perm;
use sqlx::FromRow;

use super::columns::{perms_text, scopes_text, CacheScope, Stored};
use super::{decoding, lock, now_unix, retry, Engine, LockName, MetaError, Metadata, Result};

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct TokenRow {
    /// Public identifier (shown in `token list`, used to revoke); not a secret.
    pub id: String,
    /// SHA-256 (hex) of the secret token; the token itself is never stored.
    pub secret_hash: String,
    pub label: String,
    #[sqlx(try_from = "Stored<BTreeSet<Perm>>")]
    pub perms: BTreeSet<Perm>,
    /// The caches it is scoped to, or `None` for every cache.
    #[sqlx(try_from = "Stored<Option<Vec<CacheScope>>>")]
    pub caches: Option<Vec<CacheScope>>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

impl TokenRow {
    /// The caches whose scope is live, or `None` for every cache. An ended scope grants
    /// nothing.
    pub fn live_caches(&self) -> Option<Vec<&str>> {
        self.caches.as_ref().map(|scopes| {
            scopes
                .iter()
                .filter_map(|s| match s {
                    CacheScope::Cache(name) => Some(name.as_str()),
                    CacheScope::Ended(_) => None,
                })
                .collect()
        })
    }

    /// The caches it was scoped to that were deleted since.
    pub fn ended_caches(&self) -> Vec<&str> {
        self.caches
            .iter()
            .flatten()
            .filter_map(|s| match s {
                CacheScope::Ended(name) => Some(name.as_str()),
                CacheScope::Cache(_) => None,
            })
            .collect()
    }
}

/// `scopes` with `name` marked ended, or `None` when they do not name `name`.
pub(super) fn end_scope(scopes: &[CacheScope], name: &str) -> Option<Vec<CacheScope>> {
    let mut found = false;
    let ended = scopes
        .iter()
        .map(|s| match s {
            CacheScope::Cache(c) if c == name => {
                found = true;
                CacheScope::Ended(c.clone())
            }
            s => s.clone(),
        })
        .collect();
    found.then_some(ended)
}

/// The columns a [`TokenRow`] reads.
const TOKEN_COLS: &str =
    "id, secret_hash, label, perms, caches, expires_at, revoked_at, created_at";

impl Metadata {
    pub async fn create_token(&self, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, secret_hash, label, perms, caches, expires_at, revoked_at, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.secret_hash)
        .bind(&t.label)
        .bind(perms_text(&t.perms))
        .bind(t.caches.as_deref().map(scopes_text))
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Create `t` only if no token exists at all (the bootstrap admin token); false if one
    /// does. Replicas starting together on an empty database create one between them.
    pub async fn create_first_token(&self, t: &TokenRow) -> Result<bool> {
        retry(&[], || async {
            let mut tx = self.pool.begin().await?;
            if self.engine == Engine::Postgres {
                lock::xact_lock(&mut tx, LockName::Bootstrap).await?;
            }
            let done = sqlx::query(
                "INSERT INTO tokens (id, secret_hash, label, perms, caches, expires_at, \
                 revoked_at, created_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE NOT EXISTS (SELECT 1 FROM tokens)",
            )
            .bind(&t.id)
            .bind(&t.secret_hash)
            .bind(&t.label)
            .bind(perms_text(&t.perms))
            .bind(t.caches.as_deref().map(scopes_text))
            .bind(t.expires_at)
            .bind(t.revoked_at)
            .bind(t.created_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok::<_, MetaError>(done.rows_affected() > 0)
        })
        .await
    }

    pub async fn token_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn find_token(&self, secret_hash: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE secret_hash = $1");
        sqlx::query_as(&sql)
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("tokens"))
    }

    pub async fn get_token(&self, id: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = $1");
        sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(decoding("tokens"))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at, id");
        sqlx::query_as(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(decoding("tokens"))
    }

    /// Revoke a token; returns false if no unrevoked token has this id.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_unix())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_a_cache_ends_only_its_scope() {
        let scopes = vec![
            CacheScope::Cache("a".into()),
            CacheScope::Cache("b".into()),
            CacheScope::Ended("c".into()),
        ];
        assert_eq!(
            end_scope(&scopes, "b"),
            Some(vec![
                CacheScope::Cache("a".into()),
                CacheScope::Ended("b".into()),
                CacheScope::Ended("c".into()),
            ])
        );
        assert_eq!(end_scope(&scopes, "c"), None);
        assert_eq!(end_scope(&scopes, "d"), None);
        let token = TokenRow {
            id: "t".into(),
            secret_hash: String::new(),
            label: String::new(),
            perms: [Perm::Pull].into(),
            caches: Some(scopes),
            expires_at: None,
            revoked_at: None,
            created_at: 0,
        };
        assert_eq!(token.live_caches(), Some(vec!["a", "b"]));
        assert_eq!(token.ended_caches(), vec!["c"]);
        let every = TokenRow {
            caches: None,
            ..token
        };
        assert_eq!(every.live_caches(), None);
        assert!(every.ended_caches().is_empty());
    }
}
