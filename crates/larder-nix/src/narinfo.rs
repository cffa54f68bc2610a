//! `.narinfo` files: the metadata of one store path in a binary cache.
//!
//! Follows the `NarInfo` constructor and `NarInfo::to_string` in Nix's
//! [`src/libstore/nar-info.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/nar-info.cc).
//! Each line is `Key: value\n`. Printing order is Nix's:
//!
//! ```text
//! StorePath: /nix/store/<hash>-<name>
//! URL: nar/<filehash>.nar.xz
//! Compression: xz
//! FileHash: sha256:<nix32>            (if known)
//! FileSize: <bytes>                   (if known)
//! NarHash: sha256:<nix32>
//! NarSize: <bytes>
//! References: <basename> <basename>   (always present; empty value keeps its trailing space)
//! Deriver: <basename>                 (if known)
//! Sig: <name>:<base64>                (one line per signature)
//! CA: fixed:r:sha256:<nix32>          (if content-addressed)
//! ```
//!
//! Parsing follows Nix where it is strict (StorePath, URL, NarHash and a non-zero NarSize are
//! required; a missing or empty Compression means `bzip2`; `Deriver: unknown-deriver` means
//! none; an empty `CA:` means none; unknown keys such as `System` are ignored) and is stricter
//! where Nix is loose: every line needs `": "` and a final newline, a key other than `Sig` may
//! appear once, every path, hash, number and signature is validated, and a URL must be relative
//! without `..` segments or control characters so it can never escape the cache.
//! For every narinfo Nix writes, printing a parsed file gives back the same bytes.

use std::fmt;

use crate::hash::{HashError, Sha256};
use crate::signing::{self, KeyError, Signature, SigningKey, VerifyingKey};
use crate::store_path::{StorePath, StorePathError};
use crate::util::shorten;

/// The compression Nix assumes when a narinfo names none.
pub const DEFAULT_COMPRESSION: &str = "bzip2";

/// Why a narinfo was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    /// A required key is absent.
    #[error("narinfo lacks the required field {field}")]
    MissingField {
        /// The key.
        field: &'static str,
    },
    /// A key other than `Sig` appears twice.
    #[error("narinfo has field {field:?} more than once (line {line})")]
    DuplicateField {
        /// The key (shortened).
        field: String,
        /// 1-based line number of the second occurrence.
        line: usize,
    },
    /// A line that is not `Key: value`.
    #[error("narinfo line {line} is not of the form \"Key: value\": {text:?}")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// The line (shortened).
        text: String,
    },
    /// The last line lacks its newline.
    #[error("narinfo line {line} does not end with a newline")]
    MissingNewline {
        /// 1-based line number.
        line: usize,
    },
    /// StorePath, References or Deriver is not a valid store path.
    #[error("narinfo field {field} has invalid store path {value:?}")]
    StorePath {
        /// The key.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// NarHash or FileHash is not a valid SHA-256.
    #[error("narinfo field {field} has invalid hash {value:?}")]
    Hash {
        /// The key.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: HashError,
    },
    /// NarSize or FileSize is not a decimal number.
    #[error("narinfo field {field} has invalid number {value:?}")]
    Number {
        /// The key.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: std::num::ParseIntError,
    },
    /// A Sig line is not a valid signature.
    #[error("narinfo has invalid signature {value:?}")]
    Signature {
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// Some other field has a value that is not allowed.
    #[error("narinfo field {field} has invalid value {value:?}: {reason}")]
    InvalidValue {
        /// The key.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why.
        reason: &'static str,
    },
}

/// The contents of one `.narinfo` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described.
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache root.
    pub url: String,
    /// Compression of the file at `url` (`xz`, `zstd`, `none`, …); parsing fills in Nix's default.
    pub compression: String,
    /// SHA-256 of the file at `url`.
    pub file_hash: Option<Sha256>,
    /// Size of the file at `url`.
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR.
    pub nar_hash: Sha256,
    /// Size of the uncompressed NAR.
    pub nar_size: u64,
    /// Store paths this one refers to (kept in file order; Nix writes them sorted).
    pub references: Vec<StorePath>,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// Signatures of [`NarInfo::fingerprint`].
    pub sigs: Vec<Signature>,
    /// Content address, as Nix renders it (`fixed:…` or `text:…`).
    pub ca: Option<String>,
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Why `url` may not appear in a narinfo, if it may not.
pub fn url_problem(url: &str) -> Option<&'static str> {
    if url.is_empty() {
        Some("empty")
    } else if has_control(url) {
        Some("contains a control character")
    } else if url.starts_with('/') {
        Some("absolute paths are not allowed")
    } else if url.split(['/', '\\']).any(|seg| seg == "..") {
        Some("\"..\" segments are not allowed")
    } else {
        None
    }
}

