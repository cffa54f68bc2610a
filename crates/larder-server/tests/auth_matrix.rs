//! The auth matrix: every kind of requester against public and private caches, for reads
//! (the Nix protocol), writes (Nix's uploader and the JSON API) and administration.
//!
//! The rules (SPEC §2.4): anonymous requests pull from public caches only; a private cache
//! answers 401 to anonymous and 403 to a token without `pull`, identically whether or not the
//! path exists, while `nix-cache-info` stays readable; writes need `push` on the cache; cache
//! configuration needs `admin` on it; creating caches and managing tokens needs a server admin.
//! A revoked, expired or unknown token is a 401 wherever credentials are checked. Reads of a
//! public cache do not look at credentials at all (they are open to anyone).

mod common;

use axum::http::{header, Method, StatusCode};
use common::{request, Auth, Comp, Server, TestPath, Token};
use serde_json::json;

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anon,
    Pull,
    Push,
    CacheAdmin,
    ServerAdmin,
    OtherCache,
    Revoked,
    Expired,
}

const EVERYONE: [Who; 8] = [
    Who::Anon,
    Who::Pull,
    Who::Push,
    Who::CacheAdmin,
    Who::ServerAdmin,
    Who::OtherCache,
    Who::Revoked,
    Who::Expired,
];

/// What a request should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Served (the status then depends on what exists).
    Allowed,
    Unauthorized,
    Forbidden,
}

impl Outcome {
    fn status(self) -> Option<u16> {
        match self {
            Outcome::Allowed => None,
            Outcome::Unauthorized => Some(401),
            Outcome::Forbidden => Some(403),
        }
    }
}

/// Credentials that do not work at all.
fn invalid(who: Who) -> bool {
    matches!(who, Who::Revoked | Who::Expired)
}

fn read_outcome(who: Who, private: bool) -> Outcome {
    if !private {
        return Outcome::Allowed;
    }
    match who {
        Who::Anon => Outcome::Unauthorized,
        w if invalid(w) => Outcome::Unauthorized,
        Who::OtherCache => Outcome::Forbidden,
        _ => Outcome::Allowed,
    }
}

fn write_outcome(who: Who) -> Outcome {
    match who {
        Who::Anon => Outcome::Unauthorized,
        w if invalid(w) => Outcome::Unauthorized,
        Who::Pull | Who::OtherCache => Outcome::Forbidden,
        Who::Push | Who::CacheAdmin | Who::ServerAdmin => Outcome::Allowed,
        _ => unreachable!(),
    }
}

fn cache_admin_outcome(who: Who) -> Outcome {
    match who {
        Who::Anon => Outcome::Unauthorized,
        w if invalid(w) => Outcome::Unauthorized,
        Who::CacheAdmin | Who::ServerAdmin => Outcome::Allowed,
        _ => Outcome::Forbidden,
    }
}

fn server_admin_outcome(who: Who) -> Outcome {
    match who {
        Who::Anon => Outcome::Unauthorized,
        w if invalid(w) => Outcome::Unauthorized,
        Who::ServerAdmin => Outcome::Allowed,
        _ => Outcome::Forbidden,
    }
}

/// Two caches (`pub`, `priv`) each holding one published path with a build log, a third
/// cache (`other`), an empty one for `cache_administration` to delete (`victim-a`, in the
/// scoped tokens' scope), and a token for every kind of requester.
struct World {
    srv: Server,
    pull: Token,
    push: Token,
    cache_admin: Token,
    other: Token,
    revoked: Token,
    expired: Token,
    /// Published in both `pub` and `priv`.
    present: TestPath,
    /// Published nowhere.
    absent: TestPath,
}

