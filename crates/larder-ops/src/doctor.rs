//! `larder doctor [CACHE]`'s checks, as data: the seed's verification checklist, each check
//! `ok`, `warn` or `fail` with what it saw and, when not ok, the fix. The binary prints the
//! list (or its JSON) and exits 1 when a check failed.
//!
//! Nix's view comes from `nix show-config --json` ([`NixSettings`], so `NIX_CONFIG`,
//! `NIX_USER_CONF_FILES` and every include are honoured exactly as Nix applies them); whether
//! a daemon will accept the user's substituters from the system nix.conf, which is what the
//! daemon reads ([`nixconf::probe_trust`]).

use std::path::{Path, PathBuf};

use larder_client::api::{CacheInfo, WhoAmI};
use larder_client::{ApiClient, ClientError};
use serde::Serialize;

use crate::nix::{self, NixSettings};
use crate::nixconf::{self, same_value, Trust};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The checks so far.
#[derive(Debug, Default)]
pub struct Report(pub Vec<Check>);

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

    /// How many checks failed.
    pub fn failed(&self) -> usize {
        self.0.iter().filter(|c| c.status == Status::Fail).count()
    }
}

/// What the checks start from: the server and cache the user named (or why there is none).
pub struct Target {
    /// The client of the server, and the cache when one was named; or why the client config
    /// gave none.
    pub connected: Result<(ApiClient, Option<String>), String>,
    /// The cache as the user named it (CACHE, SERVER:CACHE or a URL), for the fixes.
    pub cache_arg: Option<String>,
}

/// Run every check that applies, in order; later checks are skipped when what they need is
/// missing (no client config, no cache named, a cache the server does not know).
pub async fn run_checks(target: Target) -> Report {
    let mut r = Report::default();
    let nix_ok = check_nix(&mut r).await;
    let (client, cache) = match target.connected {
        Ok((c, cache)) => {
            r.ok("client config", format!("server {}", c.base_url()));
            (c, cache)
        }
        Err(e) => {
            r.fail(
                "client config",
                e,
                "give the cache's URL (`larder doctor http://HOST:PORT/CACHE`), run `larder \
                 login URL [TOKEN]`, or set LARDER_SERVER",
            );
            return r;
        }
    };
    let who = check_server(&mut r, &client).await;
    let Some(cache) = cache else { return r };
    let arg = target.cache_arg.unwrap_or_else(|| cache.clone());
    // Without the server, the checks of Nix's own configuration still run, for the URL the
    // cache would have.
    let server_up = !matches!(&who, Err(e) if e.status().is_none());
    let info = if server_up {
        match check_cache(&mut r, &client, &cache).await {
            Some(info) => Some(info),
            None => return r,
        }
    } else {
        None
    };
    let cache = CacheFacts::new(&client, cache, arg, info);
    if cache.info.is_some() {
        check_cache_info(&mut r, &client, &cache).await;
    }
    if cache.private() {
        check_pull(&mut r, &who, &cache.name);
    }
    let settings = if nix_ok {
        read_settings(&mut r).await
    } else {
        None
    };
    if let Some(s) = &settings {
        check_substituters(&mut r, s, &cache);
    }
    check_trust(&mut r, &cache);
    if cache.private() {
        check_netrc(
            &mut r,
            settings.as_ref(),
            &cache.url,
            client.token(),
            &cache.use_fix(),
        );
    }
    r
}

/// What the checks of one cache know of it.
struct CacheFacts {
    name: String,
    /// How the user named it.
    arg: String,
    url: String,
    info: Option<CacheInfo>,
    key: Option<String>,
}

impl CacheFacts {
    fn new(client: &ApiClient, name: String, arg: String, info: Option<CacheInfo>) -> Self {
        let url = info.as_ref().map_or_else(
            || format!("{}/{name}", client.base_url().trim_end_matches('/')),
            |i| i.url.clone(),
        );
        let key = info
            .as_ref()
            .and_then(|i| i.public_key.clone())
            .filter(|k| !k.is_empty());
        Self {
            name,
            arg,
            url,
            info,
            key,
        }
    }

    fn private(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.private)
    }

    fn use_fix(&self) -> String {
        format!("larder use {}", self.arg)
    }
}

