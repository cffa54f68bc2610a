//! `GET /metrics` in the Prometheus text format (version 0.0.4), and the request accounting
//! behind it.
//!
//! - **Requests** are counted and timed (to the response head: a NAR's streaming time is not
//!   in its latency) by route *pattern* (`/{cache}/{file}`, never the raw path), method and
//!   status, so the number of series is bounded by the router, not by what clients send.
//! - **Cost on the hot path**: the route's index comes from one hash lookup of the matched
//!   pattern; each (route, method) has a row of counters allocated the first time it is used;
//!   a request then costs a few relaxed atomic additions and no lock. Rows are sharded by
//!   serving thread (each thread's router gets its own shard), so threads never contend for
//!   a counter's cache line; a scrape sums the shards. Bodies of known length
//!   (a narinfo) are counted from their length; only streamed bodies (a NAR, an upload) are
//!   wrapped to count their bytes as they pass.
//! - **Uploads** (a NAR, or a path's narinfo) are counted as accepted or rejected, by reason
//!   ([`Rejection`]).
//! - **Connections**: open now, the caps in force, refused at each cap ([`crate::conn`]).
//! - **Unfinished multi-part uploads** on this server and the bytes their parts hold (what
//!   `multipart_max_open` and `multipart_max_staged` bound), counted from the staging
//!   directory at scrape time.
//! - **Background work**: orphaned objects deleted by the orphan scan.
//! - **Per cache**: evictions and deletions (counted here), sizes and path counts (read from
//!   the database at scrape time).
//! - **Access**: anonymous scrapes are answered, but per-cache series name only public caches;
//!   a token adds the private caches it may pull (a server admin's: all). Nothing else carries
//!   a cache name.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::access::Caller;
use crate::conn::Admission;
use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use larder_store::meta::{CacheStats, StoreTotals};

use crate::error::{ApiError, Rejection};
use crate::routes::Route;
use crate::AppState;

/// Statuses with a series of their own (every status the server sends); any other is
/// counted as `other`.
const STATUSES: [u16; 20] = [
    200, 201, 204, 206, 303, 304, 307, 400, 401, 403, 404, 405, 409, 413, 415, 416, 422, 500, 503,
    507,
];
const NS: usize = STATUSES.len() + 1;
/// Upper bounds of the latency histogram's buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
const NB: usize = BUCKETS_US.len();
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OTHER"];
const NM: usize = METHODS.len();
/// Counter shards: serving threads (one per core) take them in turn.
const SHARDS: usize = 16;

/// What an upload route receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// A NAR file.
    Nar,
    /// A store path's metadata (a narinfo, or the API's publish request).
    Path,
}

const UPLOAD_KINDS: [UploadKind; 2] = [UploadKind::Nar, UploadKind::Path];