impl World {
    async fn new() -> World {
        let srv = Server::new().await;
        for (name, private) in [
            ("pub", false),
            ("priv", true),
            ("other", false),
            ("victim-a", false),
        ] {
            srv.create_cache(name, private).await;
        }
        let scope: &[&str] = &["pub", "priv", "victim-a"];
        let pull = srv.token(&["pull"], Some(scope)).await;
        let push = srv.token(&["push"], Some(scope)).await;
        let cache_admin = srv.token(&["admin"], Some(scope)).await;
        let other = srv.token(&["admin"], Some(&["other"])).await;
        let revoked = srv.token(&["admin"], None).await;
        srv.delete(&format!("/api/v1/tokens/{}", revoked.id), srv.admin())
            .await
            .expect(204);
        let expired = srv
            .token_with(json!({ "perms": ["admin"], "expires_in": "1s" }))
            .await;
        let present = TestPath::new("present", "auth-present");
        let absent = TestPath::new("absent", "auth-absent");
        for cache in ["pub", "priv"] {
            let (nar, info) = srv.push_nix(cache, srv.admin(), &present, Comp::Zstd).await;
            nar.expect(204);
            info.expect(204);
            srv.put(
                &format!("/{cache}/log/{}", present.deriver_basename()),
                srv.admin(),
                "build log\n",
            )
            .await
            .expect(204);
        }
        // Expiry has a one-second resolution: wait until the token is certainly past it.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        World {
            srv,
            pull,
            push,
            cache_admin,
            other,
            revoked,
            expired,
            present,
            absent,
        }
    }

    fn token(&self, who: Who) -> Option<&Token> {
        match who {
            Who::Anon => None,
            Who::Pull => Some(&self.pull),
            Who::Push => Some(&self.push),
            Who::CacheAdmin => Some(&self.cache_admin),
            Who::ServerAdmin => None,
            Who::OtherCache => Some(&self.other),
            Who::Revoked => Some(&self.revoked),
            Who::Expired => Some(&self.expired),
        }
    }

    /// `who`'s credentials, as Bearer or (when `basic`) as Basic auth.
    fn auth(&self, who: Who, basic: bool) -> Auth<'_> {
        let secret = match (who, self.token(who)) {
            (Who::Anon, _) => return Auth::Anon,
            (Who::ServerAdmin, _) => self.srv.admin.as_str(),
            (_, Some(t)) => t.secret.as_str(),
            (_, None) => unreachable!(),
        };
        if basic {
            Auth::Basic("nix", secret)
        } else {
            Auth::Bearer(secret)
        }
    }
}

trait DeriverName {
    fn deriver_basename(&self) -> String;
}

impl DeriverName for TestPath {
    fn deriver_basename(&self) -> String {
        self.deriver
            .as_ref()
            .expect("test paths have a deriver")
            .basename()
    }
}

