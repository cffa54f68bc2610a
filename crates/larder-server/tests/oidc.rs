//! CI identity: `POST /api/v1/oidc/exchange` against a real OIDC issuer on loopback
//! (`larder_testkit::oidc::Issuer`: discovery document, JWKS, keys it generated, tokens signed
//! with `jsonwebtoken`). A valid ID token becomes a token limited to what the matching rules
//! grant, listed and revocable; every bad one is a 401 naming its reason and creates no token;
//! a rotation of the issuer's keys is followed without a restart; the token expires.
//! Runs over SQLite, and over PostgreSQL with `LARDER_TEST_DATABASE=postgres`.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::time::Duration;

use common::{Auth, Comp, Server, TestPath};
use larder_server::config::{ConfigFile, IssuerFile, OidcFile, RuleFile};
use larder_testkit::oidc::{self, Issuer};
use serde_json::{json, Value};

const AUD: &str = "https://cache.example.org";

fn rule(claims: &[(&str, &str)], perm: &str, caches: &[&str]) -> RuleFile {
    RuleFile {
        claims: claims
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        perm: perm.into(),
        caches: caches.iter().map(|c| c.to_string()).collect(),
    }
}

/// A server trusting `issuer` (audience [`AUD`]): `mitsio/dotfiles` on `main` may push to
/// cache `main`; every `mitsio/*` repository may pull `main` and `docs`.
async fn server(issuer: &Issuer, max_lifetime: Option<&str>) -> Server {
    let srv = Server::with_config(ConfigFile {
        oidc: Some(OidcFile {
            max_lifetime: max_lifetime.map(str::to_owned),
            issuers: vec![IssuerFile {
                issuer: issuer.url.clone(),
                audience: AUD.into(),
                rules: vec![
                    rule(
                        &[
                            ("repository", "mitsio/dotfiles"),
                            ("ref", "refs/heads/main"),
                        ],
                        "push",
                        &["main"],
                    ),
                    rule(&[("repository", "mitsio/*")], "pull", &["main", "docs"]),
                ],
            }],
        }),
        ..ConfigFile::default()
    })
    .await;
    srv.create_cache("main", true).await;
    srv.create_cache("docs", true).await;
    srv
}

fn job(issuer: &Issuer) -> Value {
    issuer.claims(
        AUD,
        json!({ "repository": "mitsio/dotfiles", "ref": "refs/heads/main", "run_id": "4242" }),
    )
}

async fn exchange(srv: &Server, token: &str, caches: Option<&[&str]>) -> common::Resp {
    let mut body = json!({ "token": token });
    if let Some(c) = caches {
        body["caches"] = json!(c);
    }
    srv.post_json("/api/v1/oidc/exchange", Auth::Anon, &body)
        .await
}

