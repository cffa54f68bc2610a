//! Copying the metadata of one database into another (`larder migrate`), verifiably.
//!
//! [`copy`] moves every row of every table from a source (typically the embedded SQLite
//! database) into an empty target (typically PostgreSQL) **in one target transaction**: either
//! the whole copy is committed, verified, or nothing is. Before committing, both sides are
//! summarised with [`checksums`] (row count and an order-independent SHA-256 digest of every
//! row's values, per table) and any difference rolls the copy back. The source is read in one
//! snapshot, so a copy is consistent even if a server still writes to the source (whatever it
//! writes afterwards is not copied: stop it first).
//!
//! Ids are copied as they are (they are what references between rows use), and PostgreSQL's
//! sequences are moved past them. A target that already holds rows is refused unless
//! `overwrite` is set, which empties it in the same transaction: a copy is atomic, and running
//! it again with `overwrite` is idempotent, so there is no partial state to resume from.

use futures::TryStreamExt;
use larder_nix::hash::Sha256;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{schema, Engine, MetaError, Metadata};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("the target database is not empty (table {table} has {rows} rows)")]
    TargetNotEmpty { table: &'static str, rows: i64 },
    #[error("the {side} database has a table or column this larder does not know: {name}")]
    UnknownSchema { side: &'static str, name: String },
    #[error("the {side} database lacks {name}")]
    MissingSchema { side: &'static str, name: String },
    #[error(
        "verification failed for table {table}: the source has {source_rows} rows (digest \
         {source_digest}), the target {target_rows} (digest {target_digest}); nothing was \
         committed"
    )]
    Mismatch {
        table: &'static str,
        source_rows: i64,
        source_digest: String,
        target_rows: i64,
        target_digest: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
}
use Kind::{Int, Text};

struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// Has a serial `id` whose sequence must follow the copied ids (PostgreSQL).
    serial: bool,
}