/// Collects every mismatch, so one run shows the whole matrix's failures.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, what: &str, got: StatusCode, want: u16, body: &str) {
        if got.as_u16() != want {
            self.0
                .push(format!("{what}: got {got}, want {want}: {body}"));
        }
    }
    fn fail(&mut self, msg: String) {
        self.0.push(msg);
    }
    fn done(self) {
        assert!(
            self.0.is_empty(),
            "{} failures:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// Read endpoints of one path: (label, URI for the path that exists, URI for one that does not).
fn read_uris(w: &World, cache: &str) -> Vec<(&'static str, String, String)> {
    let nar_file = w.present.stored_url();
    let absent_file = w.absent.stored_url();
    vec![
        (
            "narinfo",
            format!("/{cache}/{}.narinfo", w.present.hash()),
            format!("/{cache}/{}.narinfo", w.absent.hash()),
        ),
        (
            "nar",
            format!("/{cache}/{nar_file}"),
            format!("/{cache}/{absent_file}"),
        ),
        (
            "ls",
            format!("/{cache}/{}.ls", w.present.hash()),
            format!("/{cache}/{}.ls", w.absent.hash()),
        ),
        (
            "log",
            format!("/{cache}/log/{}", w.present.deriver_basename()),
            format!("/{cache}/log/{}", w.absent.deriver_basename()),
        ),
    ]
}

#[tokio::test]
async fn reads_public_and_private_caches() {
    let w = World::new().await;
    let mut f = Failures::default();
    for (cache, private) in [("pub", false), ("priv", true)] {
        for who in EVERYONE {
            for basic in [false, true] {
                if basic && who == Who::Anon {
                    continue;
                }
                let auth = w.auth(who, basic);
                let outcome = read_outcome(who, private);
                let label = |what: &str| format!("{who:?} (basic={basic}) {what} on {cache}");

                // nix-cache-info is always readable, even with bad credentials.
                let r = w.srv.get(&format!("/{cache}/nix-cache-info"), auth).await;
                f.check(&label("nix-cache-info"), r.status, 200, &r.text());
                if r.status == StatusCode::OK && !r.text().contains("StoreDir: /nix/store") {
                    f.fail(format!("{}: body {:?}", label("nix-cache-info"), r.text()));
                }

                for (what, present, absent) in read_uris(&w, cache) {
                    for method in [Method::GET, Method::HEAD] {
                        if method == Method::HEAD && matches!(what, "ls" | "log") {
                            continue;
                        }
                        let what = format!("{method} {what}");
                        let yes = w
                            .srv
                            .send(request(method.clone(), &present, auth, ""))
                            .await;
                        let no = w.srv.send(request(method.clone(), &absent, auth, "")).await;
                        match outcome.status() {
                            None => {
                                f.check(
                                    &label(&format!("{what} present")),
                                    yes.status,
                                    200,
                                    &yes.text(),
                                );
                                f.check(
                                    &label(&format!("{what} absent")),
                                    no.status,
                                    404,
                                    &no.text(),
                                );
                            }
                            Some(code) => {
                                f.check(
                                    &label(&format!("{what} present")),
                                    yes.status,
                                    code,
                                    &yes.text(),
                                );
                                // The answer must not reveal whether the path exists.
                                if (yes.status, &yes.body) != (no.status, &no.body) {
                                    f.fail(format!(
                                        "{}: present and absent paths answer differently: \
                                         {} {:?} vs {} {:?}",
                                        label(&what),
                                        yes.status,
                                        yes.text(),
                                        no.status,
                                        no.text()
                                    ));
                                }
                                if yes.body.windows(10).any(|b| b == b"StorePath:") {
                                    f.fail(format!(
                                        "{}: denied response leaks a narinfo",
                                        label(&what)
                                    ));
                                }
                                let challenge = yes.header(header::WWW_AUTHENTICATE);
                                if code == 401 && challenge.is_none_or(|c| !c.starts_with("Basic"))
                                {
                                    f.fail(format!(
                                        "{}: 401 without a Basic WWW-Authenticate challenge",
                                        label(&what)
                                    ));
                                }
                            }
                        }
                    }
                }

                // The JSON API's view of the cache follows the same rule.
                let r = w.srv.get(&format!("/api/v1/caches/{cache}"), auth).await;
                let want = outcome.status().unwrap_or(200);
                f.check(&label("cache info"), r.status, want, &r.text());
                let r = w
                    .srv
                    .post_json(
                        &format!("/api/v1/caches/{cache}/missing"),
                        auth,
                        &json!({ "paths": [w.present.hash(), w.absent.hash()] }),
                    )
                    .await;
                f.check(&label("missing"), r.status, want, &r.text());
                if r.status == StatusCode::OK && r.json()["missing"] != json!([w.absent.hash()]) {
                    f.fail(format!("{}: {}", label("missing"), r.text()));
                }
            }
        }
    }
    f.done();
}

#[tokio::test]
async fn private_caches_are_hidden_from_listings() {
    let w = World::new().await;
    let names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let anon = names(
        w.srv
            .get("/api/v1/caches", Auth::Anon)
            .await
            .expect(200)
            .json(),
    );
    assert_eq!(anon, ["other", "pub", "victim-a"]);
    let other = names(
        w.srv
            .get("/api/v1/caches", w.other.bearer())
            .await
            .expect(200)
            .json(),
    );
    assert_eq!(other, ["other", "pub", "victim-a"]);
    let pull = names(
        w.srv
            .get("/api/v1/caches", w.pull.bearer())
            .await
            .expect(200)
            .json(),
    );
    assert_eq!(pull, ["other", "priv", "pub", "victim-a"]);
    w.srv
        .get("/api/v1/caches", w.revoked.bearer())
        .await
        .expect(401);
}

#[tokio::test]
async fn writes_need_push_on_the_cache() {
    let w = World::new().await;
    let srv = &w.srv;
    let mut f = Failures::default();
    for cache in ["pub", "priv"] {
        for who in EVERYONE {
            for basic in [false, true] {
                if basic && who == Who::Anon {
                    continue;
                }
                let auth = w.auth(who, basic);
                let outcome = write_outcome(who);
                let label = |what: &str| format!("{who:?} (basic={basic}) {what} on {cache}");
                let seed = format!("write-{cache}-{who:?}-{basic}");
                let count = srv.path_count(cache).await;
                let chunks = srv.chunk_files();

                // Nix's uploader, NAR and narinfo with the same credentials.
                let tp = TestPath::new("nix-upload", &seed);
                let (nar, info) = srv.push_nix(cache, auth, &tp, Comp::Zstd).await;
                let want = outcome.status().unwrap_or(204);
                f.check(&label("PUT nar"), nar.status, want, &nar.text());
                f.check(&label("PUT narinfo"), info.status, want, &info.text());
                if outcome != Outcome::Allowed && srv.chunk_files() != chunks {
                    f.fail(format!("{}: a refused NAR was stored", label("PUT nar")));
                }

                // The narinfo alone, for a NAR a pusher did upload.
                let tp2 = TestPath::new("nix-narinfo", &seed);
                let bytes = tp2.compressed(Comp::Xz);
                srv.put_nar(cache, w.push.bearer(), &bytes, Comp::Xz)
                    .await
                    .expect(204);
                let r = srv
                    .put_narinfo(cache, auth, &tp2, &tp2.narinfo(Comp::Xz, None))
                    .await;
                f.check(
                    &label("PUT narinfo after a pusher's NAR"),
                    r.status,
                    want,
                    &r.text(),
                );

                // The JSON API: upload, and publish an upload a pusher made.
                let tp3 = TestPath::new("api-upload", &seed);
                let r = srv
                    .upload_api(cache, auth, &tp3.compressed(Comp::Zstd), "zstd")
                    .await;
                f.check(
                    &label("API upload"),
                    r.status,
                    outcome.status().unwrap_or(201),
                    &r.text(),
                );
                let tp4 = TestPath::new("api-publish", &seed);
                let up = srv
                    .upload_api(cache, w.push.bearer(), &tp4.compressed(Comp::Zstd), "zstd")
                    .await
                    .expect(201);
                let id = up.json()["upload_id"]
                    .as_str()
                    .expect("upload id")
                    .to_owned();
                let r = srv
                    .publish_api(cache, auth, &tp4.publish_body(&id, None))
                    .await;
                f.check(
                    &label("API publish"),
                    r.status,
                    outcome.status().unwrap_or(201),
                    &r.text(),
                );

                // Build logs and nix-cache-info (accepted and ignored) are writes too.
                let r = srv
                    .put(
                        &format!("/{cache}/log/{}", tp.deriver_basename()),
                        auth,
                        "log",
                    )
                    .await;
                f.check(&label("PUT log"), r.status, want, &r.text());
                let r = srv
                    .put(
                        &format!("/{cache}/nix-cache-info"),
                        auth,
                        "StoreDir: /nix/store\n",
                    )
                    .await;
                f.check(&label("PUT nix-cache-info"), r.status, want, &r.text());

                let after = srv.path_count(cache).await;
                if outcome == Outcome::Allowed {
                    for t in [&tp, &tp2, &tp4] {
                        srv.assert_present(cache, t).await;
                    }
                    if after != count + 3 {
                        f.fail(format!(
                            "{}: {count} paths became {after}, want +3",
                            label("writes")
                        ));
                    }
                } else {
                    for t in [&tp, &tp2, &tp4] {
                        srv.assert_absent(cache, t).await;
                    }
                    if after != count {
                        f.fail(format!(
                            "{}: a refused write changed the path count",
                            label("writes")
                        ));
                    }
                    let log = srv
                        .get(
                            &format!("/{cache}/log/{}", tp.deriver_basename()),
                            srv.admin(),
                        )
                        .await;
                    f.check(
                        &label("refused log stays absent"),
                        log.status,
                        404,
                        &log.text(),
                    );
                }
                assert_eq!(srv.staging_files(), 0, "staging files left behind");
            }
        }
    }
    f.done();
}

#[tokio::test]
async fn cache_administration() {
    let w = World::new().await;
    let srv = &w.srv;
    let mut f = Failures::default();
    srv.create_cache("victim-b", false).await;
    for who in EVERYONE {
        let auth = w.auth(who, false);
        let label = |what: &str| format!("{who:?} {what}");

        // Create: server admins only.
        let name = format!("new-{}", format!("{who:?}").to_lowercase());
        let r = srv
            .post_json("/api/v1/caches", auth, &json!({ "name": name }))
            .await;
        let outcome = server_admin_outcome(who);
        f.check(
            &label("create cache"),
            r.status,
            outcome.status().unwrap_or(201),
            &r.text(),
        );
        let exists = srv
            .get(&format!("/api/v1/caches/{name}"), srv.admin())
            .await;
        let want = if outcome == Outcome::Allowed {
            200
        } else {
            404
        };
        f.check(
            &label("created cache exists"),
            exists.status,
            want,
            &exists.text(),
        );

        // Configure: admin on the cache.
        let outcome = cache_admin_outcome(who);
        let priority = 50 + EVERYONE.iter().position(|x| *x == who).unwrap_or(0) as i64;
        let before = srv.cache_info("pub").await["priority"].clone();
        let r = srv
            .patch_json("/api/v1/caches/pub", auth, &json!({ "priority": priority }))
            .await;
        f.check(
            &label("configure cache"),
            r.status,
            outcome.status().unwrap_or(200),
            &r.text(),
        );
        let after = srv.cache_info("pub").await["priority"].clone();
        let want = if outcome == Outcome::Allowed {
            json!(priority)
        } else {
            before
        };
        if after != want {
            f.fail(format!(
                "{}: priority is {after}, want {want}",
                label("configure cache")
            ));
        }

        // Register a client public key: admin on the cache. Use a cache nobody uploads to.
        let key = common::signing_key("victim-a-1", 9)
            .verifying_key()
            .to_string();
        let r = srv
            .post_json(
                "/api/v1/caches/victim-a/public-key",
                auth,
                &json!({ "public_key": key }),
            )
            .await;
        // victim-a is in the cache admin's scope, like pub.
        f.check(
            &label("register public key"),
            r.status,
            outcome.status().unwrap_or(200),
            &r.text(),
        );

        // Delete: admin on the cache; the allowed requesters each get a cache of their own.
        if outcome != Outcome::Allowed {
            let r = srv.delete("/api/v1/caches/victim-a", auth).await;
            f.check(
                &label("delete cache"),
                r.status,
                outcome.status().unwrap_or(204),
                &r.text(),
            );
            srv.get("/api/v1/caches/victim-a", srv.admin())
                .await
                .expect(200);
        }
    }
    srv.delete("/api/v1/caches/victim-a", w.cache_admin.bearer())
        .await
        .expect(204);
    srv.get("/api/v1/caches/victim-a", srv.admin())
        .await
        .expect(404);
    // victim-b is outside the cache admin's scope.
    srv.delete("/api/v1/caches/victim-b", w.cache_admin.bearer())
        .await
        .expect(403);
    srv.delete("/api/v1/caches/victim-b", srv.admin())
        .await
        .expect(204);
    srv.get("/api/v1/caches/victim-b", srv.admin())
        .await
        .expect(404);
    f.done();
}

#[tokio::test]
async fn token_administration() {
    let w = World::new().await;
    let srv = &w.srv;
    let mut f = Failures::default();
    for who in EVERYONE {
        let auth = w.auth(who, false);
        let label = |what: &str| format!("{who:?} {what}");
        let outcome = server_admin_outcome(who);
        let listed = |v: &serde_json::Value| v.as_array().map(Vec::len).unwrap_or(0);
        let before = listed(
            &srv.get("/api/v1/tokens", srv.admin())
                .await
                .expect(200)
                .json(),
        );

        let r = srv
            .post_json(
                "/api/v1/tokens",
                auth,
                &json!({ "perms": ["pull"], "label": "x" }),
            )
            .await;
        f.check(
            &label("create token"),
            r.status,
            outcome.status().unwrap_or(201),
            &r.text(),
        );
        let after = listed(
            &srv.get("/api/v1/tokens", srv.admin())
                .await
                .expect(200)
                .json(),
        );
        let grown = if outcome == Outcome::Allowed { 1 } else { 0 };
        if after != before + grown {
            f.fail(format!(
                "{}: {before} tokens became {after}",
                label("create token")
            ));
        }

        let r = srv.get("/api/v1/tokens", auth).await;
        f.check(
            &label("list tokens"),
            r.status,
            outcome.status().unwrap_or(200),
            &r.text(),
        );
        if r.status == StatusCode::OK && r.text().contains("larder_") {
            f.fail(format!(
                "{}: the list shows token secrets",
                label("list tokens")
            ));
        }

        let victim = srv.token(&["pull"], Some(&["priv"])).await;
        let r = srv
            .delete(&format!("/api/v1/tokens/{}", victim.id), auth)
            .await;
        f.check(
            &label("revoke token"),
            r.status,
            outcome.status().unwrap_or(204),
            &r.text(),
        );
        let still = srv.get("/priv/nix-cache-info", victim.bearer()).await;
        f.check(
            &label("victim reads nix-cache-info"),
            still.status,
            200,
            &still.text(),
        );
        let still = srv
            .get(
                &format!("/priv/{}.narinfo", w.present.hash()),
                victim.bearer(),
            )
            .await;
        let want = if outcome == Outcome::Allowed {
            401
        } else {
            200
        };
        f.check(
            &label("victim token afterwards"),
            still.status,
            want,
            &still.text(),
        );
    }
    f.done();
}

#[tokio::test]
async fn credentials_that_do_not_work_are_401() {
    let w = World::new().await;
    let srv = &w.srv;
    let narinfo = format!("/priv/{}.narinfo", w.present.hash());
    for (label, value) in [
        (
            "unknown token",
            "Bearer larder_0000000000000000000000000000000000000000000000000000".to_owned(),
        ),
        ("empty bearer", "Bearer ".to_owned()),
        ("unknown scheme", "Digest abc".to_owned()),
        ("bad base64", "Basic !!!".to_owned()),
        ("huge token", format!("Bearer {}", "a".repeat(10_000))),
    ] {
        let mut req = request(Method::GET, &narinfo, Auth::Anon, "");
        req.headers_mut()
            .insert(header::AUTHORIZATION, value.parse().expect("header value"));
        let r = srv.send(req).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{label}: {}", r.text());
        assert!(r.header(header::WWW_AUTHENTICATE).is_some(), "{label}");
    }
    for t in [&w.revoked, &w.expired] {
        let r = srv.get("/api/v1/whoami", t.bearer()).await.expect(401);
        assert!(
            r.text().contains("revoked") || r.text().contains("expired"),
            "{}",
            r.text()
        );
    }
    // Basic auth: any user name, including none, with the token as password.
    for user in ["nix", "", "someone-else"] {
        srv.get(&narinfo, Auth::Basic(user, &w.pull.secret))
            .await
            .expect(200);
    }
    // A token's own password field is what counts, not the user name.
    srv.get(&narinfo, Auth::Basic(&w.pull.secret, "wrong"))
        .await
        .expect(401);
    let me = srv
        .get("/api/v1/whoami", w.push.basic())
        .await
        .expect(200)
        .json();
    assert_eq!(me["authenticated"], json!(true));
    assert_eq!(me["perms"], json!(["push"]));
    let anon = srv
        .get("/api/v1/whoami", Auth::Anon)
        .await
        .expect(200)
        .json();
    assert_eq!(anon["authenticated"], json!(false));
}

#[tokio::test]
async fn a_token_scope_ends_with_its_cache() {
    let srv = Server::new().await;
    srv.create_cache("tmpc", false).await;
    srv.create_cache("kept", false).await;
    let old = srv.token(&["admin"], Some(&["tmpc"])).await;
    let both = srv.token(&["push"], Some(&["tmpc", "kept"])).await;
    // Resolved once before the deletion (the server keeps resolved tokens for a moment).
    srv.get("/api/v1/caches/tmpc", old.bearer())
        .await
        .expect(200);
    srv.delete("/api/v1/caches/tmpc", srv.admin())
        .await
        .expect(204);

    // Another cache under the same name, private: the old scope does not reach it.
    srv.create_cache("tmpc", true).await;
    for (what, resp) in [
        (
            "cache-info",
            srv.get("/api/v1/caches/tmpc", old.bearer()).await,
        ),
        (
            "narinfo",
            srv.get(
                "/tmpc/0c6kzph7l0dcbfmjap64f0czdafn3b7x.narinfo",
                old.bearer(),
            )
            .await,
        ),
        (
            "patch",
            srv.patch_json(
                "/api/v1/caches/tmpc",
                old.bearer(),
                &json!({"private": false}),
            )
            .await,
        ),
        (
            "push",
            srv.post_json(
                "/api/v1/caches/tmpc/missing",
                both.bearer(),
                &json!({ "paths": [] }),
            )
            .await,
        ),
    ] {
        assert!(
            matches!(resp.status.as_u16(), 403 | 404),
            "{what}: {} {}",
            resp.status,
            resp.text()
        );
    }
    assert_eq!(
        srv.cache_info("tmpc").await["private"],
        true,
        "still private"
    );
    // The scopes on other caches are untouched.
    srv.post_json(
        "/api/v1/caches/kept/missing",
        both.bearer(),
        &json!({ "paths": [] }),
    )
    .await
    .expect(200);

    // `token list` says which scopes ended.
    let list = srv
        .get("/api/v1/tokens", srv.admin())
        .await
        .expect(200)
        .json();
    let find = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(find(&old.id)["caches"], json!([]));
    assert_eq!(find(&old.id)["deleted_caches"], json!(["tmpc"]));
    assert_eq!(find(&both.id)["caches"], json!(["kept"]));
    assert_eq!(find(&both.id)["deleted_caches"], json!(["tmpc"]));
}

#[tokio::test]
async fn a_private_cache_looks_like_a_missing_one_to_those_who_cannot_read_it() {
    let srv = Server::new().await;
    srv.create_cache("secret", true).await;
    srv.patch_json(
        "/api/v1/caches/secret",
        srv.admin(),
        &json!({ "priority": 30 }),
    )
    .await
    .expect(200);
    srv.create_cache("other", false).await;
    let tp = TestPath::new("hidden", "private-or-missing");
    srv.push_api("secret", srv.admin(), &tp, Comp::Zstd)
        .await
        .expect(201);
    let elsewhere = srv.token(&["admin"], Some(&["other"])).await;
    let everywhere = srv.token(&["pull"], None).await;
    let drv = common::store_path("hidden.drv", "private-or-missing").basename();
    let nar = format!("nar/{}", "0".repeat(52));
    for who in [Auth::Anon, elsewhere.bearer()] {
        for tail in [
            "nix-cache-info".to_owned(),
            format!("{}.narinfo", tp.hash()),
            format!("{}.ls", tp.hash()),
            format!("{nar}.nar.zst"),
            format!("log/{drv}"),
        ] {
            let private = srv.get(&format!("/secret/{tail}"), who).await;
            let missing = srv.get(&format!("/nosuch/{tail}"), who).await;
            assert_eq!(
                (private.status, private.text().replace("secret", "NAME")),
                (missing.status, missing.text().replace("nosuch", "NAME")),
                "{who:?} {tail}"
            );
            let head_private = srv.head(&format!("/secret/{tail}"), who).await;
            let head_missing = srv.head(&format!("/nosuch/{tail}"), who).await;
            assert_eq!(
                head_private.status, head_missing.status,
                "HEAD {who:?} {tail}"
            );
        }
    }
    // Who could read any cache is told the truth.
    let info = srv
        .get("/secret/nix-cache-info", everywhere.bearer())
        .await
        .expect(200);
    assert!(info.text().contains("Priority: 30"), "{}", info.text());
    srv.get("/nosuch/nix-cache-info", everywhere.bearer())
        .await
        .expect(404);
    srv.get(
        &format!("/nosuch/{}.narinfo", tp.hash()),
        everywhere.bearer(),
    )
    .await
    .expect(404);
}
