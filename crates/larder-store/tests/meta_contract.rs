//! The metadata backend contract: the same test bodies run against SQLite and against a real
//! PostgreSQL cluster (started by the test, see `larder-testkit`). Every behaviour the server
//! relies on is here: caches, tokens, uploads and publishing (with SPEC §2.3's rules),
//! concurrent replicas storing one path, garbage collection, orphaned chunks, eviction, pins,
//! usage, logs, locks, migrations; then what only PostgreSQL has (an unreachable server) and
//! copying one database into another (`larder migrate`).
#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use larder_api::Perm;
use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::realisation::DrvOutput;
use larder_nix::signing::{Signature, SigningKey};
use larder_nix::store_path::StorePath;
use larder_store::meta::transfer::{self, TransferError};
use larder_store::meta::{
    cdc_chunk_id, chunk_object_key, CacheDay, CacheRow, CacheScope, CacheStats, CacheUpdate,
    ChunkRow, Downloads, Engine, Evicted, Keep, LockName, MetaError, NarRow, NewCache, NewPath,
    Publish, PutRealisation, RealisationRow, SecretKey, SigningMode, TokenRow,
};
use larder_store::{now_unix, Metadata, ObjectStore, OpenOptions};
use larder_testkit::postgres::PgCluster;

/// A database under test, with whatever keeps it alive.
struct Db {
    meta: Metadata,
    url: String,
    pg: Option<PgCluster>,
    dir: tempfile::TempDir,
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("meta.db").display());
        let meta = Metadata::connect(&url).await.unwrap();
        Db {
            meta,
            url,
            pg: None,
            dir,
        }
    }

    async fn postgres() -> Db {
        let pg = PgCluster::start();
        let url = pg.create_database();
        let meta = Metadata::connect(&url).await.unwrap();
        Db {
            meta,
            url,
            pg: Some(pg),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn engine(&self) -> Engine {
        self.meta.engine()
    }

    /// Another handle on the same database: what a second replica (or process) has.
    async fn replica(&self) -> Metadata {
        Metadata::connect(&self.url).await.unwrap()
    }

    /// The URL of another, empty database on the same engine.
    fn fresh_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.create_database(),
            None => {
                let n = COUNTER.fetch_add(1, Ordering::SeqCst);
                format!(
                    "sqlite://{}",
                    self.dir.path().join(format!("{n}.db")).display()
                )
            }
        }
    }

    async fn rows(&self, table: &str) -> i64 {
        transfer::checksums(&self.meta)
            .await
            .unwrap()
            .iter()
            .find(|t| t.table == table)
            .unwrap_or_else(|| panic!("no table {table}"))
            .rows
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn h52(seed: &str) -> String {
    Sha256::digest(seed.as_bytes()).to_nix32()
}

/// A NAR as the server would record it, and its one chunk. `variant` changes the stored
/// file (another compression of the same NAR).
fn nar(seed: &str, variant: &str) -> (NarRow, Vec<ChunkRow>) {
    let file_hash = h52(&format!("file/{seed}/{variant}"));
    let row = NarRow {
        id: 0,
        nar_hash: Sha256::digest(format!("nar/{seed}").as_bytes()),
        nar_size: 1000 + seed.len() as i64,
        compression: if variant.is_empty() {
            Compression::Zstd
        } else {
            Compression::Xz
        },
        file_hash: file_hash.parse().unwrap(),
        file_size: 100 + variant.len() as i64,
    };
    let chunk = ChunkRow::new(file_hash, row.file_size);
    (row, vec![chunk])
}

fn upload_id() -> String {
    format!(
        "up-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// The server's upload path: reuse a stored NAR, or claim, (store the objects,) record.
async fn upload(meta: &Metadata, cache_id: i64, seed: &str, variant: &str) -> (String, NarRow) {
    let id = upload_id();
    let (row, chunks) = nar(seed, variant);
    if let Some(n) = meta
        .reuse_nar_for_upload(&id, cache_id, None, &row.nar_hash)
        .await
        .unwrap()
    {
        return (id, n);
    }
    meta.claim_chunks(&id, &chunks).await.unwrap();
    let (n, _) = meta
        .insert_nar_for_upload(&id, cache_id, None, &row, &chunks)
        .await
        .unwrap();
    (id, n)
}

fn sp(name: &str) -> StorePath {
    let d = Sha256::digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.as_bytes()[..20]);
    StorePath::from_parts(digest, name).unwrap()
}

/// A signing key named `name`.
fn key(name: &str) -> SigningKey {
    SigningKey::from_seed(name, [2; 32]).unwrap()
}

/// A signature by the test key `test-1` (of the path's name: the store does not check it).
fn sig(text: &str) -> Signature {
    SigningKey::from_seed("test-1", [1; 32]).unwrap().sign(text)
}

fn new_path(cache_id: i64, p: &StorePath, nar_id: i64, refs: &[&StorePath]) -> NewPath {
    NewPath {
        cache_id,
        store_path: p.clone(),
        refs: refs.iter().map(|r| (*r).clone()).collect(),
        deriver: Some(sp(&format!("{}.drv", p.name()))),
        ca: None,
        sigs: vec![sig(p.name())],
        nar_id,
        upstream_refs: Vec::new(),
        upstream: None,
    }
}

async fn cache(meta: &Metadata, name: &str) -> CacheRow {
    meta.create_cache(&NewCache {
        name: name.into(),
        priority: 41,
        compression: Compression::Zstd,
        signing_mode: SigningMode::Managed,
        public_key: Some(key(&format!("{name}-1")).verifying_key()),
        secret_key: Some(SecretKey(key(&format!("{name}-1")))),
        ..NewCache::default()
    })
    .await
    .unwrap()
    .expect("a new cache name")
}

/// Upload and publish `p` (referencing `refs`) in a cache.
async fn publish(meta: &Metadata, cache_id: i64, p: &StorePath, refs: &[&StorePath]) -> NarRow {
    let (id, n) = upload(meta, cache_id, p.name(), "").await;
    let done = meta
        .publish_path(&new_path(cache_id, p, n.id, refs), &id)
        .await
        .unwrap();
    assert_eq!(done, Publish::Created, "{p}");
    n
}

/// An object deleter that records the keys it was given.
fn recorder<'a>(
    log: &'a Mutex<Vec<String>>,
) -> impl Fn(String) -> BoxFuture<'a, DeleteResult> + Send + Sync + 'a {
    move |key| {
        log.lock().unwrap().push(key);
        Box::pin(async { Ok(()) })
    }
}

type DeleteResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn ok_deleter(_: String) -> BoxFuture<'static, DeleteResult> {
    Box::pin(async { Ok(()) })
}

fn token(id: &str) -> TokenRow {
    TokenRow {
        id: id.into(),
        secret_hash: h52(id),
        label: format!("label {id}"),
        perms: [Perm::Push, Perm::Pull].into(),
        caches: Some(vec![
            CacheScope::Cache("a".into()),
            CacheScope::Cache("b".into()),
        ]),
        expires_at: None,
        revoked_at: None,
        created_at: 1000,
    }
}

// ---- the contract, one body per behaviour -------------------------------------------------

