//! Advisory locks: how replicas sharing one PostgreSQL database take turns.
//!
//! - **Session locks** ([`Metadata::try_lock`], [`Metadata::lock`]) are held by a dedicated
//!   connection, outside the pool, for as long as the [`HeldLock`] lives. PostgreSQL releases
//!   them when that session ends for any reason, a crash of the replica or of its network
//!   included, so a lock never outlives its holder and no lease has to expire.
//! - **Transaction locks** ([`xact_lock`]) last until the transaction ends (migrations, the
//!   bootstrap admin token).
//!
//! On SQLite, which one process serves, every lock is granted at once and holds nothing: the
//! process's own mutexes already serialise what needs it.
//!
//! See <https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS>.

use std::time::Duration;

use sqlx::Connection;

use super::{Engine, MetaError, Metadata, Result, PG_ACQUIRE_TIMEOUT};

/// What a lock protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockName {
    /// Applying schema migrations at start.
    Migrations,
    /// Creating the bootstrap admin token on an empty database.
    Bootstrap,
    /// The periodic background work (eviction, garbage collection): one replica at a time.
    Background,
    /// An eviction in one cache (by id): plans made from one snapshot, one at a time.
    Eviction(i64),
}

impl LockName {
    /// The two `int4` keys: larder's namespace (`"lard"` plus the kind) and an object id.
    fn keys(self) -> (i32, i32) {
        const NAMESPACE: i32 = 0x6c61_7200;
        match self {
            LockName::Migrations => (NAMESPACE | 1, 0),
            LockName::Bootstrap => (NAMESPACE | 2, 0),
            LockName::Background => (NAMESPACE | 3, 0),
            // Cache ids are small; wrapping would only make two caches share a lock.
            LockName::Eviction(cache) => (NAMESPACE | 4, cache as i32),
        }
    }
}

/// How long checking a held lock's session may take before it counts as lost.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A held session lock; released when dropped (the dedicated connection closes).
#[derive(Debug)]
pub struct HeldLock {
    name: LockName,
    /// PostgreSQL: the session holding the lock. SQLite: none.
    conn: Option<sqlx::PgConnection>,
}

impl HeldLock {
    pub fn name(&self) -> LockName {
        self.name
    }

    /// Whether the lock is still held: its session answers (then PostgreSQL keeps the lock).
    /// False once the session died, e.g. after the database restarted.
    pub async fn alive(&mut self) -> bool {
        let Some(conn) = &mut self.conn else {
            return true;
        };
        let (k1, k2) = self.name.keys();
        let check = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND pid = pg_backend_pid() AND classid = $1::int4::oid AND objid = $2::int4::oid \
             AND objsubid = 2)",
        )
        .bind(k1)
        .bind(k2)
        .fetch_one(&mut *conn);
        matches!(
            tokio::time::timeout(ALIVE_TIMEOUT, check).await,
            Ok(Ok(true))
        )
    }

    /// Release the lock now (dropping does too, by closing the session).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let (k1, k2) = self.name.keys();
            let unlock = async {
                sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(k1)
                    .bind(k2)
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            };
            let _ = tokio::time::timeout(ALIVE_TIMEOUT, unlock).await;
        }
    }
}

impl Metadata {
    /// Take `name` if no one holds it: `Ok(None)` if another session (replica) does.
    pub async fn try_lock(&self, name: LockName) -> Result<Option<HeldLock>> {
        if self.engine == Engine::Sqlite {
            return Ok(Some(HeldLock { name, conn: None }));
        }
        let mut conn = self.lock_connection().await?;
        let (k1, k2) = name.keys();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(k1)
            .bind(k2)
            .fetch_one(&mut conn)
            .await?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(HeldLock {
            name,
            conn: Some(conn),
        }))
    }

    /// Take `name`, waiting for its holder to release it (or to die).
    pub async fn lock(&self, name: LockName) -> Result<HeldLock> {
        if self.engine == Engine::Sqlite {
            return Ok(HeldLock { name, conn: None });
        }
        let mut conn = self.lock_connection().await?;
        let (k1, k2) = name.keys();
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(k1)
            .bind(k2)
            .execute(&mut conn)
            .await?;
        Ok(HeldLock {
            name,
            conn: Some(conn),
        })
    }

    /// A connection of its own (not from the pool): a pooled one would be reused by others
    /// while holding the lock, and its release would not end the session.
    async fn lock_connection(&self) -> Result<sqlx::PgConnection> {
        match tokio::time::timeout(PG_ACQUIRE_TIMEOUT, sqlx::PgConnection::connect(&self.url)).await
        {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(MetaError::ConnectTimeout),
        }
    }
}

/// Take `name` until the end of `tx` (PostgreSQL only; callers check the engine).
pub(super) async fn xact_lock(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: LockName,
) -> Result<()> {
    let (k1, k2) = name.keys();
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(k1)
        .bind(k2)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