impl UploadKind {
    fn as_str(self) -> &'static str {
        match self {
            UploadKind::Nar => "nar",
            UploadKind::Path => "path",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// The routes that receive uploads: a unit test checks each is in the router.
pub const UPLOAD_ROUTES: [(Method, &str, UploadKind); 6] = [
    (Method::PUT, "/{cache}/nar/{file}", UploadKind::Nar),
    (Method::POST, "/api/v1/caches/{cache}/nars", UploadKind::Nar),
    (
        Method::POST,
        "/api/v1/caches/{cache}/multipart/{id}/complete",
        UploadKind::Nar,
    ),
    (Method::PUT, "/{cache}/{file}", UploadKind::Path),
    (
        Method::POST,
        "/api/v1/caches/{cache}/paths",
        UploadKind::Path,
    ),
    // A batch of small paths with their NARs (one request counted, however many paths).
    (
        Method::POST,
        "/api/v1/caches/{cache}/paths/batch",
        UploadKind::Path,
    ),
];

#[derive(Default)]
struct Cell {
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Non-cumulative: requests whose latency fell in bucket `i` (and not a smaller one).
    buckets: [AtomicU64; NB],
}

/// The counters of one (route, method).
struct Row {
    cells: [Cell; NS],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    upload: Option<UploadKind>,
}

#[derive(Debug, Default, Clone, Copy)]
struct CacheCounts {
    evictions: u64,
    evicted_paths: u64,
    evicted_bytes: u64,
    deleted_paths: u64,
    deleted_bytes: u64,
    upstream_hits: u64,
    upstream_misses: u64,
    upstream_errors: u64,
    upstream_bytes: u64,
}

pub struct Metrics {
    /// Route patterns; the last entry is `unmatched` (no route: a 404 or the API fallback).
    routes: Vec<Box<str>>,
    index: HashMap<Box<str>, usize>,
    /// Methods of each route that upload, by route index.
    uploads: Vec<[Option<UploadKind>; NM]>,
    /// By shard, route and method.
    rows: Vec<Vec<[OnceLock<Arc<Row>>; NM]>>,
    next_shard: AtomicU64,
    uploads_accepted: [AtomicU64; 2],
    uploads_rejected: [[AtomicU64; Rejection::ALL.len()]; 2],
    caches: Mutex<HashMap<i64, CacheCounts>>,
    orphans_deleted: AtomicU64,
    /// The connections of the server serving this router ([`Metrics::watch_connections`]);
    /// none in-process, where nothing accepts connections.
    connections: Mutex<Option<Arc<Admission>>>,
}

/// Unfinished multi-part uploads at scrape time: `(uploads, bytes)` by cache id, and in all
/// (`None` unless the requester may see every cache).
#[derive(Debug, Default)]
pub struct MultipartFigures {
    pub per_cache: HashMap<i64, (usize, u64)>,
    pub total: Option<(usize, u64)>,
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        _ => 6,
    }
}

fn status_index(status: StatusCode) -> usize {
    let s = status.as_u16();
    STATUSES.iter().position(|x| *x == s).unwrap_or(NS - 1)
}

impl Metrics {
    /// Accounting for a router serving `table` (see [`crate::route_table`]).
    pub fn new(table: &[Route]) -> Metrics {
        let mut routes: Vec<Box<str>> = Vec::new();
        let mut index = HashMap::new();
        for r in table {
            if !index.contains_key(r.path.as_str()) {
                index.insert(r.path.clone().into_boxed_str(), routes.len());
                routes.push(r.path.clone().into_boxed_str());
            }
        }
        routes.push("unmatched".into());
        let uploads = routes
            .iter()
            .map(|path| {
                let mut u = [None; NM];
                for (m, p, kind) in &UPLOAD_ROUTES {
                    if **path == **p {
                        u[method_index(m)] = Some(*kind);
                    }
                }
                u
            })
            .collect();
        let rows = (0..SHARDS)
            .map(|_| {
                routes
                    .iter()
                    .map(|_| std::array::from_fn(|_| OnceLock::new()))
                    .collect()
            })
            .collect();
        Metrics {
            routes,
            index,
            uploads,
            rows,
            next_shard: AtomicU64::new(0),
            uploads_accepted: Default::default(),
            uploads_rejected: Default::default(),
            caches: Mutex::default(),
            orphans_deleted: AtomicU64::new(0),
            connections: Mutex::default(),
        }
    }

    fn row(&self, shard: usize, route: usize, method: usize) -> &Arc<Row> {
        self.rows[shard][route][method].get_or_init(|| {
            Arc::new(Row {
                cells: Default::default(),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                upload: self.uploads[route][method],
            })
        })
    }

    fn route_index(&self, matched: Option<&str>) -> usize {
        matched
            .and_then(|p| self.index.get(p).copied())
            .unwrap_or(self.routes.len() - 1)
    }

    /// An eviction of `cache_id` removed `paths` paths of `bytes` stored bytes.
    pub fn evicted(&self, cache_id: i64, paths: usize, bytes: i64) {
        if let Ok(mut c) = self.caches.lock() {
            let e = c.entry(cache_id).or_default();
            e.evictions += 1;
            e.evicted_paths += paths as u64;
            e.evicted_bytes += bytes.max(0) as u64;
        }
    }

    /// `larder path delete` removed `paths` paths of `bytes` stored bytes from `cache_id`.
    pub fn deleted(&self, cache_id: i64, paths: usize, bytes: i64) {
        if let Ok(mut c) = self.caches.lock() {
            let e = c.entry(cache_id).or_default();
            e.deleted_paths += paths as u64;
            e.deleted_bytes += bytes.max(0) as u64;
        }
    }

    fn count(&self, cache_id: i64, f: impl FnOnce(&mut CacheCounts)) {
        if let Ok(mut c) = self.caches.lock() {
            f(c.entry(cache_id).or_default());
        }
    }

    /// A narinfo the cache lacked was served from one of its upstreams.
    pub fn upstream_hit(&self, cache_id: i64) {
        self.count(cache_id, |c| c.upstream_hits += 1);
    }

