//! Harness of the in-process HTTP tests: a server on a temporary data directory, driven with
//! `router(state).oneshot(request)`, and test store paths whose NARs are written with
//! larder-nix's `NarWriter` and uploaded the way Nix's uploader does (`PUT nar/…` then
//! `PUT <hash>.narinfo`) or the way the larder client does (JSON API).
//!
//! Every response goes through [`Server::send`], which checks the invariants that hold for
//! *every* request: never a 5xx, and never the server's data directory in a body or header.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use larder_nix::hash::Sha256;
use larder_nix::nar::write::NarWriter;
use larder_nix::signing::{SigningKey, VerifyingKey};
use larder_nix::store_path::StorePath;
use larder_server::config::ConfigFile;
use larder_server::{AppState, Config};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A server over a fresh data directory, with its bootstrap admin token. With
/// `LARDER_TEST_DATABASE=postgres` its metadata lives in a throwaway PostgreSQL cluster
/// instead of SQLite: every in-process test then runs over PostgreSQL (`.ci/run` does both).
pub struct Server {
    pub state: AppState,
    /// Server admin token (bootstrapped into `DATA/admin-token`).
    pub admin: String,
    dir: tempfile::TempDir,
    /// The PostgreSQL cluster holding the metadata, when testing over PostgreSQL.
    pub pg: Option<larder_testkit::postgres::PgCluster>,
}

/// Selects the metadata backend of [`Server`]: `sqlite` (default) or `postgres`.
pub const DATABASE_ENV: &str = "LARDER_TEST_DATABASE";

/// How a request authenticates.
#[derive(Debug, Clone, Copy)]
pub enum Auth<'a> {
    Anon,
    Bearer(&'a str),
    /// HTTP Basic with this user name and the token as password (what Nix sends from netrc).
    Basic(&'a str, &'a str),
}

/// A response, its body read whole.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Assert the status, showing the body when it differs.
    #[track_caller]
    pub fn expect(self, status: u16) -> Resp {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        self
    }
}

/// A token created through the API.
#[derive(Debug, Clone)]
pub struct Token {
    pub id: String,
    pub secret: String,
}

impl Token {
    pub fn bearer(&self) -> Auth<'_> {
        Auth::Bearer(&self.secret)
    }
    pub fn basic(&self) -> Auth<'_> {
        Auth::Basic("nix", &self.secret)
    }
}

pub fn request(method: Method, uri: &str, auth: Auth<'_>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    match auth {
        Auth::Anon => {}
        Auth::Bearer(t) => b = b.header(header::AUTHORIZATION, format!("Bearer {t}")),
        Auth::Basic(user, t) => {
            let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{t}"));
            b = b.header(header::AUTHORIZATION, format!("Basic {creds}"));
        }
    }
    b.body(body.into()).expect("valid request")
}

pub fn json_request(method: Method, uri: &str, auth: Auth<'_>, body: &Value) -> Request<Body> {
    let mut req = request(method, uri, auth, body.to_string());
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    req
}

impl Server {
    pub async fn new() -> Server {
        Server::with_config(ConfigFile::default()).await
    }

    pub async fn with_config(file: ConfigFile) -> Server {
        let mut server = Server::open(file).await;
        let token_file = larder_server::bootstrap_admin_token(&server.state)
            .await
            .expect("bootstrap")
            .expect("a fresh database gets an admin token");
        server.admin = std::fs::read_to_string(token_file)
            .expect("admin-token file")
            .trim()
            .to_owned();
        server
    }

    /// A server on a fresh database that has not made its admin token yet (`admin` is empty).
    pub async fn new_unbootstrapped() -> Server {
        Server::open(ConfigFile::default()).await
    }

