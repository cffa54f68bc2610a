//! Chunked NARs over every pair of backends: the local directory and a real Garage (S3) as
//! the object store, SQLite and a real PostgreSQL as the metadata. NARs are stored as the
//! server stores them (content-defined chunks as zstd frames named by their uncompressed
//! bytes, shared between NARs; a NAR stored whole before chunking, xz), read back by
//! `larder_store::fsck`, damaged behind the store's back (a chunk deleted, a bit flipped),
//! found, and repaired by `Metadata::unpublish_damaged` with closure safety.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use larder_nix::compression::Compression;
use larder_nix::hash::Sha256;
use larder_nix::signing::SigningKey;
use larder_nix::store_path::StorePath;
use larder_store::fsck::{self, Checkpoint, Damage};
use larder_store::meta::{
    cdc_chunk_id, chunk_object_key, CacheRow, ChunkRow, NarRow, NewCache, NewPath, Publish,
    SecretKey, SigningMode, Unpublished,
};
use larder_store::{Metadata, ObjectStore, OpenOptions, S3Credentials, Secret};
use larder_testkit::garage::Garage;
use larder_testkit::postgres::PgCluster;

/// The stores under test, with whatever keeps them alive.
struct Stores {
    objects: ObjectStore,
    meta: Metadata,
    _dir: tempfile::TempDir,
    _garage: Option<Garage>,
    _pg: Option<PgCluster>,
}

async fn stores(garage: bool, postgres: bool) -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let (objects, garage) = if garage {
        let g = Garage::start();
        let store = ObjectStore::open(
            &g.storage_url(),
            OpenOptions {
                staging_dir: dir.path().join("staging"),
                s3_credentials: Some(S3Credentials {
                    access_key_id: g.access_key_id.clone(),
                    secret_access_key: Secret::new(g.secret_access_key.clone()),
                }),
            },
        )
        .unwrap();
        (store, Some(g))
    } else {
        let store = ObjectStore::open(
            &format!("file://{}", dir.path().join("store").display()),
            OpenOptions::default(),
        )
        .unwrap();
        (store, None)
    };
    let (url, pg) = if postgres {
        let pg = PgCluster::start();
        (pg.create_database(), Some(pg))
    } else {
        (
            format!("sqlite://{}", dir.path().join("meta.db").display()),
            None,
        )
    };
    let meta = Metadata::connect(&url).await.unwrap();
    Stores {
        objects,
        meta,
        _dir: dir,
        _garage: garage,
        _pg: pg,
    }
}

/// Each body runs once per pair of backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod fs_sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::stores(false, false).await).await }
        )* }
        mod fs_postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::stores(false, true).await).await }
        )* }
        mod garage_sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::stores(true, false).await).await }
        )* }
        mod garage_postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::stores(true, true).await).await }
        )* }
    };
}

