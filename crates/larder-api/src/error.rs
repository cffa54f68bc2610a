//! Errors on the wire: every 4xx and 5xx answer of the JSON API has this body.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What failed, for a person (5xx bodies say nothing about the server's internals).
    pub error: String,
    /// Only on a refused path deletion: every store path that references the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrers: Option<Vec<String>>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            referrers: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn the_body_is_as_the_server_always_sent_it() {
        assert_eq!(
            serde_json::to_string(&ErrorBody::new("no")).unwrap(),
            r#"{"error":"no"}"#
        );
        let refused = ErrorBody {
            error: "referenced".into(),
            referrers: Some(vec!["/nix/store/a".into()]),
        };
        assert_eq!(
            serde_json::to_string(&refused).unwrap(),
            r#"{"error":"referenced","referrers":["/nix/store/a"]}"#
        );
    }
}