    async fn open(mut file: ConfigFile) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg = match std::env::var(DATABASE_ENV).as_deref() {
            Ok("postgres") if file.database.is_none() => {
                let pg = larder_testkit::postgres::PgCluster::start();
                file.database = Some(pg.create_database());
                Some(pg)
            }
            Ok("postgres" | "sqlite") | Err(_) => None,
            Ok(other) => panic!("{DATABASE_ENV}={other}: expected sqlite or postgres"),
        };
        let config = Config::resolve(file, dir.path().join("data")).expect("valid config");
        let state = larder_server::open_state(config).await.expect("open state");
        // As `larder serve` does at start (in the background there): on the embedded default,
        // misses are then answered from memory, so every test runs with that filter.
        state.meta.remember_paths().await.expect("filter of paths");
        Server {
            state,
            admin: String::new(),
            dir,
            pg,
        }
    }

    /// Another replica on the same database, object storage and data directory (one mounted
    /// on every replica).
    pub async fn replica_sharing_data(&self) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = ConfigFile {
            database: Some(self.state.config.database.clone()),
            storage: Some(self.state.config.storage.clone()),
            data_dir: Some(self.state.config.data_dir.clone()),
            ..ConfigFile::default()
        };
        let config = Config::resolve(file, dir.path().join("data")).expect("valid config");
        let state = larder_server::open_state(config).await.expect("open state");
        Server {
            state,
            admin: self.admin.clone(),
            dir,
            pg: None,
        }
    }

    /// Another replica of this server: its own data directory and in-memory state, the same
    /// database and object storage (a shared directory stands in for a bucket).
    pub async fn replica(&self) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = ConfigFile {
            database: Some(self.state.config.database.clone()),
            storage: Some(self.state.config.storage.clone()),
            ..ConfigFile::default()
        };
        let config = Config::resolve(file, dir.path().join("data")).expect("valid config");
        let state = larder_server::open_state(config).await.expect("open state");
        assert!(
            larder_server::bootstrap_admin_token(&state)
                .await
                .expect("bootstrap")
                .is_none(),
            "a replica of a bootstrapped database made another admin token"
        );
        Server {
            state,
            admin: self.admin.clone(),
            dir,
            pg: None,
        }
    }

    pub fn admin(&self) -> Auth<'_> {
        Auth::Bearer(&self.admin)
    }

    pub fn data_dir(&self) -> &Path {
        &self.state.config.data_dir
    }

    /// Send one request through a fresh router and read the whole response. Panics on a 5xx
    /// or on a response that mentions the server's directories.
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = larder_server::router(self.state.clone())
            .oneshot(req)
            .await
            .expect("the router is infallible");
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the response body failed: {e}"))
            .to_bytes()
            .to_vec();
        let r = Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        assert!(
            !r.status.is_server_error(),
            "{what}: server error {}: {}",
            r.status,
            r.text()
        );
        let root = self.dir.path().to_string_lossy().into_owned();
        let data = self.data_dir().to_string_lossy().into_owned();
        for secret in [&root, &data] {
            assert!(
                !r.text().contains(secret.as_str()),
                "{what}: response body reveals a server path: {}",
                r.text()
            );
            for (name, value) in &r.headers {
                assert!(
                    !String::from_utf8_lossy(value.as_bytes()).contains(secret.as_str()),
                    "{what}: header {name} reveals a server path"
                );
            }
        }
        r
    }

    pub async fn get(&self, uri: &str, auth: Auth<'_>) -> Resp {
        self.send(request(Method::GET, uri, auth, Body::empty()))
            .await
    }
    pub async fn head(&self, uri: &str, auth: Auth<'_>) -> Resp {
        self.send(request(Method::HEAD, uri, auth, Body::empty()))
            .await
    }
    pub async fn put(&self, uri: &str, auth: Auth<'_>, body: impl Into<Body>) -> Resp {
        self.send(request(Method::PUT, uri, auth, body)).await
    }
    pub async fn delete(&self, uri: &str, auth: Auth<'_>) -> Resp {
        self.send(request(Method::DELETE, uri, auth, Body::empty()))
            .await
    }
    pub async fn post_json(&self, uri: &str, auth: Auth<'_>, body: &Value) -> Resp {
        self.send(json_request(Method::POST, uri, auth, body)).await
    }
    pub async fn patch_json(&self, uri: &str, auth: Auth<'_>, body: &Value) -> Resp {
        self.send(json_request(Method::PATCH, uri, auth, body))
            .await
    }

    // ---- administration through the JSON API ------------------------------------------

    pub async fn create_cache(&self, name: &str, private: bool) -> Value {
        self.post_json(
            "/api/v1/caches",
            self.admin(),
            &json!({ "name": name, "private": private }),
        )
        .await
        .expect(201)
        .json()
    }

    /// A token with `perms` on `caches` (`None`: every cache).
    pub async fn token(&self, perms: &[&str], caches: Option<&[&str]>) -> Token {
        self.token_with(json!({ "perms": perms, "caches": caches, "label": "test" }))
            .await
    }

    pub async fn token_with(&self, body: Value) -> Token {
        let v = self
            .post_json("/api/v1/tokens", self.admin(), &body)
            .await
            .expect(201)
            .json();
        Token {
            id: v["id"].as_str().expect("token id").to_owned(),
            secret: v["token"].as_str().expect("token secret").to_owned(),
        }
    }

    /// Set a cache's limit in the database, without the eviction a PATCH runs at once: to look
    /// at what a collection plans and reports.
    pub async fn set_limit_quietly(&self, cache: &str, limit: i64) {
        let update = larder_store::meta::CacheUpdate {
            max_size: Some(Some(limit)),
            ..Default::default()
        };
        self.state
            .meta
            .update_cache(cache, &update)
            .await
            .expect("update");
        self.state.hot.forget_cache(cache);
    }

    pub async fn cache_info(&self, cache: &str) -> Value {
        self.get(&format!("/api/v1/caches/{cache}"), self.admin())
            .await
            .expect(200)
            .json()
    }

    /// How many paths the cache publishes.
    pub async fn path_count(&self, cache: &str) -> i64 {
        self.cache_info(cache).await["paths"]
            .as_i64()
            .expect("paths is a number")
    }

    /// The cache's public key, as the API shows it.
    pub async fn public_key(&self, cache: &str) -> VerifyingKey {
        let info = self.cache_info(cache).await;
        VerifyingKey::parse(info["public_key"].as_str().expect("public_key")).expect("valid key")
    }

    /// The hash parts, among `hashes`, that the cache does not publish.
    pub async fn missing(&self, cache: &str, hashes: &[String]) -> Vec<String> {
        let v = self
            .post_json(
                &format!("/api/v1/caches/{cache}/missing"),
                self.admin(),
                &json!({ "paths": hashes }),
            )
            .await
            .expect(200)
            .json();
        serde_json::from_value(v["missing"].clone()).expect("missing is a list of strings")
    }

    /// Assert nothing of `tp` is visible in `cache`: its narinfo is 404 (to the admin) and the
    /// bulk query reports it missing.
    pub async fn assert_absent(&self, cache: &str, tp: &TestPath) {
        let r = self
            .get(&format!("/{cache}/{}.narinfo", tp.hash()), self.admin())
            .await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{} is visible: {}",
            tp.path,
            r.text()
        );
        assert_eq!(self.missing(cache, &[tp.hash()]).await, vec![tp.hash()]);
    }

    /// Assert `tp` is published in `cache` and its narinfo describes our NAR.
    pub async fn assert_present(&self, cache: &str, tp: &TestPath) {
        let r = self
            .get(&format!("/{cache}/{}.narinfo", tp.hash()), self.admin())
            .await
            .expect(200);
        let ni = larder_nix::NarInfo::parse(&r.text()).expect("served narinfo parses");
        assert_eq!(ni.store_path, tp.path);
        assert_eq!(ni.nar_hash, tp.nar_hash());
        assert_eq!(ni.nar_size, tp.nar_size());
    }

    // ---- the data directory -----------------------------------------------------------

    /// Files under the object store's `chunk/` tree: one per stored NAR file.
    /// Objects holding NAR bytes: packs, and chunks stored on their own.
    pub fn chunk_files(&self) -> usize {
        count_files(&self.data_dir().join("store/objects/chunk"))
            + count_files(&self.data_dir().join("store/objects/pack"))
    }

    /// Files left in the staging directory (must be none between requests).
    /// Files in the staging directory, but the server's own owner lock (`staging.rs`).
    pub fn staging_files(&self) -> usize {
        let dir = self.data_dir().join("store/tmp");
        let locks = std::fs::read_dir(&dir).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("owner-"))
                .count()
        });
        count_files(&dir) - locks
    }

    // ---- uploads ------------------------------------------------------------------------

    /// `PUT /<cache>/nar/<filehash>.nar<ext>` with `bytes`.
    pub async fn put_nar(&self, cache: &str, auth: Auth<'_>, bytes: &[u8], comp: Comp) -> Resp {
        self.put(
            &format!("/{cache}/{}", nar_url(bytes, comp)),
            auth,
            bytes.to_vec(),
        )
        .await
    }

    /// `PUT /<cache>/<hash>.narinfo` with `text`.
    pub async fn put_narinfo(
        &self,
        cache: &str,
        auth: Auth<'_>,
        tp: &TestPath,
        text: &str,
    ) -> Resp {
        self.put(
            &format!("/{cache}/{}.narinfo", tp.hash()),
            auth,
            text.to_owned(),
        )
        .await
    }

    /// Nix's uploader: the NAR, then the narinfo. Returns both responses.
    pub async fn push_nix(
        &self,
        cache: &str,
        auth: Auth<'_>,
        tp: &TestPath,
        comp: Comp,
    ) -> (Resp, Resp) {
        let bytes = tp.compressed(comp);
        let nar = self.put_nar(cache, auth, &bytes, comp).await;
        let info = self
            .put_narinfo(cache, auth, tp, &tp.narinfo(comp, None))
            .await;
        (nar, info)
    }

    /// `POST /api/v1/caches/<cache>/nars?compression=…`.
    pub async fn upload_api(
        &self,
        cache: &str,
        auth: Auth<'_>,
        bytes: &[u8],
        compression: &str,
    ) -> Resp {
        self.send(request(
            Method::POST,
            &format!("/api/v1/caches/{cache}/nars?compression={compression}"),
            auth,
            bytes.to_vec(),
        ))
        .await
    }

    /// `POST /api/v1/caches/<cache>/paths`.
    pub async fn publish_api(&self, cache: &str, auth: Auth<'_>, body: &Value) -> Resp {
        self.post_json(&format!("/api/v1/caches/{cache}/paths"), auth, body)
            .await
    }

    /// The larder client's upload: the NAR, then the path. Returns the second response (or
    /// the first, if it failed).
    pub async fn push_api(&self, cache: &str, auth: Auth<'_>, tp: &TestPath, comp: Comp) -> Resp {
        let up = self
            .upload_api(cache, auth, &tp.compressed(comp), comp.name())
            .await;
        if up.status != StatusCode::CREATED {
            return up;
        }
        let id = up.json()["upload_id"]
            .as_str()
            .expect("upload_id")
            .to_owned();
        self.publish_api(cache, auth, &tp.publish_body(&id, None))
            .await
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p: PathBuf = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

// ---- test store paths ---------------------------------------------------------------------

/// How a NAR file is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comp {
    None,
    Xz,
    Zstd,
}