/// Nix runs: whether it does.
async fn check_nix(r: &mut Report) -> bool {
    match nix::version().await {
        Ok(v) => {
            r.ok("nix", v);
            true
        }
        Err(e) => {
            r.fail(
                "nix",
                format!("nix not found ({e})"),
                "install Nix (https://nixos.org/download, or `apt-get install nix-bin`) and put `nix` on PATH",
            );
            false
        }
    }
}

/// The server answers, and what the token is.
async fn check_server(r: &mut Report, client: &ApiClient) -> Result<WhoAmI, ClientError> {
    let who = client.whoami().await;
    match &who {
        Ok(w) => {
            r.ok("server", format!("{} answers", client.base_url()));
            check_token(r, w);
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
        Err(e) => r.fail(
            "server",
            format!("{e}"),
            format!(
                "is `larder serve` running at {}? check with `curl -I {}/api/v1/whoami`; fix the URL with `larder login` or LARDER_SERVER",
                client.base_url(),
                client.base_url()
            ),
        ),
    }
    who
}

fn check_token(r: &mut Report, w: &WhoAmI) {
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
                larder_client::api::Perm::join(&w.perms, "+")
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

/// The cache exists and the token may see it; `None` ends the checks.
async fn check_cache(r: &mut Report, client: &ApiClient, cache: &str) -> Option<CacheInfo> {
    match client.cache_info(cache).await {
        Ok(i) => {
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
        Err(e) => {
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
            None
        }
    }
}

/// `GET …/nix-cache-info` answers, and over HTTPS Nix trusts the certificate.
async fn check_cache_info(r: &mut Report, client: &ApiClient, c: &CacheFacts) {
    let url = &c.url;
    if let Err(e) = client.nix_cache_info(&c.name).await {
        r.fail(
            "nix-cache-info",
            format!("GET {url}/nix-cache-info: {e}"),
            format!(
                "check with `curl -I {url}/nix-cache-info`; a proxy in front of larder must pass /{}/",
                c.name
            ),
        );
        return;
    }
    r.ok("nix-cache-info", format!("GET {url}/nix-cache-info: 200"));
    if !url.starts_with("https://") {
        return;
    }
    match nix_tls_probe(url).await {
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

/// A private cache: the token can pull from it.
fn check_pull(r: &mut Report, who: &Result<WhoAmI, ClientError>, cache: &str) {
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

async fn read_settings(r: &mut Report) -> Option<NixSettings> {
    match NixSettings::read().await {
        Ok(s) => Some(s),
        Err(e) => {
            r.fail(
                "nix config",
                format!(
                    "cannot read Nix's settings: {}",
                    larder_client::push::error_line(&e)
                ),
                "check nix.conf syntax with `nix show-config`",
            );
            None
        }
    }
}

/// The cache's URL is among Nix's substituters and its key among the trusted ones.
fn check_substituters(r: &mut Report, s: &NixSettings, c: &CacheFacts) {
    let (url, use_fix) = (&c.url, c.use_fix());
    let subs = s.list("substituters");
    if subs.iter().any(|v| same_value(v, url)) {
        r.ok("substituters", format!("{url} is in Nix's substituters"));
    } else {
        r.fail(
            "substituters",
            format!("{url} is not in Nix's substituters ({})", subs.join(" ")),
            format!("`{use_fix}` (or add `extra-substituters = {url}` to nix.conf)"),
        );
    }
    match &c.key {
        Some(k) if s.list("trusted-public-keys").iter().any(|v| v == k) => {
            r.ok("trusted-public-keys", format!("{k} is trusted"))
        }
        Some(k) => r.fail(
            "trusted-public-keys",
            format!("{k} is not in Nix's trusted-public-keys"),
            format!("`{use_fix}` (or add `extra-trusted-public-keys = {k}` to nix.conf)"),
        ),
        None if c.info.is_none() => r.warn(
            "trusted-public-keys",
            "not checked: the server did not answer, so the cache's key is unknown",
            "run `larder doctor` again once the server answers",
        ),
        None => r.fail(
            "trusted-public-keys",
            format!("cache {} has no public key registered", c.name),
            format!("`larder generate-keypair {}`", c.arg),
        ),
    }
}

/// Whether the Nix daemon will use this user's substituters.
fn check_trust(r: &mut Report, c: &CacheFacts) {
    let url = &c.url;
    let trust = nixconf::decide_trust(&nixconf::probe_trust(), url, c.key.as_deref());
    let advice = || nixconf::untrusted_advice(&c.arg, url, c.key.as_deref());
    match trust {
        Trust::SingleUser => r.ok(
            "trusted user",
            "single-user install: Nix uses your nix.conf",
        ),
        Trust::Root => r.ok("trusted user", "root"),
        Trust::TrustedUser(e) => r.ok("trusted user", format!("in trusted-users ({e})")),
        Trust::TrustedSubstituter { key_trusted: true } => r.ok(
            "trusted user",
            format!("{url} is in the daemon's trusted-substituters"),
        ),
        Trust::TrustedSubstituter { key_trusted: false } => r.fail(
            "trusted user",
            format!("{url} is in trusted-substituters but the daemon does not trust its key"),
            advice(),
        ),
        Trust::Untrusted { user } => r.fail(
            "trusted user",
            format!("nix-daemon ignores the substituters of {user:?} (not in trusted-users)"),
            advice(),
        ),
    }
}

/// A private cache: Nix's netrc file has the token for the cache's host.
fn check_netrc(
    r: &mut Report,
    settings: Option<&NixSettings>,
    url: &str,
    token: Option<&str>,
    use_fix: &str,
) {
    let Some(host) = nixconf::url_host(url) else {
        return;
    };
    let netrc = settings.map_or_else(|| "/etc/nix/netrc".to_owned(), NixSettings::netrc_file);
    let Some(text) = nixconf::read_optional(Path::new(&netrc)) else {
        r.fail(
            "netrc",
            format!("{netrc} (Nix's netrc-file) is missing or unreadable"),
            format!("`{use_fix}` writes it with the token"),
        );
        return;
    };
    netrc_entry(r, &netrc, &text, host, token, use_fix);
}

/// The check of `host`'s entry in the netrc `text` (from the file `netrc`).
fn netrc_entry(
    r: &mut Report,
    netrc: &str,
    text: &str,
    host: &str,
    token: Option<&str>,
    use_fix: &str,
) {
    match nixconf::netrc_lookup(text, host) {
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

/// The CA bundle Nix checks certificates against when run from this environment: its
/// `ssl-cert-file` defaults to `NIX_SSL_CERT_FILE`, else `SSL_CERT_FILE`, else the system's
/// bundle (Nix 2.8 does not show the setting in `nix show-config`).
fn nix_ca_file() -> Option<PathBuf> {
    for var in larder_client::api::CA_FILE_VARS {
        if let Some(v) = crate::xdg::var(var) {
            return Some(v.into());
        }
    }
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt",
    ]
    .iter()
    .map(PathBuf::from)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(r: &Report) -> Vec<(&'static str, Status)> {
        r.0.iter().map(|c| (c.check, c.status)).collect()
    }

    #[tokio::test]
    async fn without_a_client_config_the_list_ends_after_nix_and_config() {
        let r = run_checks(Target {
            connected: Err("no server configured".into()),
            cache_arg: None,
        })
        .await;
        let s = statuses(&r);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "nix");
        assert_eq!(s[1], ("client config", Status::Fail));
        assert_eq!(r.0[1].detail, "no server configured");
        assert!(r.0[1]
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("larder login")));
        assert!(r.failed() >= 1);
    }

    #[test]
    fn netrc_entries_are_judged_against_the_token() {
        let judge = |text: &str, token: Option<&str>| {
            let mut r = Report::default();
            netrc_entry(&mut r, "/etc/nix/netrc", text, "h", token, "larder use c");
            r.0.remove(0)
        };
        let missing = judge("machine other password x\n", Some("t"));
        assert_eq!(missing.status, Status::Fail);
        assert_eq!(missing.detail, "/etc/nix/netrc has no entry for h");
        assert_eq!(judge("machine h login larder\n", None).status, Status::Fail);
        assert_eq!(
            judge("machine h password old\n", Some("t")).status,
            Status::Warn
        );
        let ok = judge("machine h login larder password t\n", Some("t"));
        assert_eq!((ok.status, ok.fix), (Status::Ok, None));
    }

    #[test]
    fn checks_serialise_as_the_documented_json() {
        let mut r = Report::default();
        r.ok("nix", "nix (Nix) 2.8.0");
        r.fail("netrc", "missing", "write it");
        let json = serde_json::to_string(&r.0).unwrap_or_default();
        assert_eq!(
            json,
            r#"[{"check":"nix","status":"ok","detail":"nix (Nix) 2.8.0"},{"check":"netrc","status":"fail","detail":"missing","fix":"write it"}]"#
        );
    }
}