fn parse_number(field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    // `u64::from_str` would also take a leading '+'; Nix writes plain digits only.
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NarInfoError::InvalidValue {
            field,
            value: shorten(value),
            reason: "not a decimal number",
        });
    }
    value.parse::<u64>().map_err(|source| NarInfoError::Number {
        field,
        value: shorten(value),
        source,
    })
}

fn parse_path(field: &'static str, value: &str, absolute: bool) -> Result<StorePath, NarInfoError> {
    let r = if absolute {
        StorePath::from_absolute(value)
    } else {
        StorePath::from_basename(value)
    };
    r.map_err(|source| NarInfoError::StorePath {
        field,
        value: shorten(value),
        source,
    })
}

fn parse_hash(field: &'static str, value: &str) -> Result<Sha256, NarInfoError> {
    Sha256::parse(value).map_err(|source| NarInfoError::Hash {
        field,
        value: shorten(value),
        source,
    })
}

impl NarInfo {
    /// Parse narinfo text; see the module docs for what is accepted.
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut seen: Vec<&str> = Vec::new();

        let mut rest = text;
        let mut line_no = 0;
        while !rest.is_empty() {
            line_no += 1;
            let Some((line, more)) = rest.split_once('\n') else {
                return Err(NarInfoError::MissingNewline { line: line_no });
            };
            rest = more;
            let malformed = || NarInfoError::MalformedLine {
                line: line_no,
                text: shorten(line),
            };
            let (key, value) = line.split_once(':').ok_or_else(malformed)?;
            let value = value.strip_prefix(' ').ok_or_else(malformed)?;
            if key != "Sig" {
                if seen.contains(&key) {
                    return Err(NarInfoError::DuplicateField {
                        field: shorten(key),
                        line: line_no,
                    });
                }
                seen.push(key);
            }
            match key {
                "StorePath" => store_path = Some(parse_path("StorePath", value, true)?),
                "URL" => {
                    if let Some(reason) = url_problem(value) {
                        return Err(NarInfoError::InvalidValue {
                            field: "URL",
                            value: shorten(value),
                            reason,
                        });
                    }
                    url = Some(value.to_owned());
                }
                "Compression" => {
                    if has_control(value) || value.contains(' ') {
                        return Err(NarInfoError::InvalidValue {
                            field: "Compression",
                            value: shorten(value),
                            reason: "contains whitespace or a control character",
                        });
                    }
                    compression = Some(value.to_owned());
                }
                "FileHash" => file_hash = Some(parse_hash("FileHash", value)?),
                "FileSize" => file_size = Some(parse_number("FileSize", value)?),
                "NarHash" => nar_hash = Some(parse_hash("NarHash", value)?),
                "NarSize" => nar_size = Some(parse_number("NarSize", value)?),
                "References" => {
                    references = Some(
                        value
                            .split(' ')
                            .filter(|r| !r.is_empty())
                            .map(|r| parse_path("References", r, false))
                            .collect::<Result<Vec<_>, _>>()?,
                    );
                }
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => deriver = Some(parse_path("Deriver", value, false)?),
                "Sig" => sigs.push(Signature::parse(value).map_err(|source| {
                    NarInfoError::Signature {
                        value: shorten(value),
                        source,
                    }
                })?),
                // Nix reads an empty CA as none.
                "CA" if value.is_empty() => {}
                "CA" => {
                    check_ca(value).map_err(|reason| NarInfoError::InvalidValue {
                        field: "CA",
                        value: shorten(value),
                        reason,
                    })?;
                    ca = Some(value.to_owned());
                }
                _ => {}
            }
        }