impl Comp {
    pub fn name(self) -> &'static str {
        match self {
            Comp::None => "none",
            Comp::Xz => "xz",
            Comp::Zstd => "zstd",
        }
    }
    pub fn ext(self) -> &'static str {
        match self {
            Comp::None => "",
            Comp::Xz => ".xz",
            Comp::Zstd => ".zst",
        }
    }
    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match self {
            Comp::None => data.to_vec(),
            Comp::Zstd => zstd::encode_all(data, 3).expect("zstd"),
            Comp::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).expect("xz");
                e.finish().expect("xz")
            }
        }
    }
}

/// `nar/<filehash>.nar<ext>`: the URL Nix's uploader uses for a NAR file.
pub fn nar_url(file: &[u8], comp: Comp) -> String {
    format!("nar/{}.nar{}", Sha256::digest(file).to_nix32(), comp.ext())
}

/// A store path whose hash part is derived from `seed`, so tests get distinct paths.
pub fn store_path(name: &str, seed: &str) -> StorePath {
    let d = Sha256::digest(format!("{seed}/{name}").as_bytes());
    let mut digest = [0u8; 20];
    digest.copy_from_slice(&d.as_bytes()[..20]);
    StorePath::from_parts(digest, name).expect("valid store path")
}

/// A NAR of a small tree exercising every node type: directories, a regular file, an
/// executable, an empty file and a symlink. Its contents depend on `seed`.
pub fn tree_nar(seed: &str) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).expect("nar");
    w.begin_directory().expect("nar");
    w.entry("bin").expect("nar");
    w.begin_directory().expect("nar");
    w.entry("hello").expect("nar");
    w.regular_bytes(true, format!("#!/bin/sh\necho {seed}\n").as_bytes())
        .expect("nar");
    w.end_directory().expect("nar");
    w.entry("empty").expect("nar");
    w.regular_bytes(false, b"").expect("nar");
    w.entry("lib").expect("nar");
    w.symlink("bin").expect("nar");
    w.entry("share").expect("nar");
    w.begin_directory().expect("nar");
    w.entry("doc.txt").expect("nar");
    w.regular_bytes(false, seed.repeat(100).as_bytes())
        .expect("nar");
    w.end_directory().expect("nar");
    w.end_directory().expect("nar");
    w.finish().expect("complete nar")
}

