//! Driving the `nix` command for `larder build`, `larder pull` and `larder doctor`: its
//! version, its effective settings (`nix show-config --json`, so `NIX_CONFIG`,
//! `NIX_USER_CONF_FILES` and every include count exactly as Nix applies them), `nix build
//! --json` (which Nix 2.4+ prints with the outputs of each installable; `--dry-run` evaluates
//! without building) and what its log says was fetched and built; plus the run's log file and
//! the free space of the store (`statvfs(2)`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::shell::shell_quote;

/// What went wrong running Nix.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run `nix`: {0}")]
    Run(#[source] std::io::Error),
    /// Nix ran and failed: the last line of its error output.
    #[error("{0}")]
    Failed(String),
    #[error("cannot parse `nix show-config --json`")]
    Settings(#[source] serde_json::Error),
    #[error("nix build failed: {0}")]
    Build(String),
    #[error("nix build --json printed something else")]
    BuildOutput(#[source] serde_json::Error),
    #[error("cannot write {}", .path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free log file name in {}", .0.display())]
    NoLogName(PathBuf),
}

/// `nix --version`, e.g. `nix (Nix) 2.8.0`.
pub async fn version() -> Result<String, NixError> {
    let o = tokio::process::Command::new("nix")
        .arg("--version")
        .output()
        .await
        .map_err(NixError::Run)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    } else {
        Err(NixError::Failed(
            String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        ))
    }
}

/// Nix's effective settings, by name: each `{"value": …}` of `nix show-config --json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NixSettings(HashMap<String, Setting>);

#[derive(Debug, Clone, Deserialize)]
struct Setting {
    value: serde_json::Value,
}

impl NixSettings {
    /// Read them from `nix show-config --json` (`nix config show --json` on newer Nix).
    pub async fn read() -> Result<Self, NixError> {
        let mut last = String::new();
        for sub in [
            &["show-config", "--json"][..],
            &["config", "show", "--json"][..],
        ] {
            let o = tokio::process::Command::new("nix")
                .args(["--extra-experimental-features", "nix-command"])
                .args(sub)
                .output()
                .await
                .map_err(NixError::Run)?;
            if o.status.success() {
                return Self::parse(&o.stdout);
            }
            last = String::from_utf8_lossy(&o.stderr).trim().to_owned();
        }
        Err(NixError::Failed(last))
    }

    pub fn parse(json: &[u8]) -> Result<Self, NixError> {
        serde_json::from_slice(json).map_err(NixError::Settings)
    }

    /// A setting's value as a list (a JSON array, or a space-separated string).
    pub fn list(&self, name: &str) -> Vec<String> {
        match self.0.get(name).map(|s| &s.value) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(serde_json::Value::as_str)
                .map(str::to_owned)
                .collect(),
            Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }

    /// A setting's value when it is a string.
    pub fn string(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .and_then(|s| s.value.as_str())
            .map(str::to_owned)
    }

    /// The netrc file Nix sends credentials from (`netrc-file`, by default /etc/nix/netrc).
    pub fn netrc_file(&self) -> String {
        self.string("netrc-file")
            .unwrap_or_else(|| "/etc/nix/netrc".to_owned())
    }
}

/// Free bytes in the filesystem of the Nix store (`statvfs(2)` on /nix/store), if known.
pub fn free_bytes() -> Option<u64> {
    let st = rustix::fs::statvfs("/nix/store").ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A run's log file, shared by the tasks writing to it.
#[derive(Clone)]
pub struct Log(Arc<Mutex<std::fs::File>>);

impl Log {
    pub fn new(file: std::fs::File) -> Self {
        Log(Arc::new(Mutex::new(file)))
    }

    /// A log that keeps nothing.
    pub fn discard() -> Result<Self, NixError> {
        let path = Path::new("/dev/null");
        let f = std::fs::File::create(path).map_err(|source| NixError::Log {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::new(f))
    }

    pub fn line(&self, s: &str) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{s}");
    }
}

/// Now as `YYYYMMDD-HHMMSS` in UTC (from `humantime`), for log file names that sort by time.
pub fn stamp() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // 2026-12-05T07:40:26Z → 20261205-074026
    t.trim_end_matches('Z')
        .replace(['-', ':'], "")
        .replace('T', "-")
}

/// Create `dir/build-STAMP.log`, or `build-STAMP-2.log`, … when runs share a second.
pub fn create_log(dir: &Path) -> Result<(PathBuf, std::fs::File), NixError> {
    let stamp = stamp();
    for n in 1u32..=1000 {
        let name = match n {
            1 => format!("build-{stamp}.log"),
            _ => format!("build-{stamp}-{n}.log"),
        };
        let path = dir.join(name);
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(NixError::Log { path, source }),
        }
    }
    Err(NixError::NoLogName(dir.to_path_buf()))
}

