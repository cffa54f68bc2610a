//! Several `nix copy` of one closure at once: Nix's uploader PUTs the same `nar/<filehash>`
//! into one cache from every copy. Each upload succeeds (the newest is the one a narinfo then
//! publishes); none may be a 500. (Each upload recorded its row, committed, then read it back,
//! and a concurrent upload of the same key had replaced it in between: "stored value of
//! uploads.id is invalid", found by issue 14's eviction runs.)
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use common::{Comp, Server, TestPath};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_of_one_nar_file_all_succeed_and_publish() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    for round in 0..20 {
        let tp = TestPath::new("raced", &format!("raced-{round}"));
        let bytes = tp.compressed(Comp::Zstd);
        // `Server::send` fails the test on any 5xx.
        let answers = futures::future::join_all(
            (0..8).map(|_| srv.put_nar("c", srv.admin(), &bytes, Comp::Zstd)),
        )
        .await;
        for a in answers {
            a.expect(204);
        }
        srv.put_narinfo("c", srv.admin(), &tp, &tp.narinfo(Comp::Zstd, None))
            .await
            .expect(204);
        srv.assert_present("c", &tp).await;
    }
}
