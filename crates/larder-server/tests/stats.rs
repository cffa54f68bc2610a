//! A cache's daily statistics (`larder_server::stats`): the narinfo and NAR downloads the
//! server serves (requests and body bytes; a `HEAD` or a 404 is none) and the stored size, per
//! UTC day, counted in memory and written by the usage flush; read back through
//! `GET /api/v1/caches/{cache}/stats` and drawn on the cache page (the size bar, the charts'
//! bars and points for today, the table of numbers). Counts add up across flushes and
//! replicas; a private cache's statistics are hidden like the cache itself; days older than
//! `KEEP_DAYS` are deleted, and a deleted cache's days with it.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{header, Method};
use common::{request, Auth, Comp, Server, TestPath};
use larder_server::stats::{date, today, KEEP_DAYS};
use larder_store::meta::Downloads;
use serde_json::{json, Value};

async fn flush(srv: &Server) {
    srv.state
        .retention
        .usage
        .flush(&srv.state.meta)
        .await
        .unwrap();
}

async fn stats(srv: &Server, cache: &str, query: &str, auth: Auth<'_>) -> Value {
    srv.get(&format!("/api/v1/caches/{cache}/stats{query}"), auth)
        .await
        .expect(200)
        .json()
}

/// The SVG marks (`rect` and `circle`) of the figure `id` on a page: their class, and their
/// `data-date` and `data-value` when they have them.
fn marks(html: &str, id: &str) -> Vec<BTreeMap<String, String>> {
    let start = html
        .find(&format!("<figure class=\"chart\" id=\"{id}\""))
        .unwrap_or_else(|| panic!("no figure {id}"));
    let figure = &html[start..start + html[start..].find("</figure>").unwrap()];
    figure
        .split('<')
        .filter(|t| t.starts_with("rect ") || t.starts_with("circle "))
        .map(|tag| {
            let tag = &tag[..tag.find('>').unwrap()];
            let mut attrs = BTreeMap::new();
            let mut rest = tag;
            while let Some(eq) = rest.find("=\"") {
                let name = rest[..eq].rsplit(' ').next().unwrap().to_owned();
                let value_end = eq + 2 + rest[eq + 2..].find('"').unwrap();
                attrs.insert(name, rest[eq + 2..value_end].to_owned());
                rest = &rest[value_end + 1..];
            }
            attrs
        })
        .collect()
}

/// The `data-value` of the marks of class `class` dated `day`.
fn values(marks: &[BTreeMap<String, String>], class: &str, day: &str) -> Vec<i64> {
    marks
        .iter()
        .filter(|m| m.get("class").map(String::as_str) == Some(class))
        .filter(|m| m.get("data-date").map(String::as_str) == Some(day))
        .map(|m| m["data-value"].parse().unwrap())
        .collect()
}

