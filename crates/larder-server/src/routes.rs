//! A router that records its own routes.
//!
//! axum's `Router` cannot list what it serves, yet two things need that list: `/metrics`
//! labels requests by route pattern (a fixed set, so the label's cardinality is bounded), and
//! the OpenAPI test compares the JSON API's routes with the document. Every route is therefore
//! added through [`Routes`], which registers it with axum and records `(method, pattern)` in
//! the same call, so the table cannot drift from the router.

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{self, MethodRouter};
use axum::Router;

use crate::AppState;

/// One route: a method and a path pattern as axum spells it (`/caches/{cache}`), which is
/// also OpenAPI's spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub method: Method,
    pub path: String,
}

/// A router under construction and the table of what it serves. `GET` routes also answer
/// `HEAD` (axum does that); the table lists them as `GET` only.
pub struct Routes {
    router: Router<AppState>,
    table: Vec<Route>,
}

impl Default for Routes {
    fn default() -> Self {
        Routes::new()
    }
}

impl Routes {
    pub fn new() -> Routes {
        Routes {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    fn add(mut self, method: Method, path: &str, endpoint: MethodRouter<AppState>) -> Routes {
        // axum merges the method routers of one path (and panics on a duplicate method).
        self.router = self.router.route(path, endpoint);
        self.table.push(Route {
            method,
            path: path.to_owned(),
        });
        self
    }

    pub fn get<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.add(Method::GET, path, routing::get(handler))
    }
    pub fn post<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.add(Method::POST, path, routing::post(handler))
    }
    pub fn put<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.add(Method::PUT, path, routing::put(handler))
    }
    pub fn patch<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.add(Method::PATCH, path, routing::patch(handler))
    }
    pub fn delete<H: Handler<T, AppState>, T: 'static>(self, path: &str, handler: H) -> Routes {
        self.add(Method::DELETE, path, routing::delete(handler))
    }

    /// Serve `inner` under `prefix` (its table entries get the prefix).
    pub fn nest(mut self, prefix: &str, inner: Routes) -> Routes {
        self.router = self.router.nest(prefix, inner.router);
        self.table.extend(inner.table.into_iter().map(|r| Route {
            method: r.method,
            path: format!("{prefix}{}", r.path),
        }));
        self
    }

    pub fn merge(mut self, other: Routes) -> Routes {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }

    /// What answers a request no route matches.
    pub fn fallback<H: Handler<T, AppState>, T: 'static>(mut self, handler: H) -> Routes {
        self.router = self.router.fallback(handler);
        self
    }

    pub fn table(&self) -> &[Route] {
        &self.table
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }
}
