//! larder's HTTP server.
//!
//! [`router`] builds the whole HTTP surface over an [`AppState`]: the Nix binary cache
//! protocol per cache ([`binary_cache`]), the JSON API under `/api/v1` ([`api`]), `/metrics`
//! ([`metrics`]) and `/healthz`, every route recorded in [`route_table`]. [`serve`] runs it with graceful shutdown. The server composes the lower crates
//! (`larder-nix` for formats, `larder-store` for bytes and metadata) and never re-parses what
//! they already validated.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Router;
use larder_store::{Metadata, ObjectStore};

pub mod api;
pub mod auth;
pub mod binary_cache;
pub mod config;
pub mod error;
pub mod hot;
pub mod ingest;
pub mod metrics;
pub mod publish;
pub mod retention;
pub mod routes;

pub use config::Config;
pub use error::ApiError;

/// Shared state of every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    pub meta: Metadata,
    pub objects: ObjectStore,
    pub config: Arc<Config>,
    /// In-memory caches of the hot read path.
    pub hot: Arc<hot::HotCache>,
    /// Usage recording and eviction ([`retention`]).
    pub retention: Arc<retention::Retention>,
    /// Request, upload and eviction accounting for `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
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
        .merge(binary_cache::routes())
}

/// Every route the server answers (method and pattern).
pub fn route_table() -> Vec<routes::Route> {
    routes().table().to_vec()
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    routes()
        .into_router()
        .layer(axum::middleware::from_fn_with_state(
            metrics::Observer::new(state.metrics.clone()),
            metrics::observe,
        ))
        .with_state(state)
}

/// `200 ok` when both backends answer; otherwise `503` naming the one(s) that do not.
async fn healthz(State(state): State<AppState>) -> Response {
    let (db, objects) = tokio::join!(state.meta.ping(), state.objects.ping());
    let mut down = Vec::new();
    if let Err(e) = db {
        tracing::warn!(error = %error::error_chain(&e), "healthz: metadata database");
        down.push("metadata database unavailable");
    }
    if let Err(e) = objects {
        tracing::warn!(error = %error::error_chain(&e), "healthz: object store");
        down.push("object store unavailable");
    }
    if down.is_empty() {
        return "ok\n".into_response();
    }
    let body = serde_json::json!({ "error": down.join("; ") }).to_string() + "\n";
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Open the backends named in `config` and prepare the data directory.
pub async fn open_state(
    config: Config,
) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    if !config.data_dir.exists() {
        // The data directory holds the database (token hashes, managed signing keys) and the
        // admin token: only its owner may enter it.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)?;
    }
    let meta = Metadata::connect(&config.database).await?;
    let objects = ObjectStore::open(
        &config.storage,
        larder_store::OpenOptions {
            // Remote stores stage uploads here; a local store stages inside its directory.
            staging_dir: config.data_dir.join("tmp"),
            s3_credentials: config.s3_credentials.clone(),
        },
    )?;
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
        Err(e) => return Err(e.into()),
    }
    Ok(AppState {
        meta,
        objects,
        config: Arc::new(config),
        hot: Arc::default(),
        retention: Arc::default(),
        metrics: Arc::new(metrics::Metrics::new(&route_table())),
    })
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
    write_secret_file(&path, &format!("{token}\n"))?;
    state
        .meta
        .create_token(&larder_store::meta::TokenRow {
            id,
            secret_hash: auth::token_hash(&token),
            label: "bootstrap admin".into(),
            perms: "admin".into(),
            caches: None,
            expires_at: None,
            revoked_at: None,
            created_at: larder_store::now_unix(),
        })
        .await?;
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

/// Serve until `shutdown` resolves, then finish in-flight requests.
///
/// Connections are served by one single-threaded runtime per core, all accepting on the same
/// listening socket (the model of nginx's workers): a request is read, answered and written by
/// one thread, with no wake-ups across threads, which is most of the cost of a small response.
/// Blocking work (upload verification, file I/O) still goes to each runtime's blocking pool.
/// `LARDER_WORKERS` overrides the number of serving threads.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gc_state = state.clone();
    let gc = tokio::spawn(async move { publish::gc_loop(gc_state).await });
    let usage = tokio::spawn(retention::usage_loop(state.clone()));
    let workers = std::env::var("LARDER_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .min(64);
    let listener = listener.into_std()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let listener = listener.try_clone()?;
        let app = router(state.clone());
        let mut stop = stop_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("larder-http-{i}"))
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    use axum::serve::ListenerExt;
                    let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                        // Nix issues thousands of small requests: never let Nagle delay one.
                        let _ = tcp.set_nodelay(true);
                    });
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    })
                    .await
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
    joined
}
