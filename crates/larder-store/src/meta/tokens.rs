//! API tokens: the stored hash of each secret, its permissions and cache scope, revocation, and
//! the bootstrap token. A cache's deletion ends every scope that named it (see `caches`).

use super::*;

/// The prefix of an ended scope in [`TokenRow::caches`]: `!NAME` names a cache that was
/// deleted. No cache name starts with it, so an ended scope never matches a cache again.
pub const ENDED_SCOPE: char = '!';

/// `caches` (a token's comma-separated scope) with `name` marked ended, or `None` when it
/// does not name `name`.
pub(super) fn end_scope(caches: &str, name: &str) -> Option<String> {
    let mut found = false;
    let ended: Vec<String> = caches
        .split(',')
        .map(|c| {
            if c == name {
                found = true;
                format!("{ENDED_SCOPE}{c}")
            } else {
                c.to_owned()
            }
        })
        .collect();
    found.then(|| ended.join(","))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Public identifier (shown in `token list`, used to revoke); not a secret.
    pub id: String,
    /// SHA-256 (hex) of the secret token; the token itself is never stored.
    pub secret_hash: String,
    pub label: String,
    /// Comma-separated permissions: `pull`, `push`, `admin`.
    pub perms: String,
    /// Comma-separated cache names, or `None` for every cache. A name prefixed with
    /// [`ENDED_SCOPE`] is a cache deleted since: it grants nothing.
    pub caches: Option<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

fn token_from_row(row: &AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        label: row.try_get("label")?,
        perms: row.try_get("perms")?,
        caches: row.try_get("caches")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
    })
}

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
        .bind(&t.perms)
        .bind(&t.caches)
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
            .bind(&t.perms)
            .bind(&t.caches)
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
        let row = sqlx::query(&sql)
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn get_token(&self, id: &str) -> Result<Option<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        let sql = format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY created_at, id");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(token_from_row).collect()
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