async fn caches_are_created_updated_and_deleted(db: Db) {
    let m = &db.meta;
    let a = cache(m, "alpha").await;
    assert!(m
        .create_cache(&NewCache {
            name: "alpha".into(),
            ..NewCache::default()
        })
        .await
        .unwrap()
        .is_none());
    cache(m, "beta").await;
    assert_eq!(m.get_cache("alpha").await.unwrap(), Some(a.clone()));
    let names: Vec<String> = m
        .list_caches()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let u = m
        .update_cache(
            "alpha",
            &CacheUpdate {
                private: Some(true),
                priority: Some(10),
                max_size: Some(Some(5 << 30)),
                client_public_key: Some(key("alpha-2").verifying_key()),
                ..CacheUpdate::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(u.private);
    assert_eq!((u.priority, u.max_size), (10, Some(5 << 30)));
    assert_eq!(u.signing_mode, SigningMode::Client);
    assert_eq!(
        u.secret_key, None,
        "switching to client signing drops the secret"
    );
    let u = m
        .update_cache(
            "alpha",
            &CacheUpdate {
                max_size: Some(None),
                ..CacheUpdate::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.max_size, None);
    // Pull-through upstreams: kept in order, replaced whole, removed with an empty list.
    let urls = vec![
        "https://cache.nixos.org".to_owned(),
        "http://10.0.0.2/c".to_owned(),
    ];
    let u = m
        .update_cache(
            "alpha",
            &CacheUpdate {
                upstreams: Some(urls.clone()),
                ..CacheUpdate::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u.upstreams, urls);
    assert_eq!(m.get_cache("alpha").await.unwrap().unwrap().upstreams, urls);
    let u = m
        .update_cache(
            "alpha",
            &CacheUpdate {
                upstreams: Some(Vec::new()),
                ..CacheUpdate::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(u.upstreams.is_empty());
    // A path fetched from an upstream says so in its row and in the contents list.
    let fetched = sp("fetched");
    let (id, n) = upload(m, a.id, fetched.name(), "").await;
    let mut new = new_path(a.id, &fetched, n.id, &[&sp("only-upstream")]);
    new.upstream_refs = new.refs.clone();
    new.upstream = Some(urls[0].clone());
    assert_eq!(m.publish_path(&new, &id).await.unwrap(), Publish::Created);
    let row = m
        .get_path(a.id, &fetched.hash_part())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.upstream.as_deref(), Some(urls[0].as_str()));
    let listed = m.list_paths(a.id, Some("fetched"), None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].upstream.as_deref(), Some(urls[0].as_str()));
    assert!(m
        .update_cache("nope", &CacheUpdate::default())
        .await
        .unwrap()
        .is_none());
    publish(m, a.id, &sp("in-alpha"), &[]).await;
    assert!(m.delete_cache("alpha").await.unwrap());
    assert!(!m.delete_cache("alpha").await.unwrap());
    assert_eq!(m.get_cache("alpha").await.unwrap(), None);
    assert_eq!(db.rows("paths").await, 0);
}

async fn tokens_are_stored_found_and_revoked(db: Db) {
    let m = &db.meta;
    assert!(m.create_first_token(&token("first")).await.unwrap());
    assert!(!m.create_first_token(&token("second")).await.unwrap());
    assert_eq!(m.token_count().await.unwrap(), 1);
    m.create_token(&token("other")).await.unwrap();
    assert_eq!(
        m.find_token(&h52("other")).await.unwrap(),
        Some(token("other"))
    );
    assert_eq!(m.get_token("first").await.unwrap(), Some(token("first")));
    assert_eq!(m.find_token(&h52("nope")).await.unwrap(), None);
    assert_eq!(m.list_tokens().await.unwrap().len(), 2);
    assert!(m.revoke_token("other").await.unwrap());
    assert!(!m.revoke_token("other").await.unwrap());
    assert!(m
        .get_token("other")
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());
}

/// Rows come back as the domain values they were written from; a value that does not decode
/// (a row edited by hand) is an error naming the table, the column and the value.
async fn stored_values_decode_or_name_what_is_wrong(db: Db) {
    let m = &db.meta;
    let c = cache(m, "typed").await;
    let lib = sp("lib");
    let app = sp("app");
    publish(m, c.id, &lib, &[]).await;
    let n = publish(m, c.id, &app, &[&lib]).await;
    let row = m.get_path(c.id, &app.hash_part()).await.unwrap().unwrap();
    assert_eq!(row.store_path, app);
    assert_eq!(row.refs, vec![lib.clone()]);
    assert_eq!(row.deriver, Some(sp("app.drv")));
    assert_eq!(row.sigs, vec![sig("app")]);
    assert_eq!(row.nar, n);
    assert_eq!(row.nar.compression, Compression::Zstd);
    // Deleting a cache ends the scopes naming it, as a typed variant.
    cache(m, "a").await;
    m.create_token(&token("scoped")).await.unwrap();
    assert!(m.delete_cache("a").await.unwrap());
    let t = m.get_token("scoped").await.unwrap().unwrap();
    assert_eq!(
        t.caches,
        Some(vec![
            CacheScope::Ended("a".into()),
            CacheScope::Cache("b".into()),
        ])
    );
    assert_eq!(t.live_caches(), Some(vec!["b"]));
    assert_eq!(t.ended_caches(), vec!["a"]);

    let raw = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query("UPDATE nars SET compression = 'gzip' WHERE id = $1")
        .bind(n.id)
        .execute(&raw)
        .await
        .unwrap();
    sqlx::query("UPDATE tokens SET perms = 'pull,root' WHERE id = 'scoped'")
        .execute(&raw)
        .await
        .unwrap();
    raw.close().await;
    let undecodable = |e: MetaError| match e {
        MetaError::Undecodable {
            table,
            column,
            source,
        } => (table, column, source.to_string()),
        e => panic!("not Undecodable: {e:?}"),
    };
    let (table, column, why) = undecodable(m.get_path(c.id, &app.hash_part()).await.unwrap_err());
    assert_eq!((table, column.as_str()), ("nars", "compression"));
    assert!(why.contains("\"gzip\""), "{why}");
    let (table, column, why) = undecodable(m.get_token("scoped").await.unwrap_err());
    assert_eq!((table, column.as_str()), ("tokens", "perms"));
    assert!(why.contains("pull,root"), "{why}");
    // The other rows still read.
    assert!(m.get_path(c.id, &lib.hash_part()).await.unwrap().is_some());
}

async fn publishing_keeps_the_integrity_rules(db: Db) {
    let m = &db.meta;
    let c = cache(m, "main").await;
    let lib = sp("lib");
    let app = sp("app");
    // A reference that is not in the cache: nothing is published.
    let (id, n) = upload(m, c.id, "app", "").await;
    let r = m
        .publish_path(&new_path(c.id, &app, n.id, &[&lib]), &id)
        .await
        .unwrap();
    assert_eq!(r, Publish::MissingReferences(vec![lib.clone()]));
    assert_eq!(m.get_path(c.id, &app.hash_part()).await.unwrap(), None);
    // …unless an upstream key vouched for it.
    let mut upstream = new_path(c.id, &app, n.id, &[&lib]);
    upstream.upstream_refs = vec![lib.clone()];
    let other = cache(m, "other").await;
    let (oid, on) = upload(m, other.id, "app", "").await;
    assert_eq!(on.id, n.id, "an identical NAR is stored once across caches");
    upstream.cache_id = other.id;
    assert_eq!(
        m.publish_path(&upstream, &oid).await.unwrap(),
        Publish::Created
    );
    // References first, then the referrer (its own path among its references is fine).
    let lib_nar = publish(m, c.id, &lib, &[&lib]).await;
    assert_eq!(
        m.publish_path(&new_path(c.id, &app, n.id, &[&lib, &app]), &id)
            .await
            .unwrap(),
        Publish::Created
    );
    let row = m.get_path(c.id, &app.hash_part()).await.unwrap().unwrap();
    assert_eq!(row.store_path.name(), "app");
    assert_eq!(row.refs, vec![lib.clone(), app.clone()]);
    assert_eq!(row.nar, n);
    assert_eq!(
        m.cache_refs(c.id).await.unwrap(),
        vec![(app.hash_part(), lib.hash_part())]
    );
    // The upload was consumed; the same content again is idempotent; other content is refused.
    assert_eq!(m.upload_nar(c.id, &id).await.unwrap(), None);
    let (id2, n2) = upload(m, c.id, "app", "").await;
    assert_eq!(
        m.publish_path(&new_path(c.id, &app, n2.id, &[&lib, &app]), &id2)
            .await
            .unwrap(),
        Publish::AlreadyPresent
    );
    let (id3, n3) = upload(m, c.id, "impostor", "").await;
    assert_eq!(
        m.publish_path(&new_path(c.id, &app, n3.id, &[]), &id3)
            .await
            .unwrap(),
        Publish::Conflict {
            existing_nar_hash: n.nar_hash
        }
    );
    assert_eq!(
        m.get_path(c.id, &app.hash_part())
            .await
            .unwrap()
            .unwrap()
            .nar,
        n
    );
    // Reads.
    let missing = m
        .missing_hashes(
            c.id,
            &[sp("x").hash_part(), app.hash_part(), lib.hash_part()],
        )
        .await
        .unwrap();
    assert_eq!(missing, vec![sp("x").hash_part()]);
    let stats = m.cache_stats(c.id).await.unwrap();
    assert_eq!(stats.paths, 2);
    assert_eq!(stats.size, n.file_size + lib_nar.file_size);
    assert_eq!(stats.nar_size, n.nar_size + lib_nar.nar_size);
    assert_eq!(
        m.cache_nar_by_file_hash(c.id, &n.file_hash).await.unwrap(),
        Some(n.clone())
    );
    assert_eq!(
        m.cache_nar_by_file_hash(c.id, &n3.file_hash).await.unwrap(),
        None
    );
    assert_eq!(m.nar_chunks(n.id).await.unwrap(), nar("app", "").1);
    // Nix's uploader names its uploads by file name.
    let (row, chunks) = nar("keyed", "");
    m.claim_chunks("k1", &chunks).await.unwrap();
    m.insert_nar_for_upload("k1", c.id, Some("keyed.nar.zst"), &row, &chunks)
        .await
        .unwrap();
    let (kid, kn) = m
        .upload_by_key(c.id, "keyed.nar.zst")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((kid.as_str(), kn.nar_hash), ("k1", row.nar_hash));
}

/// Two replicas (two pools on one database) receive the same store path many times at once,
/// some in another compression: one NAR row, one path, one `Created`.
async fn concurrent_replicas_store_a_path_once(db: Db) {
    let a = db.meta.clone();
    let b = db.replica().await;
    let c = cache(&a, "race").await;
    let p = sp("racer");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let meta = if i % 2 == 0 { a.clone() } else { b.clone() };
        let p = p.clone();
        tasks.spawn(async move {
            let variant = if i % 4 < 2 { "" } else { "xz" };
            let (id, n) = upload(&meta, c.id, "racer", variant).await;
            meta.publish_path(&new_path(c.id, &p, n.id, &[]), &id)
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    let created = results.iter().filter(|r| **r == Publish::Created).count();
    let present = results
        .iter()
        .filter(|r| **r == Publish::AlreadyPresent)
        .count();
    assert_eq!((created, present), (1, 15), "{results:?}");
    assert_eq!(db.rows("nars").await, 1);
    assert_eq!(db.rows("paths").await, 1);
    assert_eq!(db.rows("nar_chunks").await, 1);
    let served = b.get_path(c.id, &p.hash_part()).await.unwrap().unwrap();
    assert_eq!(served.nar.nar_hash, nar("racer", "").0.nar_hash);
}

async fn garbage_collection_spares_what_is_referenced_or_claimed(db: Db) {
    let m = &db.meta;
    let c = cache(m, "gc").await;
    publish(m, c.id, &sp("kept"), &[]).await;
    let (_pending, pn) = upload(m, c.id, "pending", "").await;
    let deleted = Mutex::new(Vec::new());
    let n = m
        .collect_garbage(3600, 3600, 3600, &recorder(&deleted))
        .await
        .unwrap();
    assert_eq!(
        (n, deleted.lock().unwrap().len()),
        (0, 0),
        "young uploads are kept"
    );
    // The pending upload expires: its NAR, its chunk, the chunk's object and the NAR's
    // listing go; the published path's stay.
    let n = m
        .collect_garbage(-1, 3600, 3600, &recorder(&deleted))
        .await
        .unwrap();
    assert_eq!(n, 1);
    // In rounds: the NAR (and its listing) first, then the chunks no NAR uses any more.
    assert_eq!(
        *deleted.lock().unwrap(),
        vec![
            larder_store::meta::listing_object_key(&pn.nar_hash),
            chunk_object_key(&pn.file_hash.to_nix32()),
        ]
    );
    assert_eq!((db.rows("nars").await, db.rows("chunks").await), (1, 1));
    assert!(m
        .get_path(c.id, &sp("kept").hash_part())
        .await
        .unwrap()
        .is_some());
    // A chunk claimed by an upload in flight (object being written, NAR not yet recorded) is
    // spared until the claim expires.
    let orphan = nar("orphan", "").1;
    m.claim_chunks("in-flight", &orphan).await.unwrap();
    let n = m
        .collect_garbage(-1, 3600, 3600, &ok_deleter)
        .await
        .unwrap();
    assert_eq!((n, db.rows("chunks").await), (0, 2));
    // A failing object delete rolls its round back: the chunk's row stays and goes next
    // time. (The expired claim was forgotten by the round before, which committed: a chunk
    // becomes a candidate only once nothing claims it.)
    let failing = |_: String| -> BoxFuture<'static, DeleteResult> {
        Box::pin(async { Err(std::io::Error::other("object store down").into()) })
    };
    let err = m.collect_garbage(-1, 3600, -1, &failing).await.unwrap_err();
    assert!(matches!(err, MetaError::Cleanup(_)), "{err:?}");
    assert_eq!(
        (db.rows("chunks").await, db.rows("chunk_claims").await),
        (2, 0)
    );
    let n = m.collect_garbage(-1, 3600, -1, &ok_deleter).await.unwrap();
    assert_eq!((n, db.rows("chunks").await), (1, 1));
    assert_eq!(db.rows("chunk_claims").await, 0);
}

async fn orphaned_chunks_are_deleted_under_lock(db: Db) {
    let m = &db.meta;
    let store_url = format!("file://{}", db.dir.path().join("store").display());
    let objects = ObjectStore::open(&store_url, OpenOptions::default()).unwrap();
    let c = cache(m, "orphans").await;
    let known = publish(m, c.id, &sp("known"), &[])
        .await
        .file_hash
        .to_nix32();
    let orphan = h52("orphan");
    assert_eq!(
        m.unknown_chunks(&[known.clone(), orphan.clone()])
            .await
            .unwrap(),
        vec![orphan.clone()]
    );
    // A failing delete rolls the batch back: no row is left behind.
    let failing = |_: String| -> BoxFuture<'static, DeleteResult> {
        Box::pin(async { Err(std::io::Error::other("object store down").into()) })
    };
    let err = m
        .delete_orphan_chunks(std::slice::from_ref(&orphan), &failing)
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::Cleanup(_)), "{err:?}");
    assert_eq!(db.rows("chunks").await, 1);
    // Only the chunk without a row is deleted; the row made to lock it goes with it.
    let deleted = Mutex::new(Vec::new());
    let gone = m
        .delete_orphan_chunks(
            &[orphan.clone(), known.clone(), orphan.clone()],
            &recorder(&deleted),
        )
        .await
        .unwrap();
    assert_eq!(gone, vec![orphan.clone()]);
    assert_eq!(*deleted.lock().unwrap(), vec![chunk_object_key(&orphan)]);
    assert_eq!(db.rows("chunks").await, 1);

    // An upload of the orphan's bytes on another replica, while its object is being deleted:
    // its claim waits for the deletion to commit, then it writes the object again.
    let racer = ChunkRow::new(h52("racer"), 5);
    let key = larder_store::meta::chunk_object_key(&racer.chunk_hash);
    let stage = |name: &str| {
        let p = objects.staging_dir().join(name);
        std::fs::write(&p, b"racer").unwrap();
        p
    };
    objects.put_file(&key, &stage("orphan")).await.unwrap();
    let replica = db.replica().await;
    let upload = Mutex::new(None);
    let (objects, racer, upload, stage) = (&objects, &racer, &upload, &stage);
    let racing_delete = move |key: String| -> BoxFuture<'_, DeleteResult> {
        let (replica, chunk) = (replica.clone(), racer.clone());
        Box::pin(async move {
            let src = stage("upload");
            let store = objects.clone();
            let task = tokio::spawn(async move {
                replica
                    .claim_chunks("racing-upload", std::slice::from_ref(&chunk))
                    .await?;
                store
                    .put_file(
                        &larder_store::meta::chunk_object_key(&chunk.chunk_hash),
                        &src,
                    )
                    .await
                    .unwrap();
                Ok::<_, MetaError>(())
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                !task.is_finished(),
                "the claim did not wait for the orphan's deletion"
            );
            objects.delete(&key).await?;
            *upload.lock().unwrap() = Some(task);
            Ok(())
        })
    };
    let gone = m
        .delete_orphan_chunks(std::slice::from_ref(&racer.chunk_hash), &racing_delete)
        .await
        .unwrap();
    assert_eq!(gone, vec![racer.chunk_hash.clone()]);
    let task = upload.lock().unwrap().take().unwrap();
    task.await.unwrap().unwrap();
    assert!(
        objects.exists(&key).await.unwrap(),
        "the upload's object is gone"
    );
    assert_eq!(
        m.unknown_chunks(std::slice::from_ref(&racer.chunk_hash))
            .await
            .unwrap(),
        Vec::<String>::new(),
        "the claimed chunk has no row"
    );
    assert_eq!(db.rows("chunk_claims").await, 1);
}

async fn eviction_is_closure_safe_and_keeps_nars_for_a_grace(db: Db) {
    let m = &db.meta;
    let c = cache(m, "ev").await;
    let lib = sp("lib");
    let app = sp("app");
    let lib_nar = publish(m, c.id, &lib, &[]).await;
    publish(m, c.id, &app, &[&lib]).await;
    // lib alone would leave app pointing at nothing.
    assert_eq!(
        m.evict_paths(c.id, &[lib.hash_part()]).await.unwrap(),
        Evicted::Raced
    );
    // A pin protects app.
    let pin = m
        .add_pin(
            c.id,
            "release",
            &app.hash_part(),
            &app.to_absolute(),
            Keep::Forever,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pin.revision, 1);
    let both = [app.hash_part(), lib.hash_part()];
    assert_eq!(m.evict_paths(c.id, &both).await.unwrap(), Evicted::Raced);
    assert!(m.delete_pin(c.id, "release").await.unwrap());
    assert_eq!(m.evict_paths(c.id, &both).await.unwrap(), Evicted::Done);
    assert_eq!(m.get_path(c.id, &lib.hash_part()).await.unwrap(), None);
    assert!(m.cache_refs(c.id).await.unwrap().is_empty());
    let now = now_unix();
    assert_eq!(
        m.servable_nar_by_file_hash(c.id, &lib_nar.file_hash, now - 60)
            .await
            .unwrap(),
        Some(lib_nar.clone()),
        "an evicted path's NAR stays servable for the grace period"
    );
    assert_eq!(
        m.servable_nar_by_file_hash(c.id, &lib_nar.file_hash, now + 60)
            .await
            .unwrap(),
        None
    );
    // Within the grace, collection keeps the NAR; after it, the NAR goes.
    m.collect_garbage(3600, 3600, -1, &ok_deleter)
        .await
        .unwrap();
    assert_eq!(db.rows("nars").await, 2);
    m.collect_garbage(3600, -1, -1, &ok_deleter).await.unwrap();
    assert_eq!(db.rows("nars").await, 0);
}

/// Upload (or reuse) a NAR made of the chunks `chunks` (id seed, stored size; a seed may come
/// twice) and publish `p` with it in a cache; returns the NAR.
async fn publish_chunked(
    meta: &Metadata,
    cache_id: i64,
    p: &StorePath,
    nar_seed: &str,
    chunks: &[(&str, i64)],
) -> NarRow {
    let id = upload_id();
    let chunks: Vec<ChunkRow> = chunks
        .iter()
        .map(|(seed, size)| ChunkRow::new(h52(&format!("chunk/{seed}")), *size))
        .collect();
    let row = NarRow {
        id: 0,
        nar_hash: Sha256::digest(format!("nar/{nar_seed}").as_bytes()),
        nar_size: 10_000 + nar_seed.len() as i64,
        compression: Compression::Zstd,
        file_hash: Sha256::digest(format!("file/{nar_seed}").as_bytes()),
        file_size: chunks.iter().map(|c| c.file_size).sum(),
    };
    let n = match meta
        .reuse_nar_for_upload(&id, cache_id, None, &row.nar_hash)
        .await
        .unwrap()
    {
        Some(n) => n,
        None => {
            meta.claim_chunks(&id, &chunks).await.unwrap();
            meta.insert_nar_for_upload(&id, cache_id, None, &row, &chunks)
                .await
                .unwrap()
                .0
        }
    };
    let done = meta
        .publish_path(&new_path(cache_id, p, n.id, &[]), &id)
        .await
        .unwrap();
    assert_eq!(done, Publish::Created, "{p}");
    n
}

/// Every cache's counters and the store's totals equal a full recount of the tables; returns
/// the caches' stats.
async fn sizes_match_a_recount(m: &Metadata, caches: &[i64], when: &str) -> Vec<CacheStats> {
    let mut out = Vec::new();
    for &id in caches {
        let kept = m.cache_stats(id).await.unwrap();
        assert_eq!(
            kept,
            m.recount_cache_stats(id).await.unwrap(),
            "{when}: cache {id}"
        );
        assert_eq!(kept.stored_size, m.cache_stored_size(id).await.unwrap());
        out.push(kept);
    }
    assert_eq!(
        m.store_totals().await.unwrap(),
        m.recount_store_totals().await.unwrap(),
        "{when}: store totals"
    );
    let listed: std::collections::HashMap<i64, CacheStats> =
        m.all_cache_stats().await.unwrap().into_iter().collect();
    for (&id, s) in caches.iter().zip(&out) {
        assert_eq!(listed.get(&id).copied().unwrap_or_default(), *s, "{when}");
    }
    out
}

/// A cache's path count, sizes and deduplicated size, and the store's totals, are counters
/// kept by every change (publication, eviction, deletion, fsck's repair, collection, cache
/// deletion, concurrent replicas, migration 9), always equal to a full recount.
async fn sizes_are_counted_exactly(db: Db) {
    let m = &db.meta;
    let a = cache(m, "sa").await;
    let b = cache(m, "sb").await;
    let ids = [a.id, b.id];
    let empty = sizes_match_a_recount(m, &ids, "empty").await;
    assert_eq!(empty[0], CacheStats::default());
    // x twice in one NAR, y shared by two NARs, one NAR used by two paths, x in both caches.
    let (p1, p2, p3, p4) = (sp("p1"), sp("p2"), sp("p3"), sp("p4"));
    let n1 = publish_chunked(m, a.id, &p1, "n1", &[("x", 100), ("y", 20), ("x", 100)]).await;
    let n2 = publish_chunked(m, a.id, &p2, "n2", &[("y", 20), ("z", 3)]).await;
    assert_eq!(publish_chunked(m, a.id, &p3, "n1", &[]).await.id, n1.id);
    publish_chunked(m, b.id, &p4, "n4", &[("x", 100), ("w", 7)]).await;
    let s = sizes_match_a_recount(m, &ids, "published").await;
    assert_eq!(
        s[0],
        CacheStats {
            paths: 3,
            size: 220 + 23 + 220,
            nar_size: 3 * 10_002,
            stored_size: 123,
        }
    );
    assert_eq!(s[1].stored_size, 107);
    let totals = m.store_totals().await.unwrap();
    assert_eq!((totals.logical, totals.stored), (220 + 23 + 220 + 107, 130));

    // Replicas publishing at once, chunks shared among them and with what is there.
    let other = db.replica().await;
    let handles = [m.clone(), other.clone()];
    let racers = (0..12).map(|i| {
        let h = handles[i % 2].clone();
        let cache_id = ids[i % 2];
        async move {
            let p = sp(&format!("race{i}"));
            let seed = format!("race{i}");
            publish_chunked(&h, cache_id, &p, &seed, &[("x", 100), ("r", 9), (&seed, 1)]).await;
        }
    });
    futures::future::join_all(racers).await;
    sizes_match_a_recount(m, &ids, "concurrent publications").await;

    // p1 goes, p3 keeps its NAR (and x, y): only a path and its bytes leave.
    assert_eq!(
        m.evict_paths(a.id, &[p1.hash_part()]).await.unwrap(),
        Evicted::Done
    );
    let s = sizes_match_a_recount(m, &ids, "evicted one of two paths of a NAR").await;
    assert_eq!(s[0].paths, 3 + 6 - 1);
    // Two replicas evicting the same paths at once count them once.
    let both = [p3.hash_part(), p2.hash_part()];
    let (r1, r2) = futures::join!(m.evict_paths(a.id, &both), other.evict_paths(a.id, &both));
    assert_eq!((r1.unwrap(), r2.unwrap()), (Evicted::Done, Evicted::Done));
    sizes_match_a_recount(m, &ids, "evicted twice at once").await;

    // fsck's repair unpublishes a damaged NAR's paths.
    let p5 = sp("p5");
    let n5 = publish_chunked(m, b.id, &p5, "n5", &[("w", 7), ("v", 50)]).await;
    sizes_match_a_recount(m, &ids, "published again").await;
    let gone = m.unpublish_damaged(None, &[n5.id, n2.id]).await.unwrap();
    assert_eq!(gone.len(), 1);
    sizes_match_a_recount(m, &ids, "unpublished by fsck").await;

    // Collection deletes chunk rows: the store's stored bytes follow.
    let before = m.store_totals().await.unwrap().stored;
    m.collect_garbage(3600, -1, -1, &ok_deleter).await.unwrap();
    let after = sizes_match_a_recount(m, &ids, "collected").await;
    assert!(m.store_totals().await.unwrap().stored < before);
    assert!(after[0].paths > 0);

    // A deleted cache leaves the totals.
    assert!(m.delete_cache("sb").await.unwrap());
    sizes_match_a_recount(m, &[a.id, b.id], "cache deleted").await;
    assert_eq!(m.cache_stats(b.id).await.unwrap(), CacheStats::default());

    // Migration 9 computes the counters of an existing database.
    let expected = m.cache_stats(a.id).await.unwrap();
    assert!(expected.paths > 0);
    let pool = raw_pool(&db).await;
    for sql in [
        "DROP TABLE cache_chunks",
        "DROP TABLE cache_sizes",
        "DROP TABLE store_sizes",
        // And migration 10 (packs), which comes after.
        "DROP TABLE packs",
        "DROP INDEX chunks_pack",
        "ALTER TABLE chunks DROP COLUMN pack",
        "ALTER TABLE chunks DROP COLUMN pack_offset",
        // And migration 11 (path_uses).
        "DROP TABLE path_uses",
        "ALTER TABLE paths ADD COLUMN last_used_at BIGINT",
        "DELETE FROM larder_schema WHERE version >= 9",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let migrated = db.replica().await;
    assert_eq!(migrated.cache_stats(a.id).await.unwrap(), expected);
    sizes_match_a_recount(&migrated, &[a.id, b.id], "migrated").await;
}

/// A read sees every commit made before it, through any handle on the database, at once: a
/// path published through another handle (another replica or process) is found by the very
/// next lookup, and an evicted one is gone by the next. On SQLite lookups run on the direct
/// read connections of `meta/fast.rs` (or the pool when those are all taken), which must see
/// what other connections committed.
async fn lookups_see_every_commit_at_once(db: Db) {
    let m = &db.meta;
    let other = db.replica().await;
    let c = cache(m, "fresh").await;
    let lib = sp("lib");
    // A miss first: it must not be remembered by anything.
    assert_eq!(m.get_path(c.id, &lib.hash_part()).await.unwrap(), None);
    let nar = publish(&other, c.id, &lib, &[]).await;
    let row = m
        .get_path(c.id, &lib.hash_part())
        .await
        .unwrap()
        .expect("a path published through another handle is found at once");
    assert_eq!(
        (row.store_path.clone(), row.nar.clone()),
        (lib.clone(), nar)
    );
    // Many lookups at once, more than there are read connections: whichever way each goes,
    // all read the same row.
    let reads = (0..64).map(|_| {
        let (m, h) = (m.clone(), lib.hash_part());
        tokio::spawn(async move { m.get_path(c.id, &h).await.unwrap() })
    });
    for r in futures::future::join_all(reads).await {
        assert_eq!(r.unwrap().as_ref(), Some(&row));
    }
    // Its NAR is servable by FileHash, with its chunks, at once too.
    let file_hash = row.nar.file_hash;
    let served = m.servable_nar_by_file_hash(c.id, &file_hash, 0).await;
    assert_eq!(served.unwrap().as_ref(), Some(&row.nar));
    let chunks = m.nar_chunks(row.nar.id).await.unwrap();
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(
        other.evict_paths(c.id, &[lib.hash_part()]).await.unwrap(),
        Evicted::Done
    );
    assert_eq!(
        m.get_path(c.id, &lib.hash_part()).await.unwrap(),
        None,
        "a path evicted through another handle is gone at once"
    );
    // Beyond any grace (evicted before now + 60 s: none counts), its NAR is not servable.
    let since = now_unix() + 60;
    let served = m.servable_nar_by_file_hash(c.id, &file_hash, since).await;
    assert_eq!(served.unwrap(), None, "an evicted path's NAR is not served");
}

async fn pins_keep_revisions_by_policy(db: Db) {
    let m = &db.meta;
    let c = cache(m, "pins").await;
    let p = sp("pinned");
    assert!(m
        .add_pin(c.id, "r", &p.hash_part(), &p.to_absolute(), Keep::Forever)
        .await
        .unwrap()
        .is_none());
    publish(m, c.id, &p, &[]).await;
    for rev in 1..=3 {
        let pin = m
            .add_pin(
                c.id,
                "r",
                &p.hash_part(),
                &p.to_absolute(),
                Keep::Revisions(2),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pin.revision, rev);
        assert_eq!(pin.keep, Keep::Revisions(2));
    }
    let revs: Vec<i64> = m
        .list_pins(c.id)
        .await
        .unwrap()
        .iter()
        .map(|p| p.revision)
        .collect();
    assert_eq!(revs, [3, 2]);
    assert!(m.delete_pin(c.id, "r").await.unwrap());
    assert!(!m.delete_pin(c.id, "r").await.unwrap());
    assert!(m.list_pins(c.id).await.unwrap().is_empty());
}

/// A connection pool of its own on the database, for changing it behind the metadata's back
/// (undoing migrations, faking a newer schema).
async fn raw_pool(db: &Db) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = match db.engine() {
        Engine::Sqlite => format!("{}?mode=rw", db.url),
        Engine::Postgres => db.url.clone(),
    };
    sqlx::AnyPool::connect(&url).await.unwrap()
}

async fn usage_and_logs_are_recorded(db: Db) {
    let m = &db.meta;
    let c = cache(m, "use").await;
    let a = sp("used-by-hash");
    let b = sp("used-by-nar");
    publish(m, c.id, &a, &[]).await;
    let bn = publish(m, c.id, &b, &[]).await;
    m.record_usage(c.id, &[a.hash_part()], &[bn.id], 12345, 600)
        .await
        .unwrap();
    let used = || async {
        let mut lru = m.lru_paths(c.id).await.unwrap();
        lru.sort_by_key(|p| p.id);
        lru.iter().map(|p| p.last_used_at).collect::<Vec<_>>()
    };
    assert_eq!(used().await, [Some(12345), Some(12345)]);
    // Used again within the resolution: nothing is written; past it, the new time is.
    m.record_usage(c.id, &[a.hash_part()], &[bn.id], 12345 + 599, 600)
        .await
        .unwrap();
    assert_eq!(used().await, [Some(12345), Some(12345)]);
    m.record_usage(c.id, &[a.hash_part()], &[], 12345 + 600, 600)
        .await
        .unwrap();
    assert_eq!(used().await, [Some(12945), Some(12345)]);
    // An older use never moves a recorded one back.
    m.record_usage(c.id, &[], &[bn.id], 100, 0).await.unwrap();
    assert_eq!(used().await, [Some(12945), Some(12345)]);
    // A use leaves with its path: published again, the path starts unused.
    assert_eq!(
        m.evict_paths(c.id, &[a.hash_part()]).await.unwrap(),
        Evicted::Done
    );
    publish(m, c.id, &a, &[]).await;
    assert_eq!(used().await, [Some(12345), None]);
    m.record_usage(c.id, &[a.hash_part()], &[], 5000, 600)
        .await
        .unwrap();
    // Version 11 moves the uses a database recorded in `paths` into `path_uses`.
    let pool = raw_pool(&db).await;
    for sql in [
        "ALTER TABLE paths ADD COLUMN last_used_at BIGINT",
        "UPDATE paths SET last_used_at = \
         (SELECT u.last_used_at FROM path_uses u WHERE u.path_id = paths.id)",
        "DROP TABLE path_uses",
        "DELETE FROM larder_schema WHERE version >= 11",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let migrated = db.replica().await;
    let mut lru = migrated.lru_paths(c.id).await.unwrap();
    lru.sort_by_key(|p| p.id);
    let uses: Vec<_> = lru.iter().map(|p| p.last_used_at).collect();
    assert_eq!(uses, [Some(12345), Some(5000)]);
    m.put_log(c.id, "x.drv", "log/one", 3).await.unwrap();
    m.put_log(c.id, "x.drv", "log/two", 4).await.unwrap();
    assert_eq!(
        m.get_log(c.id, "x.drv").await.unwrap(),
        Some(("log/two".to_owned(), 4))
    );
    assert_eq!(m.get_log(c.id, "y.drv").await.unwrap(), None);
}

/// Daily statistics: downloads flushed by several replicas at once add up, a size sample read
/// earlier never replaces a later one, old days are pruned, and deleting a cache deletes its
/// days.
async fn daily_stats_add_up_across_replicas(db: Db) {
    let m = &db.meta;
    let c = cache(m, "stats").await;
    let other = cache(m, "other").await;
    let one = Downloads {
        narinfo_requests: 1,
        narinfo_bytes: 100,
        nar_requests: 2,
        nar_bytes: 5000,
    };
    // 4 replicas × 10 flushes of the same day, concurrently.
    let replicas = futures::future::join_all((0..4).map(|_| db.replica())).await;
    futures::future::join_all(replicas.iter().map(|r| async move {
        for _ in 0..10 {
            r.add_downloads(&[(c.id, 20_000, one), (c.id, 20_001, one)])
                .await
                .unwrap();
        }
    }))
    .await;
    m.add_downloads(&[
        (other.id, 20_000, one),
        (c.id, 19_990, Downloads::default()),
    ])
    .await
    .unwrap();
    let (days, before) = m.cache_days(c.id, 19_990, 20_001).await.unwrap();
    assert_eq!(before, None);
    let sums = Downloads {
        narinfo_requests: 40,
        narinfo_bytes: 4000,
        nar_requests: 80,
        nar_bytes: 200_000,
    };
    // An empty count writes no row.
    assert_eq!(
        days,
        vec![
            CacheDay {
                day: 20_000,
                downloads: sums,
                size: None
            },
            CacheDay {
                day: 20_001,
                downloads: sums,
                size: None
            },
        ]
    );
    // Sizes: the latest reading wins, whatever the order the writes arrive in.
    m.record_sizes(20_001, 2_000, &[(c.id, 700)]).await.unwrap();
    m.record_sizes(20_001, 1_000, &[(c.id, 500), (other.id, 9)])
        .await
        .unwrap();
    m.record_sizes(19_995, 1_000, &[(c.id, 300)]).await.unwrap();
    let (days, before) = m.cache_days(c.id, 19_996, 20_001).await.unwrap();
    assert_eq!(before, Some(300));
    assert_eq!(days[1].size, Some(700));
    assert_eq!(days[1].downloads, sums, "a size sample keeps the counts");
    assert_eq!(m.cache_days(other.id, 0, 30_000).await.unwrap().0.len(), 2);
    // Pruning: days before the cutoff go.
    assert_eq!(m.prune_cache_days(20_000).await.unwrap(), 1);
    assert_eq!(m.cache_days(c.id, 0, 30_000).await.unwrap().0.len(), 2);
    // Deleting a cache deletes its days; a flush racing the deletion leaves rows that the
    // next pruning deletes.
    assert!(m.delete_cache("other").await.unwrap());
    assert!(m
        .cache_days(other.id, 0, 30_000)
        .await
        .unwrap()
        .0
        .is_empty());
    m.add_downloads(&[(other.id, 20_001, one)]).await.unwrap();
    assert_eq!(m.prune_cache_days(0).await.unwrap(), 1);
    assert_eq!(db.rows("cache_days").await, 2);
}

/// Locks: on PostgreSQL one holder at a time, released when the holder's session ends (the
/// replica dying); on SQLite (one process) always granted.
async fn locks_have_one_holder_and_die_with_it(db: Db) {
    let other = db.replica().await;
    let held = db
        .meta
        .try_lock(LockName::Background)
        .await
        .unwrap()
        .expect("a free lock");
    let second = other.try_lock(LockName::Background).await.unwrap();
    let Some(pg) = &db.pg else {
        assert!(second.is_some(), "SQLite: a no-op lock");
        return;
    };
    assert!(second.is_none(), "PostgreSQL: one holder");
    assert!(other
        .try_lock(LockName::Eviction(7))
        .await
        .unwrap()
        .is_some());
    // `lock` waits for the holder.
    let waiter = tokio::spawn(async move { other.lock(LockName::Background).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "lock() returned while another held it"
    );
    held.release().await;
    let mut got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("lock() after release")
        .unwrap();
    assert!(got.alive().await);
    // The holder's session dies (a crashed replica): the lock is free again, and the pools
    // of both handles reconnect by themselves.
    let db_name = PgCluster::db_of(&db.url);
    pg.psql(
        db_name,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    assert!(
        !got.alive().await,
        "a terminated session still counts as holding"
    );
    let again = db.meta.try_lock(LockName::Background).await.unwrap();
    assert!(again.is_some(), "the lock outlived its session");
    // A pooled connection broken while in recent use fails one query, as "unavailable"
    // (a 503 to a client, which retries); then the pool replaces it.
    let mut failures = 0;
    loop {
        match db.meta.get_cache("x").await {
            Ok(found) => {
                assert!(found.is_none());
                break;
            }
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                failures += 1;
                assert!(failures <= 16, "the pool does not recover");
            }
        }
    }
}

/// Replicas starting together on an empty database: each migration is applied once.
async fn replicas_starting_together_migrate_once(db: Db) {
    let url = db.fresh_url();
    let opened = futures::future::join_all((0..4).map(|_| Metadata::connect(&url))).await;
    for m in opened {
        let m = m.unwrap();
        assert_eq!(m.schema_version().await.unwrap(), 11);
    }
    if let Some(pg) = &db.pg {
        let versions = pg.psql(
            PgCluster::db_of(&url),
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM larder_schema",
        );
        assert_eq!(versions, "1,2,3,4,5,6,7,8,9,10,11");
    }
}

/// A database migrated by a newer larder is refused, not written to.
async fn a_newer_schema_is_refused(db: Db) {
    let pool = raw_pool(&db).await;
    sqlx::query("INSERT INTO larder_schema (version) VALUES (99)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let err = Metadata::connect(&db.url).await.unwrap_err();
    assert!(
        matches!(err, MetaError::SchemaTooNew { found: 99, .. }),
        "{err:?}"
    );
}

/// Realisations name a published path and existing dependencies, are never changed to
/// another path, and go with their path (and their dependents) on eviction and cache deletion.
async fn realisations_follow_their_paths(db: Db) {
    let m = &db.meta;
    let c = cache(m, "ca").await;
    let dep = sp("dep");
    let top = sp("top");
    let id = |n: &str| {
        DrvOutput::parse(&format!(
            "sha256:{}!out",
            Sha256::digest(n.as_bytes()).to_hex()
        ))
        .unwrap()
    };
    let row = |n: &str, p: &StorePath, deps: Vec<(DrvOutput, StorePath)>| RealisationRow {
        drv_output: id(n),
        out_path: p.clone(),
        sigs: vec![sig(n)],
        deps,
    };
    let dep_row = row("dep", &dep, vec![]);
    let top_row = row("top", &top, vec![(id("dep"), dep.clone())]);
    // The path first.
    assert_eq!(
        m.put_realisation(c.id, &dep_row).await.unwrap(),
        PutRealisation::MissingPath
    );
    publish(m, c.id, &dep, &[]).await;
    publish(m, c.id, &top, &[&dep]).await;
    // The dependency first.
    assert_eq!(
        m.put_realisation(c.id, &top_row).await.unwrap(),
        PutRealisation::MissingDependencies(vec![id("dep")])
    );
    assert_eq!(
        m.put_realisation(c.id, &dep_row).await.unwrap(),
        PutRealisation::Created
    );
    // A dependency named with another out path is missing too.
    let wrong_dep = row("top", &top, vec![(id("dep"), top.clone())]);
    assert_eq!(
        m.put_realisation(c.id, &wrong_dep).await.unwrap(),
        PutRealisation::MissingDependencies(vec![id("dep")])
    );
    assert_eq!(
        m.put_realisation(c.id, &top_row).await.unwrap(),
        PutRealisation::Created
    );
    assert_eq!(
        m.put_realisation(c.id, &top_row).await.unwrap(),
        PutRealisation::AlreadyPresent
    );
    assert_eq!(
        m.put_realisation(c.id, &row("top", &dep, vec![]))
            .await
            .unwrap(),
        PutRealisation::Conflict {
            existing_out_path: top.basename()
        }
    );
    assert_eq!(
        m.get_realisation(c.id, &id("top")).await.unwrap(),
        Some(top_row.clone())
    );
    assert_eq!(
        m.realisations_of_path(c.id, &dep.hash_part())
            .await
            .unwrap(),
        vec![id("dep").to_string()]
    );
    // Another cache sees none of them.
    let other = cache(m, "other").await;
    assert_eq!(m.get_realisation(other.id, &id("top")).await.unwrap(), None);
    // Evicting both paths deletes both realisations and the dependency rows.
    let both = [top.hash_part(), dep.hash_part()];
    assert_eq!(m.evict_paths(c.id, &both).await.unwrap(), Evicted::Done);
    assert_eq!(m.get_realisation(c.id, &id("top")).await.unwrap(), None);
    assert_eq!(db.rows("realisations").await, 0);
    assert_eq!(db.rows("realisation_deps").await, 0);
    // Deleting a cache deletes its realisations.
    publish(m, other.id, &dep, &[]).await;
    let mut in_other = dep_row.clone();
    in_other.sigs.clear();
    assert_eq!(
        m.put_realisation(other.id, &in_other).await.unwrap(),
        PutRealisation::Created
    );
    assert_eq!(
        m.get_realisation(other.id, &id("dep")).await.unwrap(),
        Some(in_other)
    );
    assert!(m.delete_cache("other").await.unwrap());
    assert_eq!(db.rows("realisations").await, 0);
}

/// An upload of many chunks, written a hundred rows per statement: every chunk row, claim and
/// list entry is there, in order, across the statements' edges and with repeats; a chunk
/// stored before keeps its row; claiming existing chunks finds exactly those, once each.
async fn uploads_of_many_chunks_are_recorded_whole(db: Db) {
    let m = &db.meta;
    let c = cache(m, "many").await;
    let chunk = |i: i64| {
        ChunkRow::new(
            cdc_chunk_id(&Sha256::digest(format!("chunk/{i}").as_bytes())),
            1000 + i,
        )
    };
    m.claim_chunks("earlier", &[chunk(7)]).await.unwrap();
    // 250 distinct chunks (statements of 100, 100, 50 rows), the first 51 listed again.
    let list: Vec<ChunkRow> = (0..250).chain(0..51).map(chunk).collect();
    let id = upload_id();
    m.claim_chunks(&id, &list).await.unwrap();
    assert_eq!(db.rows("chunks").await, 250);
    assert_eq!(db.rows("chunk_claims").await, 251);
    let ids: Vec<String> = list.iter().map(|c| c.chunk_hash.clone()).collect();
    // Claimed, but not located yet (stored nowhere): not held for a push session.
    assert!(m.claimed_chunks(&id, &ids).await.unwrap().is_empty());
    let pack = larder_store::meta::Pack {
        hash: h52("pack/many"),
        size: 1,
        chunks: vec![(list[3].chunk_hash.clone(), 0, list[3].file_size)],
    };
    m.claim_pack(&pack.hash, pack.size).await.unwrap();
    m.locate_chunks(&pack).await.unwrap();
    assert_eq!(
        m.claimed_chunks(&id, &ids).await.unwrap(),
        std::collections::HashSet::from([list[3].chunk_hash.clone()])
    );
    let (row, _) = nar("many", "");
    let (stored, inserted) = m
        .insert_nar_for_upload(&id, c.id, None, &row, &list)
        .await
        .unwrap();
    assert!(inserted);
    let names = |rows: &[ChunkRow]| -> Vec<(String, i64)> {
        rows.iter()
            .map(|r| (r.chunk_hash.clone(), r.file_size))
            .collect()
    };
    let recorded = m.nar_chunks(stored.id).await.unwrap();
    assert_eq!(names(&recorded), names(&list));
    // The located chunk keeps its pack; the others are objects of their own.
    assert_eq!(recorded[3].pack.as_deref(), Some(pack.hash.as_str()));
    assert!(recorded
        .iter()
        .all(|r| r.chunk_hash == list[3].chunk_hash || r.pack.is_none()));
    assert_eq!(db.rows("nar_chunks").await, 301);
    assert_eq!(db.rows("chunks").await, 250);
    assert_eq!(
        db.rows("chunk_claims").await,
        1,
        "the upload's claims are released"
    );
    // 300 ids, 50 of them of no chunk: only the 250 are claimed, and claiming again renews.
    let asked: Vec<String> = (0..300).map(|i| chunk(i).chunk_hash).collect();
    for _ in 0..2 {
        let claimed = m.claim_existing_chunks("session", &asked).await.unwrap();
        let want: std::collections::HashSet<String> =
            (0..250).map(|i| chunk(i).chunk_hash).collect();
        assert_eq!(claimed, want);
        assert_eq!(db.rows("chunk_claims").await, 251);
    }
    assert_eq!(db.rows("chunks").await, 250);
}

/// Every contract test, once per backend.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await
                }
            )*
        }
    };
}

