//! Tokens: `POST /tokens` ([`CreateToken`]) and what `GET /tokens` lists ([`Token`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Perm;

/// `POST /tokens` (server admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub perms: Vec<Perm>,
    /// null: every cache. Each cache named must exist.
    pub caches: Option<Vec<String>>,
    /// Lifetime such as "30d" (more than 0); null: never expires.
    pub expires_in: Option<String>,
    #[serde(default)]
    pub label: String,
}

/// A token as the API shows it (never its secret, except once to whoever created it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub label: String,
    pub perms: Vec<Perm>,
    /// null: every cache.
    pub caches: Option<Vec<String>>,
    /// Caches it was scoped to that were deleted since: that scope ended with the cache; a
    /// cache created later under the same name is not in it.
    #[serde(default)]
    pub deleted_caches: Vec<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    /// The secret, only in the answer that created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_sent_only_when_there_is_one() {
        let mut t = Token {
            id: "i".into(),
            label: String::new(),
            perms: vec![Perm::Pull, Perm::Push],
            caches: None,
            deleted_caches: vec![],
            expires_at: None,
            revoked_at: None,
            created_at: 1,
            token: None,
        };
        assert!(!serde_json::to_string(&t).unwrap().contains("\"token\""));
        t.token = Some("larder_x".into());
        let back: Token = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let sudo = r#"{"perms":["sudo"],"caches":null,"expires_in":null}"#;
        assert!(serde_json::from_str::<CreateToken>(sudo).is_err());
    }
}