async fn token_list(srv: &Server) -> Vec<Value> {
    srv.get("/api/v1/tokens", srv.admin())
        .await
        .expect(200)
        .json()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_valid_id_token_becomes_a_token_limited_to_the_matching_rules() {
    let issuer = Issuer::start();
    let srv = server(&issuer, None).await;
    let before = oidc::now();
    let t = exchange(&srv, &issuer.sign(&job(&issuer)), None)
        .await
        .expect(201)
        .json();
    // The highest permission granted, on the caches granted it; at most an hour.
    assert_eq!(t["perms"], json!(["push"]), "{t}");
    assert_eq!(t["caches"], json!(["main"]), "{t}");
    let expires = t["expires_at"].as_i64().unwrap();
    assert!(
        expires > before && expires <= oidc::now() + 3600,
        "{expires}"
    );
    let label = t["label"].as_str().unwrap();
    for part in [
        "sub=repo:mitsio/dotfiles:ref:refs/heads/main",
        "repository=mitsio/dotfiles",
        "ref=refs/heads/main",
        "run_id=4242",
        &issuer.url,
    ] {
        assert!(label.contains(part), "{label} lacks {part}");
    }
    let secret = t["token"].as_str().unwrap().to_owned();
    let id = t["id"].as_str().unwrap().to_owned();

    // It pushes to `main`, and only there.
    let tp = TestPath::new("ci-built", "oidc-1");
    srv.push_api("main", Auth::Bearer(&secret), &tp, Comp::Zstd)
        .await
        .expect(201);
    srv.assert_present("main", &tp).await;
    let other = TestPath::new("ci-other", "oidc-2");
    srv.push_api("docs", Auth::Bearer(&secret), &other, Comp::Zstd)
        .await
        .expect(403);

    // Listed like any token, with its label; revocable like any token.
    let listed = token_list(&srv).await;
    let row = listed.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(row["label"], label);
    assert!(row.get("token").is_none());
    srv.delete(&format!("/api/v1/tokens/{id}"), srv.admin())
        .await
        .expect(204);
    let r = srv
        .get("/api/v1/caches/main/paths", Auth::Bearer(&secret))
        .await
        .expect(401);
    assert!(r.text().contains("revoked"), "{}", r.text());

    // Asking for one cache: what the rules grant there. Another repository of the owner
    // may pull, not push.
    let t = exchange(&srv, &issuer.sign(&job(&issuer)), Some(&["docs"]))
        .await
        .expect(201)
        .json();
    assert_eq!(
        (t["perms"].clone(), t["caches"].clone()),
        (json!(["pull"]), json!(["docs"]))
    );
    let mut claims = job(&issuer);
    claims["repository"] = "mitsio/website".into();
    let t = exchange(&srv, &issuer.sign(&claims), None)
        .await
        .expect(201)
        .json();
    assert_eq!(
        (t["perms"].clone(), t["caches"].clone()),
        (json!(["pull"]), json!(["docs", "main"]))
    );
    let secret = t["token"].as_str().unwrap();
    srv.push_api("main", Auth::Bearer(secret), &other, Comp::Zstd)
        .await
        .expect(403);
    srv.get("/api/v1/caches/main/paths", Auth::Bearer(secret))
        .await
        .expect(200);
}

#[tokio::test]
async fn every_bad_id_token_is_refused_naming_the_reason_and_creates_no_token() {
    let issuer = Issuer::start();
    let srv = server(&issuer, None).await;
    let key = issuer.key();
    let good = job(&issuer);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        c
    };
    let tampered = {
        // A valid signature over other claims.
        let signed = issuer.sign(&good);
        let parts: Vec<&str> = signed.split('.').collect();
        let other = issuer.sign(&with(&|c| c["repository"] = "mitsio/other".into()));
        format!(
            "{}.{}.{}",
            parts[0],
            other.split('.').nth(1).unwrap(),
            parts[2]
        )
    };
    let stranger = oidc::Key::es256("unpublished");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            issuer.sign(&with(&|c| c["aud"] = "https://other.example.org".into())),
            "wrong audience",
        ),
        (
            "wrong issuer",
            issuer.sign(&with(&|c| c["iss"] = "https://token.example.org".into())),
            "wrong issuer",
        ),
        (
            "expired",
            issuer.sign(&with(&|c| {
                c["iat"] = (oidc::now() - 7200).into();
                c["nbf"] = (oidc::now() - 7200).into();
                c["exp"] = (oidc::now() - 3600).into();
            })),
            "expired",
        ),
        ("alg none", oidc::unsigned(&key.kid, &good), "alg: none"),
        (
            "HS256 with the public key",
            key.forge_hs256(&good),
            "HS256, a shared-secret algorithm",
        ),
        ("unknown kid", stranger.sign(&good), "unknown kid"),
        (
            "no matching rule",
            issuer.sign(&with(&|c| c["repository"] = "someone/else".into())),
            "no matching rule",
        ),
        (
            "a branch the push rule does not name, asking for its cache only",
            issuer.sign(&with(&|c| {
                c["repository"] = "intruder/dotfiles".into();
            })),
            "no matching rule",
        ),
        ("tampered claims", tampered, "signature does not verify"),
        (
            "not yet valid",
            issuer.sign(&with(&|c| c["nbf"] = (oidc::now() + 3600).into())),
            "not valid yet",
        ),
        (
            "no subject",
            issuer.sign(&with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            })),
            "no \"sub\" claim",
        ),
        ("not a JWT", "hello".into(), "not a JWT"),
    ];
    let before = token_list(&srv).await.len();
    for (case, token, says) in cases {
        let r = exchange(&srv, &token, None).await.expect(401);
        let error = r.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(says), "{case}: {error}");
        assert_eq!(
            token_list(&srv).await.len(),
            before,
            "{case} created a token"
        );
    }
    // The rules grant nothing on a cache they do not name.
    let r = exchange(&srv, &issuer.sign(&good), Some(&["elsewhere"]))
        .await
        .expect(401);
    assert!(r.text().contains("no matching rule"), "{}", r.text());
    // A body that is not the exchange's is a 400.
    srv.post_json("/api/v1/oidc/exchange", Auth::Anon, &json!({ "jwt": "x" }))
        .await
        .expect(400);
    assert_eq!(token_list(&srv).await.len(), before);
}

