//! Replicas (SPEC §4): servers sharing one PostgreSQL database and one object store receive
//! the same uploads at the same moment, through Nix's uploader on one and the JSON API on the
//! other, in different compressions. Every upload succeeds, each path is published once, each
//! NAR stored once, both replicas serve the same verified narinfos and NARs, and the
//! redundant copies are garbage. Always on a real PostgreSQL cluster, started here.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Auth, Comp, Server, TestPath};
use larder_nix::NarInfo;
use larder_server::config::ConfigFile;
use larder_testkit::postgres::PgCluster;

fn decompress(comp: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    match comp {
        "zstd" => zstd::decode_all(data).unwrap(),
        "xz" => {
            let mut out = Vec::new();
            xz2::read::XzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        _ => data.to_vec(),
    }
}

/// The narinfo `srv` serves for `tp`, checked, and its NAR fetched and checked.
async fn served(srv: &Server, tp: &TestPath) -> String {
    let r = srv
        .get(&format!("/c/{}.narinfo", tp.hash()), Auth::Anon)
        .await
        .expect(200);
    let ni = NarInfo::parse(&r.text()).unwrap();
    assert_eq!(ni.nar_hash, tp.nar_hash());
    assert_eq!(ni.references, tp.references);
    assert!(ni.verify(&srv.public_key("c").await));
    let nar = srv
        .get(&format!("/c/{}", ni.url), Auth::Anon)
        .await
        .expect(200);
    assert_eq!(decompress(&ni.compression, &nar.body), tp.nar);
    r.text()
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_receiving_the_same_paths_at_once_store_each_once() {
    let pg = PgCluster::start();
    let db = pg.create_database();
    let shared = tempfile::tempdir().unwrap();
    let a = Server::with_config(ConfigFile {
        database: Some(db.clone()),
        storage: Some(format!("file://{}", shared.path().display())),
        ..ConfigFile::default()
    })
    .await;
    let b = a.replica().await;
    a.create_cache("c", false).await;
    let lib = TestPath::new("lib", "replicas-lib");
    let apps: Vec<TestPath> = (0..12)
        .map(|i| TestPath::new(&format!("app{i}"), &format!("replicas-{i}")).referencing(&[&lib]))
        .collect();
    let a = std::sync::Arc::new(a);
    let b = std::sync::Arc::new(b);

    // Each path through both replicas at once: Nix's uploader (zstd) on A, the JSON API (xz)
    // on B. References first, as every uploader does.
    for wave in [vec![lib.clone()], apps.clone()] {
        let mut tasks = tokio::task::JoinSet::new();
        for tp in wave {
            let (a, b, tp2) = (a.clone(), b.clone(), tp.clone());
            tasks.spawn(async move {
                let (nar, info) = a.push_nix("c", a.admin(), &tp, Comp::Zstd).await;
                (nar.status, Some(info.status))
            });
            tasks.spawn(async move {
                let r = b.push_api("c", b.admin(), &tp2, Comp::Xz).await;
                (r.status, None)
            });
        }
        for (first, second) in tasks.join_all().await {
            assert!(first.is_success(), "an upload failed: {first}");
            if let Some(s) = second {
                assert!(s.is_success(), "a narinfo upload failed: {s}");
            }
        }
    }

    // Both replicas serve every path, identically.
    for tp in std::iter::once(&lib).chain(&apps) {
        assert_eq!(served(&a, tp).await, served(&b, tp).await);
    }
    let dbname = PgCluster::db_of(&db);
    assert_eq!(pg.psql(dbname, "SELECT count(*) FROM paths"), "13");
    assert_eq!(pg.psql(dbname, "SELECT count(*) FROM nars"), "13");
    // The losing forms are garbage as soon as collected; then objects = chunks = NARs.
    larder_server::publish::collect_garbage(&b.state)
        .await
        .unwrap();
    assert_eq!(pg.psql(dbname, "SELECT count(*) FROM chunks"), "13");
    assert_eq!(
        count_files(&shared.path().join("objects/chunk"))
            + count_files(&shared.path().join("objects/pack")),
        13
    );
    for tp in std::iter::once(&lib).chain(&apps) {
        served(&b, tp).await;
    }
}

/// Replicas that share a data directory (an NFS mount, say) and start together on an empty
/// database create one admin token between them, and the `admin-token` file holds that token,
/// never another replica's candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_leave_the_one_created_admin_token() {
    for _ in 0..5 {
        let first = Server::new_unbootstrapped().await;
        let replicas =
            futures::future::join_all((0..4).map(|_| first.replica_sharing_data())).await;
        let results = futures::future::join_all(
            std::iter::once(&first)
                .chain(replicas.iter())
                .map(|r| larder_server::bootstrap_admin_token(&r.state)),
        )
        .await;
        let written: Vec<_> = results
            .into_iter()
            .filter_map(|r| r.expect("bootstrap"))
            .collect();
        assert_eq!(
            written.len(),
            1,
            "one replica creates the token: {written:?}"
        );
        let token = std::fs::read_to_string(&written[0]).unwrap();
        let row = first
            .state
            .meta
            .find_token(&larder_server::auth::token_hash(token.trim()))
            .await
            .unwrap();
        assert!(
            row.is_some(),
            "admin-token holds a token the database does not know"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&first.state.config.data_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("admin-token."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
