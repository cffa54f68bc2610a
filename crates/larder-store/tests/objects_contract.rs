//! The object store contract, one set of test bodies run over every backend: the local
//! directory and a real Garage (an S3-compatible store started by the test on loopback; see
//! `larder-testkit`), including the orphan scan, which lists a store with modification times.
//! Plus what only a remote store can do: go away and come back.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use larder_nix::hash::Sha256Hasher;
use larder_store::meta::{chunk_hash_of_key, ChunkRow};
use larder_store::objects::migrate::{copy_all, CopyError};
use larder_store::orphans::{remove_orphans, OrphanError, OrphanReport};
use larder_store::{Metadata, ObjectError, ObjectStore, OpenOptions, S3Credentials, Secret};
use larder_testkit::garage::Garage;

struct Backend {
    store: ObjectStore,
    dir: tempfile::TempDir,
    garage: Option<Garage>,
}

fn fs_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = ObjectStore::open(
        &format!("file://{}", dir.path().join("store").display()),
        OpenOptions::default(),
    )
    .unwrap();
    Backend {
        store,
        dir,
        garage: None,
    }
}

fn s3_store(garage: &Garage, staging: PathBuf) -> ObjectStore {
    ObjectStore::open(
        &garage.storage_url(),
        OpenOptions {
            staging_dir: staging,
            s3_credentials: Some(S3Credentials {
                access_key_id: garage.access_key_id.clone(),
                secret_access_key: Secret::new(garage.secret_access_key.clone()),
            }),
        },
    )
    .unwrap()
}

fn garage_backend() -> Backend {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let store = s3_store(&garage, dir.path().join("staging"));
    Backend {
        store,
        dir,
        garage: Some(garage),
    }
}

/// Each body runs once per backend: `fs::NAME` and `garage::NAME`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod fs {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(&super::fs_backend()).await } )*
        }
        mod garage {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(&super::garage_backend()).await } )*
        }
    };
}

contract!(
    put_get_range_exists_delete,
    storing_an_existing_key_keeps_it,
    a_batch_is_stored_whole_and_keeps_existing_keys,
    large_object_streams_with_bounded_memory,
    invisible_until_complete,
    odd_keys_are_rejected,
    list_names_every_object,
    presigned_urls_serve_the_object,
    orphan_scan_deletes_only_old_unknown_chunks,
    pieces_are_read_exactly_or_name_what_is_wrong,
);

/// A staging file with `data`, as the server leaves a verified upload.
fn staged(b: &Backend, name: &str, data: &[u8]) -> PathBuf {
    let p = b.store.staging_dir().join(name);
    std::fs::write(&p, data).unwrap();
    p
}

async fn read_all(store: &ObjectStore, key: &str, range: Option<std::ops::Range<u64>>) -> Vec<u8> {
    let body = store.get(key, range).await.unwrap();
    let len = body.len;
    let data: Vec<u8> = body
        .stream
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
        .await
        .concat();
    assert_eq!(
        data.len() as u64,
        len,
        "ObjectBody.len differs from the bytes streamed"
    );
    data
}

/// The object key larder would use: `chunk/<2>/<nix32 sha256>`.
fn key_of(data: &[u8]) -> String {
    let mut h = Sha256Hasher::new();
    h.update(data);
    larder_store::meta::chunk_object_key(&h.finalize().to_nix32())
}

async fn put_get_range_exists_delete(b: &Backend) {
    let s = &b.store;
    let src = staged(b, "upload", b"hello world");
    assert!(!s.exists("chunk/aa/x").await.unwrap());
    s.put_file("chunk/aa/x", &src).await.unwrap();
    assert!(!src.exists(), "put_file consumes its source");
    assert!(s.exists("chunk/aa/x").await.unwrap());
    assert_eq!(read_all(s, "chunk/aa/x", None).await, b"hello world");
    assert_eq!(read_all(s, "chunk/aa/x", Some(6..11)).await, b"world");
    assert_eq!(read_all(s, "chunk/aa/x", Some(0..1)).await, b"h");
    assert_eq!(read_all(s, "chunk/aa/x", Some(10..11)).await, b"d");
    assert_eq!(read_all(s, "chunk/aa/x", Some(6..100)).await, b"world");
    assert_eq!(read_all(s, "chunk/aa/x", Some(3..3)).await, b"");
    s.delete("chunk/aa/x").await.unwrap();
    s.delete("chunk/aa/x").await.unwrap(); // deleting a missing object is fine
    assert!(!s.exists("chunk/aa/x").await.unwrap());
    assert!(matches!(
        s.get("chunk/aa/x", None).await,
        Err(ObjectError::NotFound(_))
    ));
    assert!(matches!(
        s.get("chunk/aa/x", Some(0..3)).await,
        Err(ObjectError::NotFound(_))
    ));
}