#[tokio::test]
async fn rotated_issuer_keys_are_picked_up_without_a_restart() {
    let issuer = Issuer::start();
    let srv = server(&issuer, None).await;
    exchange(&srv, &issuer.sign(&job(&issuer)), None)
        .await
        .expect(201);
    assert_eq!(issuer.jwks_fetches(), 1);
    // A flood of made-up key ids costs the issuer at most one fetch per interval.
    for i in 0..20 {
        let stranger = oidc::Key::es256(&format!("made-up-{i}"));
        exchange(&srv, &stranger.sign(&job(&issuer)), None)
            .await
            .expect(401);
    }
    assert!(issuer.jwks_fetches() <= 2, "{}", issuer.jwks_fetches());
    // The issuer rotates to a new (Ed25519) key; once the refetch interval is over, its first
    // token makes the server fetch the keys again.
    tokio::time::sleep(larder_server::oidc::JWKS_REFETCH_INTERVAL + Duration::from_millis(200))
        .await;
    let fetched = issuer.jwks_fetches();
    let new_key = issuer.rotate("key-2");
    let t = exchange(&srv, &new_key.sign(&job(&issuer)), None)
        .await
        .expect(201)
        .json();
    assert_eq!(t["perms"], json!(["push"]));
    assert_eq!(issuer.jwks_fetches(), fetched + 1);
    // The key it no longer publishes is unknown now.
    tokio::time::sleep(larder_server::oidc::JWKS_REFETCH_INTERVAL + Duration::from_millis(200))
        .await;
    let old = oidc::Key::es256("key-1");
    let r = exchange(&srv, &old.sign(&job(&issuer)), None)
        .await
        .expect(401);
    assert!(r.text().contains("unknown kid"), "{}", r.text());
}

#[tokio::test]
async fn an_exchanged_token_is_refused_once_expired() {
    let issuer = Issuer::start();
    let srv = server(&issuer, Some("2s")).await;
    let t = exchange(&srv, &issuer.sign(&job(&issuer)), None)
        .await
        .expect(201)
        .json();
    let secret = t["token"].as_str().unwrap();
    assert!(t["expires_at"].as_i64().unwrap() <= oidc::now() + 2);
    srv.get("/api/v1/caches/main/paths", Auth::Bearer(secret))
        .await
        .expect(200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = srv
        .get("/api/v1/caches/main/paths", Auth::Bearer(secret))
        .await
        .expect(401);
    assert!(r.text().contains("token expired"), "{}", r.text());
    let tp = TestPath::new("too-late", "oidc-3");
    srv.push_api("main", Auth::Bearer(secret), &tp, Comp::Zstd)
        .await
        .expect(401);
}

#[tokio::test]
async fn an_unreachable_issuer_is_a_503_and_a_server_without_issuers_refuses() {
    // An issuer configured on a port nobody listens on.
    let dead = format!("http://127.0.0.1:{}", larder_testkit::free_port());
    let srv = Server::with_config(ConfigFile {
        oidc: Some(OidcFile {
            max_lifetime: None,
            issuers: vec![IssuerFile {
                issuer: dead.clone(),
                audience: AUD.into(),
                rules: vec![rule(&[("repository", "*/*")], "push", &["main"])],
            }],
        }),
        ..ConfigFile::default()
    })
    .await;
    let key = oidc::Key::es256("k");
    let claims = json!({
        "iss": dead, "aud": AUD, "sub": "s", "repository": "a/b",
        "exp": oidc::now() + 300, "iat": oidc::now(),
    });
    // Straight through the router: the harness's `send` fails on any 5xx.
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = common::json_request(
        axum::http::Method::POST,
        "/api/v1/oidc/exchange",
        Auth::Anon,
        &json!({ "token": key.sign(&claims) }),
    );
    let resp = larder_server::router(srv.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("cannot fetch the signing keys"), "{text}");
    assert_eq!(token_list(&srv).await.len(), 1, "only the admin token");

    let plain = Server::new().await;
    let r = exchange(&plain, &key.sign(&claims), None).await.expect(401);
    assert!(r.text().contains("trusts no OIDC issuer"), "{}", r.text());
}
