//! Realisations of content-addressed derivations: the `realisations/<id>.doi` files of a
//! binary cache ("derivation output info").
//!
//! Follows `DrvOutput` and `Realisation` in Nix 2.8's
//! [`src/libstore/realisation.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/realisation.cc):
//! - an output id is `sha256:<drv hash, base16>!<output name>` (`DrvOutput::to_string`, with
//!   `strHash()` printing the derivation's hash modulo in base16 with its type);
//! - the file is `Realisation::toJSON().dump()`: one JSON object with `id`, `outPath` (a store
//!   path's base name), `signatures` (a sorted array) and `dependentRealisations` (an object
//!   from output ids to out paths: the input derivations' outputs this output references);
//! - the signed fingerprint is the same JSON without `signatures`, dumped by nlohmann's
//!   default `json` (keys in sorted order, no whitespace):
//!   `{"dependentRealisations":{…},"id":"sha256:…!out","outPath":"…"}`.
//!
//! Parsing is as lenient as Nix's `Realisation::fromJSON` about what it ignores (unknown
//! fields; missing `signatures` or `dependentRealisations`) and strict about every value it
//! keeps: ids, store paths and signatures are validated, so that what is printed again is
//! exactly what Nix would print.

use std::collections::BTreeMap;
use std::fmt;

use crate::hash::Sha256;
use crate::signing::{KeyError, Signature, SigningKey, VerifyingKey};
use crate::store_path::{validate_name, StorePath, StorePathError};
use crate::util::shorten;

/// Most signatures a realisation may carry.
pub const MAX_SIGNATURES: usize = 64;
/// Most dependent realisations a realisation may list.
pub const MAX_DEPENDENCIES: usize = 4096;

/// Why a realisation or an output id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealisationError {
    /// An output id without `!`.
    #[error("derivation output id {id:?} is not of the form sha256:<hash>!<output>")]
    MissingBang {
        /// The id (shortened).
        id: String,
    },
    /// The hash part of an output id.
    #[error("derivation output id {id:?} has an invalid hash")]
    Hash {
        /// The id (shortened).
        id: String,
        /// Why the hash was refused.
        #[source]
        source: crate::hash::HashError,
    },
    /// The output name of an output id.
    #[error("derivation output id {id:?} has an invalid output name")]
    OutputName {
        /// The id (shortened).
        id: String,
        /// Why the name was refused.
        #[source]
        source: StorePathError,
    },
    /// Not JSON, or not an object.
    #[error("realisation is not a JSON object: {reason}")]
    Json {
        /// What the JSON parser said.
        reason: String,
    },
    /// A required field is absent.
    #[error("realisation has no {field:?} field")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field of the wrong JSON type.
    #[error("realisation field {field:?} must be {expected}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },
    /// An out path that is not a store path's base name.
    #[error("realisation field {field:?} holds an invalid store path {value:?}")]
    StorePath {
        /// The field.
        field: &'static str,
        /// The value (shortened).
        value: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// A signature that is not `name:base64`.
    #[error("realisation has an invalid signature")]
    Signature(#[source] KeyError),
    /// Too many signatures or dependencies.
    #[error("realisation has {count} {what}; at most {max} are accepted")]
    TooMany {
        /// `"signatures"` or `"dependent realisations"`.
        what: &'static str,
        /// How many it has.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// A derivation output: the derivation's hash modulo and an output name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrvOutput {
    /// The canonical spelling, `sha256:<base16>!<output>` (what orders and prints it).
    text: String,
    output_at: usize,
}

impl DrvOutput {
    /// Parse `sha256:<hash>!<output>`; the hash may be in any spelling Nix accepts with its
    /// type (`Hash::parseAnyPrefixed`), and is printed back in base16.
    pub fn parse(s: &str) -> Result<Self, RealisationError> {
        let (hash, output) = s
            .split_once('!')
            .ok_or_else(|| RealisationError::MissingBang { id: shorten(s) })?;
        if !hash.starts_with("sha256:") && !hash.starts_with("sha256-") {
            return Err(RealisationError::Hash {
                id: shorten(s),
                source: crate::hash::HashError::WrongLength {
                    input: shorten(hash),
                    len: hash.len(),
                    expected: "a sha256: prefix",
                },
            });
        }
        let hash = Sha256::parse(hash).map_err(|source| RealisationError::Hash {
            id: shorten(s),
            source,
        })?;
        validate_name(output).map_err(|source| RealisationError::OutputName {
            id: shorten(s),
            source,
        })?;
        Ok(Self::new(&hash, output))
    }

    fn new(hash: &Sha256, output: &str) -> Self {
        let prefix = format!("sha256:{}!", hash.to_hex());
        Self {
            output_at: prefix.len(),
            text: prefix + output,
        }
    }

    /// The output name (`out`, `dev`, …).
    pub fn output(&self) -> &str {
        self.text.get(self.output_at..).unwrap_or_default()
    }

    /// The derivation's hash part, `sha256:<base16>`.
    pub fn drv_hash(&self) -> &str {
        self.text
            .get(..self.output_at.saturating_sub(1))
            .unwrap_or_default()
    }

    /// `sha256:<base16>!<output>`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for DrvOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DrvOutput({})", self.text)
    }
}

/// A realisation: which store path a derivation output was built to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    pub id: DrvOutput,
    pub out_path: StorePath,
    /// Signatures, kept sorted by their text and without duplicates (Nix's `StringSet`).
    pub signatures: Vec<Signature>,
    /// The realisations of input derivations whose out paths `out_path` references.
    pub dependent_realisations: BTreeMap<DrvOutput, StorePath>,
}