        let nar_size = nar_size.ok_or(NarInfoError::MissingField { field: "NarSize" })?;
        if nar_size == 0 {
            return Err(NarInfoError::InvalidValue {
                field: "NarSize",
                value: "0".to_owned(),
                reason: "a NAR is never empty",
            });
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::MissingField { field: "StorePath" })?,
            url: url.ok_or(NarInfoError::MissingField { field: "URL" })?,
            compression: compression
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| DEFAULT_COMPRESSION.to_owned()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::MissingField { field: "NarHash" })?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver,
            sigs,
            ca,
        })
    }

    /// The text that signatures sign; see [`signing::fingerprint`].
    pub fn fingerprint(&self) -> String {
        signing::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Sign with `key`, replacing any signature by a key of the same name.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(&self.fingerprint());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
    }

    /// Whether some signature is valid for `key`.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|s| key.verify(&fp, s))
    }
}

impl fmt::Display for NarInfo {
    /// The narinfo text, in Nix's field order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        f.write_str("References: ")?;
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&r.basename())?;
        }
        f.write_str("\n")?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {}", d.basename())?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Check a `CA` value as Nix parses it: `text:sha256:<hash>` or `fixed:[r:]<algo>:<hash>`,
/// where the hash is typed (`md5`, `sha1`, `sha256`, `sha512`) and spelt in hex, nix32 or
/// base64 of exactly that type's length, or SRI (`<algo>-<base64>`).
pub fn check_ca(value: &str) -> Result<(), &'static str> {
    let (method, hash) = value
        .split_once(':')
        .ok_or("expected \"fixed:…\" or \"text:…\"")?;
    match method {
        "text" => {
            if check_typed_hash(hash)? != "sha256" {
                return Err("a text: content address needs a sha256 hash");
            }
            Ok(())
        }
        "fixed" => check_typed_hash(hash.strip_prefix("r:").unwrap_or(hash)).map(drop),
        _ => Err("expected \"fixed:…\" or \"text:…\""),
    }
}

