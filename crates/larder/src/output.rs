//! Terminal output: logging setup, error reports, human-readable sizes and times.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

pub fn init_tracing(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = crate::env::var(crate::env::LOG)
        .map(EnvFilter::new)
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let format = crate::env::var(crate::env::LOG_FORMAT);
    if json_logs() {
        builder.json().init();
    } else {
        // Colours only on a terminal: journald and files get plain text.
        let ansi = std::io::stderr().is_terminal() && crate::env::var("NO_COLOR").is_none();
        builder.with_ansi(ansi).init();
        if let Some(other) = format.filter(|f| f != "text") {
            tracing::warn!(
                "LARDER_LOG_FORMAT={other:?} is not a log format (json or text); logging text"
            );
        }
    }
}

/// Whether `LARDER_LOG_FORMAT=json` asks for every line of the log as a JSON record.
pub fn json_logs() -> bool {
    crate::env::var(crate::env::LOG_FORMAT).as_deref() == Some("json")
}

/// Print to stdout; a closed pipe (`larder … | head`) is not an error worth a message.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    print(&(serde_json::to_string_pretty(value)? + "\n"))
}

pub use larder_ops::text::{count, human_size};

/// Print an error chain and a hint; exit 1 (or the status a [`Hinted`] error asks for).
pub fn report_error(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    if json_logs() {
        // The last line of a server that stops at start, for a log shipper like the others.
        /// One record of the JSON log, as `tracing-subscriber` writes the server's others.
        #[derive(serde::Serialize)]
        struct Record {
            timestamp: String,
            level: &'static str,
            fields: Fields,
        }
        #[derive(serde::Serialize)]
        struct Fields {
            message: String,
        }
        let record = Record {
            timestamp: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            level: "ERROR",
            fields: Fields {
                message: render_error(e),
            },
        };
        // Strings and a constant serialise infallibly.
        eprintln!("{}", serde_json::to_string(&record).unwrap_or_default());
    } else {
        eprintln!("{}", render_error(e));
    }
    match e.chain().find_map(|c| c.downcast_ref::<Hinted>()) {
        Some(h) if h.status != 1 => ExitCode::from(h.status),
        _ => ExitCode::FAILURE,
    }
}

/// The text [`report_error`] prints: the error, each cause not already in the line above it,
/// and the hint.
fn render_error(e: &anyhow::Error) -> String {
    let mut msg = format!("error: {e}");
    let mut previous = e.to_string();
    for cause in causes(e) {
        // An error that already printed its cause ("cannot open x: No such file or
        // directory") does not get it again on a line of its own.
        if previous.contains(&cause) {
            continue;
        }
        msg.push_str(&format!("\n  caused by: {cause}"));
        previous = cause;
    }
    if let Some(hint) = hint_for(e) {
        msg.push_str(&format!("\nhint: {hint}"));
    }
    msg
}

/// The causes worth reading: the HTTP client's layers of wrapping ("error sending request",
/// "client error (Connect)", "tcp connect error") are replaced by their root cause
/// ("Connection refused").
fn causes(e: &anyhow::Error) -> Vec<String> {
    let mut out = Vec::new();
    let mut chain = e.chain().skip(1);
    while let Some(cause) = chain.next() {
        if cause.downcast_ref::<reqwest::Error>().is_some() {
            if let Some(root) = chain.last() {
                out.push(root.to_string());
            } else {
                out.push(cause.to_string());
            }
            break;
        }
        out.push(cause.to_string());
    }
    out
}

/// Whether an error chain is a TLS certificate refusal (rustls' words, through reqwest).
fn certificate_problem(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let text = c.to_string();
        text.contains("certificate") || text.contains("UnknownIssuer")
    })
}

fn hint_for(e: &anyhow::Error) -> Option<String> {
    for cause in e.chain() {
        if let Some(h) = cause.downcast_ref::<Hinted>() {
            return Some(h.hint.clone());
        }
        if let Some(h) = larder_ops::hint(cause) {
            return Some(h);
        }
        if let Some(ce) = cause.downcast_ref::<larder_client::ClientError>() {
            return match ce {
                larder_client::ClientError::Unreachable { url, .. }
                    if url.starts_with("https://") && certificate_problem(e) =>
                {
                    Some(format!(
                        "the certificate of {url} is not trusted: if a private CA signed it, \
                         point NIX_SSL_CERT_FILE at that CA's PEM file (Nix reads the same \
                         variable)"
                    ))
                }
                larder_client::ClientError::Unreachable { url, .. } => Some(format!(
                    "is `larder serve` running at {url}? Check the URL with `larder login` or LARDER_SERVER"
                )),
                larder_client::ClientError::Status { status: 401, .. } => Some(
                    "set a valid token: `larder login URL TOKEN`, `larder authtoken TOKEN` or LARDER_TOKEN".into(),
                ),
                larder_client::ClientError::Status { status: 403, message, .. }
                    if message.contains("is not valid for cache") =>
                {
                    Some(
                        "check the cache's name, or ask a server admin for a token for that \
                         cache (`larder token create --cache NAME`)"
                            .into(),
                    )
                }
                larder_client::ClientError::Status { status: 403, .. } => Some(
                    "ask a server admin for a token with this permission (`larder token create`)".into(),
                ),
                _ => None,
            };
        }
    }
    None
}

/// An error whose message comes with a specific hint.
#[derive(Debug)]
pub struct Hinted {
    pub msg: String,
    pub hint: String,
    /// The exit status: 1, or [`EXIT_INTERRUPTED`].
    pub status: u8,
}

/// The exit status of a run stopped by Ctrl-C: 128 + SIGINT, what shells report for a
/// process that SIGINT killed, so scripts tell it from a failure.
pub const EXIT_INTERRUPTED: u8 = 130;

impl std::fmt::Display for Hinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}
impl std::error::Error for Hinted {}

/// Fail with `msg`, adding `hint`.
pub fn fail_with_hint(msg: impl std::fmt::Display, hint: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Hinted {
        msg: msg.to_string(),
        hint: hint.into(),
        status: 1,
    })
}

/// Report a run that Ctrl-C stopped: `msg` says what it did, `hint` how to finish; the exit
/// status is [`EXIT_INTERRUPTED`].
pub fn interrupted_with_hint(
    msg: impl std::fmt::Display,
    hint: impl Into<String>,
) -> anyhow::Error {
    anyhow::Error::new(Hinted {
        msg: msg.to_string(),
        hint: hint.into(),
        status: EXIT_INTERRUPTED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_its_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let text = io.to_string();
        #[derive(Debug)]
        struct Open(std::io::Error);
        impl std::fmt::Display for Open {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "cannot open x: {}", self.0)
            }
        }
        impl std::error::Error for Open {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Open(io)).context("cannot start");
        let shown = render_error(&e);
        assert_eq!(shown.matches(&text).count(), 1, "{shown}");
        assert!(shown.contains("caused by: cannot open x"), "{shown}");
    }
}
