//! larder's HTTP server.
//!
//! [`router`] builds the whole HTTP surface over an [`AppState`]: the Nix binary cache
//! protocol per cache ([`binary_cache`]), the JSON API under `/api/v1` ([`api`]), `/metrics`
//! ([`metrics`]), the web UI under `/ui/` ([`ui`]) and `/healthz`, every route recorded in
//! [`route_table`]. [`serve`] runs it with graceful shutdown. The server composes the lower crates
//! (`larder-nix` for formats, `larder-store` for bytes and metadata) and never re-parses what
//! they already validated.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Router;
use larder_store::{Metadata, ObjectStore};

pub mod access;
pub mod api;
pub mod auth;
pub mod binary_cache;
pub mod cache_lookup;
pub mod chunked;
pub mod chunked_nar;
pub mod config;
pub mod conn;
pub mod data_lock;
pub mod declared;
pub mod error;
pub mod hot;
pub mod ingest;
pub mod metrics;
pub mod oidc;
pub mod publish;
pub mod realisations;
pub mod retention;
pub mod routes;
pub mod staging;
pub mod stall;
pub mod stats;
pub mod tls;
pub mod ui;
pub mod upstream;

pub use config::Config;
pub use error::ApiError;

/// Shared state of every handler: one reference count to clone, however many backends and
/// caches it holds ([`Shared`] through `Deref`).
///
/// Every request clones it (axum's `State` extractor does), so a clone must be cheap and must
/// not touch memory other threads touch: cloning the fields themselves cost two path
/// allocations and a dozen atomic increments on cache lines shared by every serving thread
/// (~8 % of a narinfo miss, perf under wrk). Each serving thread gets its own `AppState`
/// ([`AppState::for_thread`]) over the same backends.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
    /// The same backends and in-memory state under a reference count of its own, for one
    /// serving thread.
    pub fn for_thread(&self) -> AppState {
        AppState::new((*self.0).clone())
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds. Every field is a handle: clones share the backend, cache or
/// counter behind it.
#[derive(Clone)]
pub struct Shared {
    pub meta: Metadata,
    pub objects: ObjectStore,
    /// This process's staging files ([`staging`]).
    pub staging: Arc<staging::Staging>,
    pub config: Arc<Config>,
    /// In-memory caches of the hot read path.
    pub hot: Arc<hot::HotCache>,
    /// Usage recording and eviction ([`retention`]).
    pub retention: Arc<retention::Retention>,
    /// Request, upload and eviction accounting for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Whether this replica holds the background-work lock (see `publish::gc_loop`).
    pub background: Arc<std::sync::atomic::AtomicBool>,
    /// The OIDC issuers' keys, fetched on demand ([`oidc`]).
    pub oidc: Arc<oidc::Oidc>,
    /// Pull-through caching's client and memory ([`upstream`]).
    pub upstream: Arc<upstream::Upstreams>,
}

/// Names a cache may not take: they are top-level routes.
pub const RESERVED_NAMES: &[&str] = &["api", "ui", "static", "metrics", "healthz"];

/// Whether `name` is a valid cache name: `^[a-z0-9][a-z0-9-]{0,62}$`, not reserved.
pub fn valid_cache_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !RESERVED_NAMES.contains(&name)
}

fn routes() -> routes::Routes {
    routes::Routes::new()
        .get("/healthz", healthz)
        .get("/metrics", metrics::serve)
        .nest("/api/v1", api::routes())
        .merge(ui::routes())
        .merge(binary_cache::routes())
        .merge(realisations::routes())
}

/// Every route the server answers (method and pattern).
pub fn route_table() -> Vec<routes::Route> {
    routes().table().to_vec()
}

/// The whole HTTP surface.
///
/// Two middleware layers, not one per concern: each layer boxes every request's future and
/// clones the service below it, which a narinfo (answered in microseconds) pays in full.
pub fn router(state: AppState) -> Router {
    let bounds = Bounds {
        header_timeout: state.config.header_timeout,
        backend_timeout: state.config.backend_timeout,
    };
    routes()
        .into_router()
        .layer(axum::middleware::from_fn_with_state(bounds, bound))
        .layer(axum::middleware::from_fn_with_state(
            metrics::Observer::new(state.metrics.clone()),
            metrics::observe,
        ))
        .with_state(state)
}

