//! `larder doctor [CACHE]`: the seed's verification checklist as a command. Each check prints
//! `ok`, `warn` or `fail` with what it saw and, when not ok, the fix; any `fail` exits 1.
//!
//! Nix's view comes from `nix show-config --json` (so `NIX_CONFIG`, `NIX_USER_CONF_FILES` and
//! every include are honoured exactly as Nix applies them); whether a daemon will accept the
//! user's substituters from the system nix.conf, which is what the daemon reads.

use std::path::Path;
use std::process::Command;

use larder_client::ClientError;
use serde::Serialize;
use serde_json::Value;

use crate::client_config::connect;
use crate::nixconf::{self, same_value, Trust};
use crate::output::{fail_with_hint, print, print_json};

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE): also check that Nix is set up to substitute from it.
    cache: Option<String>,
    /// Print the checks as a JSON array of {check, status, detail, fix}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.push(check, Status::Ok, detail, None);
    }
    fn warn(&mut self, check: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Status::Warn, detail, Some(fix.into()));
    }
    fn fail(&mut self, check: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Status::Fail, detail, Some(fix.into()));
    }
    fn push(
        &mut self,
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: Option<String>,
    ) {
        self.0.push(Check {
            check,
            status,
            detail: detail.into(),
            fix,
        });
    }
}

fn nix_version() -> Result<String, String> {
    match Command::new("nix").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(format!("cannot run `nix`: {e}")),
    }
}

