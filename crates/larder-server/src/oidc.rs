//! Verifying OIDC ID tokens ([OpenID Connect Core §3.1.3.7], [RFC 7519]) of the issuers the
//! `[oidc]` table trusts, for `POST /api/v1/oidc/exchange` (`api/oidc.rs`).
//!
//! Each issuer's signing keys come from its discovery document
//! (`ISSUER/.well-known/openid-configuration`, whose `issuer` must be the configured one) and
//! the JWKS its `jwks_uri` names. They are kept in memory ([`JWKS_MAX_AGE`]), and fetched again
//! when a token names a key id they do not hold, at most once per [`JWKS_REFETCH_INTERVAL`] per
//! issuer: an issuer that rotates its keys is followed without a restart, and a flood of made-up
//! key ids costs the issuer one request per interval.
//!
//! Only asymmetric signatures are accepted (RS*, PS*, ES256/ES384, EdDSA), and the algorithm is
//! the key's (the JWK's `alg`, or what its type and curve allow), never the token header's
//! alone: a header saying `none`, or `HS256` to have the public key used as an HMAC secret, is
//! refused before any key is looked at.
//!
//! [OpenID Connect Core §3.1.3.7]: https://openid.net/specs/openid-connect-core-1_0.html#IDTokenValidation
//! [RFC 7519]: https://www.rfc-editor.org/rfc/rfc7519

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{issuer_url_allowed, TrustedIssuer};

/// How long fetched keys are used before they are fetched again.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);
/// The shortest time between two fetches of one issuer's keys (an unknown key id, or an issuer
/// that could not be reached).
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(5);
/// How long fetching a discovery document or a JWKS may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document or JWKS read.
const MAX_DOCUMENT_SIZE: usize = 256 << 10;
/// Largest ID token looked at (GitHub's are about 1.5 KiB).
pub const MAX_ID_TOKEN_SIZE: usize = 16 << 10;
/// Clock skew allowed on `exp`, `nbf` and `iat` between the issuer and this server.
const LEEWAY_SECS: u64 = 60;

/// Why an ID token is refused. Each message names the reason; none holds a secret (claims are
/// echoed shortened).
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("this server trusts no OIDC issuer (no [[oidc.issuers]] in its configuration)")]
    NoIssuers,
    #[error("the ID token is not a JWT (three base64url parts separated by dots): {0}")]
    Malformed(String),
    #[error(
        "the ID token is unsigned (alg: none); only tokens signed with the issuer's published \
         keys are accepted"
    )]
    AlgNone,
    #[error(
        "the ID token is signed with {0}, a shared-secret algorithm; only asymmetric signatures \
         (RS256, ES256, EdDSA, …) verified with the issuer's published keys are accepted"
    )]
    Symmetric(String),
    #[error("the ID token's alg {0:?} is not supported (RS256/384/512, PS256/384/512, ES256/384, EdDSA)")]
    UnsupportedAlg(String),
    #[error("wrong issuer: {0:?} is not an issuer this server trusts")]
    UntrustedIssuer(String),
    #[error(
        "unknown kid: the issuer {issuer} publishes no signing key with id {kid:?} (its keys \
         were fetched again within the last {}s)",
        JWKS_REFETCH_INTERVAL.as_secs()
    )]
    UnknownKid { issuer: String, kid: String },
    #[error(
        "the ID token says alg {token} but the issuer's key {kid:?} is a {key} key (the key \
         decides the algorithm)"
    )]
    AlgMismatch {
        token: String,
        key: String,
        kid: String,
    },
    #[error("the ID token's signature does not verify with the issuer's key")]
    BadSignature,
    #[error("the ID token has expired (exp {0})")]
    Expired(String),
    #[error("the ID token is not valid yet (nbf in the future)")]
    NotYetValid,
    #[error(
        "wrong audience: the ID token is for {got}, but this server expects {want:?} from {issuer}"
    )]
    WrongAudience {
        got: String,
        want: String,
        issuer: String,
    },
    #[error("the ID token has no {0:?} claim")]
    MissingClaim(String),
    #[error("the ID token is invalid: {0}")]
    Invalid(String),
    /// The issuer's keys could not be fetched (and none are known): a 503, not the token's
    /// fault.
    #[error("cannot fetch the signing keys of the OIDC issuer {issuer}: {reason}")]
    IssuerUnreachable { issuer: String, reason: String },
}