/// The time limits [`bound`] applies.
#[derive(Clone, Copy)]
struct Bounds {
    header_timeout: std::time::Duration,
    backend_timeout: std::time::Duration,
}

/// Middleware: a read's response head is due within `backend_timeout` ([`read_deadline`]); a
/// body that carries data may not fall silent for `header_timeout`
/// ([`stall::bound_body_silence`]); and every response is [`harden`]ed.
async fn bound(
    State(bounds): State<Bounds>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    let resp = match *req.method() {
        Method::GET | Method::HEAD => read_deadline(bounds.backend_timeout, req, next).await,
        // Reads carry no body: leave the hot path alone.
        Method::OPTIONS => next.run(req).await,
        _ => stall::bound_body_silence(bounds.header_timeout, req, next).await,
    };
    harden(resp)
}

/// Every response is data, never a page a browser may run, unless it says otherwise: logs,
/// narinfos, listings and error bodies carry what clients uploaded, and they are served on the
/// web UI's origin. So every response without its own policy (the UI's pages set theirs) gets
/// `Content-Security-Policy: sandbox; default-src 'none'` (no script, no same-origin access,
/// even if a browser renders it), and every response `X-Content-Type-Options: nosniff` (its
/// declared type is the one used).
fn harden(mut resp: Response) -> Response {
    use axum::http::{header, HeaderValue};
    let h = resp.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox; default-src 'none'"),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A GET or HEAD whose response head is not ready within `limit` (`backend_timeout`) is
/// answered 503 (with Retry-After): a backend that accepts connections but stopped answering
/// must not hold Nix and every other client forever. Only the head is timed: a NAR then
/// streams for as long as it takes. Uploads are not timed here; their bodies take as long as
/// the network. `/healthz` bounds its own checks ([`HEALTH_TIMEOUT`]) to report which backend
/// is away.
async fn read_deadline(
    limit: std::time::Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error::ApiError::BackendTimeout(limit).into_response(),
    }
}

/// How long each backend check of `/healthz` may take: a little more than a request waits
/// for a database connection, so that an unreachable database is reported as such.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

