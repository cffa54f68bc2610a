//! The OpenAPI document at `/api/v1/openapi.json` is kept true:
//! - its paths and methods are exactly the JSON API routes the router serves (the router's
//!   table, recorded as routes are added), so adding or removing a route without documenting
//!   it fails here;
//! - every documented operation is called on a real server (TCP, `larder_server::serve`), and
//!   each answer's status must be documented and its body must match the documented schema.
#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Comp, Server, TestPath};
use larder_nix::hash::Sha256;
use serde_json::{json, Value};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    serde_json::from_str(larder_server::api::openapi_json()).expect("the document is JSON")
}

/// `(METHOD, path)` of every documented operation.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: unexpected key {method:?}"
            );
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_api_routes() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    let routed: BTreeSet<(String, String)> = larder_server::route_table()
        .into_iter()
        .filter_map(|r| {
            r.path
                .strip_prefix("/api/v1")
                .map(|p| (r.method.as_str().to_owned(), p.to_owned()))
        })
        .collect();
    let documented = documented(&doc);
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
    // Every schema in the document is a valid JSON Schema (2020-12, OpenAPI 3.1's dialect).
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        jsonschema::meta::validate(schema)
            .unwrap_or_else(|e| panic!("schema {name} is not a valid JSON Schema: {e}"));
    }
    // Every documented path parameter is declared.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            assert_eq!(declared, in_path, "{method} {path}: path parameters");
        }
    }
}

#[tokio::test]
async fn undocumented_methods_are_not_served() {
    // The router answers 405 to every method the document does not list for a path: no
    // route was added around the recorded table.
    let srv = Server::new().await;
    let doc = doc();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{cache}", "c")
            .replace("{path}", "x")
            .replace("{pin}", "p")
            .replace("{id}", "i")
            .replace("{n}", "0");
        for m in METHODS {
            if item.get(m).is_some() {
                continue;
            }
            let method = axum::http::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let r = srv
                .send(common::request(
                    method,
                    &format!("/api/v1{concrete}"),
                    srv.admin(),
                    axum::body::Body::empty(),
                ))
                .await;
            assert_eq!(r.status, 405, "{m} {path} is served but not documented");
        }
    }
}

/// Calls a real server and checks every answer against the document.
struct Checker {
    doc: Value,
    base: String,
    http: reqwest::Client,
    covered: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl Checker {
    /// The schema of a documented answer, with `$ref`s to responses resolved; `None` for an
    /// answer documented without a body.
    fn response_schema(&self, method: &str, template: &str, status: u16) -> Option<Value> {
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let mut resp = op["responses"][status.to_string()].clone();
        assert!(
            resp.is_object(),
            "{method} {template}: status {status} is not documented"
        );
        if let Some(r) = resp["$ref"].as_str() {
            let name = r.strip_prefix("#/components/responses/").unwrap();
            resp = self.doc["components"]["responses"][name].clone();
        }
        let schema = resp["content"]["application/json"]["schema"].clone();
        (!schema.is_null()).then_some(schema)
    }

    /// Send a request to `/api/v1{path}` (an instance of `template`), check its answer and
    /// return its status and body.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Body>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, format!("{}/api/v1{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        match body {
            Some(Body::Json(v)) => rb = rb.json(&v),
            Some(Body::Bytes(b)) => rb = rb.body(b),
            None => {}
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let schema = self.response_schema(method, template, status);
        let value = match &schema {
            None => {
                assert!(
                    text.is_empty(),
                    "{method} {path}: {status} is documented without a body: {text}"
                );
                Value::Null
            }
            Some(schema) => {
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
                let root = json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "components": self.doc["components"],
                    "allOf": [schema],
                });
                let validator = jsonschema::validator_for(&root).unwrap();
                let errors: Vec<String> = validator
                    .iter_errors(&value)
                    .map(|e| format!("{} at {}", e, e.instance_path()))
                    .collect();
                assert!(
                    errors.is_empty(),
                    "{method} {path} ({status}) does not match its schema:\n{}\nbody: {value:#}",
                    errors.join("\n")
                );
                value
            }
        };
        self.covered
            .entry((method.to_owned(), template.to_owned()))
            .or_default()
            .insert(status);
        (status, value)
    }

    async fn ok(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Body>,
        want: u16,
    ) -> Value {
        let (status, v) = self.call(method, template, path, token, body).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }
}

enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn j(v: Value) -> Option<Body> {
    Some(Body::Json(v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_documented_schemas() {
    let srv = Server::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(larder_server::serve(
        srv.state.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut c = Checker {
        doc: doc(),
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        covered: BTreeMap::new(),
    };
    let admin = srv.admin.clone();
    let a = Some(admin.as_str());

    c.ok("GET", "/openapi.json", "/openapi.json", None, None, 200)
        .await;
    c.ok("GET", "/whoami", "/whoami", a, None, 200).await;
    c.ok("GET", "/whoami", "/whoami", None, None, 200).await;
    c.ok("GET", "/whoami", "/whoami", Some("larder_nope"), None, 401)
        .await;

    // Caches.
    let body = json!({ "name": "pub", "max_size": "1GiB", "compression": "zstd" });
    c.ok("POST", "/caches", "/caches", a, j(body.clone()), 201)
        .await;
    c.ok("POST", "/caches", "/caches", a, j(body), 409).await;
    c.ok(
        "POST",
        "/caches",
        "/caches",
        a,
        j(json!({ "name": "Bad!" })),
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches",
        "/caches",
        None,
        j(json!({ "name": "x" })),
        401,
    )
    .await;
    c.ok(
        "POST",
        "/caches",
        "/caches",
        a,
        j(json!({ "name": "priv", "private": true })),
        201,
    )
    .await;
    c.ok(
        "POST",
        "/caches",
        "/caches",
        a,
        j(json!({ "name": "client" })),
        201,
    )
    .await;
    let list = c.ok("GET", "/caches", "/caches", a, None, 200).await;
    assert_eq!(list.as_array().unwrap().len(), 3);
    c.ok("GET", "/caches/{cache}", "/caches/pub", None, None, 200)
        .await;
    c.ok("GET", "/caches/{cache}", "/caches/priv", None, None, 401)
        .await;
    c.ok("GET", "/caches/{cache}", "/caches/nope", a, None, 404)
        .await;
    c.ok("GET", "/caches/{cache}", "/caches/Bad!", None, None, 400)
        .await;
    c.ok(
        "PATCH",
        "/caches/{cache}",
        "/caches/pub",
        a,
        j(json!({ "priority": 30, "max_size": null })),
        200,
    )
    .await;
    c.ok(
        "PATCH",
        "/caches/{cache}",
        "/caches/pub",
        None,
        j(json!({ "priority": 30 })),
        401,
    )
    .await;
    let pull = c
        .ok(
            "POST",
            "/tokens",
            "/tokens",
            a,
            j(json!({ "perms": ["pull"], "caches": ["priv"], "label": "reader", "expires_in": "30d" })),
            201,
        )
        .await;
    let pull_token = pull["token"].as_str().unwrap().to_owned();
    c.ok(
        "GET",
        "/caches/{cache}",
        "/caches/priv",
        Some(&pull_token),
        None,
        200,
    )
    .await;
    c.ok(
        "PATCH",
        "/caches/{cache}",
        "/caches/priv",
        Some(&pull_token),
        j(json!({ "private": false })),
        403,
    )
    .await;
    c.ok("GET", "/tokens", "/tokens", a, None, 200).await;
    c.ok("GET", "/tokens", "/tokens", Some(&pull_token), None, 403)
        .await;
    c.ok(
        "POST",
        "/tokens",
        "/tokens",
        a,
        j(json!({ "perms": [] })),
        400,
    )
    .await;

    // Uploads: a single-shot NAR and a multi-part one, then their paths.
    let lib = TestPath::new("lib", "lib");
    let app = TestPath::new("app", "app").referencing(&[&lib]);
    let up = c
        .ok(
            "POST",
            "/caches/{cache}/nars",
            "/caches/pub/nars?compression=none",
            a,
            Some(Body::Bytes(lib.compressed(Comp::None))),
            201,
        )
        .await;
    c.ok(
        "POST",
        "/caches/{cache}/nars",
        "/caches/pub/nars?compression=bzip2",
        a,
        Some(Body::Bytes(vec![1])),
        415,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/nars",
        "/caches/pub/nars?compression=none",
        a,
        Some(Body::Bytes(b"not a nar".to_vec())),
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/nars",
        "/caches/pub/nars?compression=none",
        None,
        Some(Body::Bytes(vec![1])),
        401,
    )
    .await;
    let publish = lib.publish_body(up["upload_id"].as_str().unwrap(), None);
    c.ok(
        "POST",
        "/caches/{cache}/paths",
        "/caches/pub/paths",
        a,
        j(publish),
        201,
    )
    .await;
    let again = c
        .ok(
            "POST",
            "/caches/{cache}/nars",
            "/caches/pub/nars?compression=none",
            a,
            Some(Body::Bytes(lib.compressed(Comp::None))),
            201,
        )
        .await;
    let publish = lib.publish_body(again["upload_id"].as_str().unwrap(), None);
    c.ok(
        "POST",
        "/caches/{cache}/paths",
        "/caches/pub/paths",
        a,
        j(publish),
        200,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/paths",
        "/caches/pub/paths",
        a,
        j(json!({ "upload_id": "x" })),
        400,
    )
    .await;
    // A batch, into another cache (whose contents nothing below counts).
    let fresh = TestPath::new("batched", "openapi");
    let mut meta = fresh.publish_body("", None);
    meta.as_object_mut().unwrap().remove("upload_id");
    let meta = serde_json::to_vec(&meta).unwrap();
    let batch = [&(meta.len() as u32).to_be_bytes()[..], &meta, &fresh.nar].concat();
    let answer = c
        .ok(
            "POST",
            "/caches/{cache}/paths/batch",
            "/caches/priv/paths/batch?compression=none",
            a,
            Some(Body::Bytes(batch)),
            200,
        )
        .await;
    assert_eq!(answer["paths"][0]["status"], json!("created"), "{answer}");
    c.ok(
        "POST",
        "/caches/{cache}/paths/batch",
        "/caches/priv/paths/batch?compression=none",
        a,
        Some(Body::Bytes(vec![0, 0, 0, 9, b'{'])),
        400,
    )
    .await;
    let identity = format!(
        "nar_hash={}&nar_size={}",
        Sha256::digest(&app.nar).to_typed_nix32(),
        app.nar.len()
    );
    let opened = c
        .ok(
            "POST",
            "/caches/{cache}/multipart",
            &format!("/caches/pub/multipart?compression=zstd&{identity}"),
            a,
            None,
            201,
        )
        .await;
    let id = opened["upload_id"].as_str().unwrap().to_owned();
    let listed = c
        .ok(
            "GET",
            "/caches/{cache}/multipart",
            &format!("/caches/pub/multipart?{identity}"),
            a,
            None,
            200,
        )
        .await;
    assert_eq!(listed["uploads"][0]["upload_id"], id.as_str());
    c.ok(
        "GET",
        "/caches/{cache}/multipart",
        "/caches/pub/multipart?nar_hash=nope",
        a,
        None,
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/multipart",
        "/caches/pub/multipart?compression=lz4",
        a,
        None,
        415,
    )
    .await;
    // Push-side chunking: a NAR of one chunk.
    let chunk = format!("{}.zst", Sha256::digest(&app.nar).to_nix32());
    let chunk_req = json!({ "session": "s1", "chunks": [chunk] });
    c.ok(
        "POST",
        "/caches/{cache}/chunks/missing",
        "/caches/pub/chunks/missing",
        a,
        j(chunk_req.clone()),
        200,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/chunks/missing",
        "/caches/pub/chunks/missing",
        a,
        j(json!({ "session": "s1", "chunks": ["x"] })),
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/chunks/assemble",
        "/caches/pub/chunks/assemble",
        a,
        j(chunk_req.clone()),
        409,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/chunks",
        "/caches/pub/chunks?session=s1",
        a,
        Some(Body::Bytes(b"not zstd".to_vec())),
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/chunks",
        "/caches/pub/chunks?session=s1",
        a,
        Some(Body::Bytes(zstd::bulk::compress(&app.nar, 3).unwrap())),
        201,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/chunks/assemble",
        "/caches/pub/chunks/assemble",
        a,
        j(chunk_req),
        201,
    )
    .await;
    c.ok(
        "PUT",
        "/caches/{cache}/multipart/{id}/parts/{n}",
        &format!("/caches/pub/multipart/{id}/parts/0"),
        a,
        Some(Body::Bytes(app.compressed(Comp::Zstd))),
        204,
    )
    .await;
    let shown = c
        .ok(
            "GET",
            "/caches/{cache}/multipart/{id}",
            &format!("/caches/pub/multipart/{id}"),
            a,
            None,
            200,
        )
        .await;
    assert_eq!(shown["parts"][0]["nar_size"], app.nar.len());
    c.ok(
        "GET",
        "/caches/{cache}/multipart/{id}",
        "/caches/pub/multipart/00000000000000000000000000000000",
        a,
        None,
        404,
    )
    .await;
    // An upload abandoned.
    let abandoned = c
        .ok(
            "POST",
            "/caches/{cache}/multipart",
            "/caches/pub/multipart?compression=none",
            a,
            None,
            201,
        )
        .await;
    let abandoned = abandoned["upload_id"].as_str().unwrap().to_owned();
    c.ok(
        "DELETE",
        "/caches/{cache}/multipart/{id}",
        &format!("/caches/pub/multipart/{abandoned}"),
        a,
        None,
        204,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/multipart/{id}",
        &format!("/caches/pub/multipart/{abandoned}"),
        a,
        None,
        404,
    )
    .await;
    c.ok(
        "PUT",
        "/caches/{cache}/multipart/{id}/parts/{n}",
        "/caches/pub/multipart/00000000000000000000000000000000/parts/0",
        a,
        Some(Body::Bytes(vec![1])),
        404,
    )
    .await;
    let done = c
        .ok(
            "POST",
            "/caches/{cache}/multipart/{id}/complete",
            &format!("/caches/pub/multipart/{id}/complete?parts=1"),
            a,
            None,
            201,
        )
        .await;
    c.ok(
        "POST",
        "/caches/{cache}/multipart/{id}/complete",
        "/caches/pub/multipart/zz/complete",
        a,
        None,
        400,
    )
    .await;
    let publish = app.publish_body(done["upload_id"].as_str().unwrap(), None);
    c.ok(
        "POST",
        "/caches/{cache}/paths",
        "/caches/pub/paths",
        a,
        j(publish),
        201,
    )
    .await;
    let missing = c
        .ok(
            "POST",
            "/caches/{cache}/missing",
            "/caches/pub/missing",
            None,
            j(json!({ "paths": [lib.path.to_absolute(), common::store_path("x", "x").hash_part()] })),
            200,
        )
        .await;
    assert_eq!(missing["missing"].as_array().unwrap().len(), 1);
    c.ok(
        "POST",
        "/caches/{cache}/missing",
        "/caches/pub/missing",
        None,
        j(json!({ "paths": ["/etc"] })),
        400,
    )
    .await;

    // Contents.
    let listed = c
        .ok(
            "GET",
            "/caches/{cache}/paths",
            "/caches/pub/paths?limit=1",
            None,
            None,
            200,
        )
        .await;
    assert!(listed["next_cursor"].is_string());
    c.ok(
        "GET",
        "/caches/{cache}/paths",
        "/caches/pub/paths?query=lib",
        None,
        None,
        200,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths",
        "/caches/priv/paths",
        None,
        None,
        401,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths",
        "/caches/pub/paths?limit=0",
        None,
        None,
        400,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}", lib.hash()),
        None,
        None,
        200,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths/{path}",
        &format!(
            "/caches/pub/paths/{}",
            common::store_path("x", "x").hash_part()
        ),
        None,
        None,
        404,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths/{path}",
        "/caches/pub/paths/nonsense",
        None,
        None,
        400,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths/{path}",
        "/caches/priv/paths/nonsense",
        Some(&pull_token),
        None,
        400,
    )
    .await;

    // Statistics.
    let stats = c
        .ok(
            "GET",
            "/caches/{cache}/stats",
            "/caches/pub/stats?days=3",
            None,
            None,
            200,
        )
        .await;
    assert_eq!(stats["days"].as_array().unwrap().len(), 3);
    c.ok(
        "GET",
        "/caches/{cache}/stats",
        "/caches/pub/stats?days=0",
        None,
        None,
        400,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/stats",
        "/caches/priv/stats",
        None,
        None,
        401,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/stats",
        "/caches/nope/stats",
        a,
        None,
        404,
    )
    .await;

    // Pins, eviction, deletion.
    let pin = json!({ "name": "rel", "store_path": app.path.to_absolute(), "keep_revisions": 2 });
    c.ok(
        "POST",
        "/caches/{cache}/pins",
        "/caches/pub/pins",
        a,
        j(pin),
        201,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/pins",
        "/caches/pub/pins",
        a,
        j(json!({ "name": "x y", "store_path": "/nix/store/x" })),
        400,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/pins",
        "/caches/pub/pins",
        None,
        None,
        200,
    )
    .await;
    c.ok(
        "GET",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}", lib.hash()),
        None,
        None,
        200,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/pins/{pin}",
        "/caches/pub/pins/rel",
        a,
        None,
        204,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/pins/{pin}",
        "/caches/pub/pins/rel",
        a,
        None,
        404,
    )
    .await;
    c.ok(
        "PATCH",
        "/caches/{cache}",
        "/caches/pub",
        a,
        j(json!({ "priority": 42 })),
        200,
    )
    .await;
    // A limit set in the database (a PATCH of max_size evicts at once), so that the
    // collection below has evictions to report.
    srv.set_limit_quietly("pub", 1).await;
    let report = c
        .ok(
            "POST",
            "/caches/{cache}/gc",
            "/caches/pub/gc?dry_run=true",
            a,
            None,
            200,
        )
        .await;
    assert_eq!(report["evicted"].as_array().unwrap().len(), 2);
    c.ok(
        "POST",
        "/caches/{cache}/gc",
        "/caches/pub/gc?dry_run=maybe",
        a,
        None,
        400,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/gc",
        "/caches/pub/gc",
        None,
        None,
        401,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}", lib.hash()),
        a,
        None,
        409,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}", lib.hash()),
        Some(&pull_token),
        None,
        403,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}?with_referrers=true", lib.hash()),
        a,
        None,
        200,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/paths/{path}",
        &format!("/caches/pub/paths/{}", lib.hash()),
        a,
        None,
        404,
    )
    .await;
    c.ok(
        "DELETE",
        "/caches/{cache}/paths/{path}",
        "/caches/pub/paths/x?with_referrers=1",
        a,
        None,
        400,
    )
    .await;
    let gc = c
        .ok("POST", "/caches/{cache}/gc", "/caches/pub/gc", a, None, 200)
        .await;
    assert_eq!(gc["evicted"], json!([]));

    // Client signing, then tokens and caches go.
    let key = common::signing_key("client-1", 7)
        .verifying_key()
        .to_string();
    c.ok(
        "POST",
        "/caches/{cache}/public-key",
        "/caches/client/public-key",
        a,
        j(json!({ "public_key": key })),
        200,
    )
    .await;
    c.ok(
        "POST",
        "/caches/{cache}/public-key",
        "/caches/client/public-key",
        a,
        j(json!({ "public_key": "nope" })),
        400,
    )
    .await;
    let id = pull["id"].as_str().unwrap().to_owned();
    c.ok(
        "DELETE",
        "/tokens/{id}",
        &format!("/tokens/{id}"),
        a,
        None,
        204,
    )
    .await;
    c.ok(
        "DELETE",
        "/tokens/{id}",
        &format!("/tokens/{id}"),
        a,
        None,
        404,
    )
    .await;
    c.ok("DELETE", "/tokens/{id}", "/tokens/x", None, None, 401)
        .await;
    c.ok("DELETE", "/caches/{cache}", "/caches/client", a, None, 204)
        .await;
    c.ok("DELETE", "/caches/{cache}", "/caches/client", a, None, 404)
        .await;

    // A server that trusts no issuer refuses every ID token (tests/oidc.rs trades real ones).
    c.ok(
        "POST",
        "/oidc/exchange",
        "/oidc/exchange",
        None,
        j(json!({ "token": "not.a.jwt" })),
        401,
    )
    .await;
    c.ok(
        "POST",
        "/oidc/exchange",
        "/oidc/exchange",
        None,
        j(json!({ "jwt": "x" })),
        400,
    )
    .await;

    // Every documented operation was called.
    let covered: BTreeSet<(String, String)> = c.covered.keys().cloned().collect();
    let all = documented(&c.doc);
    let uncalled: Vec<_> = all.difference(&covered).collect();
    assert!(uncalled.is_empty(), "operations never called: {uncalled:?}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// The schema of the JSON body `method path` takes.
fn request_schema(doc: &Value, method: &str, path: &str) -> Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
    assert!(!schema.is_null(), "{method} {path} documents no JSON body");
    schema
}

#[test]
fn what_the_client_sends_matches_the_documented_request_schemas() {
    use larder_api::{
        ConfigureCache, CreateCache, CreateToken, MissingRequest, Perm, PinRequest, PublishRequest,
        RegisterKey, Size, UpstreamRef,
    };
    let doc = doc();
    let lib = TestPath::new("lib", "lib");
    let check = |method: &str, path: &str, body: Value| {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": doc["components"],
            "allOf": [request_schema(&doc, method, path)],
        });
        let validator = jsonschema::validator_for(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {path}: the client's body does not match:\n{}\nbody: {body:#}",
            errors.join("\n")
        );
    };
    // Each body as the client's types serialise it (the `larder` verbs and the push build
    // exactly these), with every optional part set and unset.
    check(
        "post",
        "/caches",
        v(&CreateCache {
            name: "c".into(),
            private: true,
            priority: Some(30),
            compression: Some("xz".into()),
            max_size: Some(Size::Text("5GiB".into())),
            upstreams: vec!["https://cache.nixos.org".into()],
            upstream_keys: vec![larder_nix::signing::CACHE_NIXOS_ORG_KEY.into()],
        }),
    );
    check(
        "post",
        "/caches",
        v(&CreateCache {
            name: "c".into(),
            max_size: Some(Size::Bytes(1 << 30)),
            ..Default::default()
        }),
    );
    check(
        "patch",
        "/caches/{cache}",
        v(&ConfigureCache {
            private: Some(false),
            priority: Some(1),
            compression: Some("none".into()),
            max_size: Some(None),
            upstreams: Some(vec!["http://10.0.0.2:8080/c".into()]),
            upstream_keys: Some(Vec::new()),
        }),
    );
    check(
        "patch",
        "/caches/{cache}",
        v(&ConfigureCache {
            max_size: Some(Some(Size::Text("1GiB".into()))),
            ..Default::default()
        }),
    );
    check(
        "post",
        "/tokens",
        v(&CreateToken {
            perms: vec![Perm::Pull, Perm::Push],
            caches: Some(vec!["c".into()]),
            expires_in: Some("30d".into()),
            label: "ci".into(),
        }),
    );
    check(
        "post",
        "/tokens",
        v(&CreateToken {
            perms: vec![Perm::Admin],
            caches: None,
            expires_in: None,
            label: String::new(),
        }),
    );
    check(
        "post",
        "/caches/{cache}/missing",
        v(&MissingRequest {
            paths: vec![lib.path.to_absolute(), lib.hash()],
        }),
    );
    check(
        "post",
        "/caches/{cache}/paths",
        v(&PublishRequest {
            upload_id: "u".into(),
            store_path: lib.path.to_absolute(),
            nar_hash: Sha256::digest(&lib.nar).to_typed_nix32(),
            nar_size: lib.nar.len() as u64,
            references: vec![lib.path.to_absolute()],
            deriver: None,
            ca: None,
            sigs: vec![],
            upstream: vec![UpstreamRef {
                store_path: lib.path.to_absolute(),
                nar_hash: Sha256::digest(&lib.nar).to_typed_nix32(),
                nar_size: 1,
                references: vec![],
                sigs: vec!["k:c2ln".into()],
            }],
        }),
    );
    check(
        "post",
        "/caches/{cache}/pins",
        v(&PinRequest {
            name: "release".into(),
            store_path: lib.path.to_absolute(),
            keep_revisions: Some(2),
            keep_days: None,
            keep_forever: false,
        }),
    );
    check(
        "post",
        "/caches/{cache}/public-key",
        v(&RegisterKey {
            public_key: "client-1:AAAA".into(),
        }),
    );
}

/// A body serialised as the client sends it.
fn v<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap()
}