/// A verified ID token: its issuer's configuration and its claims.
pub struct Verified<'a> {
    pub issuer: &'a TrustedIssuer,
    pub claims: Map<String, Value>,
}

/// One usable key of an issuer.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// What is known of one issuer's keys.
struct IssuerKeys {
    keys: Vec<Key>,
    /// When `keys` were fetched (`None`: never successfully).
    fetched: Option<Instant>,
    /// When a fetch was last tried.
    attempted: Instant,
}

/// The verifier: the issuers' keys, fetched on demand and kept.
pub struct Oidc {
    http: reqwest::Client,
    /// By issuer URL. One lock: fetches are rare, and a fetch waiting on another one then
    /// finds the keys fresh and does not fetch again.
    keys: tokio::sync::Mutex<HashMap<String, IssuerKeys>>,
    /// Fetches of JWKS so far (discovery + keys count as one), for the logs and tests.
    fetches: std::sync::atomic::AtomicU64,
}

impl Default for Oidc {
    fn default() -> Self {
        Oidc::new()
    }
}

/// Parts of the token's JOSE header that are read before anything is verified.
struct Header {
    alg: String,
    kid: Option<String>,
}

fn b64(part: &str) -> Result<Vec<u8>, OidcError> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(part)
        .map_err(|_| OidcError::Malformed("a part is not base64url".into()))
}

fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, OidcError> {
    match serde_json::from_slice::<Value>(&b64(part)?) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(OidcError::Malformed(format!(
            "its {what} is not a JSON object"
        ))),
    }
}

