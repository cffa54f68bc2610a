//! The `[oidc]` table: which OIDC issuers the server trusts, with which audience, and the
//! rules that turn an ID token's claims into permissions (`POST /api/v1/oidc/exchange`, see
//! [`crate::oidc`]).
//!
//! ```toml
//! [oidc]
//! max_lifetime = "1h"                      # of the larder tokens it makes; at most 1h
//!
//! [[oidc.issuers]]
//! issuer = "https://token.actions.githubusercontent.com"
//! audience = "https://cache.example.org"
//!
//! [[oidc.issuers.rules]]
//! claims = { repository = "mitsio/dotfiles", ref = "refs/heads/main" }
//! perm = "push"
//! caches = ["modular-workspace"]
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use larder_api::Perm;

use super::{format_duration, parse_duration, ConfigError};

/// The longest a token made from an ID token may live, and its default: a CI job's token
/// should not outlive the job by much, and nothing can take it back from a leaked log sooner.
pub const MAX_OIDC_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// `[oidc]` as the file holds it.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    /// Lifetime of the tokens the exchange makes, e.g. `15m`; at most (and by default) `1h`.
    pub max_lifetime: Option<String>,
    /// The trusted issuers (`[[oidc.issuers]]`).
    #[serde(default)]
    pub issuers: Vec<IssuerFile>,
}

/// One `[[oidc.issuers]]` table.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    /// The issuer's URL, exactly as its tokens' `iss` claim says it; its discovery document is
    /// `ISSUER/.well-known/openid-configuration`.
    pub issuer: String,
    /// The `aud` claim its tokens must carry for this server (what the CI job asks for).
    pub audience: String,
    /// What its tokens may do (`[[oidc.issuers.rules]]`).
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

/// One `[[oidc.issuers.rules]]` table.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Claim name → pattern: every one must match (exactly, or `*` for any run of characters).
    pub claims: BTreeMap<String, String>,
    /// `pull` or `push`.
    pub perm: String,
    /// The caches it grants `perm` on.
    pub caches: Vec<String>,
}

/// The `[oidc]` table, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    pub max_lifetime: Duration,
    pub issuers: Vec<TrustedIssuer>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        OidcConfig {
            max_lifetime: MAX_OIDC_TOKEN_LIFETIME,
            issuers: Vec::new(),
        }
    }
}

/// An issuer whose ID tokens the server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub audience: String,
    pub rules: Vec<Rule>,
}

/// Claims that, all matching, grant `perm` on `caches`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub claims: Vec<(String, ClaimPattern)>,
    pub perm: Perm,
    pub caches: Vec<String>,
}

/// A claim's expected value: exact, or with `*` standing for any run of characters
/// (`refs/heads/*`, `mitsio/*`). Nothing else is special.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPattern(String);