/// What serving a NAR of several chunks reads: ranges of several objects, one after another,
/// exactly; read again (from the page cache on a local directory, where the first read may
/// have waited for the disk) the same. A missing object is `NotFound`, a short one an error.
async fn pieces_are_read_exactly_or_name_what_is_wrong(b: &Backend) {
    let s = &b.store;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    s.put_file("pack/aa/big", &staged(b, "big", &big))
        .await
        .unwrap();
    s.put_file("pack/bb/small", &staged(b, "small", b"0123456789"))
        .await
        .unwrap();
    let pieces = vec![
        ("pack/aa/big".to_owned(), 5..1_200_005),
        ("pack/bb/small".to_owned(), 2..7),
        ("pack/aa/big".to_owned(), 2_999_990..3_000_000),
        ("pack/bb/small".to_owned(), 0..0),
    ];
    let mut expected = big[5..1_200_005].to_vec();
    expected.extend_from_slice(b"23456");
    expected.extend_from_slice(&big[2_999_990..]);
    for _ in 0..2 {
        let got = s.read_pieces(pieces.clone()).await.unwrap();
        assert!(
            got == expected,
            "{} bytes read, {} expected",
            got.len(),
            expected.len()
        );
    }
    let missing = vec![
        ("pack/bb/small".to_owned(), 0..4),
        ("pack/cc/gone".to_owned(), 0..4),
    ];
    match s.read_pieces(missing).await {
        Err(ObjectError::NotFound(key)) => assert_eq!(key, "pack/cc/gone"),
        other => panic!("a missing object read as {other:?}"),
    }
    let short = vec![("pack/bb/small".to_owned(), 4..12)];
    match s.read_pieces(short).await {
        Err(e) if !matches!(e, ObjectError::NotFound(_)) => {
            assert!(e.to_string().contains("pack/bb/small"), "{e}")
        }
        other => panic!("a short object read as {other:?}"),
    }
}

async fn storing_an_existing_key_keeps_it(b: &Backend) {
    let s = &b.store;
    let key = key_of(b"first");
    s.put_file(&key, &staged(b, "a", b"first")).await.unwrap();
    let again = staged(b, "b", b"first");
    s.put_file(&key, &again).await.unwrap();
    assert!(!again.exists());
    assert_eq!(read_all(s, &key, None).await, b"first");
}

/// `put_many` (the chunks of one upload): every object of the batch readable afterwards, in
/// new directories too, an existing key kept as it was, no staging file left behind.
async fn a_batch_is_stored_whole_and_keeps_existing_keys(b: &Backend) {
    let s = &b.store;
    let old = key_of(b"kept");
    s.put_file(&old, &staged(b, "kept", b"kept")).await.unwrap();
    let mut items: Vec<(String, bytes::Bytes)> = (0..40u32)
        .map(|i| {
            let data = format!("object {i}").into_bytes();
            (key_of(&data), bytes::Bytes::from(data))
        })
        .collect();
    // The existing key, offered other bytes: kept (keys are content hashes, so this only
    // happens for a frame another zstd made; the stored one stays).
    items.push((old.clone(), bytes::Bytes::from_static(b"other")));
    s.put_many(items.clone()).await.unwrap();
    for (key, data) in &items[..40] {
        assert_eq!(read_all(s, key, None).await, &data[..], "{key}");
    }
    assert_eq!(read_all(s, &old, None).await, b"kept");
    // Again: nothing changes.
    s.put_many(items).await.unwrap();
    if b.garage.is_none() {
        // The writers' own staging directories stay; no file in them does.
        let tmp = b.dir.path().join("store/tmp");
        let mut left = Vec::new();
        for entry in std::fs::read_dir(&tmp).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                left.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            } else {
                left.push(path);
            }
        }
        assert!(left.is_empty(), "staging files left: {left:?}");
    }
}

/// Deterministic, incompressible test data: word `i` of the stream.
fn word(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Write `mib` MiB of test data to `path` in 1 MiB blocks; returns its key.
fn write_big(path: &Path, mib: u64) -> String {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = Sha256Hasher::new();
    let mut block = vec![0u8; 1 << 20];
    for m in 0..mib {
        for (j, w) in block.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(m * (1 << 17) + j as u64).to_le_bytes());
        }
        h.update(&block);
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    larder_store::meta::chunk_object_key(&h.finalize().to_nix32())
}