/// Check a typed hash (`algo:digest` or SRI `algo-base64`); returns its algorithm.
fn check_typed_hash(hash: &str) -> Result<&str, &'static str> {
    use base64::Engine;
    const BAD: &str = "expected a hash such as sha256:<nix32, hex or base64> or sha256-<base64>";
    let (algorithm, digest, sri) = match (hash.split_once(':'), hash.split_once('-')) {
        (Some((a, d)), _) => (a, d, false),
        (None, Some((a, d))) => (a, d, true),
        (None, None) => return Err(BAD),
    };
    let bytes: usize = match algorithm {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return Err("unknown hash algorithm (md5, sha1, sha256, sha512)"),
    };
    let base64_len = bytes.div_ceil(3) * 4;
    let base64 = || {
        base64::engine::general_purpose::STANDARD
            .decode(digest)
            .is_ok_and(|d| d.len() == bytes)
    };
    let ok = if sri {
        base64()
    } else if digest.len() == 2 * bytes {
        digest.bytes().all(|b| b.is_ascii_hexdigit())
    } else if digest.len() == crate::nixbase32::encoded_len(bytes) {
        crate::nixbase32::decode(digest).is_ok()
    } else {
        digest.len() == base64_len && base64()
    };
    if ok {
        Ok(algorithm)
    } else {
        Err(BAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// As written by `nix copy --to file://…?compression=xz&secret-key=…` (Nix 2.8).
    const SAMPLE: &str = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin
URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz
Compression: xz
FileHash: sha256:05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56
FileSize: 68852
NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
NarSize: 196040
References: 0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0 syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin
Deriver: 5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
";

    fn sample() -> NarInfo {
        NarInfo::parse(SAMPLE).unwrap()
    }

    #[test]
    fn parses_and_prints_nix_sample() {
        let ni = sample();
        assert_eq!(ni.store_path.name(), "curl-7.82.0-bin");
        assert_eq!(ni.compression, "xz");
        assert_eq!(ni.file_size, Some(68852));
        assert_eq!(ni.nar_size, 196040);
        assert_eq!(ni.references.len(), 2);
        assert_eq!(
            ni.deriver.as_ref().map(StorePath::name),
            Some("curl-7.82.0.drv")
        );
        assert_eq!(ni.sigs.len(), 1);
        assert_eq!(ni.sigs[0].key_name(), "cache.nixos.org-1");
        assert_eq!(ni.to_string(), SAMPLE);
        assert_eq!(
            ni.fingerprint(),
            "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;\
             sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;\
             /nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,\
             /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin"
        );
    }

    #[test]
    fn defaults_and_optional_fields() {
        let text = "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-x\nURL: nar/a.nar\n\
                    NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\n\
                    NarSize: 8\nDeriver: unknown-deriver\nSystem: x86_64-linux\nCA: \n";
        let ni = NarInfo::parse(text).unwrap();
        assert_eq!(ni.compression, "bzip2");
        assert_eq!(ni.deriver, None);
        assert_eq!(ni.ca, None);
        assert!(ni.references.is_empty());
        assert_eq!(
            ni.to_string(),
            "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-x\nURL: nar/a.nar\n\
             Compression: bzip2\nNarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\n\
             NarSize: 8\nReferences: \n"
        );
        let with_ca = text.replace(
            "CA: \n",
            "CA: fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\n",
        );
        let ni = NarInfo::parse(&with_ca).unwrap();
        assert!(ni.to_string().ends_with("References: \nCA: fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\n"));
    }

    #[test]
    fn content_addresses_in_every_spelling_nix_reads() {
        for ca in [
            "fixed:r:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0".to_owned(),
            format!("fixed:sha256:{}", "ab".repeat(32)),
            format!("fixed:r:sha256-{}=", "A".repeat(43)),
            format!("fixed:sha256:{}=", "A".repeat(43)),
            format!("fixed:sha1:{}", "0".repeat(40)),
            format!("fixed:md5:{}", "f".repeat(32)),
            format!("fixed:r:sha512:{}", "1".repeat(128)),
            "text:sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0".to_owned(),
        ] {
            let text = format!("{SAMPLE}CA: {ca}\n");
            let ni = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{ca}: {e}"));
            assert_eq!(ni.ca.as_deref(), Some(ca.as_str()));
        }
    }

    #[test]
    fn rejects() {
        let cases: Vec<(String, &str)> = vec![
            (
                SAMPLE.replace("StorePath: /nix/store/", "StorePath: /nix/sto/"),
                "StorePath",
            ),
            (SAMPLE.replace("URL: nar/", "URL: /nar/"), "URL absolute"),
            (SAMPLE.replace("URL: nar/", "URL: ../nar/"), "URL dotdot"),
            (SAMPLE.replace("URL: nar/", "URL: nar/../../"), "URL dotdot"),
            (SAMPLE.replace("URL: nar/", "URL: nar\0/"), "URL nul"),
            (
                SAMPLE.replace("NarHash: sha256:1", "NarHash: sha256:e"),
                "NarHash",
            ),
            (
                SAMPLE.replace("NarSize: 196040", "NarSize: +196040"),
                "NarSize plus",
            ),
            (SAMPLE.replace("NarSize: 196040", "NarSize: 0"), "NarSize 0"),
            (
                SAMPLE.replace("NarSize: 196040", "NarSize: -1"),
                "NarSize neg",
            ),
            (
                SAMPLE.replace("NarSize: 196040", "NarSize: 99999999999999999999999"),
                "NarSize big",
            ),
            (
                SAMPLE.replace("FileSize: 68852", "FileSize: 6x"),
                "FileSize",
            ),
            (
                SAMPLE.replace("References: 0jqd", "References: 0jqe"),
                "References",
            ),
            (
                SAMPLE.replace("Deriver: 5rwx", "Deriver: /nix/store/5rwx"),
                "Deriver",
            ),
            (
                SAMPLE.replace("Sig: cache.nixos.org-1:", "Sig: cache.nixos.org-1:x"),
                "Sig",
            ),
            (
                SAMPLE.replace("Compression: xz\n", "Compression: xz\nCompression: xz\n"),
                "dup",
            ),
            (
                SAMPLE.replace("Compression: xz\n", "Compression: x z\n"),
                "compression",
            ),
            (SAMPLE.replace("NarSize: 196040\n", ""), "no NarSize"),
            (
                SAMPLE.replace(
                    "NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0\n",
                    "",
                ),
                "no NarHash",
            ),
            (
                SAMPLE.replace(
                    "URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz\n",
                    "",
                ),
                "no URL",
            ),
            (
                SAMPLE.replace(
                    "StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin\n",
                    "",
                ),
                "no StorePath",
            ),
            (SAMPLE.replace("FileSize:", "FileSize"), "no colon"),
            (SAMPLE.replace("FileSize: ", "FileSize:"), "no space"),
            (SAMPLE.trim_end().to_owned(), "no final newline"),
            (format!("{SAMPLE}\n"), "empty line"),
            (format!("{SAMPLE}CA: nonsense\n"), "CA"),
            (
                format!("{SAMPLE}CA: fixed:\"><script>alert(1)</script>\n"),
                "CA with markup",
            ),
            (format!("{SAMPLE}CA: fixed:r:sha256:abc\n"), "CA short hash"),
            (
                format!("{SAMPLE}CA: fixed:sha3:{}\n", "0".repeat(52)),
                "CA algorithm",
            ),
            (
                format!("{SAMPLE}CA: text:sha1:{}\n", "0".repeat(40)),
                "text CA without sha256",
            ),
            (
                format!("{SAMPLE}CA: fixed:r:sha256:{}\n", "e".repeat(52)),
                "CA nix32 letter e",
            ),
            (String::new(), "empty"),
        ];
        for (text, what) in cases {
            assert!(NarInfo::parse(&text).is_err(), "{what} accepted:\n{text}");
        }
    }

    #[test]
    fn sign_and_verify() {
        let mut ni = sample();
        let key = SigningKey::from_seed("larder-test-1", [3; 32]).unwrap();
        assert!(!ni.verify(&key.verifying_key()));
        ni.sign(&key);
        ni.sign(&key);
        assert_eq!(ni.sigs.len(), 2);
        assert!(ni.verify(&key.verifying_key()));
        let reparsed = NarInfo::parse(&ni.to_string()).unwrap();
        assert!(reparsed.verify(&key.verifying_key()));
        let mut tampered = reparsed;
        tampered.nar_size += 1;
        assert!(!tampered.verify(&key.verifying_key()));
    }

    fn arb_path() -> impl Strategy<Value = StorePath> {
        (
            any::<[u8; 20]>(),
            "[a-zA-Z0-9+_?=][a-zA-Z0-9+\\-._?=]{0,40}",
        )
            .prop_map(|(d, n)| StorePath::from_parts(d, &n).unwrap())
    }

    fn arb_narinfo() -> impl Strategy<Value = NarInfo> {
        (
            (
                arb_path(),
                "[a-z0-9]{1,8}(/[a-z0-9_-][a-z0-9._-]{0,19}){0,3}",
                "[a-z0-9]{1,8}",
            ),
            (
                proptest::option::of(any::<[u8; 32]>()),
                proptest::option::of(any::<u64>()),
            ),
            (any::<[u8; 32]>(), 1..u64::MAX),
            (
                proptest::collection::vec(arb_path(), 0..5),
                proptest::option::of(arb_path()),
            ),
            (
                proptest::collection::vec((any::<[u8; 32]>(), "[a-z.-]{1,10}"), 0..3),
                proptest::option::of("(fixed:r:sha256|text:sha256):[01][0-9a-df-np-sv-z]{51}"),
            ),
        )
            .prop_map(
                |(
                    (store_path, url, compression),
                    (fh, fs),
                    (nh, ns),
                    (references, deriver),
                    (sigs, ca),
                )| NarInfo {
                    store_path,
                    url,
                    compression,
                    file_hash: fh.map(Sha256::from_bytes),
                    file_size: fs,
                    nar_hash: Sha256::from_bytes(nh),
                    nar_size: ns,
                    references,
                    deriver,
                    sigs: sigs
                        .into_iter()
                        .map(|(seed, name)| SigningKey::from_seed(&name, seed).unwrap().sign("x"))
                        .collect(),
                    ca,
                },
            )
    }

    proptest! {
        #[test]
        fn print_parse_roundtrip(ni in arb_narinfo()) {
            let text = ni.to_string();
            prop_assert_eq!(NarInfo::parse(&text), Ok(ni));
        }

        #[test]
        fn parse_never_panics(s in "(\\PC{0,40}\n){0,12}") {
            if let Ok(ni) = NarInfo::parse(&s) {
                // Whatever is accepted prints to something that parses to the same value.
                prop_assert_eq!(NarInfo::parse(&ni.to_string()), Ok(ni));
            }
        }

        #[test]
        fn mutated_sample_never_panics(i in 0..SAMPLE.len(), b in any::<u8>()) {
            let mut bytes = SAMPLE.as_bytes().to_vec();
            bytes[i] = b;
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = NarInfo::parse(s);
            }
        }
    }
}