/// A NAR of a single regular file.
pub fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).expect("nar");
    w.regular_bytes(false, contents).expect("nar");
    w.finish().expect("complete nar")
}

/// Deterministic bytes that do not compress.
pub fn noise(len: usize, seed: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(seed.as_bytes());
    while out.len() < len {
        out.extend_from_slice(block.as_bytes());
        block = Sha256::digest(block.as_bytes());
    }
    out.truncate(len);
    out
}

/// A store path to upload: its NAR and metadata.
#[derive(Debug, Clone)]
pub struct TestPath {
    pub path: StorePath,
    pub nar: Vec<u8>,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
}

impl TestPath {
    /// `<hash>-<name>` with a tree NAR, both derived from `seed`.
    pub fn new(name: &str, seed: &str) -> TestPath {
        TestPath::with_nar(name, seed, tree_nar(seed))
    }

    pub fn with_nar(name: &str, seed: &str, nar: Vec<u8>) -> TestPath {
        TestPath {
            path: store_path(name, seed),
            nar,
            references: Vec::new(),
            deriver: Some(store_path(&format!("{name}.drv"), seed)),
        }
    }

    pub fn referencing(mut self, refs: &[&TestPath]) -> TestPath {
        self.references = refs.iter().map(|t| t.path.clone()).collect();
        self
    }