#[derive(serde::Serialize)]
struct Health {
    /// `ok` or `unavailable`.
    status: &'static str,
    metadata: BackendHealth,
    objects: BackendHealth,
    /// Whether this replica runs the background work (eviction, garbage collection).
    background_work: bool,
    /// What is down, in words (`metadata database unavailable; object store unavailable`).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct BackendHealth {
    /// `sqlite`, `postgres`, `file`, `s3`.
    backend: String,
    ok: bool,
    /// A short reason when not ok; never a URL or a path.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// `/healthz`: each backend checked with a round trip (at most [`HEALTH_TIMEOUT`] each); 200
/// when both answer, 503 otherwise, with a JSON report either way.
async fn healthz(State(state): State<AppState>) -> Response {
    let (meta, objects) = tokio::join!(
        tokio::time::timeout(HEALTH_TIMEOUT, state.meta.ping()),
        // Any key will do: the question is whether the store answers.
        tokio::time::timeout(HEALTH_TIMEOUT, state.objects.ping()),
    );
    let metadata = BackendHealth {
        backend: state.meta.engine().as_str().to_owned(),
        ok: matches!(meta, Ok(Ok(_))),
        error: match meta {
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.is_unavailable() => Some("unreachable"),
            Ok(Err(_)) => Some("failing"),
            Err(_) => Some("timed out"),
        },
    };
    let objects = BackendHealth {
        backend: state
            .config
            .storage
            .split_once("://")
            .map_or("file", |(scheme, _)| scheme)
            .to_owned(),
        ok: matches!(objects, Ok(Ok(_))),
        error: match objects {
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.is_unavailable() => Some("unreachable"),
            Ok(Err(_)) => Some("failing"),
            Err(_) => Some("timed out"),
        },
    };
    let ok = metadata.ok && objects.ok;
    let down: Vec<&str> = [
        (!metadata.ok).then_some("metadata database unavailable"),
        (!objects.ok).then_some("object store unavailable"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let health = Health {
        error: (!down.is_empty()).then(|| down.join("; ")),
        status: if ok { "ok" } else { "unavailable" },
        metadata,
        objects,
        background_work: state.background.load(std::sync::atomic::Ordering::SeqCst),
    };
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(health)).into_response()
}

/// Why the backends could not be opened. URLs are shown without credentials.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the data directory {}", .0.display())]
    DataDir(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot open the metadata database {0}")]
    Database(String, #[source] larder_store::MetaError),
    #[error("cannot open the object storage {0}")]
    Storage(String, #[source] larder_store::ObjectError),
}

/// Make every file and directory this process creates from now on private to its owner
/// (umask 077): the database holds token hashes and managed signing keys, and the objects are
/// a private cache's content, whatever the mode of the directory they are created in.
pub fn create_private_files() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// A warning when other local users can enter or read the data directory (it existed before
/// with a permissive mode), with the command that fixes it.
pub fn data_dir_warning(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the data directory {} has mode {mode:o}: other local users can read it (token \
             hashes, signing keys, private caches' NARs); new files are created private, but \
             fix what is there with: chmod -R go-rwx {}",
            dir.display(),
            dir.display()
        )
    })
}

/// Create the data directory if it is missing. It holds the database (token hashes, managed
/// signing keys) and the admin token: only its owner may enter it.
pub fn create_data_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Open the backends named in `config` and prepare the data directory.
pub async fn open_state(
    config: Config,
) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    create_data_dir(&config.data_dir)
        .map_err(|e| OpenError::DataDir(config.data_dir.clone(), e))?;
    let redact = larder_store::meta::redact_url;
    let options = larder_store::meta::ConnectOptions {
        max_connections: config.database_max_connections,
    };
    let meta = Metadata::connect_with(&config.database, options)
        .await
        .map_err(|e| OpenError::Database(redact(&config.database), e))?;
    let objects = ObjectStore::open(
        &config.storage,
        larder_store::OpenOptions {
            // Remote stores stage uploads here; a local store stages inside its directory.
            staging_dir: config.data_dir.join("tmp"),
            s3_credentials: config.s3_credentials.clone(),
        },
    )
    .map_err(|e| OpenError::Storage(redact(&config.storage), e))?;
    if config.nar_redirect == config::NarRedirect::Presigned && !objects.can_presign() {
        return Err("nar_redirect = \"presigned\" needs s3:// storage".into());
    }
    match objects.ping().await {
        Ok(()) => {}
        // Serve anyway: requests that need the store get 503 until it answers again.
        Err(e) if e.is_unavailable() => tracing::warn!(
            error = %error::error_chain(&e),
            "the object store does not answer; requests that need it get 503 until it does"
        ),
        Err(e) => return Err(OpenError::Storage(redact(&config.storage), e).into()),
    }
    let staging = staging::Staging::open(objects.staging_dir())
        .map_err(|e| OpenError::DataDir(objects.staging_dir().to_owned(), e))?;
    Ok(AppState::new(Shared {
        meta,
        objects,
        staging: Arc::new(staging),
        config: Arc::new(config),
        hot: Arc::default(),
        retention: Arc::default(),
        metrics: Arc::new(metrics::Metrics::new(&route_table())),
        background: Arc::default(),
        oidc: Arc::default(),
        upstream: Arc::default(),
    }))
}

/// On an empty database, create a server admin token and write it to `DATA/admin-token`
/// (mode 0600). Returns the file's path when it did.
pub async fn bootstrap_admin_token(
    state: &AppState,
) -> Result<Option<std::path::PathBuf>, Box<dyn std::error::Error + Send + Sync>> {
    if state.meta.token_count().await? > 0 {
        return Ok(None);
    }
    let (token, id) = auth::new_token()?;
    let path = state.config.data_dir.join("admin-token");
    // Written aside first: the file appears only if this token is the one created (replicas
    // starting together on an empty database create one token between them). The aside file
    // is this process's own, so replicas sharing a data directory cannot swap their tokens.
    let pending = state
        .config
        .data_dir
        .join(format!("admin-token.pending.{}.{id}", std::process::id()));
    write_secret_file(&pending, &format!("{token}\n"))?;
    let created = state
        .meta
        .create_first_token(&larder_store::meta::TokenRow {
            id,
            secret_hash: auth::token_hash(&token),
            label: "bootstrap admin".into(),
            perms: [auth::Perm::Admin].into(),
            caches: None,
            expires_at: None,
            revoked_at: None,
            created_at: larder_store::now_unix(),
        })
        .await;
    if !matches!(created, Ok(true)) {
        let _ = std::fs::remove_file(&pending);
        created?;
        return Ok(None);
    }
    std::fs::rename(&pending, &path)?;
    Ok(Some(path))
}

/// Write a file only its owner can read (mode 0600 from creation, never world-readable).
pub fn write_secret_file(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Build the metadata's in-memory filter of published paths (the embedded default's), after
/// which lookups of absent paths no longer read the database; until then they do.
async fn remember_paths(state: AppState) {
    let started = std::time::Instant::now();
    match state.meta.remember_paths().await {
        Ok(Some(built)) => tracing::info!(
            paths = built.paths,
            bytes = built.bytes,
            ms = started.elapsed().as_millis() as u64,
            "misses answered from memory"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot read the published paths for the filter of misses: every lookup reads \
             the database"
        ),
    }
}

/// Serve until `shutdown` resolves, then finish in-flight requests.
///
/// Connections are served by one single-threaded runtime per core, all accepting on the same
/// listening socket (the model of nginx's workers): a request is read, answered and written by
/// one thread, with no wake-ups across threads, which is most of the cost of a small response.
/// Blocking work (upload verification, file I/O) still goes to each runtime's blocking pool.
/// Connections are bounded as [`conn`] describes.
/// `LARDER_WORKERS` overrides the number of serving threads.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(state, vec![listener.into_std()?], None, shutdown).await
}