    /// A narinfo the cache lacked was in none of its upstreams (asked now or remembered).
    pub fn upstream_miss(&self, cache_id: i64) {
        self.count(cache_id, |c| c.upstream_misses += 1);
    }

    /// An upstream failed (unreachable, timed out, an error status), served a narinfo not
    /// signed by a trusted key, or a NAR that failed verification.
    pub fn upstream_error(&self, cache_id: i64) {
        self.count(cache_id, |c| c.upstream_errors += 1);
    }

    /// NAR bytes received from an upstream.
    pub fn upstream_bytes(&self, cache_id: i64, bytes: u64) {
        self.count(cache_id, |c| c.upstream_bytes += bytes);
    }

    /// Report `admission`'s connections (the server now accepting them).
    pub fn watch_connections(&self, admission: Arc<Admission>) {
        if let Ok(mut c) = self.connections.lock() {
            *c = Some(admission);
        }
    }

    /// The orphan scan deleted `objects` objects that no metadata named.
    pub fn orphans_deleted(&self, objects: u64) {
        self.orphans_deleted.fetch_add(objects, Relaxed);
    }

    /// The exposition text. `caches` are the caches the requester may see, with their
    /// statistics (`None`: no paths).
    fn render(
        &self,
        caches: &[(i64, String, Option<i64>, CacheStats)],
        stored: &HashMap<i64, i64>,
        totals: Option<StoreTotals>,
        multipart: &MultipartFigures,
    ) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = writeln!(
            out,
            "# HELP larder_build_info The running larder version.\n# TYPE larder_build_info gauge\n\
             larder_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        // Requests, by route pattern, method and status.
        let mut requests = String::new();
        let mut latency = String::new();
        let mut bytes_out = String::new();
        let mut bytes_in = String::new();
        for (r, route) in self.routes.iter().enumerate() {
            let route = escape(route);
            for (m, method) in METHODS.iter().enumerate() {
                let rows: Vec<&Arc<Row>> = self
                    .rows
                    .iter()
                    .filter_map(|shard| shard[r][m].get())
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let sum = |f: &dyn Fn(&Row) -> &AtomicU64| -> u64 {
                    rows.iter().map(|row| f(row).load(Relaxed)).sum()
                };
                let labels = format!("route=\"{route}\",method=\"{method}\"");
                for s in 0..NS {
                    let count = sum(&|row| &row.cells[s].count);
                    if count == 0 {
                        continue;
                    }
                    let status = STATUSES
                        .get(s)
                        .map_or_else(|| "other".to_owned(), |c| c.to_string());
                    let labels = format!("{labels},status=\"{status}\"");
                    let _ = writeln!(requests, "larder_http_requests_total{{{labels}}} {count}");
                    let mut cumulative = 0;
                    for (b, bound) in BUCKETS_US.iter().enumerate() {
                        cumulative += sum(&|row| &row.cells[s].buckets[b]);
                        let _ = writeln!(
                            latency,
                            "larder_http_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {cumulative}",
                            *bound as f64 / 1e6
                        );
                    }
                    let _ = writeln!(
                        latency,
                        "larder_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}\n\
                         larder_http_request_duration_seconds_sum{{{labels}}} {}\n\
                         larder_http_request_duration_seconds_count{{{labels}}} {count}",
                        sum(&|row| &row.cells[s].sum_us) as f64 / 1e6
                    );
                }
                let _ = writeln!(
                    bytes_out,
                    "larder_http_response_body_bytes_total{{{labels}}} {}",
                    sum(&|row| &row.bytes_out)
                );
                let _ = writeln!(
                    bytes_in,
                    "larder_http_request_body_bytes_total{{{labels}}} {}",
                    sum(&|row| &row.bytes_in)
                );
            }
        }
        family(
            &mut out,
            "larder_http_requests_total",
            "counter",
            "HTTP requests by route pattern, method and status.",
            &requests,
        );
        family(
            &mut out,
            "larder_http_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to its response head, by route pattern, method and status.",
            &latency,
        );
        family(
            &mut out,
            "larder_http_response_body_bytes_total",
            "counter",
            "Response body bytes served (HEAD responses have none), by route pattern and method.",
            &bytes_out,
        );
        family(
            &mut out,
            "larder_http_request_body_bytes_total",
            "counter",
            "Request body bytes received, by route pattern and method.",
            &bytes_in,
        );
        // Uploads.
        let mut accepted = String::new();
        let mut rejected = String::new();
        for kind in UPLOAD_KINDS {
            let k = kind.as_str();
            let _ = writeln!(
                accepted,
                "larder_uploads_accepted_total{{kind=\"{k}\"}} {}",
                self.uploads_accepted[kind.index()].load(Relaxed)
            );
            for (i, reason) in Rejection::ALL.iter().enumerate() {
                let n = self.uploads_rejected[kind.index()][i].load(Relaxed);
                let _ = writeln!(
                    rejected,
                    "larder_uploads_rejected_total{{kind=\"{k}\",reason=\"{}\"}} {n}",
                    reason.as_str()
                );
            }
        }
        family(
            &mut out,
            "larder_uploads_accepted_total",
            "counter",
            "Uploads accepted: NAR files stored, store paths published (or already present).",
            &accepted,
        );
        family(
            &mut out,
            "larder_uploads_rejected_total",
            "counter",
            "Uploads refused, by reason.",
            &rejected,
        );
        family(
            &mut out,
            "larder_orphaned_objects_deleted_total",
            "counter",
            "Objects deleted from the object store because no metadata named them (this process).",
            &format!(
                "larder_orphaned_objects_deleted_total {}\n",
                self.orphans_deleted.load(Relaxed)
            ),
        );
        let admission = self.connections.lock().ok().and_then(|c| c.clone());
        if let Some(c) = admission.map(|a| a.counts()) {
            family(
                &mut out,
                "larder_connections_open",
                "gauge",
                "Client connections open now.",
                &format!("larder_connections_open {}\n", c.open),
            );
            family(
                &mut out,
                "larder_connections_max",
                "gauge",
                "The caps on open connections: in all (max_connections) and per client address (max_connections_per_client).",
                &format!(
                    "larder_connections_max{{cap=\"max_connections\"}} {}\n\
                     larder_connections_max{{cap=\"max_connections_per_client\"}} {}\n",
                    c.max_total, c.max_per_client
                ),
            );
            family(
                &mut out,
                "larder_connections_refused_total",
                "counter",
                "Connections closed at once because a cap was reached, by cap (this process).",
                &format!(
                    "larder_connections_refused_total{{cap=\"max_connections\"}} {}\n\
                     larder_connections_refused_total{{cap=\"max_connections_per_client\"}} {}\n",
                    c.refused_total, c.refused_per_client
                ),
            );
        }
        if let Some((uploads, bytes)) = multipart.total {
            family(
                &mut out,
                "larder_multipart_uploads",
                "gauge",
                "Unfinished multi-part uploads staged on this server, every cache.",
                &format!("larder_multipart_uploads {uploads}\n"),
            );
            family(
                &mut out,
                "larder_multipart_staged_bytes",
                "gauge",
                "Bytes the parts of unfinished multi-part uploads hold on this server, every cache.",
                &format!("larder_multipart_staged_bytes {bytes}\n"),
            );
        }
        if let Some(t) = totals {
            family(
                &mut out,
                "larder_store_logical_bytes",
                "gauge",
                "NAR file bytes of every published path, counted in each cache that has it (what the limits count).",
                &format!("larder_store_logical_bytes {}\n", t.logical.max(0)),
            );
            family(
                &mut out,
                "larder_store_stored_bytes",
                "gauge",
                "Bytes of every chunk in the object store, each once.",
                &format!("larder_store_stored_bytes {}\n", t.stored.max(0)),
            );
            let ratio = if t.stored > 0 {
                t.logical as f64 / t.stored as f64
            } else {
                1.0
            };
            family(
                &mut out,
                "larder_store_dedup_ratio",
                "gauge",
                "Logical bytes per stored byte (deduplication across NARs and caches).",
                &format!("larder_store_dedup_ratio {ratio:.4}\n"),
            );
        }
        // Per cache.
        let counts = self.caches.lock().map(|c| c.clone()).unwrap_or_default();
        let mut fams: [(&str, &str, &str, String); 16] = [
            (
                "larder_cache_paths",
                "gauge",
                "Store paths published in the cache.",
                String::new(),
            ),
            (
                "larder_cache_size_bytes",
                "gauge",
                "Stored (compressed) NAR bytes of the cache's paths.",
                String::new(),
            ),
            (
                "larder_cache_stored_bytes",
                "gauge",
                "Bytes the cache's NAR files occupy after deduplication (each chunk once).",
                String::new(),
            ),
            (
                "larder_cache_nar_size_bytes",
                "gauge",
                "Uncompressed NAR bytes of the cache's paths.",
                String::new(),
            ),
            (
                "larder_cache_max_size_bytes",
                "gauge",
                "The cache's storage limit (caches that have one).",
                String::new(),
            ),
            (
                "larder_evictions_total",
                "counter",
                "Evictions that removed paths from the cache (this process).",
                String::new(),
            ),
            (
                "larder_evicted_paths_total",
                "counter",
                "Paths evicted from the cache (this process).",
                String::new(),
            ),
            (
                "larder_evicted_bytes_total",
                "counter",
                "Stored bytes evicted from the cache (this process).",
                String::new(),
            ),
            (
                "larder_deleted_paths_total",
                "counter",
                "Paths deleted from the cache with `larder path delete` (this process).",
                String::new(),
            ),
            (
                "larder_deleted_bytes_total",
                "counter",
                "Stored bytes deleted with `larder path delete` (this process).",
                String::new(),
            ),
            (
                "larder_upstream_hits_total",
                "counter",
                "Narinfos the cache lacked, served from an upstream (this process).",
                String::new(),
            ),
            (
                "larder_upstream_misses_total",
                "counter",
                "Narinfos the cache lacked that no upstream had (this process).",
                String::new(),
            ),
            (
                "larder_upstream_errors_total",
                "counter",
                "Upstream failures: unreachable, timed out, untrusted signature, NAR refused (this process).",
                String::new(),
            ),
            (
                "larder_upstream_bytes_total",
                "counter",
                "NAR bytes fetched from upstreams (this process).",
                String::new(),
            ),
            (
                "larder_cache_multipart_uploads",
                "gauge",
                "Unfinished multi-part uploads of the cache staged on this server (multipart_max_open bounds them).",
                String::new(),
            ),
            (
                "larder_cache_multipart_staged_bytes",
                "gauge",
                "Bytes the parts of the cache's unfinished multi-part uploads hold on this server (multipart_max_staged bounds them).",
                String::new(),
            ),
        ];
        for (id, name, max, stats) in caches {
            let c = counts.get(id).copied().unwrap_or_default();
            let (mp_uploads, mp_bytes) = multipart.per_cache.get(id).copied().unwrap_or((0, 0));
            let values = [
                Some(stats.paths as u64),
                Some(stats.size.max(0) as u64),
                Some(stored.get(id).copied().unwrap_or(0).max(0) as u64),
                Some(stats.nar_size.max(0) as u64),
                max.map(|m| m.max(0) as u64),
                Some(c.evictions),
                Some(c.evicted_paths),
                Some(c.evicted_bytes),
                Some(c.deleted_paths),
                Some(c.deleted_bytes),
                Some(c.upstream_hits),
                Some(c.upstream_misses),
                Some(c.upstream_errors),
                Some(c.upstream_bytes),
                Some(mp_uploads as u64),
                Some(mp_bytes),
            ];
            for (f, v) in fams.iter_mut().zip(values) {
                if let Some(v) = v {
                    let _ = writeln!(f.3, "{}{{cache=\"{name}\"}} {v}", f.0);
                }
            }
        }
        for (name, kind, help, body) in &fams {
            family(&mut out, name, kind, help, body);
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, body: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    out.push_str(body);
}

/// A label value as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Row {
    fn observe(&self, status: StatusCode, elapsed: Duration) {
        let cell = &self.cells[status_index(status)];
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        cell.count.fetch_add(1, Relaxed);
        cell.sum_us.fetch_add(us, Relaxed);
        if let Some(b) = BUCKETS_US.iter().position(|bound| us <= *bound) {
            cell.buckets[b].fetch_add(1, Relaxed);
        }
    }
}

/// The state of one router's [`observe`] middleware: the metrics and its shard.
#[derive(Clone)]
pub struct Observer {
    metrics: Arc<Metrics>,
    shard: usize,
}

impl Observer {
    /// An observer with the next shard (one per router: routers are built per thread).
    pub fn new(metrics: Arc<Metrics>) -> Observer {
        let shard = (metrics.next_shard.fetch_add(1, Relaxed) % SHARDS as u64) as usize;
        Observer { metrics, shard }
    }
}

/// The middleware of every request: accounting, and the per-request debug log line.
pub async fn observe(State(obs): State<Observer>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let metrics = &obs.metrics;
    let route = metrics.route_index(req.extensions().get::<MatchedPath>().map(|p| p.as_str()));
    let method = req.method().clone();
    let row = metrics.row(obs.shard, route, method_index(&method));
    let req = if HttpBody::size_hint(req.body()).exact() == Some(0) {
        req
    } else {
        let counter = row.clone();
        req.map(|body| {
            Body::new(body.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    counter.bytes_in.fetch_add(d.len() as u64, Relaxed);
                }
                f
            }))
        })
    };
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status();
    row.observe(status, elapsed);
    if let Some(kind) = row.upload {
        if status.is_success() {
            metrics.uploads_accepted[kind.index()].fetch_add(1, Relaxed);
        } else {
            let reason = resp
                .extensions()
                .get::<Rejection>()
                .copied()
                .unwrap_or_else(|| Rejection::from_status(status));
            let i = Rejection::ALL
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(Rejection::ALL.len() - 1);
            metrics.uploads_rejected[kind.index()][i].fetch_add(1, Relaxed);
        }
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(
            %method,
            route = &*metrics.routes[route],
            status = status.as_u16(),
            micros = elapsed.as_micros() as u64,
            "request"
        );
    }
    if method == Method::HEAD {
        return resp;
    }
    match HttpBody::size_hint(resp.body()).exact() {
        Some(n) => {
            row.bytes_out.fetch_add(n, Relaxed);
            resp
        }
        None => {
            let counter = row.clone();
            resp.map(|body| {
                Body::new(body.map_frame(move |f| {
                    if let Some(d) = f.data_ref() {
                        counter.bytes_out.fetch_add(d.len() as u64, Relaxed);
                    }
                    f
                }))
            })
        }
    }
}

