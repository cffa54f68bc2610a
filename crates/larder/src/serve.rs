//! `larder serve`: resolve the configuration (flag > env > file > default, in
//! [`resolve_config`]), open the backends, bootstrap the admin token, and serve until SIGTERM
//! or Ctrl-C, finishing in-flight requests.

use std::path::PathBuf;

use anyhow::Context;
use larder_server::config::{Config, ConfigFile, SizeValue};

use crate::env;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML config file (keys: listen, data_dir, public_url, database,
    /// database_max_connections, storage, s3_access_key_id, s3_secret_access_key,
    /// nar_redirect, compression, compression_level, max_upload_size, max_nar_size, gc_interval,
    /// evicted_nar_grace, orphan_scan_interval, orphan_grace, backend_timeout, header_timeout,
    /// max_connections, max_connections_per_client, upstream_keys, tls_cert, tls_key,
    /// delete_undeclared_caches, and [caches.NAME] tables declaring caches; see the README).
    #[arg(long, env = "LARDER_SERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on; `127.0.0.1:0` picks a free port. [default: 127.0.0.1:8080]
    #[arg(long, env = "LARDER_LISTEN")]
    listen: Option<String>,
    /// Data directory (SQLite database, NAR objects, admin token). On SQLite, one server
    /// at a time uses it (DATA/lock).
    /// [default: $XDG_DATA_HOME/larder]
    #[arg(long = "data", env = "LARDER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Base URL clients use to reach this server: http:// or https:// and a host, e.g.
    /// http://shoshin:8080. [default: http://<listen>, https://<listen> with TLS]
    #[arg(long, env = "LARDER_PUBLIC_URL")]
    public_url: Option<String>,
    /// Metadata database: sqlite://PATH or postgres://… [default: sqlite://DATA/larder.db]
    #[arg(long, env = "LARDER_DATABASE")]
    database: Option<String>,
    /// Most connections to the database, per replica. [default: 16 for PostgreSQL, 8 for
    /// SQLite]
    #[arg(long, env = "LARDER_DATABASE_MAX_CONNECTIONS")]
    database_max_connections: Option<u32>,
    /// NAR storage: file:///DIR or s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME (credentials
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the config file).
    /// [default: file://DATA/store]
    #[arg(long, env = "LARDER_STORAGE")]
    storage: Option<String>,
    /// NAR downloads: `stream` through the server, or `presigned` (a 307 redirect to a
    /// presigned URL of the S3 store). [default: stream]
    #[arg(long, env = "LARDER_NAR_REDIRECT")]
    nar_redirect: Option<String>,
    /// Preferred compression of new caches: zstd, xz or none. [default: zstd]
    #[arg(long, env = "LARDER_COMPRESSION")]
    compression: Option<String>,
    /// Compression level clients use by default. [default: 3]
    #[arg(long, env = "LARDER_COMPRESSION_LEVEL")]
    compression_level: Option<i32>,
    /// Largest accepted upload, e.g. 64GiB. [default: 64GiB]
    #[arg(long, env = "LARDER_MAX_UPLOAD_SIZE")]
    max_upload_size: Option<String>,
    /// Largest NAR accepted once decompressed, e.g. 64GiB: a compressed upload expanding past
    /// it is refused (413) as soon as it does. [default: 64GiB]
    #[arg(long, env = "LARDER_MAX_NAR_SIZE")]
    max_nar_size: Option<String>,
    /// Garbage collection interval, e.g. 1h. [default: 1h]
    #[arg(long, env = "LARDER_GC_INTERVAL")]
    gc_interval: Option<String>,
    /// How often to delete orphaned objects (objects in the store that no metadata names,
    /// older than `orphan_grace`), e.g. 24h; 0 or `off` disables it. [default: 24h]
    #[arg(long, env = "LARDER_ORPHAN_SCAN_INTERVAL")]
    orphan_scan_interval: Option<String>,
    /// How long a download or lookup (GET, HEAD) waits for the database and the object store
    /// before it is answered 503 with Retry-After, e.g. 30s. [default: 30s]
    #[arg(long, env = "LARDER_BACKEND_TIMEOUT")]
    backend_timeout: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key); re-read on SIGHUP.
    #[arg(long, env = "LARDER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); re-read on SIGHUP.
    #[arg(long, env = "LARDER_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    larder_ops::xdg::larder_dir(larder_ops::xdg::Base::Data)
        .map_err(|e| anyhow::anyhow!("{e}; pass --data DIR"))
}