contract!(
    caches_are_created_updated_and_deleted,
    tokens_are_stored_found_and_revoked,
    stored_values_decode_or_name_what_is_wrong,
    publishing_keeps_the_integrity_rules,
    concurrent_replicas_store_a_path_once,
    garbage_collection_spares_what_is_referenced_or_claimed,
    orphaned_chunks_are_deleted_under_lock,
    eviction_is_closure_safe_and_keeps_nars_for_a_grace,
    lookups_see_every_commit_at_once,
    pins_keep_revisions_by_policy,
    usage_and_logs_are_recorded,
    daily_stats_add_up_across_replicas,
    locks_have_one_holder_and_die_with_it,
    replicas_starting_together_migrate_once,
    a_newer_schema_is_refused,
    realisations_follow_their_paths,
    sizes_are_counted_exactly,
    uploads_of_many_chunks_are_recorded_whole,
);

// ---- PostgreSQL only: an unreachable server --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_fails_fast_and_recovers_by_itself() {
    let db = Db::postgres().await;
    let pg = db.pg.as_ref().unwrap();
    let c = cache(&db.meta, "faults").await;
    pg.stop();
    let started = Instant::now();
    let err = db.meta.get_cache("faults").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    // The pool's acquire timeout (3 s), with a margin for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "failing took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let lock_err = db.meta.try_lock(LockName::Background).await.unwrap_err();
    assert!(lock_err.is_unavailable(), "{lock_err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "failing took {:?}",
        started.elapsed()
    );
    for text in [
        format!("{err:?}"),
        format!("{lock_err:?}"),
        format!("{:?}", db.meta),
    ] {
        assert!(!text.contains(pg.password()), "the password leaked: {text}");
    }
    pg.restart();
    // The same handle works again: no restart of the application. A pooled connection that
    // was in use just before the outage is not checked before its next use, so it may fail
    // one query (as unavailable) before the pool replaces it.
    let mut failures = 0;
    let found = loop {
        match db.meta.get_cache("faults").await {
            Ok(found) => break found,
            Err(e) => {
                assert!(e.is_unavailable(), "{e:?}");
                failures += 1;
                assert!(failures <= 16, "the pool does not recover");
            }
        }
    };
    assert_eq!(found, Some(c));
    assert!(db
        .meta
        .try_lock(LockName::Background)
        .await
        .unwrap()
        .is_some());
}