/// The CA bundle Nix checks certificates against when run from this environment: its
/// `ssl-cert-file` defaults to `NIX_SSL_CERT_FILE`, else `SSL_CERT_FILE`, else the system's
/// bundle (Nix 2.8 does not show the setting in `nix show-config`).
fn nix_ca_file() -> Option<std::path::PathBuf> {
    for var in larder_client::api::CA_FILE_VARS {
        if let Some(v) = crate::env::var(var) {
            return Some(v.into());
        }
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

/// GET `url`/nix-cache-info trusting exactly what Nix trusts here: `Ok(ca file)` or why not.
async fn nix_tls_probe(url: &str) -> Result<String, (String, String)> {
    let Some(ca) = nix_ca_file() else {
        return Err(("no CA bundle".into(), "Nix finds no CA certificates".into()));
    };
    let shown = ca.display().to_string();
    let fail = |e: String| (shown.clone(), e);
    let pem = std::fs::read(&ca).map_err(|e| fail(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))?;
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .timeout(std::time::Duration::from_secs(10));
    for cert in certs {
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| fail(e.to_string()))?;
    match client.get(format!("{url}/nix-cache-info")).send().await {
        Ok(_) => Ok(shown),
        Err(e) => {
            let mut chain = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                chain = format!("{chain}: {s}");
                source = s.source();
            }
            Err(fail(chain))
        }
    }
}

/// Nix's effective settings (`nix show-config --json`, `nix config show --json` on newer Nix).
fn nix_settings() -> Result<Value, String> {
    let mut last = String::new();
    for sub in [
        &["show-config", "--json"][..],
        &["config", "show", "--json"][..],
    ] {
        match Command::new("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(sub)
            .output()
        {
            Ok(o) if o.status.success() => {
                return serde_json::from_slice(&o.stdout)
                    .map_err(|e| format!("cannot parse `nix show-config --json`: {e}"));
            }
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => return Err(format!("cannot run `nix`: {e}")),
        }
    }
    Err(last)
}

/// A setting's value as a list (`{"value": [...]}`, or a space-separated string).
fn setting_list(settings: &Value, name: &str) -> Vec<String> {
    let v = settings
        .get(name)
        .and_then(|s| s.get("value"))
        .unwrap_or(&Value::Null);
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn setting_str(settings: &Value, name: &str) -> Option<String> {
    settings
        .get(name)
        .and_then(|s| s.get("value"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let r = run_checks(args.cache.as_deref()).await;
    if args.json {
        print_json(&r.0)?;
    } else {
        let mut out = String::new();
        for c in &r.0 {
            let tag = match c.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "fail",
            };
            out.push_str(&format!("{tag:<5} {:<20} {}\n", c.check, c.detail));
            if let Some(fix) = &c.fix {
                for (i, line) in fix.lines().enumerate() {
                    let lead = if i == 0 { "fix: " } else { "     " };
                    out.push_str(&format!("{:27}{lead}{line}\n", ""));
                }
            }
        }
        print(&out)?;
    }
    let failed = r.0.iter().filter(|c| c.status == Status::Fail).count();
    if failed > 0 {
        return Err(fail_with_hint(
            format!("{failed} of {} checks failed", r.0.len()),
            "apply the fixes above, then run `larder doctor` again",
        ));
    }
    Ok(())
}

async fn run_checks(cache_arg: Option<&str>) -> Report {
    let mut r = Report::default();
    let nix = nix_version();
    match &nix {
        Ok(v) => r.ok("nix", v.clone()),
        Err(e) => r.fail(
            "nix",
            format!("nix not found ({e})"),
            "install Nix (https://nixos.org/download, or `apt-get install nix-bin`) and put `nix` on PATH",
        ),
    }

    // A cache named by its URL, by `SERVER:CACHE` or on the default server.
    let connected = match cache_arg {
        Some(a) => crate::client_config::target(a).map(|t| (t.client, Some(t.cache))),
        None => connect(None).map(|c| (c, None)),
    };
    let (client, cache) = match connected {
        Ok((c, cache)) => {
            r.ok("client config", format!("server {}", c.base_url()));
            (c, cache)
        }
        Err(e) => {
            r.fail(
                "client config",
                format!("{e:#}"),
                "give the cache's URL (`larder doctor http://HOST:PORT/CACHE`), run `larder \
                 login URL [TOKEN]`, or set LARDER_SERVER",
            );
            return r;
        }
    };
    let cache = cache.as_deref();

    let who = client.whoami().await;
    match &who {
        Ok(w) => {
            r.ok("server", format!("{} answers", client.base_url()));
            if w.authenticated {
                let scope = match &w.caches {
                    None => "all caches".to_owned(),
                    Some(c) => format!("caches {}", c.join(", ")),
                };
                r.ok(
                    "token",
                    format!(
                        "{:?}: {} on {scope}",
                        w.label.clone().unwrap_or_default(),
                        w.perms.join("+")
                    ),
                );
            } else {
                r.warn(
                    "token",
                    "no token: anonymous (enough for public caches only)",
                    "`larder login URL TOKEN`, `larder authtoken TOKEN` or LARDER_TOKEN",
                );
            }
        }
        Err(ClientError::Status {
            status: 401,
            message,
            ..
        }) => {
            r.ok("server", format!("{} answers", client.base_url()));
            r.fail(
                "token",
                format!("the server rejects the token: {message}"),
                "set a valid token: `larder login URL TOKEN`, `larder authtoken TOKEN` or LARDER_TOKEN",
            );
        }
        Err(e) => {
            r.fail(
                "server",
                format!("{e}"),
                format!(
                    "is `larder serve` running at {}? check with `curl -I {}/api/v1/whoami`; fix the URL with `larder login` or LARDER_SERVER",
                    client.base_url(),
                    client.base_url()
                ),
            );
        }
    }

    let Some(cache) = cache else { return r };
    // Without the server, the checks of Nix's own configuration still run, for the URL the
    // cache would have.
    let server_up = !matches!(&who, Err(e) if e.status().is_none());
    let fetched = if server_up {
        Some(client.cache_info(cache).await)
    } else {
        None
    };
    let info = match fetched {
        None => None,
        Some(Ok(i)) => {
            r.ok(
                "cache",
                format!(
                    "{} ({}, {} paths)",
                    i.name,
                    if i.private { "private" } else { "public" },
                    i.paths
                ),
            );
            Some(i)
        }
        Some(Err(e)) => {
            let fix = match e.status() {
                Some(404) => format!(
                    "`larder cache list` shows the caches you can see; a server admin runs `larder cache create {cache}`"
                ),
                Some(401 | 403) => format!(
                    "use a token with pull on {cache}: `larder token create --perm pull --cache {cache}` (server admin)"
                ),
                _ => "check the server with `larder doctor` (no cache argument)".to_owned(),
            };
            r.fail("cache", format!("{cache}: {e}"), fix);
            return r;
        }
    };
    let url = info.as_ref().map_or_else(
        || format!("{}/{cache}", client.base_url().trim_end_matches('/')),
        |i| i.url.clone(),
    );
    let private = info.as_ref().is_some_and(|i| i.private);

    if info.is_some() {
        match client.nix_cache_info(cache).await {
            Ok(_) => {
                r.ok("nix-cache-info", format!("GET {url}/nix-cache-info: 200"));
                if url.starts_with("https://") {
                    match nix_tls_probe(&url).await {
                        Ok(ca) => r.ok("nix tls", format!("Nix trusts the certificate ({ca})")),
                        Err((ca, e)) => r.fail(
                            "nix tls",
                            format!("Nix, with the CA certificates of {ca}, will refuse {url}: {e}"),
                            "point NIX_SSL_CERT_FILE at the PEM file of the CA that signed the \
                             server's certificate (Nix reads it before SSL_CERT_FILE; for \
                             nix-daemon, in the daemon's environment)",
                        ),
                    }
                }
            }
            Err(e) => r.fail(
                "nix-cache-info",
                format!("GET {url}/nix-cache-info: {e}"),
                format!("check with `curl -I {url}/nix-cache-info`; a proxy in front of larder must pass /{cache}/"),
            ),
        }
    }

    if private {
        let can_pull = who.as_ref().is_ok_and(|w| {
            !w.perms.is_empty()
                && w.caches
                    .as_ref()
                    .is_none_or(|c| c.iter().any(|x| x == cache))
        });
        if can_pull {
            r.ok("pull", format!("the token can pull from {cache}"));
        } else {
            r.fail(
                "pull",
                format!("{cache} is private and the current token cannot pull from it"),
                format!("a server admin runs `larder token create --perm pull --cache {cache}`; then `larder authtoken TOKEN`"),
            );
        }
    }

    let key = info
        .as_ref()
        .and_then(|i| i.public_key.clone())
        .filter(|k| !k.is_empty());
    let use_fix = format!("larder use {}", cache_arg.unwrap_or(cache));
    let settings = match (&nix, nix_settings()) {
        (Ok(_), Ok(s)) => Some(s),
        (Ok(_), Err(e)) => {
            r.fail(
                "nix config",
                format!("cannot read Nix's settings: {e}"),
                "check nix.conf syntax with `nix show-config`",
            );
            None
        }
        (Err(_), _) => None,
    };
    if let Some(s) = &settings {
        let subs = setting_list(s, "substituters");
        if subs.iter().any(|v| same_value(v, &url)) {
            r.ok("substituters", format!("{} is in Nix's substituters", url));
        } else {
            r.fail(
                "substituters",
                format!("{} is not in Nix's substituters ({})", url, subs.join(" ")),
                format!(
                    "`{use_fix}` (or add `extra-substituters = {}` to nix.conf)",
                    url
                ),
            );
        }
        match &key {
            Some(k)
                if setting_list(s, "trusted-public-keys")
                    .iter()
                    .any(|v| v == k) =>
            {
                r.ok("trusted-public-keys", format!("{k} is trusted"))
            }
            Some(k) => r.fail(
                "trusted-public-keys",
                format!("{k} is not in Nix's trusted-public-keys"),
                format!("`{use_fix}` (or add `extra-trusted-public-keys = {k}` to nix.conf)"),
            ),
            None if info.is_none() => r.warn(
                "trusted-public-keys",
                "not checked: the server did not answer, so the cache's key is unknown",
                "run `larder doctor` again once the server answers",
            ),
            None => r.fail(
                "trusted-public-keys",
                format!("cache {cache} has no public key registered"),
                format!("`larder generate-keypair {}`", cache_arg.unwrap_or(cache)),
            ),
        }
    }

    let trust = nixconf::decide_trust(&nixconf::probe_trust(), &url, key.as_deref());
    let advice = || nixconf::untrusted_advice(cache_arg.unwrap_or(cache), &url, key.as_deref());
    match trust {
        Trust::SingleUser => r.ok(
            "trusted user",
            "single-user install: Nix uses your nix.conf",
        ),
        Trust::Root => r.ok("trusted user", "root"),
        Trust::TrustedUser(e) => r.ok("trusted user", format!("in trusted-users ({e})")),
        Trust::TrustedSubstituter { key_trusted: true } => r.ok(
            "trusted user",
            format!("{} is in the daemon's trusted-substituters", url),
        ),
        Trust::TrustedSubstituter { key_trusted: false } => r.fail(
            "trusted user",
            format!(
                "{} is in trusted-substituters but the daemon does not trust its key",
                url
            ),
            advice(),
        ),
        Trust::Untrusted { user } => r.fail(
            "trusted user",
            format!("nix-daemon ignores the substituters of {user:?} (not in trusted-users)"),
            advice(),
        ),
    }

    if private {
        check_netrc(&mut r, settings.as_ref(), &url, client.token(), &use_fix);
    }
    r
}

fn check_netrc(
    r: &mut Report,
    settings: Option<&Value>,
    url: &str,
    token: Option<&str>,
    use_fix: &str,
) {
    let Some(host) = nixconf::url_host(url) else {
        return;
    };
    let netrc = settings
        .and_then(|s| setting_str(s, "netrc-file"))
        .unwrap_or_else(|| "/etc/nix/netrc".to_owned());
    let Some(text) = nixconf::read_optional(Path::new(&netrc)) else {
        r.fail(
            "netrc",
            format!("{netrc} (Nix's netrc-file) is missing or unreadable"),
            format!("`{use_fix}` writes it with the token"),
        );
        return;
    };
    match nixconf::netrc_lookup(&text, host) {
        None => r.fail(
            "netrc",
            format!("{netrc} has no entry for {host}"),
            format!("`{use_fix}` adds `machine {host} login larder password TOKEN`"),
        ),
        Some(e) if e.password.is_none() => r.fail(
            "netrc",
            format!("the entry for {host} in {netrc} has no password"),
            format!("`{use_fix}` rewrites it"),
        ),
        Some(e) if token.is_some() && e.password.as_deref() != token => r.warn(
            "netrc",
            format!("{netrc} has an entry for {host} with another token than the current one"),
            format!("`{use_fix}` writes the current token, if that is the one Nix should use"),
        ),
        Some(_) => r.ok("netrc", format!("{netrc} has an entry for {host}")),
    }
}