/// [`serve`] on several listening sockets (those systemd passes, for one), over TLS when `tls`
/// is given; `SIGHUP` then re-reads the certificate and key ([`tls::Tls::reload`]).
pub async fn serve_on(
    state: AppState,
    listeners: Vec<std::net::TcpListener>,
    tls: Option<Arc<tls::Tls>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reload = tokio::spawn(reload_on_sighup(tls.clone()));
    let gc_state = state.clone();
    let gc = tokio::spawn(async move { publish::gc_loop(gc_state).await });
    let usage = tokio::spawn(retention::usage_loop(state.clone()));
    tokio::spawn(remember_paths(state.clone()));
    let workers = std::env::var("LARDER_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .min(64);
    let fd_limit = conn::raise_fd_limit();
    let max_connections = state
        .config
        .max_connections
        .unwrap_or_else(|| conn::connections_for_fd_limit(fd_limit));
    let admission = conn::Admission::new(max_connections, state.config.max_connections_per_client);
    state.metrics.watch_connections(admission.clone());
    let header_timeout = state.config.header_timeout;
    for listener in &listeners {
        listener.set_nonblocking(true)?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    let spread = conn::Spread::new(workers);
    for i in 0..workers {
        let listeners = listeners
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        let app = router(state.for_thread());
        let stop = stop_rx.clone();
        let admission = admission.clone();
        let tls = tls.clone();
        let worker = conn::Worker {
            spread: spread.clone(),
            index: i,
        };
        let thread = std::thread::Builder::new()
            .name(format!("larder-http-{i}"))
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut loops = Vec::with_capacity(listeners.len());
                    for listener in listeners {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        loops.push(conn::accept_loop(
                            listener,
                            app.clone(),
                            admission.clone(),
                            tls.clone(),
                            header_timeout,
                            worker.clone(),
                            stop.clone(),
                        ));
                    }
                    futures::future::join_all(loops).await;
                    Ok(())
                })
            })?;
        threads.push(thread);
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        let mut result = Ok(());
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(std::io::Error::other("a serving thread panicked")),
            }
        }
        result
    })
    .await
    .map_err(std::io::Error::other)?;
    gc.abort();
    usage.abort();
    reload.abort();
    // What the last moments served: path uses and download statistics.
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.retention.usage.flush_all(&state.meta),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "recording path usage failed at shutdown"),
        Err(_) => tracing::warn!("recording path usage timed out at shutdown"),
    }
    joined
}

/// Re-read the TLS files on every `SIGHUP` (`systemctl reload`); a bad pair is logged and the
/// current one kept. Without TLS there is nothing to reload, but the signal must not stop the
/// server either (its default action).
async fn reload_on_sighup(tls: Option<Arc<tls::Tls>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the TLS files will not be reloaded");
        return;
    };
    while hup.recv().await.is_some() {
        let Some(tls) = &tls else {
            tracing::info!("SIGHUP: nothing to reload (no tls_cert and tls_key)");
            continue;
        };
        match tls.reload() {
            Ok(()) => tracing::info!(
                cert = %tls.files().cert.display(),
                "reloaded the TLS certificate and key"
            ),
            Err(e) => tracing::error!("{e}; still serving the previous certificate"),
        }
    }
}