#[tokio::test]
async fn downloads_and_size_are_recorded_and_drawn() {
    let srv = Server::new().await;
    srv.create_cache("pub", false).await;
    let a = TestPath::new("alpha", "stats-a");
    let b = TestPath::new("beta", "stats-b");
    srv.push_nix("pub", srv.admin(), &a, Comp::Zstd).await;
    srv.push_nix("pub", srv.admin(), &b, Comp::None).await;
    let size = srv.cache_info("pub").await["size"].as_i64().unwrap();
    // A limit twice the size: the bar is half full.
    srv.patch_json(
        "/api/v1/caches/pub",
        srv.admin(),
        &json!({ "max_size": size * 2 }),
    )
    .await
    .expect(200);

    // Downloads: 3 narinfos and 2 NARs (one a range of 10 bytes). A HEAD, a 404 and a 416
    // are not downloads.
    let mut narinfo_bytes = 0;
    for tp in [&a, &a, &b] {
        let r = srv
            .get(&format!("/pub/{}.narinfo", tp.hash()), Auth::Anon)
            .await
            .expect(200);
        narinfo_bytes += r.body.len() as i64;
    }
    srv.head(&format!("/pub/{}.narinfo", a.hash()), Auth::Anon)
        .await
        .expect(200);
    srv.get(
        &format!("/pub/{}.narinfo", common::store_path("x", "x").hash_part()),
        Auth::Anon,
    )
    .await
    .expect(404);
    let a_nar = format!("/pub/{}", a.stored_url());
    let b_nar = format!("/pub/{}", b.stored_url());
    let full = srv.get(&a_nar, Auth::Anon).await.expect(200);
    let ranged = |range: &str| {
        let mut req = request(Method::GET, &b_nar, Auth::Anon, Body::empty());
        req.headers_mut()
            .insert(header::RANGE, range.parse().unwrap());
        req
    };
    assert_eq!(
        srv.send(ranged("bytes=0-9")).await.expect(206).body.len(),
        10
    );
    srv.send(ranged("bytes=999999-")).await.expect(416);
    srv.head(&a_nar, Auth::Anon).await.expect(200);
    let nar_bytes = full.body.len() as i64 + 10;

    // Nothing is written by a request; the flush writes it.
    let id = srv.state.meta.get_cache("pub").await.unwrap().unwrap().id;
    let (rows, _) = srv.state.meta.cache_days(id, 0, i64::MAX).await.unwrap();
    assert!(
        rows.iter().all(|r| r.downloads.is_empty()),
        "written before a flush: {rows:?}"
    );
    flush(&srv).await;
    let (rows, _) = srv
        .state
        .meta
        .cache_days(id, today(), today())
        .await
        .unwrap();
    assert_eq!(
        rows[0].downloads,
        Downloads {
            narinfo_requests: 3,
            narinfo_bytes,
            nar_requests: 2,
            nar_bytes,
        }
    );
    assert_eq!(
        rows[0].size,
        Some(size),
        "the size is sampled, not only shown"
    );

    // The API: 30 days by default, every day present, today last.
    let s = stats(&srv, "pub", "", Auth::Anon).await;
    assert_eq!(s["cache"], "pub");
    assert_eq!(s["max_size"], size * 2);
    let days = s["days"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(days[0]["date"], date(today() - 29));
    let t = &days[29];
    assert_eq!(t["date"], date(today()));
    assert_eq!(
        (t["narinfo_requests"].as_i64(), t["nar_requests"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(t["requests"], 5);
    assert_eq!(t["narinfo_bytes"], narinfo_bytes);
    assert_eq!(t["nar_bytes"], nar_bytes);
    assert_eq!(t["bytes"], narinfo_bytes + nar_bytes);
    assert_eq!(t["size"], size);
    assert_eq!(days[28]["requests"], 0);
    assert_eq!(days[28]["size"], Value::Null, "before the cache existed");
    let week = stats(&srv, "pub", "?days=7", Auth::Anon).await;
    assert_eq!(week["days"].as_array().unwrap().len(), 7);
    assert_eq!(week["days"][6], *t);
    for bad in ["?days=0", "?days=91", "?days=x", "?weeks=2"] {
        srv.get(&format!("/api/v1/caches/pub/stats{bad}"), Auth::Anon)
            .await
            .expect(400);
    }

    // The page: the size bar at 50 %, and today's marks carry today's totals.
    let html = srv
        .get("/ui/caches/pub", Auth::Anon)
        .await
        .expect(200)
        .text();
    assert!(
        html.contains(r#"data-percent="50""#) && html.contains(r#"<svg class="sizebar""#),
        "{html}"
    );
    assert!(html.contains(&format!(
        "{} of {} (50 %)",
        larder_server::ui::human_size(size),
        larder_server::ui::human_size(size * 2)
    )));
    let today = date(today());
    let size_marks = marks(&html, "chart-size");
    assert_eq!(values(&size_marks, "point", &today), [size]);
    assert_eq!(size_marks.len(), 1, "one day with a size: {size_marks:?}");
    let bytes_marks = marks(&html, "chart-bytes");
    assert_eq!(
        values(&bytes_marks, "bar", &today),
        [narinfo_bytes + nar_bytes]
    );
    assert_eq!(bytes_marks.len(), 1, "no bar for a day without downloads");
    let request_marks = marks(&html, "chart-requests");
    assert_eq!(values(&request_marks, "bar nar", &today), [2]);
    assert_eq!(values(&request_marks, "bar narinfo", &today), [3]);
    // Text for those who do not see the pictures.
    for text in [
        r#"aria-labelledby="chart-size-title chart-size-desc""#,
        r#"<title id="chart-requests-title">Requests per day</title>"#,
        "5 in total (2 NARs, 3 narinfos), 5 today.",
        r#"id="stats-table""#,
    ] {
        assert!(html.contains(text), "{text:?} missing from {html}");
    }
    // Without a limit, the size alone.
    srv.patch_json(
        "/api/v1/caches/pub",
        srv.admin(),
        &json!({ "max_size": null }),
    )
    .await
    .expect(200);
    let html = srv
        .get("/ui/caches/pub", Auth::Anon)
        .await
        .expect(200)
        .text();
    assert!(!html.contains("sizebar"));
    assert!(html.contains("(no limit)"));
}

#[tokio::test]
async fn counts_add_up_across_flushes_and_replicas() {
    let srv = Server::new().await;
    let other = srv.replica().await;
    srv.create_cache("shared", false).await;
    let tp = TestPath::new("shared", "stats-shared");
    srv.push_nix("shared", srv.admin(), &tp, Comp::Xz).await;
    let uri = format!("/shared/{}.narinfo", tp.hash());
    srv.get(&uri, Auth::Anon).await.expect(200);
    flush(&srv).await;
    srv.get(&uri, Auth::Anon).await.expect(200);
    other.get(&uri, Auth::Anon).await.expect(200);
    other.get(&uri, Auth::Anon).await.expect(200);
    futures::future::join(flush(&srv), flush(&other)).await;
    let s = stats(&other, "shared", "?days=1", Auth::Anon).await;
    assert_eq!(s["days"][0]["narinfo_requests"], 4);
    // A flush with nothing to write changes nothing.
    flush(&srv).await;
    let again = stats(&srv, "shared", "?days=1", Auth::Anon).await;
    assert_eq!(again, s);
}

#[tokio::test]
async fn private_statistics_are_hidden_like_the_cache() {
    let srv = Server::new().await;
    srv.create_cache("secret", true).await;
    srv.create_cache("open", false).await;
    let tp = TestPath::new("classified", "stats-priv");
    srv.push_api("secret", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let reader = srv.token(&["pull"], Some(&["secret"])).await;
    srv.get(&format!("/secret/{}.narinfo", tp.hash()), reader.basic())
        .await
        .expect(200);
    flush(&srv).await;
    // Anonymous, or a token for another cache: the answer of a cache that does not exist.
    let elsewhere = srv.token(&["pull"], Some(&["open"])).await;
    for (auth, status) in [(Auth::Anon, 401), (elsewhere.bearer(), 403)] {
        let hidden = srv.get("/api/v1/caches/secret/stats", auth).await;
        let missing = srv.get("/api/v1/caches/no-such/stats", auth).await;
        assert_eq!(hidden.status, status);
        assert_eq!(missing.status, status);
        assert_eq!(
            hidden.text().replace("secret", "no-such"),
            missing.text(),
            "the answers differ"
        );
        assert!(!hidden.text().contains("narinfo_requests"));
    }
    let page = srv.get("/ui/caches/secret", Auth::Anon).await.expect(404);
    assert!(!page.text().contains("chart-"));
    // Whoever may pull it sees them.
    let s = stats(&srv, "secret", "", reader.bearer()).await;
    assert_eq!(s["days"][29]["narinfo_requests"], 1);
    let page = srv
        .get("/ui/caches/secret", reader.bearer())
        .await
        .expect(200)
        .text();
    assert_eq!(
        values(
            &marks(&page, "chart-requests"),
            "bar narinfo",
            &date(today())
        ),
        [1]
    );
}

#[tokio::test]
async fn old_days_are_pruned_sizes_carry_over_and_deleted_caches_leave_nothing() {
    let srv = Server::new().await;
    srv.create_cache("aged", false).await;
    let id = srv.state.meta.get_cache("aged").await.unwrap().unwrap().id;
    let meta = &srv.state.meta;
    let one = Downloads {
        narinfo_requests: 1,
        narinfo_bytes: 10,
        nar_requests: 0,
        nar_bytes: 0,
    };
    let t = today();
    // Days recorded before: beyond the 90 kept, the oldest kept, and a size 3 days ago.
    meta.add_downloads(&[(id, t - KEEP_DAYS, one), (id, t - KEEP_DAYS + 1, one)])
        .await
        .unwrap();
    meta.record_sizes(t - 3, 1, &[(id, 1234)]).await.unwrap();
    // The process's first flush of the day samples every cache and prunes.
    flush(&srv).await;
    let (rows, _) = meta.cache_days(id, 0, t).await.unwrap();
    let days: Vec<i64> = rows.iter().map(|r| r.day).collect();
    assert_eq!(days, [t - KEEP_DAYS + 1, t - 3, t]);
    assert_eq!(
        rows[2].size,
        Some(0),
        "an empty cache's size is sampled too"
    );
    let s = stats(&srv, "aged", "?days=90", Auth::Anon).await;
    let days = s["days"].as_array().unwrap();
    assert_eq!(days.len(), 90);
    assert_eq!(days[0]["narinfo_requests"], 1);
    // A day without a sample had the size of the day before; before any, none is known.
    let sizes: Vec<Value> = days[85..].iter().map(|d| d["size"].clone()).collect();
    assert_eq!(
        sizes,
        [Value::Null, 1234.into(), 1234.into(), 1234.into(), 0.into()]
    );

    srv.delete("/api/v1/caches/aged", srv.admin())
        .await
        .expect(204);
    assert!(meta.cache_days(id, 0, t).await.unwrap().0.is_empty());
}
