//! A real OIDC issuer on loopback for the tests of CI identity: it serves its discovery
//! document (`/.well-known/openid-configuration`) and its JWKS (`/jwks`) over HTTP, signs ID
//! tokens with keys it generated itself (ECDSA P-256, then Ed25519 after a rotation) through
//! the `jsonwebtoken` crate, and can stand in for GitHub Actions' token endpoint
//! (`/gha/token?…&audience=AUD` with the request token as bearer: `{"value": ID_TOKEN}`).
//!
//! It also makes the bad tokens a server must refuse: unsigned (`alg: none`), HS256 with the
//! public key as secret (algorithm confusion), and signed by a key it never published.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key of the issuer.
#[derive(Clone)]
pub struct Key {
    pub kid: String,
    pub alg: Algorithm,
    pkcs8: Vec<u8>,
    /// The public JWK.
    pub jwk: Value,
}

impl Key {
    /// A new ECDSA P-256 (ES256) key.
    pub fn es256(kid: &str) -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        // Uncompressed point: 0x04, x (32 bytes), y (32 bytes).
        let point = pair.public_key().as_ref();
        Key {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            pkcs8: pkcs8.as_ref().to_vec(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
            }),
        }
    }

    /// A new Ed25519 (EdDSA) key.
    pub fn ed25519(kid: &str) -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Key {
            kid: kid.to_owned(),
            alg: Algorithm::EdDSA,
            pkcs8: pkcs8.as_ref().to_vec(),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                "x": b64url(pair.public_key().as_ref()),
            }),
        }
    }

    /// `claims` signed with this key, its kid in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        let key = match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_der(&self.pkcs8),
            _ => EncodingKey::from_ec_der(&self.pkcs8),
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// The algorithm-confusion forgery: `claims` "signed" with HS256, using this key's public
    /// JWK (as published, which anyone can fetch) as the HMAC secret, under this key's kid.
    pub fn forge_hs256(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let secret = self.jwk.to_string();
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }
}

/// An unsigned token (`alg: none`, empty signature) naming `kid`.
pub fn unsigned(kid: &str, claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT", "kid": kid });
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct State {
    /// The keys the JWKS publishes; the last one signs.
    keys: Vec<Key>,
    jwks_fetches: u64,
    discovery_fetches: u64,
    /// GitHub Actions' endpoint: the request token it wants and the claims it signs (with
    /// `aud` set to the audience asked for).
    github: Option<(String, Value)>,
    /// The audiences asked of the GitHub Actions endpoint.
    audiences: Vec<String>,
}

/// The issuer, serving until dropped.
pub struct Issuer {
    /// `http://127.0.0.1:PORT`: its `iss`.
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    port: u16,
}

impl Issuer {
    /// Start serving on a free loopback port with one ES256 key, `key-1`.
    pub fn start() -> Issuer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let state = Arc::new(Mutex::new(State {
            keys: vec![Key::es256("key-1")],
            jwks_fetches: 0,
            discovery_fetches: 0,
            github: None,
            audiences: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, u) = (state.clone(), stop.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, u) = (s.clone(), u.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &s, &u);
                });
            }
        });
        Issuer {
            url,
            state,
            stop,
            port,
        }
    }

    /// The key that signs now.
    pub fn key(&self) -> Key {
        self.state.lock().unwrap().keys.last().unwrap().clone()
    }

    /// `claims` signed with the current key.
    pub fn sign(&self, claims: &Value) -> String {
        self.key().sign(claims)
    }

    /// Replace the published keys with a new Ed25519 key, `kid`, which signs from now on.
    pub fn rotate(&self, kid: &str) -> Key {
        let key = Key::ed25519(kid);
        self.state.lock().unwrap().keys = vec![key.clone()];
        key
    }

    /// How many times the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.lock().unwrap().jwks_fetches
    }

    /// How many times the discovery document was fetched.
    pub fn discovery_fetches(&self) -> u64 {
        self.state.lock().unwrap().discovery_fetches
    }

    /// Claims of a CI job: `iss` this issuer, `aud`, `sub`, valid from a minute ago for five
    /// minutes, plus `extra`.
    pub fn claims(&self, aud: &str, extra: Value) -> Value {
        let mut c = json!({
            "iss": self.url, "aud": aud, "sub": "repo:mitsio/dotfiles:ref:refs/heads/main",
            "iat": now() - 60, "nbf": now() - 60, "exp": now() + 300, "jti": now().to_string(),
        });
        if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
            c.extend(extra);
        }
        c
    }

    /// Act as GitHub Actions' ID token endpoint: a request with `Authorization: Bearer
    /// request_token` gets `claims` signed with `aud` = the `audience` asked. Returns the
    /// endpoint's URL as `ACTIONS_ID_TOKEN_REQUEST_URL` holds it (with a query already).
    pub fn github_actions(&self, request_token: &str, claims: Value) -> String {
        self.state.lock().unwrap().github = Some((request_token.to_owned(), claims));
        format!("{}/gha/token?api-version=2.0", self.url)
    }

    /// The audiences asked of the GitHub Actions endpoint so far.
    pub fn audiences(&self) -> Vec<String> {
        self.state.lock().unwrap().audiences.clone()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The value of `name` in a query string (percent-decoded).
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answer one request on `conn` (HTTP/1.1, then close).
fn serve(conn: TcpStream, state: &Mutex<State>, url: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split(' ').nth(1).unwrap_or("/").to_owned();
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            }
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (status, body) = {
        let mut s = state.lock().unwrap();
        match path {
            "/.well-known/openid-configuration" => {
                s.discovery_fetches += 1;
                (
                    200,
                    json!({
                        "issuer": url, "jwks_uri": format!("{url}/jwks"),
                        "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                    }),
                )
            }
            "/jwks" => {
                s.jwks_fetches += 1;
                let keys: Vec<Value> = s.keys.iter().map(|k| k.jwk.clone()).collect();
                (200, json!({ "keys": keys }))
            }
            "/gha/token" => match s.github.clone() {
                Some((want, claims))
                    if authorization.as_deref() == Some(&format!("Bearer {want}")) =>
                {
                    let audience = query_value(query, "audience").unwrap_or_default();
                    s.audiences.push(audience.clone());
                    let mut claims = claims;
                    claims["aud"] = Value::String(audience);
                    let token = s.keys.last().unwrap().sign(&claims);
                    (200, json!({ "value": token, "count": 1 }))
                }
                _ => (401, json!({ "message": "Bad credentials" })),
            },
            _ => (404, json!({ "message": "not found" })),
        }
    };
    let body = body.to_string();
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    )?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("api-version=2.0&audience=http%3A%2F%2Fx%3A1", "audience").as_deref(),
            Some("http://x:1")
        );
        assert_eq!(query_value("a=1", "audience"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