/// A duration as the reports show it: tenths below ten seconds, then `12s`, `45m 23s`,
/// `1h 44m 38s`.
pub fn duration(secs: f64) -> String {
    // Tenths below ten seconds, so that 1.6 s is not "2s" next to a "0.1s".
    if secs < 9.95 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m {}s", s / 3600, (s / 60) % 60, s % 60),
    }
}

/// One `nix build --json --no-link -L` run.
pub struct Build<'a> {
    /// `-f FILE`: the installables are attributes of this file.
    pub file: Option<&'a Path>,
    pub installables: &'a [String],
    /// More arguments, e.g. `--dry-run` or `--option NAME VALUE`.
    pub args: Vec<String>,
    /// Where Nix's stderr goes, line by line.
    pub log: &'a Log,
    /// Whether Nix's stderr is shown on ours too.
    pub echo: bool,
}

/// What a `nix build` printed: the outputs (stdout) and its log lines (stderr).
pub struct Built {
    pub outputs: Vec<String>,
    pub log: Vec<String>,
}

#[derive(Deserialize)]
struct BuildResult {
    #[serde(default)]
    outputs: std::collections::BTreeMap<String, String>,
}

impl Build<'_> {
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("nix");
        cmd.args(["build", "--json", "--no-link", "-L"])
            .args(&self.args);
        if let Some(f) = self.file {
            cmd.arg("--file").arg(f);
        }
        cmd.args(self.installables)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Run it: the outputs, or the last error line of Nix's log.
    pub async fn run(&self) -> Result<Built, NixError> {
        let mut cmd = self.command();
        let shown: Vec<String> = cmd
            .as_std()
            .get_args()
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect();
        self.log.line(&format!("$ nix {}", shown.join(" ")));
        let mut child = cmd.spawn().map_err(NixError::Run)?;
        let stderr = child.stderr.take();
        let (log, echo) = (self.log.clone(), self.echo);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let Some(stderr) = stderr else { return all };
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                log.line(&l);
                if echo {
                    eprintln!("{l}");
                }
                all.push(l);
            }
            all
        });
        let out = child.wait_with_output().await.map_err(NixError::Run)?;
        let log = reader.await.unwrap_or_default();
        if !out.status.success() {
            let last = log
                .iter()
                .rfind(|l| l.starts_with("error") || l.contains("error:"));
            return Err(NixError::Build(
                last.map_or_else(|| "see the log".to_owned(), |l| l.to_string()),
            ));
        }
        Ok(Built {
            outputs: outputs(&out.stdout)?,
            log,
        })
    }
}

/// The output paths of `nix build --json`'s answer, in order.
fn outputs(json: &[u8]) -> Result<Vec<String>, NixError> {
    let results: Vec<BuildResult> = serde_json::from_slice(json).map_err(NixError::BuildOutput)?;
    Ok(results
        .into_iter()
        .flat_map(|r| r.outputs.into_values())
        .collect())
}

