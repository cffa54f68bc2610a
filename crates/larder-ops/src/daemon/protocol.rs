//! The daemon's socket protocol: one JSON object per line each way, as typed messages.
//!
//! - [`Request::Push`] `{"op":"push","paths":[…],"wait":false}` → [`Reply::Queued`]
//!   `{"ok":true,"queued":N}`; with `"wait":true` then [`Reply::Progress`] lines
//!   `{"progress":{"done":D,"failed":F,"total":N}}` and a final [`Reply::Finished`]
//!   `{"ok":BOOL,"done":D,"failures":[{"path":…,"error":…}]}`.
//! - [`Request::Status`] `{"op":"status"}` → [`Reply::Counts`]
//!   `{"ok":true,"cache":…,"queued":Q,"done":D,"failed":F}`.
//! - [`Request::Stop`] `{"op":"stop"}` → the daemon stops taking pushes, drains the queue,
//!   replies [`Reply::Counts`] (without `cache`) and exits.
//! - Any request can be answered [`Reply::Refused`] `{"ok":false,"error":…}`.

use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Queue store paths (absolute); with `wait`, report until they are pushed.
    Push {
        #[serde(default)]
        paths: Vec<String>,
        #[serde(default)]
        wait: bool,
    },
    Status,
    Stop,
}

/// What the daemon answers. Replies are told apart by their fields (the wire format has no
/// tag), so the variants are listed most specific first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The request was not carried out.
    Refused { ok: bool, error: String },
    /// How far a waited-for push is.
    Progress { progress: Progress },
    /// A waited-for push is over: `ok` when no path failed.
    Finished {
        ok: bool,
        done: u64,
        failures: Vec<Failure>,
    },
    /// The queue's entries by state (status, and the reply to stop).
    Counts(Counts),
    /// The paths are on disk in the queue.
    Queued { ok: bool, queued: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub failed: u64,
    pub total: u64,
}

/// A path that did not get pushed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

/// The queue's entries by state; `cache` when a running daemon says where it pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    pub queued: u64,
    pub done: u64,
    pub failed: u64,
}

impl Counts {
    pub fn new(cache: Option<String>, c: larder_client::queue::Counts) -> Self {
        Self {
            ok: true,
            cache,
            queued: c.queued,
            done: c.done,
            failed: c.failed,
        }
    }
}

impl Reply {
    pub fn refused(error: impl Into<String>) -> Self {
        Reply::Refused {
            ok: false,
            error: error.into(),
        }
    }
}

/// A message as its line on the socket, newline included.
pub fn encode(message: &impl Serialize) -> String {
    // Serialising these types cannot fail: no maps with non-string keys, no foreign types.
    let mut line = serde_json::to_string(message).unwrap_or_default();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        serde_json::from_str(encode(v).trim_end()).unwrap()
    }

    #[test]
    fn requests_are_the_documented_lines() {
        let push = Request::Push {
            paths: vec!["/nix/store/a".into()],
            wait: true,
        };
        assert_eq!(
            encode(&push),
            "{\"op\":\"push\",\"paths\":[\"/nix/store/a\"],\"wait\":true}\n"
        );
        assert_eq!(encode(&Request::Status), "{\"op\":\"status\"}\n");
        assert_eq!(encode(&Request::Stop), "{\"op\":\"stop\"}\n");
        assert_eq!(round_trip(&push), push);
        // `wait` may be left out.
        let r: Request = serde_json::from_str(r#"{"op":"push","paths":[]}"#).unwrap();
        assert_eq!(
            r,
            Request::Push {
                paths: vec![],
                wait: false
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"dance"}"#).is_err());
    }

    #[test]
    fn replies_are_the_documented_lines_and_read_back_as_themselves() {
        let cases = [
            (
                Reply::refused("unknown op"),
                r#"{"ok":false,"error":"unknown op"}"#,
            ),
            (
                Reply::Queued {
                    ok: true,
                    queued: 3,
                },
                r#"{"ok":true,"queued":3}"#,
            ),
            (
                Reply::Progress {
                    progress: Progress {
                        done: 1,
                        failed: 0,
                        total: 3,
                    },
                },
                r#"{"progress":{"done":1,"failed":0,"total":3}}"#,
            ),
            (
                Reply::Finished {
                    ok: false,
                    done: 2,
                    failures: vec![Failure {
                        path: "/nix/store/x".into(),
                        error: "gone".into(),
                    }],
                },
                r#"{"ok":false,"done":2,"failures":[{"path":"/nix/store/x","error":"gone"}]}"#,
            ),
            (
                Reply::Counts(Counts {
                    ok: true,
                    cache: Some("c".into()),
                    queued: 0,
                    done: 5,
                    failed: 1,
                }),
                r#"{"ok":true,"cache":"c","queued":0,"done":5,"failed":1}"#,
            ),
            (
                Reply::Counts(Counts {
                    ok: true,
                    cache: None,
                    queued: 0,
                    done: 5,
                    failed: 1,
                }),
                r#"{"ok":true,"queued":0,"done":5,"failed":1}"#,
            ),
        ];
        for (reply, line) in cases {
            assert_eq!(encode(&reply), format!("{line}\n"));
            assert_eq!(round_trip(&reply), reply, "{line}");
        }
    }
}