/// `GET /metrics`.
pub async fn serve(State(state): State<AppState>, Caller(p): Caller) -> Result<Response, ApiError> {
    let stats: HashMap<i64, CacheStats> = state.meta.all_cache_stats().await?.into_iter().collect();
    let all = state.meta.list_caches().await?;
    let count = all.len();
    let visible: Vec<(i64, String, Option<i64>, CacheStats)> = all
        .into_iter()
        .filter(|c| crate::access::can_see(&p, c))
        .map(|c| {
            let s = stats.get(&c.id).copied().unwrap_or_default();
            (c.id, c.name, c.max_size, s)
        })
        .collect();
    let stored = state.meta.all_cache_stored_sizes().await?;
    // The server-wide figures add up every cache: only for who may see them all.
    let all_visible = visible.len() == count;
    let totals = if all_visible {
        Some(state.meta.store_totals().await?)
    } else {
        None
    };
    let mut multipart = MultipartFigures::default();
    for s in crate::api::multipart::staged(&state, None).await? {
        let e = multipart.per_cache.entry(s.cache_id).or_default();
        e.0 += 1;
        e.1 += s.bytes;
    }
    if all_visible {
        multipart.total = Some(
            multipart
                .per_cache
                .values()
                .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2)),
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&visible, &stored, totals, &multipart),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_routes_exist_in_the_router() {
        let table = crate::route_table();
        for (method, path, _) in &UPLOAD_ROUTES {
            assert!(
                table.iter().any(|r| r.method == *method && r.path == *path),
                "{method} {path} is not a route"
            );
        }
    }

    #[test]
    fn statuses_and_latencies_land_in_their_series() {
        let m = Metrics::new(&crate::route_table());
        let r = m.route_index(Some("/{cache}/{file}"));
        assert_ne!(r, m.routes.len() - 1);
        assert_eq!(m.route_index(Some("/no/such/{route}")), m.routes.len() - 1);
        let row = m.row(3, r, 0);
        m.row(0, r, 0)
            .observe(StatusCode::OK, Duration::from_micros(1));
        row.observe(StatusCode::OK, Duration::from_micros(300));
        row.observe(StatusCode::IM_A_TEAPOT, Duration::from_secs(60));
        let text = m.render(&[], &HashMap::new(), None, &MultipartFigures::default());
        assert!(text.contains(
            "larder_http_requests_total{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "larder_http_request_duration_seconds_bucket{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\",le=\"0.00025\"} 1"
        ));
        assert!(text.contains(
            "larder_http_request_duration_seconds_bucket{route=\"/{cache}/{file}\",method=\"GET\",status=\"200\",le=\"0.0005\"} 2"
        ));
        assert!(text.contains(
            "larder_http_request_duration_seconds_bucket{route=\"/{cache}/{file}\",method=\"GET\",status=\"other\",le=\"10\"} 0"
        ));
        assert!(text.contains(
            "larder_http_request_duration_seconds_count{route=\"/{cache}/{file}\",method=\"GET\",status=\"other\"} 1"
        ));
    }
}