contract!(chunked_nars_are_verified_and_damage_is_repaired_closure_safely);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Bytes that do not compress, from `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sp(name: &str) -> StorePath {
    let d = Sha256::digest(name.as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.as_bytes()[..20]);
    StorePath::from_parts(digest, name).unwrap()
}

async fn cache(meta: &Metadata, name: &str) -> CacheRow {
    let key = SigningKey::from_seed(&format!("{name}-1"), [2; 32]).unwrap();
    meta.create_cache(&NewCache {
        name: name.into(),
        priority: 41,
        compression: Compression::Zstd,
        signing_mode: SigningMode::Managed,
        public_key: Some(key.verifying_key()),
        secret_key: Some(SecretKey(key)),
        ..NewCache::default()
    })
    .await
    .unwrap()
    .unwrap()
}

/// Store `chunks` (the objects first, as the server does), record the NAR they make and
/// publish `path` with it in `cache`, referencing `refs`.
async fn store_and_publish(
    s: &Stores,
    cache: &CacheRow,
    path: &StorePath,
    refs: &[&StorePath],
    nar: NarRow,
    chunks: Vec<(String, Vec<u8>)>,
) -> NarRow {
    let rows: Vec<ChunkRow> = chunks
        .iter()
        .map(|(id, bytes)| ChunkRow::new(id.clone(), bytes.len() as i64))
        .collect();
    let upload = format!("up-{}", COUNTER.fetch_add(1, Ordering::SeqCst));
    s.meta.claim_chunks(&upload, &rows).await.unwrap();
    for (id, bytes) in &chunks {
        s.objects
            .put_bytes(&chunk_object_key(id), bytes)
            .await
            .unwrap();
    }
    let (nar, _) = s
        .meta
        .insert_nar_for_upload(&upload, cache.id, None, &nar, &rows)
        .await
        .unwrap();
    let signer = SigningKey::from_seed("test-1", [1; 32]).unwrap();
    let published = s
        .meta
        .publish_path(
            &NewPath {
                cache_id: cache.id,
                store_path: path.clone(),
                refs: refs.iter().map(|r| (*r).clone()).collect(),
                deriver: None,
                ca: None,
                sigs: vec![signer.sign(path.name())],
                nar_id: nar.id,
                upstream_refs: Vec::new(),
                upstream: None,
            },
            &upload,
        )
        .await
        .unwrap();
    assert_eq!(published, Publish::Created, "{path}");
    nar
}

/// A NAR cut into content-defined chunks at `cuts`: each a zstd frame named by the hash of
/// its uncompressed bytes.
fn chunked(nar_bytes: &[u8], cuts: &[usize]) -> (NarRow, Vec<(String, Vec<u8>)>) {
    let mut chunks = Vec::new();
    let mut file = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([nar_bytes.len()].iter()) {
        let piece = &nar_bytes[start..end];
        let frame = zstd::bulk::compress(piece, 3).unwrap();
        file.extend_from_slice(&frame);
        chunks.push((cdc_chunk_id(&Sha256::digest(piece)), frame));
        start = end;
    }
    let row = NarRow {
        id: 0,
        nar_hash: Sha256::digest(nar_bytes),
        nar_size: nar_bytes.len() as i64,
        compression: Compression::Zstd,
        file_hash: Sha256::digest(&file),
        file_size: file.len() as i64,
    };
    (row, chunks)
}

/// A NAR stored whole, as larder stored them before chunking: one object, xz, named by the
/// hash of its stored bytes.
fn whole_xz(nar_bytes: &[u8]) -> (NarRow, Vec<(String, Vec<u8>)>) {
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 6);
    enc.write_all(nar_bytes).unwrap();
    let file = enc.finish().unwrap();
    let file_hash = Sha256::digest(&file);
    let row = NarRow {
        id: 0,
        nar_hash: Sha256::digest(nar_bytes),
        nar_size: nar_bytes.len() as i64,
        compression: Compression::Xz,
        file_hash,
        file_size: file.len() as i64,
    };
    (row, vec![(file_hash.to_nix32(), file)])
}

/// A full fsck run from scratch: the checkpoint it ends with.
async fn run(s: &Stores, scope: Option<i64>) -> Checkpoint {
    let mut state = Checkpoint::default();
    let mut calls = 0;
    fsck::run(&s.objects, &s.meta, scope, &mut state, |_, _| {
        calls += 1;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(calls, state.checked);
    state
}

async fn chunked_nars_are_verified_and_damage_is_repaired_closure_safely(s: Stores) {
    let a = cache(&s.meta, "a").await;
    let b = cache(&s.meta, "b").await;
    // Two NARs sharing their last two chunks (an edit in the first), a path referencing the
    // second, and in another cache a NAR stored whole.
    let base = noise(600_000, 1);
    let mut edited = base.clone();
    edited[..100].fill(b'e');
    let (p1, p2, p3, p4) = (sp("one"), sp("two"), sp("three"), sp("legacy"));
    let (row1, chunks1) = chunked(&base, &[200_000, 400_000]);
    let (row2, chunks2) = chunked(&edited, &[200_000, 400_000]);
    assert_eq!(chunks1[1..], chunks2[1..], "shared chunks");
    let only2 = chunks2[0].0.clone();
    let nar1 = store_and_publish(&s, &a, &p1, &[], row1, chunks1).await;
    let nar2 = store_and_publish(&s, &a, &p2, &[], row2, chunks2).await;
    let (row3, chunks3) = chunked(b"/nix/store/...-two", &[]);
    store_and_publish(&s, &a, &p3, &[&p2], row3, chunks3).await;
    let (row4, chunks4) = whole_xz(&noise(300_000, 4));
    let legacy_chunk = chunks4[0].0.clone();
    let nar4 = store_and_publish(&s, &b, &p4, &[], row4, chunks4).await;

    // Sound: every NAR read back, the bytes counted as stored.
    let state = run(&s, None).await;
    assert_eq!(state.checked, 4);
    assert!(state.damaged.is_empty(), "{:?}", state.damaged);
    let (count, bytes) = s.meta.fsck_totals(None).await.unwrap();
    assert_eq!((count, bytes), (4, state.bytes as i64));
    assert_eq!(run(&s, Some(b.id)).await.checked, 1);
    // Resuming after the first two NARs checks the other two.
    let mut state = Checkpoint {
        after: nar2.id,
        ..Checkpoint::default()
    };
    fsck::run(&s.objects, &s.meta, None, &mut state, |_, _| Ok(()))
        .await
        .unwrap();
    assert_eq!(state.checked, 2);

    // The chunk only the second NAR has, deleted; a bit flipped in the legacy NAR.
    s.objects.delete(&chunk_object_key(&only2)).await.unwrap();
    let key4 = chunk_object_key(&legacy_chunk);
    let len = s.objects.get(&key4, None).await.unwrap().len;
    let mut bytes = s.objects.read_range(&key4, 0..len).await.unwrap().to_vec();
    bytes[len as usize / 2] ^= 1;
    s.objects.delete(&key4).await.unwrap();
    s.objects.put_bytes(&key4, &bytes).await.unwrap();

    let state = run(&s, None).await;
    assert_eq!(state.checked, 4);
    let damaged: Vec<(i64, &Vec<Damage>)> = state
        .damaged
        .iter()
        .map(|d| (d.nar_id, &d.damage))
        .collect();
    assert_eq!(damaged.len(), 2, "{damaged:?}");
    assert_eq!(
        damaged[0],
        (nar2.id, &vec![Damage::MissingChunk { chunk: only2 }])
    );
    assert_eq!(state.damaged[0].paths[0].basename, p2.to_string()[11..]);
    assert_eq!(damaged[1].0, nar4.id);
    assert!(
        matches!(&damaged[1].1[..], [Damage::CorruptChunk { chunk, problem }]
            if *chunk == legacy_chunk && problem.contains("hashes to")),
        "{damaged:?}"
    );
    assert_ne!(nar1.id, nar2.id);

    // Repair in cache a: the damaged path and the path referencing it, nothing else.
    let gone = s
        .meta
        .unpublish_damaged(Some(a.id), &[nar2.id, nar4.id])
        .await
        .unwrap();
    let names: Vec<(&str, bool)> = gone
        .iter()
        .map(|u| {
            (
                u.path().basename.as_str(),
                matches!(u, Unpublished::Damaged { .. }),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            (&p2.to_string()[11..], true),
            (&p3.to_string()[11..], false)
        ]
    );
    for (p, there) in [(&p1, true), (&p2, false), (&p3, false)] {
        let hash = &p.to_string()[11..43];
        assert_eq!(
            s.meta.get_path(a.id, hash).await.unwrap().is_some(),
            there,
            "{p}"
        );
    }
    // Cache b was out of scope; then repaired on its own.
    assert!(s
        .meta
        .get_path(b.id, &p4.to_string()[11..43])
        .await
        .unwrap()
        .is_some());
    let gone = s.meta.unpublish_damaged(None, &[nar4.id]).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert!(s
        .meta
        .get_path(b.id, &p4.to_string()[11..43])
        .await
        .unwrap()
        .is_none());
    // Nothing uses the damaged NARs any more: the next run checks the sound one only.
    let state = run(&s, None).await;
    assert_eq!(state.checked, 1, "{:?}", state.damaged);
    assert!(state.damaged.is_empty());
}
