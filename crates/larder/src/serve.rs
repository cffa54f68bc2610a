//! `larder serve`: resolve the configuration (flag > env > file > default, defined and
//! layered in [`larder_server::config`]; `--print-config` shows the result), open the backends, bootstrap the admin token, and serve until SIGTERM
//! or Ctrl-C, finishing in-flight requests.

use std::path::PathBuf;

use anyhow::Context;
use larder_server::config::{Config, Settings};

use crate::env;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML config file: every setting below by its key (the flag's name with `_` for `-`;
    /// `--data` is `data_dir`), and the file-only s3_access_key_id, s3_secret_access_key,
    /// upstream_keys, delete_undeclared_caches and [caches.NAME] tables declaring caches (see
    /// the README).
    #[arg(long, env = "LARDER_SERVE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the configuration the server would run with (flags, environment, file and
    /// defaults resolved; secrets masked) as TOML, and exit without starting.
    #[arg(long)]
    print_config: bool,
    // Boxed: the settings are most of the size of every parsed command line.
    #[command(flatten)]
    settings: Box<Settings>,
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    larder_ops::xdg::larder_dir(larder_ops::xdg::Base::Data)
        .map_err(|e| anyhow::anyhow!("{e}; pass --data DIR"))
}

/// The settings of every layer ([`Settings::layered`]) and the data directory to default to.
fn resolve_config(args: ServeArgs) -> anyhow::Result<(Settings, PathBuf)> {
    let file = args.config.as_deref().map(Settings::load).transpose()?;
    let settings = Settings::layered(*args.settings, file, env::var);
    // The default is needed (and HOME with it) only when no data directory is given: a
    // service manager may run the server without HOME.
    let default_data = match &settings.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    Ok((settings, default_data))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let print_config = args.print_config;
    let (file, default_data) = resolve_config(args)?;
    let public_url_given = file.public_url.is_some();
    let listen_given = file.listen.is_some();
    // Resolved (and so checked) before anything is bound or opened.
    let mut config = Config::resolve(file, default_data)?;
    if print_config {
        print!("{}", config.to_masked_toml()?);
        return Ok(());
    }
    // Before anything is opened: every connection and every NAR served needs a descriptor,
    // and everything the server creates is private to its user.
    larder_server::conn::raise_fd_limit();
    larder_server::create_private_files();
    // Held until this function returns (the server has stopped) or the process dies.
    let _data_lock = lock_data_dir(&config)?;
    // Checked before anything is bound: a bad pair stops the server here, naming both files.
    let tls = config
        .tls
        .as_ref()
        .map(larder_server::tls::Tls::load)
        .transpose()?;
    let bound = bind(&mut config, tls.is_some(), listen_given, public_url_given).await?;
    let state = larder_server::open_state(config)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    prepare_state(&state, &bound.login_url).await?;
    warn_about_addresses(&state, &bound);
    say(&format!("listening on {}://{}", bound.scheme, bound.addr));
    // Under systemd (Type=notify): the sockets are listening and every start-up step (the
    // database, declared caches) is done, so requests are answered from now on.
    notify_systemd(sd_notify::NotifyState::Ready);
    larder_server::serve_on(state, bound.listeners, tls, shutdown_signal())
        .await
        .context("server failed")?;
    say("stopped");
    Ok(())
}

/// The data directory's lock (SQLite only), or the error naming the server holding it.
fn lock_data_dir(config: &Config) -> anyhow::Result<Option<larder_server::data_lock::DataDirLock>> {
    match larder_server::data_lock::lock_data_dir(config) {
        Err(e @ larder_server::data_lock::LockError::Busy { .. }) => {
            Err(crate::output::fail_with_hint(
                e,
                "stop it first, or give this server another --data DIR; several servers on \
                 one deployment need PostgreSQL (see \"Scaling out\" in the README)",
            ))
        }
        other => Ok(other?),
    }
}

/// The listening sockets and the addresses the server tells about.
struct Bound {
    listeners: Vec<std::net::TcpListener>,
    addr: std::net::SocketAddr,
    scheme: &'static str,
    tls_on: bool,
    /// Listening on an unspecified address without a public URL: no client can use the URL
    /// caches are announced with.
    unreachable_default: bool,
    /// The URL to give `larder login`.
    login_url: String,
}

/// Bind `config.listen` (or take the sockets systemd passed), and set `config.listen` and,
/// when none was given, `config.public_url` to the address actually bound.
async fn bind(
    config: &mut Config,
    tls_on: bool,
    listen_given: bool,
    public_url_given: bool,
) -> anyhow::Result<Bound> {
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
    Ok(Bound {
        listeners,
        addr,
        scheme,
        tls_on,
        unreachable_default,
        login_url,
    })
}

/// Start-up steps on the opened backends: the bootstrap admin token, the declared caches.
async fn prepare_state(state: &larder_server::AppState, login_url: &str) -> anyhow::Result<()> {
    if let Some(path) = larder_server::bootstrap_admin_token(state)
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
    for change in larder_server::declared::apply(state)
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .context("cannot apply the caches declared in the config file")?
    {
        say(&change);
    }
    Ok(())
}

/// Warn about addresses no client can use, and a data directory that will not last.
fn warn_about_addresses(state: &larder_server::AppState, bound: &Bound) {
    let Bound {
        addr,
        scheme,
        login_url,
        ..
    } = bound;
    if bound.tls_on && state.config.public_url.starts_with("http://") {
        warn(&format!(
            "public_url is {} but this server speaks HTTPS only (tls_cert and tls_key are set): \
             clients told this URL cannot connect; use https://",
            state.config.public_url
        ));
    }
    if let Some(warning) = larder_server::data_dir_warning(&state.config.data_dir) {
        warn(&warning);
    }
    if bound.unreachable_default {
        warn(&format!(
            "listening on {addr} without --public-url: caches are announced \
             as {scheme}://{addr}/CACHE and new caches' keys are named after {ip}, which no \
             client can use; set public_url (--public-url, LARDER_PUBLIC_URL or the config \
             file) to {login_url}",
            ip = addr.ip()
        ));
    }
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