/// `s`, at most 100 characters and no control characters, for messages.
pub fn shorten(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(100).collect();
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

/// The header and the (unverified) claims of `token`.
fn split(token: &str) -> Result<(Header, Map<String, Value>), OidcError> {
    if token.len() > MAX_ID_TOKEN_SIZE {
        return Err(OidcError::Malformed(format!(
            "longer than {MAX_ID_TOKEN_SIZE} bytes"
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(OidcError::Malformed(format!(
            "{} parts (an encrypted JWE or not a JWT)",
            parts.len()
        )));
    }
    let header = json_object(parts[0], "header")?;
    let claims = json_object(parts[1], "payload")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(OidcError::Malformed("its header has no alg".into())),
    };
    let kid = match header.get("kid") {
        Some(Value::String(k)) => Some(k.clone()),
        None | Some(Value::Null) => None,
        Some(_) => return Err(OidcError::Malformed("its kid is not a string".into())),
    };
    Ok((Header { alg, kid }, claims))
}

/// The algorithm a token header names, if it is one this server verifies.
fn asymmetric(alg: &str) -> Result<Algorithm, OidcError> {
    if alg.eq_ignore_ascii_case("none") {
        return Err(OidcError::AlgNone);
    }
    if alg.to_ascii_uppercase().starts_with("HS") {
        return Err(OidcError::Symmetric(shorten(alg)));
    }
    Ok(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(OidcError::UnsupportedAlg(shorten(other))),
    })
}

/// The algorithm `jwk` verifies, and its key, if it is a usable signing key: its `alg` when it
/// names one (and it fits the key's type), else what its type and curve allow. Symmetric
/// (`oct`) keys, encryption keys and unsupported curves are never used.
fn usable(jwk: &Jwk) -> Option<Key> {
    use AlgorithmParameters as P;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let family: &[Algorithm] = match &jwk.algorithm {
        P::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        P::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        P::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
        P::OctetKeyPair(_) | P::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => family[0],
        Some(k) => match k {
            KeyAlgorithm::RS256 => Algorithm::RS256,
            KeyAlgorithm::RS384 => Algorithm::RS384,
            KeyAlgorithm::RS512 => Algorithm::RS512,
            KeyAlgorithm::PS256 => Algorithm::PS256,
            KeyAlgorithm::PS384 => Algorithm::PS384,
            KeyAlgorithm::PS512 => Algorithm::PS512,
            KeyAlgorithm::ES256 => Algorithm::ES256,
            KeyAlgorithm::ES384 => Algorithm::ES384,
            KeyAlgorithm::EdDSA => Algorithm::EdDSA,
            _ => return None,
        },
    };
    if !family.contains(&alg) {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// `GET url` as JSON, at most [`MAX_DOCUMENT_SIZE`] bytes.
async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", crate::error::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {}", crate::error::error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_SIZE {
            return Err(format!("GET {url}: larger than {MAX_DOCUMENT_SIZE} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not JSON ({e})"))
}

impl Oidc {
    pub fn new() -> Oidc {
        let http = reqwest::Client::builder()
            .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")))
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // An issuer's documents are where its configuration says; a redirect is not
            // followed to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Oidc {
            http,
            keys: tokio::sync::Mutex::new(HashMap::new()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times keys were fetched from issuers since start.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The keys `issuer` publishes now: its discovery document, then its JWKS.
    async fn fetch(&self, issuer: &str) -> Result<Vec<Key>, String> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let discovery = get_json(&self.http, &discovery_url).await?;
        if discovery.get("issuer").and_then(Value::as_str) != Some(issuer) {
            return Err(format!(
                "its discovery document names another issuer ({:?})",
                discovery.get("issuer").map(|v| shorten(&v.to_string()))
            ));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("its discovery document has no jwks_uri")?;
        if !issuer_url_allowed(jwks_uri) {
            return Err(format!(
                "its jwks_uri {:?} is not https:// (or http:// on loopback)",
                shorten(jwks_uri)
            ));
        }
        let jwks = get_json(&self.http, jwks_uri).await?;
        let keys: Vec<Key> = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("its JWKS has no keys array")?
            .iter()
            // A key of a kind this server does not use is skipped, not fatal.
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .filter_map(|jwk| usable(&jwk))
            .collect();
        if keys.is_empty() {
            return Err("its JWKS holds no usable signing key".into());
        }
        Ok(keys)
    }

    /// The key of `issuer` with id `kid` (or its only key, for a token without one), fetching
    /// the issuer's keys when they are unknown or old, or lack `kid` (rate-limited).
    async fn key(&self, issuer: &str, kid: Option<&str>) -> Result<Key, OidcError> {
        let find = |keys: &[Key]| -> Option<Key> {
            match kid {
                Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)).cloned(),
                None if keys.len() == 1 => keys.first().cloned(),
                None => None,
            }
        };
        let mut all = self.keys.lock().await;
        let now = Instant::now();
        let known = all.get(issuer);
        let stale = known.is_none_or(|k| k.fetched.is_none_or(|f| now - f > JWKS_MAX_AGE));
        let missing = known.is_none_or(|k| find(&k.keys).is_none());
        let may_fetch = known.is_none_or(|k| now - k.attempted >= JWKS_REFETCH_INTERVAL);
        if (stale || missing) && may_fetch {
            let fetched = self.fetch(issuer).await;
            let entry = all.entry(issuer.to_owned()).or_insert_with(|| IssuerKeys {
                keys: Vec::new(),
                fetched: None,
                attempted: now,
            });
            entry.attempted = Instant::now();
            match fetched {
                Ok(keys) => {
                    tracing::info!(issuer, keys = keys.len(), "fetched the OIDC issuer's keys");
                    entry.keys = keys;
                    entry.fetched = Some(Instant::now());
                }
                // The keys known before stay in use: an issuer's outage does not stop CI.
                Err(reason) => {
                    tracing::warn!(issuer, %reason, "cannot fetch the OIDC issuer's keys");
                    if entry.fetched.is_none() {
                        return Err(OidcError::IssuerUnreachable {
                            issuer: issuer.to_owned(),
                            reason,
                        });
                    }
                }
            }
        }
        let Some(known) = all.get(issuer).filter(|k| k.fetched.is_some()) else {
            return Err(OidcError::IssuerUnreachable {
                issuer: issuer.to_owned(),
                reason: format!(
                    "the last attempt failed less than {}s ago",
                    JWKS_REFETCH_INTERVAL.as_secs()
                ),
            });
        };
        find(&known.keys).ok_or_else(|| OidcError::UnknownKid {
            issuer: issuer.to_owned(),
            kid: kid.map_or_else(|| "(none, and the issuer has several keys)".into(), shorten),
        })
    }

    /// Verify `token` against the trusted `issuers`: its signature with its issuer's key, its
    /// issuer, audience, expiry and not-before.
    pub async fn verify<'a>(
        &self,
        issuers: &'a [TrustedIssuer],
        token: &str,
    ) -> Result<Verified<'a>, OidcError> {
        if issuers.is_empty() {
            return Err(OidcError::NoIssuers);
        }
        let (header, unverified) = split(token.trim())?;
        let alg = asymmetric(&header.alg)?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| OidcError::MissingClaim("iss".into()))?;
        let issuer = issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| OidcError::UntrustedIssuer(shorten(iss)))?;
        let key = self.key(&issuer.issuer, header.kid.as_deref()).await?;
        if key.alg != alg {
            return Err(OidcError::AlgMismatch {
                token: header.alg,
                key: format!("{:?}", key.alg),
                kid: key.kid.unwrap_or_default(),
            });
        }
        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&[&issuer.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        use jsonwebtoken::errors::ErrorKind;
        match jsonwebtoken::decode::<Map<String, Value>>(token.trim(), &key.key, &validation) {
            Ok(data) => Ok(Verified {
                issuer,
                claims: data.claims,
            }),
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidSignature => OidcError::BadSignature,
                ErrorKind::ExpiredSignature => OidcError::Expired(
                    unverified
                        .get("exp")
                        .and_then(Value::as_i64)
                        .map(|t| {
                            let t = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
                            humantime::format_rfc3339_seconds(t).to_string()
                        })
                        .unwrap_or_default(),
                ),
                ErrorKind::ImmatureSignature => OidcError::NotYetValid,
                ErrorKind::InvalidAudience => OidcError::WrongAudience {
                    got: unverified
                        .get("aud")
                        .map_or_else(|| "no audience".into(), |a| shorten(&a.to_string())),
                    want: issuer.audience.clone(),
                    issuer: issuer.issuer.clone(),
                },
                ErrorKind::InvalidIssuer => OidcError::UntrustedIssuer(shorten(iss)),
                ErrorKind::MissingRequiredClaim(c) => OidcError::MissingClaim(c.clone()),
                ErrorKind::InvalidAlgorithm => OidcError::AlgMismatch {
                    token: header.alg,
                    key: format!("{:?}", key.alg),
                    kid: key.kid.unwrap_or_default(),
                },
                other => OidcError::Invalid(shorten(&format!("{other:?}"))),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn part(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn headers_are_judged_before_any_key() {
        let claims = part(&serde_json::json!({"iss": "https://x", "sub": "s"}));
        for (alg, says) in [
            ("none", "alg: none"),
            ("None", "alg: none"),
            ("HS256", "shared-secret"),
            ("hs512", "shared-secret"),
            ("XY1", "not supported"),
        ] {
            let token = format!("{}.{claims}.", part(&serde_json::json!({ "alg": alg })));
            let (h, _) = split(&token).unwrap();
            let e = asymmetric(&h.alg).unwrap_err().to_string();
            assert!(e.contains(says), "{alg}: {e}");
        }
        assert!(split("a.b").is_err());
        assert!(split("!!.b.c").is_err());
        assert_eq!(asymmetric("ES256").unwrap(), Algorithm::ES256);
    }

    #[test]
    fn only_asymmetric_signing_keys_are_used() {
        let jwk = |v: Value| serde_json::from_value::<Jwk>(v).unwrap();
        let oct = jwk(serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}));
        assert!(usable(&oct).is_none());
        let ec = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": "k1",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        });
        assert_eq!(usable(&jwk(ec.clone())).unwrap().alg, Algorithm::ES256);
        let mut wrong = ec.clone();
        wrong["alg"] = "RS256".into();
        assert!(usable(&jwk(wrong)).is_none(), "alg must fit the key type");
        let mut enc = ec;
        enc["use"] = "enc".into();
        assert!(usable(&jwk(enc)).is_none());
    }
}
