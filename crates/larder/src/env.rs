//! Every environment variable larder reads, in one place: [`VARS`] names each one with what
//! it does, and the server's settings add theirs from their one definition
//! ([`larder_server::config::Settings::environment`]); [`all`] is both, and the top man page's
//! ENVIRONMENT section prints it. A test reads the sources and fails when code reads a
//! variable this registry does not list, or the registry lists one nothing reads.
//!
//! With `LARDER_SERVER` and `LARDER_TOKEN` no client config file is needed. Flags win over
//! the variables of `larder serve`, which win over its config file.

pub const SERVER: &str = "LARDER_SERVER";
pub const TOKEN: &str = "LARDER_TOKEN";
pub const CONFIG: &str = "LARDER_CONFIG";
pub const LOG: &str = "LARDER_LOG";
pub const LOG_FORMAT: &str = "LARDER_LOG_FORMAT";
pub const NIX_CONF: &str = "LARDER_NIX_CONF";
pub const NETRC: &str = "LARDER_NETRC";
pub const OIDC_TOKEN: &str = "LARDER_OIDC_TOKEN";
pub const OIDC_AUDIENCE: &str = "LARDER_OIDC_AUDIENCE";

/// One environment variable and what it does.
pub struct Var {
    pub name: &'static str,
    pub meaning: &'static str,
}

const fn var_(name: &'static str, meaning: &'static str) -> Var {
    Var { name, meaning }
}

/// Every variable but the server settings' (those are in [`all`]).
pub const VARS: &[Var] = &[
    // The client.
    var_(SERVER, "server URL of client commands"),
    var_(TOKEN, "API token of client commands"),
    var_(CONFIG, "client config file"),
    var_(
        OIDC_TOKEN,
        "a CI job's OIDC ID token, traded for a short-lived token when no token is set (`push`, `login --oidc`)",
    ),
    var_(
        OIDC_AUDIENCE,
        "audience of the ID token asked of GitHub Actions (default: the server's URL)",
    ),
    var_(
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "GitHub Actions' ID token endpoint (jobs with `permissions: id-token: write`)",
    ),
    var_(
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "GitHub Actions' bearer token for ACTIONS_ID_TOKEN_REQUEST_URL",
    ),
    var_(
        "LARDER_SIGNING_KEY",
        "Nix secret key (name:base64) `push` signs with",
    ),
    var_(
        "LARDER_PUSH_PART_SIZE",
        "part size of multi-part uploads (`push --part-size`)",
    ),
    var_(
        "LARDER_PUSH_NO_CHUNKING",
        "upload whole NARs, not only the chunks the cache lacks (`push --no-chunking`; the push daemon reads it too)",
    ),
    var_(
        "LARDER_STALL_TIMEOUT",
        "how long an upload may make no progress (`push --stall-timeout`, the push daemon)",
    ),
    var_(
        "LARDER_SOURCE_TOKEN",
        "token of a private source cache (`import --source-token`)",
    ),
    var_(
        "LARDER_DAEMON_SOCKET",
        "socket of the push daemon (`daemon --socket`)",
    ),
    var_(
        NIX_CONF,
        "the nix.conf `use`, `remove` and `doctor` edit instead of the mode's",
    ),
    var_(NETRC, "the netrc `use` writes when nix.conf names none"),
    // Nix's own, read as Nix reads them.
    var_("NIX_CONF_DIR", "directory of the system nix.conf"),
    var_(
        "NIX_USER_CONF_FILES",
        "user nix.conf files (the first is the one edited)",
    ),
    var_(
        "NIX_CONFIG",
        "extra nix.conf lines, kept when the daemon runs Nix",
    ),
    var_(
        "NIX_REMOTE",
        "whether the Nix store is reached through the daemon",
    ),
    var_(
        "NIX_STATE_DIR",
        "Nix's state directory (the store database)",
    ),
    var_("NIX_DAEMON_SOCKET_PATH", "socket of nix-daemon"),
    var_(
        "NIX_SSL_CERT_FILE",
        "CA certificates to trust (as Nix does)",
    ),
    var_(
        "SSL_CERT_FILE",
        "CA certificates to trust when NIX_SSL_CERT_FILE is unset",
    ),
    // The server beside its settings.
    var_("LARDER_SERVE_CONFIG", "config file of `serve` (`--config`)"),
    var_(
        "LARDER_WORKERS",
        "number of serving threads (default: one per core)",
    ),
    var_(
        "AWS_ACCESS_KEY_ID",
        "S3 access key id of `serve` (over `s3_access_key_id`) and `migrate`",
    ),
    var_(
        "AWS_SECRET_ACCESS_KEY",
        "S3 secret key of `serve` (over `s3_secret_access_key`) and `migrate`",
    ),
    // systemd, read by the sd-notify and listenfd crates.
    var_("NOTIFY_SOCKET", "systemd's readiness socket (Type=notify)"),
    var_("LISTEN_FDS", "sockets systemd passes (socket activation)"),
    var_("LISTEN_PID", "the process systemd passed the sockets to"),
    // Both, and the system's.
    var_(LOG, "log filter, e.g. `debug` or `larder_server=debug`"),
    var_(LOG_FORMAT, "`json`: one JSON object per log line"),
    var_("NO_COLOR", "no colours in the log"),
    var_(
        "XDG_CONFIG_HOME",
        "where the client config and user nix.conf are",
    ),
    var_("XDG_DATA_HOME", "where `serve` keeps its data by default"),
    var_(
        "XDG_STATE_HOME",
        "where the push daemon keeps its socket and queue",
    ),
    var_("XDG_CACHE_HOME", "where `build` keeps its cache"),
    var_(
        "HOME",
        "the base of the XDG directories when they are unset",
    ),
    var_("USER", "the user named in nix.conf's trusted-users advice"),
    var_("PATH", "where the daemon finds nix"),
];

