//! The OpenAPI 3.1 document of the JSON API, served at `/api/v1/openapi.json`.
//!
//! Its schemas are generated from `larder-api`'s types (`larder_api::Schemas`), the types the
//! handlers answer with and the client sends, so a field cannot change without the document
//! changing with it. Its operations (paths, parameters, statuses and their descriptions) are
//! written in `openapi-paths.json`, which refers to those schemas by name. `tests/openapi.rs`
//! keeps both true: every route is documented, every schema referred to exists, and real
//! answers and the client's requests match the schemas.

use std::sync::OnceLock;

use serde_json::Value;
use utoipa::OpenApi as _;

/// The operations, written by hand; its `components.schemas` holds only what no type
/// describes (the document itself).
const OPERATIONS: &str = include_str!("openapi-paths.json");

/// The whole document as JSON text, built once.
pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| build().to_string())
}

fn build() -> Value {
    // Both halves are compiled in: neither can fail to parse or serialise once the tests pass,
    // and a broken document is served as one (the tests say which) rather than panicking.
    let mut doc: Value = serde_json::from_str(OPERATIONS).unwrap_or(Value::Null);
    let generated = larder_api::Schemas::openapi()
        .components
        .map(|c| serde_json::to_value(c.schemas).unwrap_or(Value::Null));
    if let (Some(Value::Object(generated)), Some(Value::Object(schemas))) =
        (generated, doc.pointer_mut("/components/schemas"))
    {
        for (name, schema) in generated {
            schemas.entry(name).or_insert(schema);
        }
    }
    doc
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn the_document_holds_the_generated_schemas_and_every_reference_resolves() {
        let doc: Value = serde_json::from_str(openapi_json()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("Cache") && schemas.contains_key("OpenApi"));
        let text = openapi_json();
        for r in text.split("#/components/schemas/").skip(1) {
            let name: String = r.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "dangling $ref {name}");
        }
    }
}
