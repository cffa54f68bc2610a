//! larder's client workflows: what the verbs of the `larder` binary do beyond parsing
//! arguments and printing, each testable without spawning the binary.
//!
//! [`larder_client`] is the mechanism (the HTTP API, the local store reader, the push
//! pipeline) that any program could use; this crate is the policy of larder's own verbs on
//! the user's machine: it edits nix.conf and netrc files ([`nixconf`], [`use_cache`]), runs the push daemon
//! and speaks its socket protocol ([`daemon`]), watches the store ([`watch`]), drives `nix
//! build` ([`nix`]), and gathers doctor's checks ([`doctor`]). Errors are typed
//! (`thiserror`); those that come with a fix say it through [`hint`], which the binary prints.

pub mod daemon;
pub mod doctor;
pub mod nix;
pub mod nixconf;
pub mod plan;
pub mod pull;
pub mod pusher;
pub mod shell;
pub mod signals;
pub mod text;
pub mod use_cache;
pub mod watch;
pub mod xdg;

/// The fix to try for `e`, when it is one of this crate's errors that knows one.
pub fn hint(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(e) = e.downcast_ref::<pusher::PusherError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<daemon::DaemonError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<watch::WatchError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<pull::PullError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<plan::PlanError>() {
        return e.hint();
    }
    if let Some(e) = e.downcast_ref::<use_cache::UseError>() {
        return e.hint();
    }
    None
}