/// Peak resident memory of this process (each test runs in a process of its own).
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

async fn hash_object(s: &ObjectStore, key: &str) -> (String, u64) {
    let body = s.get(key, None).await.unwrap();
    let mut h = Sha256Hasher::new();
    let mut n = 0u64;
    let mut stream = body.stream;
    while let Some(block) = stream.next().await {
        let block = block.unwrap();
        n += block.len() as u64;
        h.update(&block);
    }
    (
        larder_store::meta::chunk_object_key(&h.finalize().to_nix32()),
        n,
    )
}

async fn large_object_streams_with_bounded_memory(b: &Backend) {
    const MIB: u64 = 192;
    let s = &b.store;
    let src = b.store.staging_dir().join("big");
    let key = write_big(&src, MIB);
    let before = peak_rss_mib();
    s.put_file(&key, &src).await.unwrap();
    assert_eq!(hash_object(s, &key).await, (key.clone(), MIB << 20));
    // A range deep inside, across an S3 part boundary (8 MiB parts).
    let at = (100u64 << 20) - 4;
    let got = read_all(s, &key, Some(at..at + 16)).await;
    let want: Vec<u8> = (at / 8..at / 8 + 3)
        .flat_map(|w| word(w).to_le_bytes())
        .collect();
    assert_eq!(got, want[4..20]);
    let grew = peak_rss_mib().saturating_sub(before);
    assert!(
        grew < 96,
        "storing and reading a {MIB} MiB object grew peak memory by {grew} MiB"
    );
}