impl Realisation {
    /// Parse a `.doi` file.
    pub fn parse(json: &[u8]) -> Result<Self, RealisationError> {
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| RealisationError::Json {
                reason: e.to_string(),
            })?;
        let serde_json::Value::Object(obj) = value else {
            return Err(RealisationError::Json {
                reason: "the top level is not an object".into(),
            });
        };
        let string = |field: &'static str| -> Result<&str, RealisationError> {
            match obj.get(field) {
                None => Err(RealisationError::MissingField { field }),
                Some(serde_json::Value::String(s)) => Ok(s),
                Some(_) => Err(RealisationError::WrongType {
                    field,
                    expected: "a string",
                }),
            }
        };
        let id = DrvOutput::parse(string("id")?)?;
        let out_path = store_path("outPath", string("outPath")?)?;
        let mut realisation = Realisation {
            id,
            out_path,
            signatures: Vec::new(),
            dependent_realisations: BTreeMap::new(),
        };
        match obj.get("signatures") {
            None => {}
            Some(serde_json::Value::Array(sigs)) => {
                if sigs.len() > MAX_SIGNATURES {
                    return Err(RealisationError::TooMany {
                        what: "signatures",
                        count: sigs.len(),
                        max: MAX_SIGNATURES,
                    });
                }
                for sig in sigs {
                    let serde_json::Value::String(sig) = sig else {
                        return Err(RealisationError::WrongType {
                            field: "signatures",
                            expected: "an array of strings",
                        });
                    };
                    realisation
                        .add_signature(Signature::parse(sig).map_err(RealisationError::Signature)?);
                }
            }
            Some(_) => {
                return Err(RealisationError::WrongType {
                    field: "signatures",
                    expected: "an array of strings",
                })
            }
        }
        match obj.get("dependentRealisations") {
            None => {}
            Some(serde_json::Value::Object(deps)) => {
                if deps.len() > MAX_DEPENDENCIES {
                    return Err(RealisationError::TooMany {
                        what: "dependent realisations",
                        count: deps.len(),
                        max: MAX_DEPENDENCIES,
                    });
                }
                for (dep, path) in deps {
                    let serde_json::Value::String(path) = path else {
                        return Err(RealisationError::WrongType {
                            field: "dependentRealisations",
                            expected: "an object of strings",
                        });
                    };
                    realisation.dependent_realisations.insert(
                        DrvOutput::parse(dep)?,
                        store_path("dependentRealisations", path)?,
                    );
                }
            }
            Some(_) => {
                return Err(RealisationError::WrongType {
                    field: "dependentRealisations",
                    expected: "an object",
                })
            }
        }
        Ok(realisation)
    }

    /// Add a signature, keeping the set sorted and free of duplicates.
    pub fn add_signature(&mut self, sig: Signature) {
        let text = sig.to_string();
        match self
            .signatures
            .binary_search_by(|s| s.to_string().cmp(&text))
        {
            Ok(_) => {}
            Err(at) => self.signatures.insert(at, sig),
        }
    }

    /// The `.doi` file as Nix writes it (`toJSON().dump()`).
    pub fn to_json(&self) -> String {
        self.dump(true)
    }

    /// What a signature signs: the JSON without `signatures`.
    pub fn fingerprint(&self) -> String {
        self.dump(false)
    }

    /// Sign with `key` (replacing no other signature).
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(&self.fingerprint());
        self.add_signature(sig);
    }

    /// Whether one of the signatures is `key`'s valid signature of this realisation.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let fp = self.fingerprint();
        self.signatures.iter().any(|s| key.verify(&fp, s))
    }

    /// nlohmann's `dump()` of a `json` object: keys sorted (`std::map`), no whitespace.
    fn dump(&self, with_signatures: bool) -> String {
        let mut out = String::from("{\"dependentRealisations\":{");
        for (i, (dep, path)) in self.dependent_realisations.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, dep.as_str());
            out.push(':');
            push_json_string(&mut out, &path.basename());
        }
        out.push_str("},\"id\":");
        push_json_string(&mut out, self.id.as_str());
        out.push_str(",\"outPath\":");
        push_json_string(&mut out, &self.out_path.basename());
        if with_signatures {
            out.push_str(",\"signatures\":[");
            for (i, sig) in self.signatures.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(&mut out, &sig.to_string());
            }
            out.push(']');
        }
        out.push('}');
        out
    }
}