/// Every variable, name and meaning: [`VARS`], then each server setting's that it does not
/// list, in the settings' order.
pub fn all() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = VARS
        .iter()
        .map(|v| (v.name.to_owned(), v.meaning.to_owned()))
        .collect();
    for setting in larder_server::config::Settings::environment() {
        if !all.iter().any(|(n, _)| *n == setting.var) {
            let flag = setting
                .flag
                .map(|f| format!(", or {f}"))
                .unwrap_or_default();
            all.push((
                setting.var,
                format!("`serve`: the {} setting{flag}", setting.key),
            ));
        }
    }
    all
}

/// A variable's value, treating empty as unset.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The variables the shipped code reads: the names given to `env = "…"` (clap),
    /// `var("…")`/`var_os("…")` (std and [`super::var`]), and every `"LARDER_…"` string
    /// (constants such as [`super::TOKEN`]). The test-support crate is not shipped.
    fn read_by_the_code() -> BTreeSet<String> {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for krate in std::fs::read_dir(&crates).unwrap() {
            let krate = krate.unwrap().path();
            if krate.ends_with("larder-testkit") || !krate.join("src").is_dir() {
                continue;
            }
            sources(&krate.join("src"), &mut files);
        }
        assert!(files.len() > 20, "found only {files:?}");
        let patterns = [
            r#"env\s*=\s*"([A-Z][A-Z0-9_]*)""#,
            r#"var(?:_os)?\(\s*"([A-Z][A-Z0-9_]*)""#,
            r#""(LARDER_[A-Z0-9_]+)""#,
        ]
        .map(|p| regex::Regex::new(p).unwrap());
        let mut names = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for pattern in &patterns {
                names.extend(pattern.captures_iter(&text).map(|c| c[1].to_owned()));
            }
        }
        names
    }

    #[test]
    fn the_registry_lists_every_variable_the_code_reads_and_no_other() {
        let code = read_by_the_code();
        let all: Vec<String> = super::all().into_iter().map(|(n, _)| n).collect();
        let registry: BTreeSet<String> = all.iter().cloned().collect();
        assert_eq!(registry.len(), all.len(), "a variable is listed twice");
        let unlisted: Vec<&String> = code.difference(&registry).collect();
        assert!(unlisted.is_empty(), "read but not in env.rs: {unlisted:?}");
        // Read by a dependency (systemd's protocol) or through a list of names (the CA file
        // variables), so not seen as a literal read above, but named in the sources.
        let sources_text: String = {
            let mut files = Vec::new();
            sources(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
                &mut files,
            );
            files
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap())
                .collect()
        };
        let by_dependency = ["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"];
        for name in registry.difference(&code) {
            assert!(
                by_dependency.contains(&name.as_str())
                    || sources_text.contains(&format!("\"{name}\"")),
                "{name} is listed in env.rs but nothing reads it"
            );
        }
    }

    #[test]
    fn the_check_sees_each_way_of_reading() {
        let code = read_by_the_code();
        for name in [
            "LARDER_DAEMON_SOCKET", // clap `env =`
            "NIX_STATE_DIR",        // std::env::var_os
            "NIX_CONF_DIR",         // larder_ops::xdg::var
            "LARDER_TOKEN",         // a constant
            "LARDER_GC_INTERVAL",   // a server setting
        ] {
            assert!(code.contains(name), "{name} not found");
        }
    }
}
