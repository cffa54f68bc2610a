//! CI identity: `POST /oidc/exchange` ([`OidcExchange`]) trades an OIDC ID token (GitHub
//! Actions, GitLab CI, Forgejo, …) for a short-lived larder token; the answer is a [`Token`]
//! with its secret.
//!
//! [`Token`]: crate::Token

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /oidc/exchange`: needs no larder token; the ID token is the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcExchange {
    /// The ID token (a JWT signed by an issuer the server trusts), as the CI hands it out.
    pub token: String,
    /// Only these caches, of those the matching rules grant (e.g. the one cache a push goes
    /// to); null: every cache the rules grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caches: Option<Vec<String>>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn caches_are_optional_and_nothing_else_is_accepted() {
        let e: OidcExchange = serde_json::from_str(r#"{"token":"a.b.c"}"#).unwrap();
        assert_eq!(e.caches, None);
        assert!(serde_json::from_str::<OidcExchange>(r#"{"token":"t","perm":"admin"}"#).is_err());
    }
}