fn store_path(field: &'static str, value: &str) -> Result<StorePath, RealisationError> {
    StorePath::from_basename(value).map_err(|source| RealisationError::StorePath {
        field,
        value: shorten(value),
        source,
    })
}

/// A JSON string as nlohmann and serde_json both escape it (`"`, `\` and control characters;
/// everything else, non-ASCII included, as is).
fn push_json_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a `str` cannot fail; keep the output valid JSON regardless.
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "sha256:6e9b5e0f1c4a5c7b0d3e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c";
    const OUT: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-ca-top";
    const DEP: &str = "1mdqa9w1p6cmli6976v4wi0sw9r4p5pr-ca-dep";

    fn doc() -> String {
        format!(
            r#"{{"dependentRealisations":{{"{HASH}!out":"{DEP}"}},"id":"{HASH}!out","outPath":"{OUT}","signatures":[]}}"#
        )
    }

    #[test]
    fn round_trip_is_byte_exact() {
        let r = Realisation::parse(doc().as_bytes()).expect("parses");
        assert_eq!(r.to_json(), doc());
        assert_eq!(r.id.output(), "out");
        assert_eq!(r.id.drv_hash(), HASH);
        assert_eq!(
            r.fingerprint(),
            format!(
                r#"{{"dependentRealisations":{{"{HASH}!out":"{DEP}"}},"id":"{HASH}!out","outPath":"{OUT}"}}"#
            )
        );
    }

    #[test]
    fn ids_are_printed_in_base16() {
        let hex = HASH.trim_start_matches("sha256:");
        let h = Sha256::parse(hex).expect("hex");
        let id = DrvOutput::parse(&format!("{}!dev", h.to_typed_nix32())).expect("nix32");
        assert_eq!(id.as_str(), format!("{HASH}!dev"));
        for bad in [
            "nobang",
            "sha256:abc!out",
            "md5:00!out",
            &format!("{HASH}!"),
            &format!("{HASH}!a/b"),
            &format!("{hex}!out"),
        ] {
            assert!(DrvOutput::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sign_and_verify() {
        let key = SigningKey::from_seed("test-1", [7; 32]).expect("key");
        let other = SigningKey::from_seed("test-1", [8; 32]).expect("key");
        let mut r = Realisation::parse(doc().as_bytes()).expect("parses");
        r.sign(&key);
        assert!(r.verify(&key.verifying_key()));
        assert!(!r.verify(&other.verifying_key()));
        let again = Realisation::parse(r.to_json().as_bytes()).expect("parses");
        assert!(again.verify(&key.verifying_key()));
        // Changing the out path breaks the signature.
        let mut tampered = again.clone();
        tampered.out_path = StorePath::from_basename(DEP).expect("path");
        assert!(!tampered.verify(&key.verifying_key()));
    }

    #[test]
    fn rejects_bad_documents_without_panicking() {
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"id":1,"outPath":"x"}"#,
            &format!(r#"{{"id":"{HASH}!out"}}"#),
            &format!(r#"{{"id":"{HASH}!out","outPath":"/nix/store/{OUT}"}}"#),
            &format!(r#"{{"id":"{HASH}!out","outPath":"{OUT}","signatures":"x"}}"#),
            &format!(r#"{{"id":"{HASH}!out","outPath":"{OUT}","signatures":["nocolon"]}}"#),
            &format!(r#"{{"id":"{HASH}!out","outPath":"{OUT}","dependentRealisations":[]}}"#),
            &format!(
                r#"{{"id":"{HASH}!out","outPath":"{OUT}","dependentRealisations":{{"x":"{DEP}"}}}}"#
            ),
        ] {
            assert!(Realisation::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        // Optional fields may be missing; unknown ones are ignored, as by Nix.
        let r = Realisation::parse(
            format!(r#"{{"id":"{HASH}!out","outPath":"{OUT}","extra":true}}"#).as_bytes(),
        )
        .expect("parses");
        assert!(r.signatures.is_empty() && r.dependent_realisations.is_empty());
    }
}