async fn invisible_until_complete(b: &Backend) {
    let s = b.store.clone();
    let src = b.store.staging_dir().join("big");
    let key = write_big(&src, 48);
    let put = tokio::spawn({
        let (s, key, src) = (s.clone(), key.clone(), src.clone());
        async move { s.put_file(&key, &src).await }
    });
    let mut polls = 0;
    while !put.is_finished() {
        // Whenever the object is visible, it is whole.
        if s.exists(&key).await.unwrap() {
            assert_eq!(hash_object(&s, &key).await, (key.clone(), 48 << 20));
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    put.await.unwrap().unwrap();
    assert!(polls > 0);
    assert_eq!(hash_object(&s, &key).await, (key.clone(), 48 << 20));

    // A caller that gives up at once (a client hanging up; the store has not even answered
    // whether the object exists) leaves no partial object: the put finishes on its own.
    let src2 = b.store.staging_dir().join("big2");
    let key2 = write_big(&src2, 40);
    let _ = tokio::time::timeout(Duration::from_millis(1), s.put_file(&key2, &src2)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if s.exists(&key2).await.unwrap() {
            assert_eq!(hash_object(&s, &key2).await, (key2.clone(), 40 << 20));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned upload never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // …and consumes its staged file, as a completed put does.
    while src2.exists() {
        assert!(Instant::now() < deadline, "the staged file was left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn odd_keys_are_rejected(b: &Backend) {
    let s = &b.store;
    for bad in [
        "", "../x", "a/../b", "/abs", "a//b", "UPPER", "a b", "a%2fb", "a?b", "a#b", "ä", "a\nb",
        "a\0b", "a\\b", "./a", "a/.",
    ] {
        let src = staged(b, "odd", b"data");
        let invalid = |r: Result<(), ObjectError>| matches!(r, Err(ObjectError::InvalidKey(_)));
        assert!(invalid(s.put_file(bad, &src).await), "put {bad:?} accepted");
        assert!(src.exists(), "a rejected put must not consume its source");
        assert!(invalid(s.get(bad, None).await.map(|_| ())), "get {bad:?}");
        assert!(invalid(s.exists(bad).await.map(|_| ())), "exists {bad:?}");
        assert!(invalid(s.delete(bad).await), "delete {bad:?}");
        assert!(invalid(
            s.presigned_get(bad, Duration::from_secs(60))
                .await
                .map(|_| ())
        ));
    }
    let listed: Vec<_> = s.list().collect().await;
    assert!(listed.is_empty(), "something was stored: {listed:?}");
}

async fn list_names_every_object(b: &Backend) {
    let s = &b.store;
    let mut keys = Vec::new();
    for (i, data) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
        let key = key_of(data);
        s.put_file(&key, &staged(b, &format!("f{i}"), data))
            .await
            .unwrap();
        keys.push(key);
    }
    s.put_file("log/some-log", &staged(b, "l", b"log"))
        .await
        .unwrap();
    keys.push("log/some-log".into());
    let mut listed: Vec<String> = s.list().map(|k| k.unwrap()).collect().await;
    listed.sort();
    keys.sort();
    assert_eq!(listed, keys);
}

/// The orphan scan over this store, with a SQLite database: it deletes an old chunk object
/// without a row, and nothing else; it deletes nothing while most chunk objects have no row.
async fn orphan_scan_deletes_only_old_unknown_chunks(b: &Backend) {
    let s = &b.store;
    let db = format!("sqlite://{}", b.dir.path().join("meta.db").display());
    let meta = Metadata::connect(&db).await.unwrap();
    let put = |key: String, data: &[u8]| {
        let src = staged(b, "obj", data);
        async move {
            s.put_file(&key, &src).await.unwrap();
            key
        }
    };
    let record = |keys: &[&String]| {
        let chunks: Vec<ChunkRow> = keys
            .iter()
            .map(|k| ChunkRow::new(chunk_hash_of_key(k).unwrap().to_owned(), 1))
            .collect();
        let meta = meta.clone();
        async move { meta.claim_chunks("some-upload", &chunks).await.unwrap() }
    };
    let known = put(key_of(b"known"), b"known").await;
    record(&[&known]).await;
    let orphan = put(key_of(b"orphan"), b"orphan").await;
    // Keys not exactly of a chunk's form are never touched, whatever their age.
    let hash = chunk_hash_of_key(&orphan).unwrap();
    let mut others = Vec::new();
    for key in [
        format!("{orphan}.part"),
        format!("log/{hash}"),
        format!(
            "chunk/{}/{hash}",
            if hash.starts_with("zz") { "yy" } else { "zz" }
        ),
        "backup/readme".to_owned(),
    ] {
        others.push(put(key, b"other").await);
    }
    let mut strays = Vec::new();
    for i in 0..10 {
        let data = format!("stray {i}");
        strays.push(put(key_of(data.as_bytes()), data.as_bytes()).await);
    }
    // Everything above is old; what comes next is young. (Leeway for S3's `Last-Modified`,
    // which may be cut to the second.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let cutoff = std::time::SystemTime::now() - Duration::from_secs(1);
    let young = put(key_of(b"young"), b"young").await;
    let every = {
        let mut v: Vec<String> = [&known, &orphan, &young]
            .into_iter()
            .chain(&others)
            .chain(&strays)
            .cloned()
            .collect();
        v.sort();
        v
    };
    let listed = || async {
        let mut keys: Vec<String> = s.list().map(|k| k.unwrap()).collect().await;
        keys.sort();
        keys
    };

    // 12 of 13 chunk objects unknown: this database is not the store's. Nothing is deleted.
    let err = remove_orphans(&meta, s, cutoff).await.unwrap_err();
    assert!(
        matches!(
            err,
            OrphanError::MostlyUnknown {
                unknown: 12,
                chunks: 13
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("shared by two deployments"),
        "{err}"
    );
    assert_eq!(listed().await, every);

    // Once the strays are known, only the old orphan goes.
    record(&strays.iter().collect::<Vec<_>>()).await;
    let report = remove_orphans(&meta, s, cutoff).await.unwrap();
    assert_eq!(
        report,
        OrphanReport {
            objects: every.len() as u64,
            chunks: 13,
            unknown: 2,
            deleted: 1,
            deleted_bytes: b"orphan".len() as u64,
        }
    );
    assert!(
        !s.exists(&orphan).await.unwrap(),
        "the orphan is still there"
    );
    let left: Vec<String> = every.iter().filter(|k| **k != orphan).cloned().collect();
    assert_eq!(listed().await, left);
    assert_eq!(
        meta.unknown_chunks(&[hash.to_owned()]).await.unwrap(),
        vec![hash.to_owned()],
        "the orphan's row stayed behind"
    );
}

async fn presigned_urls_serve_the_object(b: &Backend) {
    let s = &b.store;
    let key = key_of(b"presigned bytes");
    s.put_file(&key, &staged(b, "p", b"presigned bytes"))
        .await
        .unwrap();
    let url = s
        .presigned_get(&key, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(url.is_some(), s.can_presign());
    let Some(url) = url else { return };
    assert!(
        !url.contains(&b.garage.as_ref().unwrap().secret_access_key),
        "the secret key is in a presigned URL"
    );
    let http = reqwest::Client::new();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], b"presigned bytes");
    let r = http
        .get(&url)
        .header("Range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], b"bytes");
    // The URL grants this object only, for GET only.
    let other = url.replacen(&key, &key_of(b"other"), 1);
    assert_eq!(http.get(&other).send().await.unwrap().status(), 403);
    assert_eq!(http.delete(&url).send().await.unwrap().status(), 403);
    assert!(s.exists(&key).await.unwrap());
}

/// Garage killed: every operation fails within seconds as `Unavailable` (never a hang, never
/// "not found"), an upload cut by the outage leaves nothing visible, and the same store
/// handle works again once Garage is back, without reopening it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_outage_fails_fast_and_recovers() {
    let mut b = garage_backend();
    let s = b.store.clone();
    let kept = key_of(b"kept");
    s.put_file(&kept, &staged(&b, "k", b"kept")).await.unwrap();

    // Kill Garage in the middle of a large upload: once some of its parts are in Garage's
    // data directory, long before all of them.
    let src = b.store.staging_dir().join("big");
    let key = write_big(&src, 128);
    let data_dir = b.garage.as_ref().unwrap().dir().join("data");
    let put = tokio::spawn({
        let (s, key, src) = (s.clone(), key.clone(), src.clone());
        async move { s.put_file(&key, &src).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir_size(&data_dir) < 16 << 20 {
        assert!(!put.is_finished(), "the upload ended before it was cut");
        assert!(Instant::now() < deadline, "the upload does not progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.garage.as_mut().unwrap().stop();
    let r = put.await.unwrap();
    assert!(
        matches!(&r, Err(e) if e.is_unavailable()),
        "an upload cut by the outage: {r:?}"
    );

    for _ in 0..2 {
        let t = Instant::now();
        let e = s.exists(&kept).await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        let e = s.get(&kept, None).await.err().unwrap();
        assert!(e.is_unavailable(), "{e}");
        let e = s.ping().await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "failing took {:?}",
            t.elapsed()
        );
    }
    let e = s
        .put_file(&key_of(b"new"), &staged(&b, "n", b"new"))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(!e
        .to_string()
        .contains(&b.garage.as_ref().unwrap().secret_access_key));

    b.garage.as_mut().unwrap().restart();
    s.ping().await.unwrap();
    assert_eq!(read_all(&s, &kept, None).await, b"kept");
    assert!(
        !s.exists(&key).await.unwrap(),
        "a cut upload became visible"
    );
    let again = key_of(b"after");
    s.put_file(&again, &staged(&b, "a", b"after"))
        .await
        .unwrap();
    assert_eq!(read_all(&s, &again, None).await, b"after");
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// `larder migrate`'s object copy, directory → Garage → directory: every object arrives
/// verified, a second run copies nothing, and a corrupt source object is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_verified_and_resumes() {
    let fs = fs_backend();
    let s3 = garage_backend();
    let mut keys = Vec::new();
    for i in 0..20 {
        let data = format!("object {i}").repeat(i * 1000 + 1);
        let key = key_of(data.as_bytes());
        fs.store
            .put_file(&key, &staged(&fs, "x", data.as_bytes()))
            .await
            .unwrap();
        keys.push((key, data));
    }
    let big = fs.store.staging_dir().join("big");
    let big_key = write_big(&big, 20);
    fs.store.put_file(&big_key, &big).await.unwrap();

    // Interrupted half-way: some objects already there.
    for (key, _) in &keys[..5] {
        larder_store::objects::migrate::copy_one(&fs.store, &s3.store, key)
            .await
            .unwrap();
    }
    let r = copy_all(&fs.store, &s3.store, |_| {}).await.unwrap();
    assert_eq!((r.copied, r.skipped), (16, 5), "{r:?}");
    for (key, data) in &keys {
        assert_eq!(read_all(&s3.store, key, None).await, data.as_bytes());
    }
    assert_eq!(
        hash_object(&s3.store, &big_key).await,
        (big_key.clone(), 20 << 20)
    );
    let r = copy_all(&fs.store, &s3.store, |_| {}).await.unwrap();
    assert_eq!((r.copied, r.skipped), (0, 21), "{r:?}");

    // And back into an empty directory.
    let back = fs_backend();
    let r = copy_all(&s3.store, &back.store, |_| {}).await.unwrap();
    assert_eq!((r.copied, r.skipped), (21, 0));
    assert_eq!(
        hash_object(&back.store, &big_key).await,
        (big_key.clone(), 20 << 20)
    );

    // A source object whose bytes do not match its key is not copied.
    let (victim, _) = &keys[7];
    let path = back.dir.path().join("store/objects").join(victim);
    std::fs::write(&path, b"bit rot").unwrap();
    let fresh = fs_backend();
    let e = copy_all(&back.store, &fresh.store, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CopyError::Corrupt { key, .. } if key == victim),
        "{e}"
    );
    assert!(!fresh.store.exists(victim).await.unwrap());
}