/// `these N paths will be fetched (X MiB download, …)` and `… will be built:` from Nix's
/// dry-run output: (to build, to fetch).
pub fn parse_dry_run(lines: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut build, mut fetch) = (Vec::new(), Vec::new());
    let mut section = 0;
    for l in lines {
        if l.contains("will be built") {
            section = 1;
        } else if l.contains("will be fetched") {
            section = 2;
        } else if let Some(p) = l.strip_prefix("  ").filter(|p| p.starts_with('/')) {
            match section {
                1 => build.push(p.trim().to_owned()),
                2 => fetch.push(p.trim().to_owned()),
                _ => {}
            }
        } else {
            section = 0;
        }
    }
    (build, fetch)
}

/// What a realisation's log says: the paths copied and where from (`copying path 'P' from
/// 'URL'...`), and the derivations built (`building 'D'...`).
pub fn parse_realised(lines: &[String]) -> (Vec<(String, String)>, Vec<String>) {
    let mut fetched = Vec::new();
    let mut built = Vec::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("copying path '") {
            if let Some((p, from)) = rest.split_once("' from '") {
                let from = from.trim_end_matches("'...").trim_end_matches('/');
                fetched.push((p.to_owned(), from.to_owned()));
            }
        } else if let Some(rest) = l.strip_prefix("building '") {
            built.push(rest.trim_end_matches("'...").to_owned());
        }
    }
    (fetched, built)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runs_in_the_same_second_get_their_own_log() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<PathBuf> = (0..3).map(|_| create_log(dir.path()).unwrap().0).collect();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        assert!(names[0] != names[1] && names[1] != names[2]);
        let first = names[0].file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(first.len(), "build-20261205-074026.log".len(), "{first}");
    }

    #[test]
    fn stamps_are_date_and_time() {
        let s = stamp();
        assert_eq!(s.len(), 15, "{s}");
        assert_eq!(&s[8..9], "-");
        assert!(s.chars().filter(|c| *c != '-').all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn dry_run_lists_are_parsed() {
        let l = lines(&[
            "these 2 derivations will be built:",
            "  /nix/store/a.drv",
            "  /nix/store/b.drv",
            "these 3 paths will be fetched (0.01 MiB download, 0.02 MiB unpacked):",
            "  /nix/store/x",
            "  /nix/store/y",
            "  /nix/store/z",
        ]);
        let (b, f) = parse_dry_run(&l);
        assert_eq!(b, ["/nix/store/a.drv", "/nix/store/b.drv"]);
        assert_eq!(f, ["/nix/store/x", "/nix/store/y", "/nix/store/z"]);
    }

    #[test]
    fn realised_log_says_what_was_fetched_and_built() {
        let l = lines(&[
            "copying path '/nix/store/x' from 'http://h:8080/c/'...",
            "building '/nix/store/a.drv'...",
            "other",
        ]);
        let (fetched, built) = parse_realised(&l);
        assert_eq!(
            fetched,
            [("/nix/store/x".to_owned(), "http://h:8080/c".to_owned())]
        );
        assert_eq!(built, ["/nix/store/a.drv"]);
    }

    #[test]
    fn build_outputs_and_settings_are_read() {
        let out = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"out":"/nix/store/a","dev":"/nix/store/a-dev"}}]"#;
        assert_eq!(outputs(out).unwrap(), ["/nix/store/a-dev", "/nix/store/a"]);
        let s = NixSettings::parse(
            br#"{"substituters":{"value":["https://a","https://b"]},"trusted-public-keys":{"value":"k1 k2"},"netrc-file":{"value":"/n"}}"#,
        )
        .unwrap();
        assert_eq!(s.list("substituters"), ["https://a", "https://b"]);
        assert_eq!(s.list("trusted-public-keys"), ["k1", "k2"]);
        assert_eq!(s.netrc_file(), "/n");
        assert!(s.list("missing").is_empty());
        assert_eq!(NixSettings::default().netrc_file(), "/etc/nix/netrc");
    }

    #[test]
    fn durations_read_like_the_seed() {
        assert_eq!(duration(2723.0), "45m 23s");
        assert_eq!(duration(6278.0), "1h 44m 38s");
        assert_eq!(duration(5.2), "5.2s");
        assert_eq!(duration(1.6), "1.6s");
        assert_eq!(duration(0.1), "0.1s");
        assert_eq!(duration(12.4), "12s");
    }
}
