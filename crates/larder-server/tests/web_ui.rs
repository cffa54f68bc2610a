//! The web UI, in process: values from the database and the request are escaped, private
//! caches are hidden (the same 404 as a missing cache) until a token that can pull them is
//! given (login cookie or Authorization header), the path list is searchable and paginated
//! by keyset links, and the pages show what `larder cache info` and `path-info` show.
//! The real-browser test is crates/larder/tests/web_ui.rs.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{header, Method, Request};
use common::{Auth, Comp, Resp, Server, TestPath};
use serde_json::json;

/// A request as a browser sends it: optional cookie, optional Origin, optional form body.
fn browser(method: Method, uri: &str, cookie: Option<&str>, form: Option<&str>) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, "larder.test");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("theme=dark; larder_token={c}"));
    }
    match form {
        Some(f) => b
            .header(header::ORIGIN, "http://larder.test")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(f.to_owned())),
        None => b.body(Body::empty()),
    }
    .unwrap()
}

async fn page(srv: &Server, uri: &str, cookie: Option<&str>) -> Resp {
    srv.send(browser(Method::GET, uri, cookie, None)).await
}

/// Log in through the form; returns the cookie value the server set.
async fn login(srv: &Server, token: &str) -> String {
    let r = srv
        .send(browser(
            Method::POST,
            "/ui/login",
            None,
            Some(&format!("token={token}&next=%2Fui%2Fcaches%2Fsecret")),
        ))
        .await
        .expect(303);
    assert_eq!(r.header(header::LOCATION), Some("/ui/caches/secret"));
    let cookie = r.header(header::SET_COOKIE).unwrap().to_owned();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(
        !cookie.contains("Secure"),
        "plain http public_url: {cookie}"
    );
    let value = cookie
        .strip_prefix("larder_token=")
        .unwrap()
        .split(';')
        .next()
        .unwrap();
    assert_eq!(value, token);
    value.to_owned()
}

/// HTML text escaping as maud does it, to compare page text with API values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `href` of the first `<a …>` whose attributes contain `marker` (e.g. `rel="next"`).
fn link_with(html: &str, marker: &str) -> Option<String> {
    let at = html.find(marker)?;
    let rest = &html[at..];
    let start = rest.find("href=\"")? + 6;
    let end = start + rest[start..].find('"')?;
    Some(rest[start..end].replace("&amp;", "&"))
}

/// Store paths listed in the page's path table, in order.
fn listed(html: &str) -> Vec<String> {
    let Some(start) = html.find("id=\"path-list\"") else {
        return Vec::new();
    };
    let table = &html[start..html[start..].find("</table>").unwrap() + start];
    table
        .split("<td class=\"path\">")
        .skip(1)
        .map(|cell| {
            let text_start = cell.find('>').unwrap() + 1;
            let text_end = cell.find("</a>").unwrap();
            cell[text_start..text_end].to_owned()
        })
        .collect()
}

fn assert_page(r: &Resp) {
    assert_eq!(
        r.header(header::CONTENT_TYPE),
        Some("text/html; charset=utf-8")
    );
    let csp = r.header(header::CONTENT_SECURITY_POLICY).unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = r.text();
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(html.contains("name=\"viewport\""));
    // The only script is the external, optional copy.js.
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(html.contains("<script src=\"/static/copy.js?v="), "{html}");
}

#[tokio::test]
async fn values_from_the_database_and_the_request_are_escaped() {
    let srv = Server::new().await;
    srv.create_cache("pub", false).await;
    srv.create_cache("secret", true).await;
    let tp = TestPath::new("hello", "esc");
    srv.push_api("pub", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    // A token label is free text chosen by an admin.
    let t = srv
        .token_with(json!({
            "perms": ["pull"], "caches": ["secret"],
            "label": "<script>alert(1)</script>\"'&"
        }))
        .await;
    let cookie = login(&srv, &t.secret).await;
    let r = page(&srv, "/ui/", Some(&cookie)).await.expect(200);
    assert_page(&r);
    let html = r.text();
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"),
        "{html}"
    );

    // The search text is echoed in the input and the count line: escaped in both.
    let hostile = "\"><script>alert(2)</script>";
    let r = page(
        &srv,
        "/ui/caches/pub?q=%22%3E%3Cscript%3Ealert(2)%3C%2Fscript%3E",
        None,
    )
    .await
    .expect(200);
    assert_page(&r);
    let html = r.text();
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(
        html.contains(&format!("value=\"{}\"", esc(hostile))),
        "{html}"
    );
    assert!(html.contains("0 path(s) match"), "{html}");

    // Error messages quote the bad input: escaped too, with the right status.
    for (uri, status) in [
        ("/ui/caches/pub/paths/%3Cimg%20src%3Dx%3E", 400),
        ("/ui/caches/pub?cursor=%3Cb%3E", 400),
        ("/ui/caches/pub?limit=%3Cb%3E", 400),
        ("/ui/caches/%3Cb%3E", 400),
    ] {
        let r = page(&srv, uri, None).await.expect(status);
        assert_page(&r);
        let html = r.text();
        assert!(
            !html.contains("<img") && !html.contains("<b>"),
            "{uri}: {html}"
        );
    }
}

