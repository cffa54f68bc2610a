//! Every environment variable larder reads, in one place.
//!
//! Client: `LARDER_SERVER` (server URL), `LARDER_TOKEN`, `LARDER_SIGNING_KEY` (Nix secret key
//! `name:base64`), `LARDER_CONFIG` (client config file). With `LARDER_SERVER` and
//! `LARDER_TOKEN` no config file is needed.
//!
//! `larder use` / `remove` / `doctor`: `LARDER_NIX_CONF` (the nix.conf to edit instead of the
//! mode's default; tests point it at a temp file), `LARDER_NETRC` (the netrc to write when
//! nix.conf names none). They also read Nix's own `NIX_CONF_DIR` (system nix.conf directory),
//! `NIX_USER_CONF_FILES` (the first one is the user nix.conf edited) and `NIX_REMOTE` (daemon
//! or not).
//!
//! Server (`larder serve`; flags override these, these override the config file):
//! `LARDER_SERVE_CONFIG`, `LARDER_LISTEN`, `LARDER_DATA_DIR`, `LARDER_PUBLIC_URL`,
//! `LARDER_DATABASE`, `LARDER_DATABASE_MAX_CONNECTIONS`, `LARDER_STORAGE`, `LARDER_NAR_REDIRECT`,
//! `LARDER_COMPRESSION`, `LARDER_COMPRESSION_LEVEL`, `LARDER_MAX_UPLOAD_SIZE`,
//! `LARDER_MAX_NAR_SIZE`, `LARDER_GC_INTERVAL`, `LARDER_ORPHAN_SCAN_INTERVAL`,
//! `LARDER_BACKEND_TIMEOUT`, `LARDER_TLS_CERT`, `LARDER_TLS_KEY`; under systemd, its own
//! `NOTIFY_SOCKET`, `LISTEN_FDS` and `LISTEN_PID` (socket activation).
//! S3 credentials (`larder serve` with `s3://` storage, `larder migrate`): the standard
//! `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (they override the config file's
//! `s3_access_key_id` / `s3_secret_access_key`).
//!
//! Both: `LARDER_LOG` (a tracing filter such as `debug` or `larder_server=debug`),
//! `LARDER_LOG_FORMAT` (`json`: one JSON object per log line, for log shippers), `NO_COLOR`,
//! `XDG_CONFIG_HOME`, `XDG_DATA_HOME`, `HOME`.

pub const SERVER: &str = "LARDER_SERVER";
pub const TOKEN: &str = "LARDER_TOKEN";
pub const CONFIG: &str = "LARDER_CONFIG";
pub const LOG: &str = "LARDER_LOG";
pub const LOG_FORMAT: &str = "LARDER_LOG_FORMAT";
pub const NIX_CONF: &str = "LARDER_NIX_CONF";
pub const NETRC: &str = "LARDER_NETRC";

/// A variable's value, treating empty as unset.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
