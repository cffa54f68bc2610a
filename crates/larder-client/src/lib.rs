//! larder's client library: a typed client of the server's JSON API ([`api`]). The local Nix
//! store reader and the push pipeline live here too as they arrive.

pub mod api;
mod batch;
mod chunked;
pub mod import;
pub mod local_store;
mod multipart;
pub mod oidc;
pub mod push;
pub mod queue;
pub mod realisations;
pub mod retry;
mod stall;
mod upload;

pub use api::{ApiClient, ClientError};