/// Every table of the schema, parents before children (foreign keys), with its columns.
/// [`check_schema`] refuses a database with anything not listed here, so a migration that adds
/// a table or a column cannot be silently left out of a copy.
const TABLES: &[Table] = &[
    Table {
        name: "caches",
        columns: &[
            ("id", Int),
            ("name", Text),
            ("private", Int),
            ("priority", Int),
            ("compression", Text),
            ("max_size", Int),
            ("signing_mode", Text),
            ("public_key", Text),
            ("secret_key", Text),
            ("created_at", Int),
            ("upstream_keys", Text),
            ("upstreams", Text),
        ],
        serial: true,
    },
    Table {
        name: "tokens",
        columns: &[
            ("id", Text),
            ("secret_hash", Text),
            ("label", Text),
            ("perms", Text),
            ("caches", Text),
            ("expires_at", Int),
            ("revoked_at", Int),
            ("created_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "nars",
        columns: &[
            ("id", Int),
            ("nar_hash", Text),
            ("nar_size", Int),
            ("compression", Text),
            ("file_hash", Text),
            ("file_size", Int),
            ("created_at", Int),
        ],
        serial: true,
    },
    Table {
        name: "chunks",
        columns: &[
            ("chunk_hash", Text),
            ("file_size", Int),
            ("created_at", Int),
            ("pack", Text),
            ("pack_offset", Int),
        ],
        serial: false,
    },
    Table {
        name: "packs",
        columns: &[
            ("pack_hash", Text),
            ("file_size", Int),
            ("created_at", Int),
            ("writers", Int),
            ("unused", Int),
        ],
        serial: false,
    },
    Table {
        name: "chunk_claims",
        columns: &[
            ("claim_id", Text),
            ("chunk_hash", Text),
            ("claimed_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "nar_chunks",
        columns: &[("nar_id", Int), ("seq", Int), ("chunk_hash", Text)],
        serial: false,
    },
    Table {
        name: "paths",
        columns: &[
            ("id", Int),
            ("cache_id", Int),
            ("hash", Text),
            ("name", Text),
            ("nar_id", Int),
            ("refs", Text),
            ("deriver", Text),
            ("ca", Text),
            ("sigs", Text),
            ("created_at", Int),
            ("upstream", Text),
        ],
        serial: true,
    },
    Table {
        name: "path_uses",
        columns: &[("path_id", Int), ("last_used_at", Int)],
        serial: false,
    },
    Table {
        name: "uploads",
        columns: &[
            ("id", Text),
            ("cache_id", Int),
            ("nar_id", Int),
            ("key", Text),
            ("created_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "logs",
        columns: &[
            ("cache_id", Int),
            ("drv", Text),
            ("object_key", Text),
            ("size", Int),
            ("created_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "path_refs",
        columns: &[("cache_id", Int), ("referrer", Text), ("ref_hash", Text)],
        serial: false,
    },
    Table {
        name: "evicted_nars",
        columns: &[("cache_id", Int), ("nar_id", Int), ("evicted_at", Int)],
        serial: false,
    },
    Table {
        name: "pins",
        columns: &[
            ("id", Int),
            ("cache_id", Int),
            ("name", Text),
            ("revision", Int),
            ("hash", Text),
            ("store_path", Text),
            ("keep", Text),
            ("keep_n", Int),
            ("created_at", Int),
        ],
        serial: true,
    },
    Table {
        name: "cache_days",
        columns: &[
            ("cache_id", Int),
            ("day", Int),
            ("narinfo_requests", Int),
            ("narinfo_bytes", Int),
            ("nar_requests", Int),
            ("nar_bytes", Int),
            ("size", Int),
            ("size_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "realisations",
        columns: &[
            ("cache_id", Int),
            ("drv_output", Text),
            ("out_hash", Text),
            ("out_path", Text),
            ("sigs", Text),
            ("created_at", Int),
        ],
        serial: false,
    },
    Table {
        name: "realisation_deps",
        columns: &[
            ("cache_id", Int),
            ("referrer", Text),
            ("dep", Text),
            ("dep_out_path", Text),
        ],
        serial: false,
    },
    Table {
        name: "cache_chunks",
        columns: &[("cache_id", Int), ("chunk_hash", Text), ("uses", Int)],
        serial: false,
    },
    Table {
        name: "cache_sizes",
        columns: &[
            ("cache_id", Int),
            ("shard", Int),
            ("paths", Int),
            ("size", Int),
            ("nar_size", Int),
            ("stored", Int),
        ],
        serial: false,
    },
    Table {
        name: "store_sizes",
        columns: &[("shard", Int), ("chunk_bytes", Int)],
        serial: false,
    },
];

/// The bookkeeping table of migrations: not copied (both sides are migrated to the same
/// version by [`Metadata::connect`]).
const SCHEMA_TABLE: &str = "larder_schema";
/// Most bound parameters per `INSERT` (SQLite allows 32766, PostgreSQL 65535).
const PARAMS_PER_INSERT: usize = 4000;

/// One table's summary: its row count and an order-independent digest of its rows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableSum {
    pub table: &'static str,
    pub rows: i64,
    /// Hex; the wrapping sum of the SHA-256 of each row's values, so that it does not depend
    /// on row order (which differs between engines and collations).
    pub digest: String,
}

/// What [`copy`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub schema_version: i64,
    /// Per table, identical on both sides (verified before committing).
    pub tables: Vec<TableSum>,
    /// Whether the target held rows that were replaced (`overwrite`).
    pub overwritten: bool,
}

/// The summary of every table of `meta`, read in one snapshot.
pub async fn checksums(meta: &Metadata) -> Result<Vec<TableSum>, TransferError> {
    check_schema(meta, "database").await?;
    let mut tx = meta.pool.begin().await.map_err(MetaError::from)?;
    snapshot(&mut tx, meta.engine).await?;
    let sums = sum_tables(&mut tx).await?;
    tx.rollback().await.map_err(MetaError::from)?;
    Ok(sums)
}

/// Copy every row of `from` into `to` in one transaction of `to`, verified before it commits
/// (see the module documentation). `overwrite`: empty a non-empty target first.
pub async fn copy(
    from: &Metadata,
    to: &Metadata,
    overwrite: bool,
) -> Result<CopyReport, TransferError> {
    check_schema(from, "source").await?;
    check_schema(to, "target").await?;
    let mut src = from.pool.begin().await.map_err(MetaError::from)?;
    snapshot(&mut src, from.engine).await?;
    let mut dst = to.pool.begin().await.map_err(MetaError::from)?;
    let mut overwritten = false;
    for t in TABLES.iter().rev() {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {}", t.name))
            .fetch_one(&mut *dst)
            .await
            .map_err(MetaError::from)?;
        if rows > 0 {
            if !overwrite {
                return Err(TransferError::TargetNotEmpty {
                    table: t.name,
                    rows,
                });
            }
            overwritten = true;
            sqlx::query(&format!("DELETE FROM {}", t.name))
                .execute(&mut *dst)
                .await
                .map_err(MetaError::from)?;
        }
    }
    for t in TABLES {
        copy_table(t, &mut src, &mut dst).await?;
        if t.serial && to.engine == Engine::Postgres {
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{0}', 'id'), \
                 COALESCE((SELECT MAX(id) FROM {0}), 0) + 1, false)",
                t.name
            ))
            .execute(&mut *dst)
            .await
            .map_err(MetaError::from)?;
        }
    }
    let source = sum_tables(&mut src).await?;
    let target = sum_tables(&mut dst).await?;
    for (s, d) in source.iter().zip(&target) {
        if s != d {
            return Err(TransferError::Mismatch {
                table: s.table,
                source_rows: s.rows,
                source_digest: s.digest.clone(),
                target_rows: d.rows,
                target_digest: d.digest.clone(),
            });
        }
    }
    dst.commit().await.map_err(MetaError::from)?;
    src.rollback().await.map_err(MetaError::from)?;
    Ok(CopyReport {
        schema_version: schema::VERSION,
        tables: target,
        overwritten,
    })
}

/// Make the rest of `tx` read one snapshot (SQLite's transactions always do).
async fn snapshot(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    engine: Engine,
) -> Result<(), MetaError> {
    if engine == Engine::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Refuse a database whose tables or columns differ from [`TABLES`].
async fn check_schema(meta: &Metadata, side: &'static str) -> Result<(), TransferError> {
    let (tables_sql, columns_sql) = match meta.engine {
        Engine::Sqlite => (
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            "SELECT name FROM pragma_table_info($1)",
        ),
        Engine::Postgres => (
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
            "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
        ),
    };
    let tables: Vec<String> = sqlx::query_scalar(tables_sql)
        .fetch_all(&meta.pool)
        .await
        .map_err(MetaError::from)?;
    for name in &tables {
        if name != SCHEMA_TABLE && !TABLES.iter().any(|t| t.name == name) {
            return Err(TransferError::UnknownSchema {
                side,
                name: name.clone(),
            });
        }
    }
    for t in TABLES {
        if !tables.iter().any(|n| n == t.name) {
            return Err(TransferError::MissingSchema {
                side,
                name: format!("table {}", t.name),
            });
        }
        let columns: Vec<String> = sqlx::query_scalar(columns_sql)
            .bind(t.name)
            .fetch_all(&meta.pool)
            .await
            .map_err(MetaError::from)?;
        for c in &columns {
            if !t.columns.iter().any(|(n, _)| n == c) {
                return Err(TransferError::UnknownSchema {
                    side,
                    name: format!("{}.{c}", t.name),
                });
            }
        }
        for (c, _) in t.columns {
            if !columns.iter().any(|n| n == c) {
                return Err(TransferError::MissingSchema {
                    side,
                    name: format!("column {}.{c}", t.name),
                });
            }
        }
    }
    Ok(())
}

fn select_all(t: &Table) -> String {
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    format!("SELECT {} FROM {}", cols.join(", "), t.name)
}

/// A row's values, as read and written.
#[derive(Debug)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

fn values(t: &Table, row: &AnyRow) -> Result<Vec<Value>, MetaError> {
    t.columns
        .iter()
        .map(|(c, kind)| {
            Ok(match kind {
                Int => Value::Int(row.try_get(*c)?),
                Text => Value::Text(row.try_get(*c)?),
            })
        })
        .collect()
}

async fn copy_table(
    t: &Table,
    src: &mut sqlx::Transaction<'_, sqlx::Any>,
    dst: &mut sqlx::Transaction<'_, sqlx::Any>,
) -> Result<(), MetaError> {
    let per_insert = (PARAMS_PER_INSERT / t.columns.len()).max(1);
    let select = select_all(t);
    let mut rows = sqlx::query(&select).fetch(&mut **src);
    let mut batch: Vec<Vec<Value>> = Vec::with_capacity(per_insert);
    while let Some(row) = rows.try_next().await? {
        batch.push(values(t, &row)?);
        if batch.len() == per_insert {
            insert_rows(t, &batch, dst).await?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        insert_rows(t, &batch, dst).await?;
    }
    Ok(())
}

async fn insert_rows(
    t: &Table,
    batch: &[Vec<Value>],
    dst: &mut sqlx::Transaction<'_, sqlx::Any>,
) -> Result<(), MetaError> {
    let n = t.columns.len();
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    let tuples: Vec<String> = (0..batch.len())
        .map(|r| format!("({})", super::placeholders(r * n + 1, n)))
        .collect();
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        t.name,
        cols.join(", "),
        tuples.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for row in batch {
        for v in row {
            q = match v {
                Value::Int(i) => q.bind(*i),
                Value::Text(s) => q.bind(s.clone()),
            };
        }
    }
    q.execute(&mut **dst).await?;
    Ok(())
}

async fn sum_tables(tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> Result<Vec<TableSum>, MetaError> {
    let mut out = Vec::with_capacity(TABLES.len());
    for t in TABLES {
        let select = select_all(t);
        let mut rows = sqlx::query(&select).fetch(&mut **tx);
        let mut count = 0i64;
        let mut sum = [0u64; 4];
        while let Some(row) = rows.try_next().await? {
            count += 1;
            let mut buf = Vec::with_capacity(256);
            for v in values(t, &row)? {
                match v {
                    Value::Int(None) | Value::Text(None) => buf.push(0),
                    Value::Int(Some(i)) => {
                        buf.push(1);
                        buf.extend_from_slice(&i.to_le_bytes());
                    }
                    Value::Text(Some(s)) => {
                        buf.push(2);
                        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                        buf.extend_from_slice(s.as_bytes());
                    }
                }
            }
            let h = Sha256::digest(&buf);
            for (lane, bytes) in sum.iter_mut().zip(h.as_bytes().chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(bytes);
                *lane = lane.wrapping_add(u64::from_le_bytes(b));
            }
        }
        out.push(TableSum {
            table: t.name,
            rows: count,
            digest: sum.iter().map(|l| format!("{l:016x}")).collect(),
        });
    }
    Ok(out)
}