impl ClaimPattern {
    pub fn new(pattern: impl Into<String>) -> ClaimPattern {
        ClaimPattern(pattern.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `value` matches: the pieces between stars appear in order, the first at the
    /// start and the last at the end.
    pub fn matches(&self, value: &str) -> bool {
        let mut pieces = self.0.split('*');
        let first = pieces.next().unwrap_or_default();
        let Some(mut rest) = value.strip_prefix(first) else {
            return false;
        };
        let pieces: Vec<&str> = pieces.collect();
        let Some((last, middle)) = pieces.split_last() else {
            return rest.is_empty(); // no star: exact
        };
        for piece in middle {
            match rest.find(piece) {
                Some(at) => rest = &rest[at + piece.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

impl Rule {
    /// Whether every claim this rule names is in `claims` and matches. A claim that is a
    /// number or a boolean is compared as its JSON text; any other kind never matches.
    pub fn matches(&self, claims: &serde_json::Map<String, serde_json::Value>) -> bool {
        self.claims
            .iter()
            .all(|(name, pattern)| match claims.get(name) {
                Some(serde_json::Value::String(s)) => pattern.matches(s),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    pattern.matches(&v.to_string())
                }
                _ => false,
            })
    }
}

/// Whether `url` may be an issuer (or the JWKS address an issuer names): `https://`, or
/// `http://` to a loopback address (an issuer on the same machine, e.g. in tests), with a host.
pub fn issuer_url_allowed(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    match parsed.scheme() {
        "https" => parsed.host_str().is_some_and(|h| !h.is_empty()),
        "http" => match parsed.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        },
        _ => false,
    }
}

fn bad(key: &'static str, value: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key,
        value: value.into(),
    }
}

impl OidcFile {
    /// Check every value; errors name the key.
    pub fn resolve(self) -> Result<OidcConfig, ConfigError> {
        let max_lifetime = match &self.max_lifetime {
            Some(s) => parse_duration(s).map_err(|inner| ConfigError::Setting {
                key: "oidc.max_lifetime",
                inner: Box::new(inner),
            })?,
            None => MAX_OIDC_TOKEN_LIFETIME,
        };
        if max_lifetime.is_zero() || max_lifetime > MAX_OIDC_TOKEN_LIFETIME {
            return Err(bad(
                "oidc.max_lifetime (more than 0, at most 1h)",
                self.max_lifetime.unwrap_or_default(),
            ));
        }
        let mut issuers: Vec<TrustedIssuer> = Vec::new();
        for i in self.issuers {
            if !issuer_url_allowed(&i.issuer) {
                return Err(bad(
                    "oidc.issuers.issuer (an https:// URL, or http:// on a loopback address)",
                    i.issuer,
                ));
            }
            if issuers.iter().any(|t| t.issuer == i.issuer) {
                return Err(bad("oidc.issuers.issuer (given twice)", i.issuer));
            }
            if i.audience.trim().is_empty() {
                return Err(bad(
                    "oidc.issuers.audience (the aud your CI jobs ask for, e.g. this server's \
                     public_url)",
                    i.audience,
                ));
            }
            let mut rules = Vec::new();
            for r in i.rules {
                rules.push(rule(&i.issuer, r)?);
            }
            issuers.push(TrustedIssuer {
                issuer: i.issuer,
                audience: i.audience,
                rules,
            });
        }
        Ok(OidcConfig {
            max_lifetime,
            issuers,
        })
    }
}

fn rule(issuer: &str, r: RuleFile) -> Result<Rule, ConfigError> {
    // A rule without claims would grant its caches to every token of the issuer: for a public
    // CI service, to every repository in the world.
    if r.claims.is_empty() {
        return Err(bad(
            "oidc.issuers.rules.claims (at least one claim, e.g. repository = \"owner/repo\": a \
             rule without claims would grant to every job of the issuer)",
            issuer,
        ));
    }
    for (name, pattern) in &r.claims {
        if name.is_empty() || pattern.is_empty() || pattern.chars().all(|c| c == '*') {
            return Err(bad(
                "oidc.issuers.rules.claims (a claim name and a pattern that is not only `*`)",
                format!("{name} = {pattern:?}"),
            ));
        }
    }
    let perm = match Perm::parse(&r.perm) {
        Some(p @ (Perm::Pull | Perm::Push)) => p,
        _ => return Err(bad("oidc.issuers.rules.perm (pull or push)", r.perm)),
    };
    if r.caches.is_empty() {
        return Err(bad(
            "oidc.issuers.rules.caches (at least one cache)",
            issuer,
        ));
    }
    for c in &r.caches {
        if !crate::valid_cache_name(c) {
            return Err(bad("oidc.issuers.rules.caches (cache names)", c.clone()));
        }
    }
    Ok(Rule {
        claims: r
            .claims
            .into_iter()
            .map(|(k, v)| (k, ClaimPattern::new(v)))
            .collect(),
        perm,
        caches: r.caches,
    })
}

impl OidcConfig {
    /// Back to the file's form (`--print-config`).
    pub fn to_file(&self) -> OidcFile {
        OidcFile {
            max_lifetime: Some(format_duration(self.max_lifetime)),
            issuers: self
                .issuers
                .iter()
                .map(|i| IssuerFile {
                    issuer: i.issuer.clone(),
                    audience: i.audience.clone(),
                    rules: i
                        .rules
                        .iter()
                        .map(|r| RuleFile {
                            claims: r
                                .claims
                                .iter()
                                .map(|(k, v)| (k.clone(), v.as_str().to_owned()))
                                .collect(),
                            perm: r.perm.as_str().to_owned(),
                            caches: r.caches.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_with_stars() {
        let p = |s: &str| ClaimPattern::new(s);
        assert!(p("refs/heads/main").matches("refs/heads/main"));
        assert!(!p("refs/heads/main").matches("refs/heads/main2"));
        assert!(!p("refs/heads/main").matches("xrefs/heads/main"));
        assert!(p("refs/heads/*").matches("refs/heads/release/1"));
        assert!(p("refs/heads/*").matches("refs/heads/"));
        assert!(!p("refs/heads/*").matches("refs/tags/v1"));
        assert!(p("mitsio/*-config").matches("mitsio/nix-config"));
        assert!(!p("mitsio/*-config").matches("mitsio/nix-configs"));
        assert!(p("*/dotfiles").matches("mitsio/dotfiles"));
        assert!(p("a*b*c").matches("abc") && p("a*b*c").matches("aXbYc"));
        assert!(!p("a*b*c").matches("acb"));
        // The last piece may not overlap the ones before it.
        assert!(!p("ab*b").matches("ab"));
    }

    #[test]
    fn the_table_is_checked() {
        let ok: OidcFile = toml::from_str(
            "max_lifetime = \"15m\"\n[[issuers]]\nissuer = \"https://token.actions.githubusercontent.com\"\n\
             audience = \"https://cache.example.org\"\n[[issuers.rules]]\n\
             claims = { repository = \"o/r\", ref = \"refs/heads/main\" }\nperm = \"push\"\ncaches = [\"main\"]\n",
        )
        .unwrap();
        let c = ok.clone().resolve().unwrap();
        assert_eq!(c.max_lifetime, Duration::from_secs(900));
        assert_eq!(c.issuers[0].rules[0].perm, Perm::Push);
        assert_eq!(c.to_file().resolve().unwrap(), c);
        let with = |edit: &dyn Fn(&mut OidcFile)| {
            let mut f = ok.clone();
            edit(&mut f);
            f.resolve().unwrap_err().to_string()
        };
        assert!(with(&|f| f.max_lifetime = Some("2h".into())).contains("at most 1h"));
        assert!(with(&|f| f.issuers[0].issuer = "http://example.org".into()).contains("loopback"));
        assert!(with(&|f| f.issuers[0].audience = String::new()).contains("audience"));
        assert!(with(&|f| f.issuers[0].rules[0].claims.clear()).contains("at least one claim"));
        assert!(with(&|f| f.issuers[0].rules[0].perm = "admin".into()).contains("pull or push"));
        assert!(with(&|f| f.issuers[0].rules[0].caches = vec!["Bad!".into()]).contains("Bad!"));
        assert!(with(&|f| {
            f.issuers[0].rules[0]
                .claims
                .insert("sub".into(), "*".into());
        })
        .contains("only `*`"));
        assert!(issuer_url_allowed("http://127.0.0.1:4000"));
        assert!(issuer_url_allowed("http://[::1]:4000/x"));
        assert!(!issuer_url_allowed("http://10.0.0.1"));
        assert!(!issuer_url_allowed("ftp://x"));
    }
}