    pub fn hash(&self) -> String {
        self.path.hash_part()
    }
    pub fn nar_hash(&self) -> Sha256 {
        Sha256::digest(&self.nar)
    }
    pub fn nar_size(&self) -> u64 {
        self.nar.len() as u64
    }
    pub fn compressed(&self, comp: Comp) -> Vec<u8> {
        comp.compress(&self.nar)
    }
    /// The NAR file the server stores and serves for this path, whatever it was uploaded as:
    /// its content-defined chunks, each a zstd frame (`larder_server::chunked`).
    pub fn stored(&self) -> Vec<u8> {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        let mut w = larder_server::chunked::ChunkWriter::new(tmp.reopen().expect("reopen"))
            .expect("chunk writer");
        w.write(&self.nar).expect("chunk");
        w.finish().expect("chunk");
        std::fs::read(tmp.path()).expect("read chunks")
    }
    /// `nar/<filehash>.nar.zst`: where the server serves [`Self::stored`].
    pub fn stored_url(&self) -> String {
        nar_url(&self.stored(), Comp::Zstd)
    }
    pub fn fingerprint(&self) -> String {
        larder_nix::signing::fingerprint(
            &self.path,
            &self.nar_hash(),
            self.nar_size(),
            &self.references,
        )
    }

    /// The narinfo fields Nix's uploader writes, in its order.
    pub fn narinfo_fields(&self, comp: Comp, key: Option<&SigningKey>) -> Vec<(String, String)> {
        let file = self.compressed(comp);
        let mut f = vec![
            ("StorePath".into(), self.path.to_absolute()),
            ("URL".into(), nar_url(&file, comp)),
            ("Compression".into(), comp.name().into()),
            ("FileHash".into(), Sha256::digest(&file).to_string()),
            ("FileSize".into(), file.len().to_string()),
            ("NarHash".into(), self.nar_hash().to_string()),
            ("NarSize".into(), self.nar_size().to_string()),
            (
                "References".into(),
                self.references
                    .iter()
                    .map(StorePath::basename)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ];
        if let Some(d) = &self.deriver {
            f.push(("Deriver".into(), d.basename()));
        }
        if let Some(k) = key {
            f.push(("Sig".into(), k.sign(&self.fingerprint()).to_string()));
        }
        f
    }

    pub fn narinfo(&self, comp: Comp, key: Option<&SigningKey>) -> String {
        render_fields(&self.narinfo_fields(comp, key))
    }

    /// The body of `POST /api/v1/caches/<c>/paths` for this path.
    pub fn publish_body(&self, upload_id: &str, key: Option<&SigningKey>) -> Value {
        let sigs: Vec<String> = key
            .map(|k| k.sign(&self.fingerprint()).to_string())
            .into_iter()
            .collect();
        json!({
            "upload_id": upload_id,
            "store_path": self.path.to_absolute(),
            "nar_hash": self.nar_hash().to_string(),
            "nar_size": self.nar_size(),
            "references": self.references.iter().map(StorePath::to_absolute).collect::<Vec<_>>(),
            "deriver": self.deriver.as_ref().map(StorePath::basename),
            "sigs": sigs,
        })
    }
}

pub fn render_fields(fields: &[(String, String)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
}

/// Replace (or, with `None`, remove) a narinfo field.
pub fn with_field(mut fields: Vec<(String, String)>, key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => {
            for (k, old) in fields.iter_mut() {
                if k == key {
                    *old = v.to_owned();
                }
            }
        }
        None => fields.retain(|(k, _)| k != key),
    }
    render_fields(&fields)
}

/// A signing key from a fixed seed.
pub fn signing_key(name: &str, seed: u8) -> SigningKey {
    SigningKey::from_seed(name, [seed; 32]).expect("valid key name")
}