// ---- copying a database into another (`larder migrate`) --------------------------------

/// Rows in every table.
async fn populate(m: &Metadata) {
    let a = cache(m, "one").await;
    let b = cache(m, "two").await;
    m.create_token(&token("admin")).await.unwrap();
    let lib = sp("lib");
    let app = sp("app");
    publish(m, a.id, &lib, &[]).await;
    publish(m, a.id, &app, &[&lib]).await;
    publish(m, b.id, &lib, &[]).await;
    let gone = sp("gone");
    publish(m, a.id, &gone, &[]).await;
    assert_eq!(
        m.evict_paths(a.id, &[gone.hash_part()]).await.unwrap(),
        Evicted::Done
    );
    upload(m, b.id, "pending", "xz").await;
    let in_flight = nar("in-flight", "").1;
    m.claim_chunks("in-flight", &in_flight).await.unwrap();
    let pack = larder_store::meta::Pack {
        hash: h52("pack/in-flight"),
        size: 500,
        chunks: vec![(in_flight[0].chunk_hash.clone(), 7, in_flight[0].file_size)],
    };
    m.claim_pack(&pack.hash, pack.size).await.unwrap();
    m.locate_chunks(&pack).await.unwrap();
    m.add_pin(
        a.id,
        "rel",
        &app.hash_part(),
        &app.to_absolute(),
        Keep::Days(3),
    )
    .await
    .unwrap()
    .unwrap();
    m.put_log(a.id, "app.drv", "log/app", 10).await.unwrap();
    let id = |n: &str| {
        DrvOutput::parse(&format!(
            "sha256:{}!out",
            Sha256::digest(n.as_bytes()).to_hex()
        ))
        .unwrap()
    };
    for (n, p, deps) in [
        ("lib", &lib, vec![]),
        ("app", &app, vec![(id("lib"), lib.clone())]),
    ] {
        let r = RealisationRow {
            drv_output: id(n),
            out_path: p.clone(),
            sigs: vec![sig(n)],
            deps,
        };
        assert_eq!(
            m.put_realisation(a.id, &r).await.unwrap(),
            PutRealisation::Created
        );
    }
    m.record_usage(a.id, &[app.hash_part()], &[], 777, 0)
        .await
        .unwrap();
    let served = Downloads {
        narinfo_requests: 3,
        narinfo_bytes: 1200,
        nar_requests: 1,
        nar_bytes: 4096,
    };
    m.add_downloads(&[(a.id, 20_000, served)]).await.unwrap();
    m.record_sizes(20_001, 1_728_000_000_000, &[(a.id, 4096), (b.id, 0)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_sqlite_to_postgres_is_verified_atomic_and_reversible() {
    let src = Db::sqlite().await;
    populate(&src.meta).await;
    let sums = transfer::checksums(&src.meta).await.unwrap();
    for t in &sums {
        assert!(t.rows > 0, "populate() leaves table {} empty", t.table);
    }
    let dst = Db::postgres().await;
    let report = transfer::copy(&src.meta, &dst.meta, false).await.unwrap();
    assert!(!report.overwritten);
    assert_eq!(report.tables, sums);
    assert_eq!(transfer::checksums(&dst.meta).await.unwrap(), sums);
    // The target answers like the source.
    let one = dst.meta.get_cache("one").await.unwrap().unwrap();
    assert_eq!(Some(one.clone()), src.meta.get_cache("one").await.unwrap());
    assert_eq!(
        dst.meta
            .get_path(one.id, &sp("app").hash_part())
            .await
            .unwrap(),
        src.meta
            .get_path(one.id, &sp("app").hash_part())
            .await
            .unwrap()
    );
    // A non-empty target is refused, and left as it was.
    let err = transfer::copy(&src.meta, &dst.meta, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::TargetNotEmpty { .. }),
        "{err:?}"
    );
    assert_eq!(transfer::checksums(&dst.meta).await.unwrap(), sums);
    // Asked to, it is replaced: running the copy again is idempotent.
    cache(&dst.meta, "extra").await;
    let again = transfer::copy(&src.meta, &dst.meta, true).await.unwrap();
    assert!(again.overwritten);
    assert_eq!(transfer::checksums(&dst.meta).await.unwrap(), sums);
    // New rows in the target get fresh ids (its sequences follow the copied ids).
    let max_id = dst
        .meta
        .list_caches()
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .max();
    let new = cache(&dst.meta, "after").await;
    assert!(Some(new.id) > max_id);
    publish(&dst.meta, new.id, &sp("new-path"), &[]).await;
    // And back again, into a fresh SQLite database.
    let back = Db::sqlite().await;
    transfer::copy(&dst.meta, &back.meta, false).await.unwrap();
    assert_eq!(
        transfer::checksums(&back.meta).await.unwrap(),
        transfer::checksums(&dst.meta).await.unwrap()
    );
}

// ---- SQLite only: what reaches the disk ---------------------------------------------------

/// SQLite commits reach the database file only at a checkpoint (`synchronous = NORMAL` in WAL
/// mode): losing the WAL (what an OS crash or power loss can do to unsynced frames) would undo
/// them. `make_durable`, which garbage collection runs before deleting any object, puts every
/// committed transaction in the database file itself: a copy of that file alone, without its
/// WAL, has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commits_are_in_the_database_file_before_objects_are_collected() {
    let db = Db::sqlite().await;
    cache(&db.meta, "durable").await;
    let file = db.dir.path().join("meta.db");
    let lost_wal = |name: &str| {
        let copy = db.dir.path().join(name);
        std::fs::copy(&file, &copy).unwrap();
        format!("sqlite://{}", copy.display())
    };
    // Before: the new cache lives only in the WAL.
    let before = Metadata::connect(&lost_wal("before.db")).await.unwrap();
    assert!(before.get_cache("durable").await.unwrap().is_none());
    assert!(db.meta.make_durable().await.unwrap());
    let after = Metadata::connect(&lost_wal("after.db")).await.unwrap();
    assert!(after.get_cache("durable").await.unwrap().is_some());
    // Garbage collection makes the database durable first.
    cache(&db.meta, "collected").await;
    db.meta
        .collect_garbage(3600, 3600, 3600, &|_| Box::pin(async { Ok(()) }))
        .await
        .unwrap();
    let gc = Metadata::connect(&lost_wal("gc.db")).await.unwrap();
    assert!(gc.get_cache("collected").await.unwrap().is_some());
}