#[tokio::test]
async fn private_caches_are_hidden_until_a_token_that_can_pull_them() {
    let srv = Server::new().await;
    srv.create_cache("open", false).await;
    srv.create_cache("secret", true).await;
    let tp = TestPath::new("classified", "priv");
    srv.push_api("secret", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let path_uri = format!("/ui/caches/secret/paths/{}", tp.path.basename());

    // Anonymous: not listed, and its pages are the 404 of a missing cache.
    let list = page(&srv, "/ui/", None).await.expect(200).text();
    assert!(list.contains("/ui/caches/open"), "{list}");
    assert!(!list.contains("secret"), "{list}");
    assert!(list.contains("Log in"), "{list}");
    let hidden = page(&srv, "/ui/caches/secret", None).await.expect(404);
    assert_page(&hidden);
    let hidden_path = page(&srv, &path_uri, None).await.expect(404);
    assert!(!hidden.text().contains("classified"));
    // (Its URL, hence the login link's `next`, names the path; nothing else may.)
    assert!(!hidden_path.text().contains(&tp.nar_hash().to_nix32()));
    // SPEC's `/<cache>` address redirects whether or not the cache exists or is visible.
    for name in ["secret", "open", "nothing-here"] {
        let r = page(&srv, &format!("/{name}"), None).await.expect(303);
        assert_eq!(
            r.header(header::LOCATION).unwrap(),
            format!("/ui/caches/{name}")
        );
    }
    assert_eq!(
        page(&srv, "/", None)
            .await
            .expect(303)
            .header(header::LOCATION),
        Some("/ui/")
    );

    // A token without pull on it sees the same as anonymous.
    let other = srv.token(&["pull"], Some(&["open"])).await;
    let other_cookie = login(&srv, &other.secret).await;
    let list = page(&srv, "/ui/", Some(&other_cookie))
        .await
        .expect(200)
        .text();
    assert!(
        !list.contains("secret") && list.contains("Log out"),
        "{list}"
    );
    let r = page(&srv, "/ui/caches/secret", Some(&other_cookie))
        .await
        .expect(404);
    assert!(!r.text().contains("classified"));

    // A token with pull: listed, its pages readable, by cookie or by Authorization header.
    let puller = srv.token(&["pull"], Some(&["secret"])).await;
    let cookie = login(&srv, &puller.secret).await;
    let list = page(&srv, "/ui/", Some(&cookie)).await.expect(200).text();
    assert!(list.contains("/ui/caches/secret"), "{list}");
    let html = page(&srv, "/ui/caches/secret", Some(&cookie))
        .await
        .expect(200)
        .text();
    assert!(html.contains(&tp.path.to_absolute()), "{html}");
    page(&srv, &path_uri, Some(&cookie)).await.expect(200);
    srv.get(&path_uri, puller.bearer()).await.expect(200);
    srv.get(&path_uri, puller.basic()).await.expect(200);
    // A bad header is a 401 (as in the API), not silently anonymous.
    srv.get("/ui/", Auth::Bearer("larder_nope"))
        .await
        .expect(401);

    // The cookie is for UI pages only: the Nix protocol and the API ignore it.
    srv.send(browser(
        Method::GET,
        &format!("/secret/{}.narinfo", tp.hash()),
        Some(&cookie),
        None,
    ))
    .await
    .expect(401);
    srv.send(browser(
        Method::GET,
        "/api/v1/caches/secret/paths",
        Some(&cookie),
        None,
    ))
    .await
    .expect(401);

    // Login refusals: a wrong token (no cookie set), and a form posted from another site.
    let r = srv
        .send(browser(
            Method::POST,
            "/ui/login",
            None,
            Some("token=larder_wrong&next=%2Fui%2F"),
        ))
        .await
        .expect(401);
    assert!(r.header(header::SET_COOKIE).is_none());
    assert!(r.text().contains("does not work"), "{}", r.text());
    let mut cross = browser(
        Method::POST,
        "/ui/login",
        None,
        Some(&format!("token={}", puller.secret)),
    );
    cross
        .headers_mut()
        .insert(header::ORIGIN, "http://evil.test".parse().unwrap());
    let r = srv.send(cross).await.expect(403);
    assert!(r.header(header::SET_COOKIE).is_none());
    // `next` never leaves the UI.
    let r = srv
        .send(browser(
            Method::POST,
            "/ui/login",
            None,
            Some(&format!(
                "token={}&next=https%3A%2F%2Fevil.test%2F",
                puller.secret
            )),
        ))
        .await
        .expect(303);
    assert_eq!(r.header(header::LOCATION), Some("/ui/"));

    // Logout deletes the cookie.
    let r = srv
        .send(browser(Method::POST, "/ui/logout", Some(&cookie), Some("")))
        .await
        .expect(303);
    assert!(r
        .header(header::SET_COOKIE)
        .unwrap()
        .starts_with("larder_token=; "));
    assert!(r.header(header::SET_COOKIE).unwrap().contains("Max-Age=0"));

    // A revoked token's cookie: browsing goes on anonymously, and the cookie is deleted.
    srv.delete(&format!("/api/v1/tokens/{}", puller.id), srv.admin())
        .await
        .expect(204);
    let r = page(&srv, "/ui/", Some(&cookie)).await.expect(200);
    assert!(r.header(header::SET_COOKIE).unwrap().contains("Max-Age=0"));
    let html = r.text();
    assert!(
        html.contains("no longer works") && !html.contains("secret"),
        "{html}"
    );
    page(&srv, "/ui/caches/secret", Some(&cookie))
        .await
        .expect(404);

    // Hidden is indistinguishable from missing: the same page once the cache is gone.
    srv.delete("/api/v1/caches/secret", srv.admin())
        .await
        .expect(204);
    let missing = page(&srv, "/ui/caches/secret", None).await.expect(404);
    assert_eq!(missing.text(), hidden.text());
    let missing_path = page(&srv, &path_uri, None).await.expect(404);
    assert_eq!(missing_path.text(), hidden_path.text());
}

#[tokio::test]
async fn path_list_is_searchable_and_paginated_and_pages_show_cache_info() {
    let srv = Server::new().await;
    srv.create_cache("c", false).await;
    let lib = TestPath::new("libfoo-1.0", "lib");
    let app = TestPath::new("python3-app", "app").referencing(&[&lib]);
    let mut all = vec![lib.clone(), app.clone()];
    for i in 0..5 {
        all.push(TestPath::new(&format!("hello-{i}"), &format!("h{i}")));
    }
    for tp in &all {
        srv.push_api("c", srv.admin(), tp, Comp::Zstd)
            .await
            .expect(201);
    }
    let mut expected: Vec<String> = all.iter().map(|t| t.path.to_absolute()).collect();
    expected.sort_by_key(|p| {
        let base = p.rsplit('/').next().unwrap().to_owned();
        (base[33..].to_owned(), base[..32].to_owned())
    });

    // Pages of 3 by following the "Next page" links; the last page has none.
    let mut seen = Vec::new();
    let mut uri = "/ui/caches/c?limit=3".to_owned();
    let mut pages = 0;
    loop {
        let r = page(&srv, &uri, None).await.expect(200);
        assert_page(&r);
        let html = r.text();
        assert!(html.contains("7 path(s)."), "{html}");
        let rows = listed(&html);
        seen.extend(rows.iter().cloned());
        pages += 1;
        match link_with(&html, "rel=\"next\"") {
            Some(next) => {
                assert_eq!(rows.len(), 3, "a page before the last is full");
                assert!(next.contains("limit=3"), "{next}");
                uri = next;
            }
            None => break,
        }
        if pages > 1 {
            assert!(html.contains("First page"), "{html}");
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);

    // Search narrows the list (case-insensitively), and pages within the search.
    let r = page(&srv, "/ui/caches/c?q=HELLO&limit=2", None)
        .await
        .expect(200)
        .text();
    assert!(r.contains("5 path(s) match"), "{r}");
    let first = listed(&r);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|p| p.contains("-hello-")));
    let next = link_with(&r, "rel=\"next\"").unwrap();
    assert!(next.contains("q=HELLO"), "{next}");
    let r2 = page(&srv, &next, None).await.expect(200).text();
    let second = listed(&r2);
    assert!(second.iter().all(|p| p.contains("-hello-")));
    assert!(BTreeSet::from_iter(&first).is_disjoint(&BTreeSet::from_iter(&second)));
    let r = page(&srv, "/ui/caches/c?q=python3", None)
        .await
        .expect(200)
        .text();
    assert_eq!(listed(&r), vec![app.path.to_absolute()]);
    // Empty parameters, as a GET form sends them, mean "none".
    let r = page(&srv, "/ui/caches/c?q=&cursor=", None)
        .await
        .expect(200)
        .text();
    assert_eq!(listed(&r).len(), 7);
    for bad in ["limit=0", "limit=1001", "cursor=..%2Fetc"] {
        page(&srv, &format!("/ui/caches/c?{bad}"), None)
            .await
            .expect(400);
    }

    // The cache page shows what `larder cache info` shows, the same text.
    let info = srv.cache_info("c").await;
    let html = page(&srv, "/ui/caches/c", None).await.expect(200).text();
    for field in ["nix_conf", "flake_nix_config", "public_key"] {
        let text = info[field].as_str().unwrap();
        assert!(html.contains(&esc(text)), "{field} {text:?} not in {html}");
    }
    assert!(html.contains("7</dd>"), "path count: {html}");
    assert!(html.contains("(no limit)"), "{html}");
    assert!(!html.contains("over 85 %"), "{html}");
    assert!(html.contains("No pins."), "{html}");

    // With a limit: the meter, the numbers, and past 85 % the warning.
    let size = info["size"].as_i64().unwrap();
    let max = size * 100 / 90;
    srv.patch_json("/api/v1/caches/c", srv.admin(), &json!({ "max_size": max }))
        .await
        .expect(200);
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "release<1>", "store_path": app.path.to_absolute() }),
    )
    .await
    .expect(400); // pin names are restricted; a valid one:
    srv.post_json(
        "/api/v1/caches/c/pins",
        srv.admin(),
        &json!({ "name": "release", "store_path": app.path.to_absolute() }),
    )
    .await
    .expect(201);
    let html = page(&srv, "/ui/caches/c", None).await.expect(200).text();
    // The size bar: 90 % filled, in the warning colour, marked at 85 %.
    assert!(
        html.contains(r#"<svg class="sizebar""#) && html.contains(r#"data-percent="90""#),
        "{html}"
    );
    assert!(
        html.contains(r#"<rect class="used near" x="0" y="0" width="90.0""#),
        "{html}"
    );
    assert!(html.contains(r#"class="threshold" x1="85.0""#), "{html}");
    assert!(html.contains("(90 %)"), "{html}");
    assert!(html.contains("over 85 %"), "{html}");
    assert!(html.contains(">release<"), "{html}");
    let list = page(&srv, "/ui/", None).await.expect(200).text();
    assert!(list.contains("Over 85 %"), "{list}");

    // A path page: narinfo fields, references and referrers as links, the pin holding it.
    let lib_page = format!("/ui/caches/c/paths/{}", lib.path.basename());
    let app_page = format!("/ui/caches/c/paths/{}", app.path.basename());
    let html = page(&srv, &lib_page, None).await.expect(200).text();
    assert!(
        html.contains(&format!("href=\"{app_page}\"")),
        "referrer link: {html}"
    );
    assert!(
        html.contains(&format!("sha256:{}", lib.nar_hash().to_nix32())),
        "{html}"
    );
    assert!(html.contains("Referrers (1)"), "{html}");
    assert!(html.contains("release"), "pinned through app: {html}");
    let html = page(&srv, &app_page, None).await.expect(200).text();
    assert!(
        html.contains(&format!("href=\"{lib_page}\"")),
        "reference link: {html}"
    );
    assert!(html.contains("References (1)"), "{html}");
    let served = srv
        .get(&format!("/c/{}.narinfo", app.hash()), Auth::Anon)
        .await
        .expect(200)
        .text();
    assert!(html.contains(&esc(&served)), "narinfo as served: {html}");
    // By hash part too; a path of another cache or none at all is a 404.
    page(&srv, &format!("/ui/caches/c/paths/{}", app.hash()), None)
        .await
        .expect(200);
    let stranger = TestPath::new("stranger", "s");
    page(
        &srv,
        &format!("/ui/caches/c/paths/{}", stranger.path.basename()),
        None,
    )
    .await
    .expect(404);

    // The assets are served, and the page works without them.
    let css = page(&srv, "/static/larder.css", None).await.expect(200);
    assert_eq!(
        css.header(header::CONTENT_TYPE),
        Some("text/css; charset=utf-8")
    );
    let js = page(&srv, "/static/copy.js", None).await.expect(200);
    assert!(js.text().contains("clipboard"));
}