/// The one place where flags and env (clap merges those two) override the file.
fn resolve_config(args: ServeArgs) -> anyhow::Result<(ConfigFile, PathBuf)> {
    let mut file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    macro_rules! over {
        ($($field:ident),*) => { $( if args.$field.is_some() { file.$field = args.$field; } )* };
    }
    over!(
        listen,
        data_dir,
        public_url,
        database,
        database_max_connections,
        storage,
        nar_redirect,
        compression,
        compression_level,
        gc_interval,
        orphan_scan_interval,
        backend_timeout,
        tls_cert,
        tls_key
    );
    // S3 credentials: the standard AWS variables override the file (never flags: a flag is
    // visible to every user in the process list).
    if let Some(id) = env::var("AWS_ACCESS_KEY_ID") {
        file.s3_access_key_id = Some(id);
    }
    if let Some(secret) = env::var("AWS_SECRET_ACCESS_KEY") {
        file.s3_secret_access_key = Some(larder_store::Secret::new(secret));
    }
    if let Some(s) = args.max_upload_size {
        file.max_upload_size = Some(SizeValue::Text(s));
    }
    if let Some(s) = args.max_nar_size {
        file.max_nar_size = Some(SizeValue::Text(s));
    }
    // The default is needed (and HOME with it) only when no data directory is given: a
    // service manager may run the server without HOME.
    let default_data = match &file.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    Ok((file, default_data))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (file, default_data) = resolve_config(args)?;
    let public_url_given = file.public_url.is_some();
    let listen_given = file.listen.is_some();
    // Resolved (and so checked) before anything is bound or opened.
    let mut config = Config::resolve(file, default_data)?;
    // Before anything is opened: every connection and every NAR served needs a descriptor,
    // and everything the server creates is private to its user.
    larder_server::conn::raise_fd_limit();
    larder_server::create_private_files();
    // Held until this function returns (the server has stopped) or the process dies.
    let _data_lock = match larder_server::data_lock::lock_data_dir(&config) {
        Err(e @ larder_server::data_lock::LockError::Busy { .. }) => {
            return Err(crate::output::fail_with_hint(
                e,
                "stop it first, or give this server another --data DIR; several servers on \
                 one deployment need PostgreSQL (see \"Scaling out\" in the README)",
            ))
        }
        other => other?,
    };
    // Checked before anything is bound: a bad pair stops the server here, naming both files.
    let tls = config
        .tls
        .as_ref()
        .map(larder_server::tls::Tls::load)
        .transpose()?;
    let tls_on = tls.is_some();
    let scheme = if tls_on { "https" } else { "http" };
    let (listeners, passed) = listening_sockets(&config.listen).await?;
    if passed && listen_given {
        warn(&format!(
            "listen ({}) is not used: serving on the socket(s) systemd passed (socket \
             activation)",
            config.listen
        ));
    }
    let addr = listeners[0].local_addr()?;
    config.listen = addr.to_string();
    // Without a public URL, clients are told the address actually bound (`:0` is a port now).
    let unreachable_default = !public_url_given && addr.ip().is_unspecified();
    if !public_url_given {
        config.public_url = format!("{scheme}://{addr}");
    }
    let login_url = if unreachable_default {
        format!("{scheme}://<this machine's address>:{}", addr.port())
    } else {
        config.public_url.clone()
    };
    let state = larder_server::open_state(config)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(path) = larder_server::bootstrap_admin_token(&state)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("cannot create the bootstrap admin token")?
    {
        say(&format!(
            "created a server admin token in {} (mode 0600); use it with:\n  \
             larder login {login_url} \"$(cat {})\"",
            path.display(),
            path.display()
        ));
    }
    for change in larder_server::declared::apply(&state)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("cannot apply the caches declared in the config file")?
    {
        say(&change);
    }
    if tls_on && state.config.public_url.starts_with("http://") {
        warn(&format!(
            "public_url is {} but this server speaks HTTPS only (tls_cert and tls_key are set): \
             clients told this URL cannot connect; use https://",
            state.config.public_url
        ));
    }
    if let Some(warning) = larder_server::data_dir_warning(&state.config.data_dir) {
        warn(&warning);
    }
    if unreachable_default {
        warn(&format!(
            "listening on {addr} without --public-url: caches are announced \
             as {scheme}://{addr}/CACHE and new caches' keys are named after {ip}, which no \
             client can use; set public_url (--public-url, LARDER_PUBLIC_URL or the config \
             file) to {login_url}",
            ip = addr.ip()
        ));
    }
    say(&format!("listening on {scheme}://{addr}"));
    // Under systemd (Type=notify): the sockets are listening and every start-up step (the
    // database, declared caches) is done, so requests are answered from now on.
    notify_systemd(sd_notify::NotifyState::Ready);
    larder_server::serve_on(state, listeners, tls, shutdown_signal())
        .await
        .context("server failed")?;
    say("stopped");
    Ok(())
}

/// A start-up or shutdown message: `larder: MESSAGE` on stderr, or a JSON log record when
/// `LARDER_LOG_FORMAT=json` (every line a log shipper reads is then JSON).
fn say(message: &str) {
    if json_logs() {
        tracing::info!("{message}");
    } else {
        eprintln!("larder: {message}");
    }
}

fn warn(message: &str) {
    if json_logs() {
        tracing::warn!("{message}");
    } else {
        eprintln!("larder: warning: {message}");
    }
}

use crate::output::json_logs;

/// The sockets to serve on: those systemd passed (socket activation, `LISTEN_FDS`; then `true`),
/// in which case `listen` is not used, or one bound to `listen`.
async fn listening_sockets(listen: &str) -> anyhow::Result<(Vec<std::net::TcpListener>, bool)> {
    let mut passed = listenfd::ListenFd::from_env();
    let mut sockets = Vec::new();
    for i in 0..passed.len() {
        match passed.take_tcp_listener(i) {
            Ok(Some(l)) => sockets.push(l),
            Ok(None) => {}
            Err(e) => anyhow::bail!(
                "socket {} passed by systemd (LISTEN_FDS) is not a listening TCP socket: {e}; \
                 use ListenStream=HOST:PORT in the .socket unit",
                i + 3
            ),
        }
    }
    if !sockets.is_empty() {
        return Ok((sockets, true));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    Ok((vec![listener.into_std()?], false))
}

/// Tell systemd about the service's state when it runs us with `Type=notify`; elsewhere
/// (`NOTIFY_SOCKET` unset) this does nothing.
fn notify_systemd(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    notify_systemd(sd_notify::NotifyState::Stopping);
    say("shutting down, finishing in-flight requests");
}
