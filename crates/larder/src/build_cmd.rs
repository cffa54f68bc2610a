//! `larder build` (the seed's `cachix-build-all`) and `larder pull` (the seed's
//! `cachix-pull`): build installables and push their closures with a per-installable report,
//! and realise installables from a cache with a report of what was fetched and what built.
//!
//! Both drive the `nix` command (`nix build --json`, which Nix 2.4+ prints with the outputs of
//! each installable; `--dry-run --json` evaluates without building). Installables are flake
//! references (`.#homeConfigurations.host.activationPackage`, `path:/dir#pkg`) or, with
//! `-f FILE`, attributes of a Nix file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use larder_client::local_store::PathInfo;
use larder_client::push::{Observer, Outcome};
use larder_nix::narinfo::NarInfo;
use larder_nix::store_path::StorePath;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::output::{count, fail_with_hint, human_size, print};
use crate::pusher::Pusher;

/// Below this much free space in the store a build run warns.
const MIN_FREE_BYTES: u64 = 1 << 30;
const RULE: &str = "━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━";

#[derive(clap::Args)]
pub struct BuildArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE). [default, with no
    /// argument at all: `cache` and `build` of ./larder.toml]
    cache: Option<String>,
    /// What to build, in turn: flake references (`.#homeConfigurations.shoshin.activationPackage`)
    /// or, with -f, attribute paths. [default: `.`, the flake's default package]
    installables: Vec<String>,
    /// Take the installables as attributes of this Nix file (like `nix build -f`).
    #[arg(short = 'f', long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Show what would be built and pushed; build and push nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stream Nix's build log to the terminal (it always goes to the log file).
    #[arg(short, long)]
    verbose: bool,
    /// Where to write the run's log. [default: $XDG_CACHE_HOME/larder/builds]
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Print one JSON object per installable, then a summary object, instead of the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nix: NixFlags,
}

/// Nix options `build` and `pull` pass through to `nix build`, as a flake or a home-manager
/// configuration may need them.
#[derive(clap::Args, Debug, Default)]
pub struct NixFlags {
    /// Passed to Nix: evaluate in impure mode (`nix build --impure`), e.g. for a flake that
    /// reads the environment or a path outside it.
    #[arg(long)]
    impure: bool,
    /// Passed to Nix: `--arg NAME EXPR`, an argument of the file's function (repeatable).
    #[arg(long, num_args = 2, value_names = ["NAME", "EXPR"], action = clap::ArgAction::Append)]
    arg: Vec<String>,
    /// Passed to Nix: `--argstr NAME STRING`, a string argument (repeatable).
    #[arg(long, num_args = 2, value_names = ["NAME", "STRING"], action = clap::ArgAction::Append)]
    argstr: Vec<String>,
    /// Passed to Nix: `--option NAME VALUE`, a Nix setting for this run (repeatable).
    #[arg(long, num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    option: Vec<String>,
}

impl NixFlags {
    /// The options as `nix build` arguments.
    fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.impure {
            out.push("--impure".to_owned());
        }
        for (flag, values) in [
            ("--arg", &self.arg),
            ("--argstr", &self.argstr),
            ("--option", &self.option),
        ] {
            for pair in values.chunks(2) {
                out.push(flag.to_owned());
                out.extend(pair.iter().cloned());
            }
        }
        out
    }
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE). [default, with no
    /// argument at all: `cache` and `pull` of ./larder.toml]
    cache: Option<String>,
    /// What to realise: flake references or, with -f, attribute paths.
    installables: Vec<String>,
    /// Take the installables as attributes of this Nix file (like `nix build -f`).
    #[arg(short = 'f', long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Report what would be fetched and built; realise nothing.
    #[arg(long)]
    dry_run: bool,
    /// Show Nix's build logs.
    #[arg(short, long)]
    verbose: bool,
    /// Print the plan and the result as JSON objects (one per line) instead of the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    nix: NixFlags,
    /// A command to run after a successful pull, e.g. `-- home-manager switch --flake .#host`.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `./larder.toml`: what `larder build` and `larder pull` do when given no argument at all, so
/// that the daily job is one word (the Cachix guide's `cachix-build-all` and `cachix-pull`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    /// The cache (CACHE, SERVER:CACHE or its URL).
    cache: String,
    /// A Nix file whose attributes the installables are (like `-f`).
    file: Option<PathBuf>,
    /// What `larder build` builds.
    #[serde(default)]
    build: Vec<String>,
    /// What `larder pull` realises.
    #[serde(default)]
    pull: Vec<String>,
}

const DEFAULTS_FILE: &str = "larder.toml";

/// The cache, installables and file to use: the arguments, or with none at all, the
/// defaults of `./larder.toml` for `verb`.
fn with_defaults(
    cache: &Option<String>,
    installables: &[String],
    file: &Option<PathBuf>,
    verb: &str,
) -> anyhow::Result<(String, Vec<String>, Option<PathBuf>)> {
    if let Some(cache) = cache {
        return Ok((cache.clone(), installables.to_vec(), file.clone()));
    }
    let example = format!(
        "give the cache (`larder {verb} CACHE INSTALLABLE…`), or write ./{DEFAULTS_FILE}, e.g.\n  \
         cache = \"modular-workspace\"\n  build = [\".#homeConfigurations.shoshin.activationPackage\"]\n  \
         pull = [\".#homeConfigurations.gyakusatsu.activationPackage\"]"
    );
    let text = match std::fs::read_to_string(DEFAULTS_FILE) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail_with_hint(
                format!("no cache given and no ./{DEFAULTS_FILE} here"),
                example,
            ))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read ./{DEFAULTS_FILE}")),
    };
    let d: Defaults =
        toml::from_str(&text).with_context(|| format!("invalid ./{DEFAULTS_FILE}"))?;
    let installables = if verb == "pull" { d.pull } else { d.build };
    if verb == "pull" && installables.is_empty() {
        return Err(fail_with_hint(
            format!("./{DEFAULTS_FILE} names nothing to pull (`pull = [...]`)"),
            example,
        ));
    }
    Ok((d.cache, installables, d.file.or_else(|| file.clone())))
}

/// The human report, or (with `--json`) JSON objects one per line.
struct Report {
    json: bool,
}

impl Report {
    fn text(&self, s: &str) -> anyhow::Result<()> {
        if self.json {
            Ok(())
        } else {
            print(s)
        }
    }

    fn event(&self, v: serde_json::Value) -> anyhow::Result<()> {
        if self.json {
            print(&format!("{v}\n"))
        } else {
            Ok(())
        }
    }
}

/// A run's log file.
#[derive(Clone)]
struct Log(Arc<Mutex<std::fs::File>>);

impl Log {
    fn line(&self, s: &str) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(f, "{s}");
    }
}

fn cache_home() -> anyhow::Result<PathBuf> {
    Ok(match crate::env::var("XDG_CACHE_HOME") {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(
            crate::env::var("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    })
}

/// Local time as `YYYYMMDD-HHMMSS` (from `date`, which knows the time zone).
fn stamp() -> String {
    std::process::Command::new("date")
        .arg("+%Y%m%d-%H%M%S")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() == 15)
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string()
        })
}

/// `arg` as a shell would need it typed (the log's commands can be pasted).
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:#=@+,-".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Create `dir/build-STAMP.log`, or `build-STAMP-2.log`, … when runs share a second.
fn create_log(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
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
            Err(e) => return Err(e).with_context(|| format!("cannot write {}", path.display())),
        }
    }
    anyhow::bail!("no free log file name in {}", dir.display())
}

fn duration(secs: f64) -> String {
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

/// Ask the cache for a narinfo with the credentials Nix will send (its `netrc-file` entry for
/// the host, if any), before a plan that would otherwise report a private cache Nix cannot
/// read as a cache miss: an absent path is 404 to whoever may read the cache, 401/403 to
/// anyone else.
async fn nix_can_read(
    conf: &serde_json::Value,
    url: &str,
    cache: &str,
    arg: &str,
) -> anyhow::Result<()> {
    let netrc = conf["netrc-file"]["value"]
        .as_str()
        .unwrap_or("/etc/nix/netrc")
        .to_owned();
    let host = crate::nixconf::url_host(url).unwrap_or_default();
    let entry = crate::nixconf::read_optional(Path::new(&netrc))
        .and_then(|text| crate::nixconf::netrc_lookup(&text, host));
    let mut probe = larder_client::api::http_builder()?
        .build()?
        .get(format!("{url}/{}.narinfo", "0".repeat(32)))
        .timeout(std::time::Duration::from_secs(10));
    if let Some(e) = &entry {
        probe = probe.basic_auth(e.login.clone().unwrap_or_default(), e.password.clone());
    }
    let Ok(answer) = probe.send().await else {
        return Ok(()); // Reachability was checked just before; Nix will say what it sees.
    };
    let status = answer.status().as_u16();
    if !matches!(status, 401 | 403) {
        return Ok(());
    }
    let why = match &entry {
        None => format!("Nix's netrc-file {netrc} has no entry for {host}"),
        Some(_) => {
            format!("the token in Nix's netrc-file {netrc} for {host} cannot read cache {cache}")
        }
    };
    Err(fail_with_hint(
        format!(
            "Nix would be refused by {url} ({status}): {why}, so every path would look missing \
             and be built locally"
        ),
        format!(
            "run `larder use {arg}` with a token that can pull it (`larder login URL TOKEN` \
             first, or LARDER_TOKEN); `larder doctor {arg}` checks the result"
        ),
    ))
}

async fn nix_version() -> anyhow::Result<String> {
    let o = tokio::process::Command::new("nix")
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            fail_with_hint(
                format!("cannot run nix: {e}"),
                "install Nix (https://nixos.org/download) and make sure `nix` is on PATH",
            )
        })?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Free bytes in the filesystem of the Nix store (`df`), if known.
fn free_bytes() -> Option<u64> {
    let o = std::process::Command::new("df")
        .args(["-Pk", "/nix/store"])
        .output()
        .ok()?;
    let text = String::from_utf8(o.stdout).ok()?;
    let kb: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// `nix build ARGS --json` for one installable; stderr to the log (and the terminal when
/// `echo`). Returns the outputs, or the last lines of Nix's error.
async fn nix_build(
    file: Option<&Path>,
    installables: &[String],
    extra: &[&str],
    flags: &NixFlags,
    log: &Log,
    echo: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut cmd = tokio::process::Command::new("nix");
    cmd.args(["build", "--json", "--no-link", "-L"])
        .args(extra)
        .args(flags.args());
    if let Some(f) = file {
        cmd.arg("--file").arg(f);
    }
    cmd.args(installables)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown: Vec<String> = cmd
        .as_std()
        .get_args()
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect();
    log.line(&format!("$ nix {}", shown.join(" ")));
    let mut child = cmd.spawn().context("cannot run nix build")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (log2, echo2) = (log.clone(), echo);
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            log2.line(&l);
            if echo2 {
                eprintln!("{l}");
            }
            all.push(l);
        }
        all
    });
    let out = child.wait_with_output().await.context("nix build")?;
    let err_lines = reader.await.unwrap_or_default();
    if !out.status.success() {
        let tail: Vec<&String> = err_lines
            .iter()
            .filter(|l| l.starts_with("error") || l.contains("error:"))
            .collect();
        anyhow::bail!(
            "nix build failed: {}",
            tail.last()
                .map_or_else(|| "see the log".to_owned(), |l| l.to_string())
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("nix build --json printed something else")?;
    let mut outs = Vec::new();
    for item in v.as_array().into_iter().flatten() {
        for (_, p) in item["outputs"].as_object().into_iter().flatten() {
            if let Some(p) = p.as_str() {
                outs.push(p.to_owned());
            }
        }
    }
    Ok((outs, err_lines))
}

/// Failures only: the report has the numbers.
struct Quiet(Log);

impl Observer for Quiet {
    fn finished(&self, path: &PathInfo, outcome: &Outcome) {
        match outcome {
            Outcome::Failed(e) => {
                self.0.line(&format!("push failed: {}: {e}", path.path));
                eprintln!("  error: {}: {e}", path.path);
            }
            Outcome::Pushed { .. } => self.0.line(&format!("pushed {}", path.path)),
            _ => {}
        }
    }
}

pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let (cache, chosen, file) =
        with_defaults(&args.cache, &args.installables, &args.file, "build")?;
    let t_all = Instant::now();
    let rep = Report { json: args.json };
    let dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => cache_home()?.join("larder/builds"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (log_path, log_file) = create_log(&dir)?;
    let log = Log(Arc::new(Mutex::new(log_file)));
    let installables = if chosen.is_empty() {
        vec![if file.is_some() {
            String::new()
        } else {
            ".".into()
        }]
    } else {
        chosen.clone()
    };

    let mut out = format!("{RULE}\nlarder build → {}\n{RULE}\n", cache);
    // Prerequisites first: nothing is built if the push cannot happen.
    let version = nix_version().await?;
    out.push_str(&format!("✓ {version}\n"));
    let mut pusher = Pusher::connect(&cache).await?;
    out.push_str(&format!(
        "✓ server {} reachable, token can push to {}\n",
        pusher.client.base_url(),
        pusher.cache
    ));
    match free_bytes() {
        Some(b) if b < MIN_FREE_BYTES => out.push_str(&format!(
            "! only {} free in /nix/store; builds may fail (nix-collect-garbage frees space)\n",
            human_size(b as i64)
        )),
        Some(b) => out.push_str(&format!("✓ {} free in /nix/store\n", human_size(b as i64))),
        None => {}
    }
    rep.text(&(out + "\n"))?;

    let n = installables.len();
    let mut failed = 0;
    let (mut total_paths, mut total_bytes) = (0usize, 0u64);
    for (i, inst) in installables.iter().enumerate() {
        let shown = if inst.is_empty() {
            file.as_ref()
                .map_or(String::new(), |f| f.display().to_string())
        } else {
            inst.clone()
        };
        let verb = if args.dry_run {
            "Would build"
        } else {
            "Building"
        };
        rep.text(&format!("[{}/{n}] {verb}: {shown}\n", i + 1))?;
        log.line(&format!("== [{}/{n}] {shown}", i + 1));
        let t0 = Instant::now();
        let extra: &[&str] = if args.dry_run { &["--dry-run"] } else { &[] };
        let r = nix_build(
            file.as_deref(),
            std::slice::from_ref(inst),
            extra,
            &args.nix,
            &log,
            !args.json && (args.verbose || args.dry_run),
        )
        .await;
        let outs = match r {
            Ok((outs, _)) => outs,
            Err(e) => {
                failed += 1;
                log.line(&format!("failed: {e:#}"));
                rep.text(&format!("  └─ ✗ {e:#}\n\n"))?;
                rep.event(serde_json::json!({
                    "installable": shown, "ok": false, "stage": "build",
                    "error": format!("{e:#}"), "build_secs": t0.elapsed().as_secs_f64(),
                }))?;
                continue;
            }
        };
        if args.dry_run {
            for o in &outs {
                rep.text(&format!("  └─ output: {o}\n"))?;
            }
            rep.text(
                "  └─ would push their closures (paths already in the cache are skipped)\n\n",
            )?;
            rep.event(serde_json::json!({"installable": shown, "ok": true, "outputs": outs}))?;
            continue;
        }
        let build_secs = t0.elapsed().as_secs_f64();
        rep.text(&format!("  └─ Build time: {}\n", duration(build_secs)))?;
        let roots: Vec<StorePath> = outs
            .iter()
            .filter_map(|o| StorePath::from_absolute(o).ok())
            .collect();
        let t1 = Instant::now();
        match pusher.push(roots, Arc::new(Quiet(log.clone()))).await {
            Ok(batch) => {
                let s = &batch.summary;
                let push_secs = t1.elapsed().as_secs_f64();
                rep.text(&format!(
                    "  └─ Push time: {}\n  └─ Artifacts: {} pushed (~{}), {} already in the cache\n\n",
                    duration(push_secs),
                    count(s.pushed as u64, "path"),
                    human_size(s.bytes as i64),
                    batch.present
                ))?;
                log.line(&format!("pushed {} paths, {} bytes", s.pushed, s.bytes));
                total_paths += s.pushed;
                total_bytes += s.bytes;
                let ok = s.failed == 0 && batch.invalid.is_empty();
                if !ok {
                    failed += 1;
                    rep.text(&format!(
                        "  └─ ✗ {} failed to push\n\n",
                        count(s.failed as u64, "path")
                    ))?;
                }
                rep.event(serde_json::json!({
                    "installable": shown, "ok": ok, "outputs": outs,
                    "build_secs": build_secs, "push_secs": push_secs,
                    "pushed": s.pushed, "bytes": s.bytes, "present": batch.present,
                    "failed": s.failed,
                }))?;
            }
            Err(e) => {
                failed += 1;
                log.line(&format!("push failed: {e:#}"));
                rep.text(&format!("  └─ ✗ push failed: {e:#}\n\n"))?;
                rep.event(serde_json::json!({
                    "installable": shown, "ok": false, "stage": "push", "outputs": outs,
                    "build_secs": build_secs, "error": format!("{e:#}"),
                }))?;
            }
        }
    }
    let head = if failed == 0 {
        if args.dry_run {
            "✅ Dry run: nothing built or pushed".to_owned()
        } else {
            format!("✅ All {n} builds completed and pushed")
        }
    } else {
        format!("❌ {failed} of {n} installables failed")
    };
    let total_secs = t_all.elapsed().as_secs_f64();
    rep.text(&format!(
        "{RULE}\n{head}\nPushed: {} (~{})\nTotal time: {}\nLogs: {}\n{RULE}\n",
        count(total_paths as u64, "path"),
        human_size(total_bytes as i64),
        duration(total_secs),
        log_path.display()
    ))?;
    rep.event(serde_json::json!({
        "summary": true, "installables": n, "failed": failed, "pushed": total_paths,
        "bytes": total_bytes, "secs": total_secs, "log": log_path, "dry_run": args.dry_run,
    }))?;
    if failed > 0 {
        return Err(fail_with_hint(
            format!("{failed} of {n} installables failed"),
            format!("the log says why: {}", log_path.display()),
        ));
    }
    Ok(())
}

/// `these N paths will be fetched (X MiB download, …)` and `… will be built:` from Nix's
/// dry-run output: (to build, to fetch).
fn parse_dry_run(lines: &[String]) -> (Vec<String>, Vec<String>) {
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

/// Which of `paths` the cache has, with their (FileSize, NarSize): narinfo lookups, 16 at a time.
async fn in_cache(
    t: &crate::client_config::Target,
    paths: &[String],
) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let mut found = HashMap::new();
    let mut todo = paths.iter();
    let mut set = tokio::task::JoinSet::new();
    loop {
        while set.len() < 16 {
            let Some(p) = todo.next() else { break };
            let Ok(sp) = StorePath::from_absolute(p) else {
                continue;
            };
            let (client, cache, p) = (t.client.clone(), t.cache.clone(), p.clone());
            set.spawn(async move {
                let text = client.narinfo(&cache, &sp.hash_part()).await?;
                anyhow::Ok((p, text))
            });
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (p, text) = r.context("narinfo lookup")??;
        if let Some(info) = text.and_then(|t| NarInfo::parse(&t).ok()) {
            found.insert(p, (info.file_size.unwrap_or(info.nar_size), info.nar_size));
        }
    }
    Ok(found)
}

fn sum_sizes<'a>(
    sizes: &HashMap<String, (u64, u64)>,
    paths: impl Iterator<Item = &'a String>,
) -> (usize, u64, u64) {
    paths
        .filter_map(|p| sizes.get(p))
        .fold((0, 0, 0), |(n, f, s), (file, nar)| {
            (n + 1, f + file, s + nar)
        })
}

pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let (cache, chosen, file) = with_defaults(&args.cache, &args.installables, &args.file, "pull")?;
    if chosen.is_empty() {
        return Err(fail_with_hint(
            "nothing to pull",
            "name what to realise: `larder pull CACHE INSTALLABLE…`",
        ));
    }
    let t0 = Instant::now();
    let rep = Report { json: args.json };
    let t = crate::client_config::target(&cache)?;
    let url = format!("{}/{}", t.client.base_url().trim_end_matches('/'), t.cache);
    let mut out = format!("{RULE}\nlarder pull ← {url}\n{RULE}\n");
    nix_version().await?;
    let conf = tokio::process::Command::new("nix")
        .args(["show-config", "--json"])
        .output()
        .await
        .context("cannot run nix show-config")?;
    let conf: serde_json::Value = serde_json::from_slice(&conf.stdout)
        .context("nix show-config --json printed something else")?;
    let subs: Vec<&str> = conf["substituters"]["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    if !subs.iter().any(|s| s.trim_end_matches('/') == url) {
        // Suggest `use` only for a cache that exists (a typo gets the closest name instead);
        // a server that is down gets the suggestion anyway.
        if let Err(e) = crate::client_config::require_cache(&t).await {
            if e.downcast_ref::<crate::output::Hinted>().is_some() {
                return Err(e);
            }
        }
        return Err(fail_with_hint(
            format!("{url} is not among Nix's substituters, so Nix would build everything"),
            format!(
                "run `larder use {}` (then `larder doctor {}`)",
                cache, cache
            ),
        ));
    }
    out.push_str(&format!("✓ Cache configured: {url}\n"));
    // The Cachix guide's promise: a cache that is down means building locally, not failing. A cache
    // that answers but refuses (a token problem) is still an error: it needs fixing.
    let reachable = match t.client.nix_cache_info(&t.cache).await {
        Ok(_) => {
            out.push_str("✓ Cache reachable\n");
            true
        }
        Err(e) if e.is_transient() => {
            out.push_str(&format!("! Cache unreachable ({e})\n"));
            eprintln!(
                "warning: {url} is unreachable: what no other substituter has will be built locally"
            );
            false
        }
        Err(e) => return Err(e).with_context(|| format!("cannot use cache {url}")),
    };
    if reachable {
        nix_can_read(&conf, &url, &t.cache, &cache).await?;
    }
    rep.text(&out)?;
    // Nix itself would stop at the unreachable cache (with its default `fallback = false`, a
    // substituter that cannot be reached is an error): leave it out of this run, and let Nix
    // build what no substituter can give.
    let others: String = subs
        .iter()
        .filter(|s| s.trim_end_matches('/') != url)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let without_cache: Vec<&str> = if reachable {
        vec![]
    } else {
        vec![
            "--option",
            "substituters",
            &others,
            "--option",
            "fallback",
            "true",
        ]
    };

    let null_log = Log(Arc::new(Mutex::new(
        std::fs::File::create("/dev/null").context("cannot open /dev/null")?,
    )));
    let dry_args: Vec<&str> = ["--dry-run"]
        .into_iter()
        .chain(without_cache.iter().copied())
        .collect();
    let (_, dry) = nix_build(
        file.as_deref(),
        &chosen,
        &dry_args,
        &args.nix,
        &null_log,
        false,
    )
    .await?;
    let (to_build, to_fetch) = parse_dry_run(&dry);
    let sizes = if reachable {
        in_cache(&t, &to_fetch).await.unwrap_or_else(|e| {
            eprintln!("warning: cannot look paths up in {url} ({e:#}); Nix decides alone");
            HashMap::new()
        })
    } else {
        HashMap::new()
    };
    let (ours, ours_file, ours_nar) = sum_sizes(&sizes, to_fetch.iter());
    rep.text(&format!(
        "Plan: {} to fetch, {ours} of them from {} ({} download, {} unpacked); \
         {} to build locally\n",
        count(to_fetch.len() as u64, "path"),
        t.cache,
        human_size(ours_file as i64),
        human_size(ours_nar as i64),
        count(to_build.len() as u64, "derivation"),
    ))?;
    rep.event(serde_json::json!({
        "plan": true, "cache_reachable": reachable, "fetch": to_fetch.len(), "fetch_from_cache": ours,
        "fetch_from_cache_bytes": ours_file, "fetch_from_cache_nar_bytes": ours_nar,
        "build": to_build, "fetch_paths": to_fetch,
    }))?;
    if !to_build.is_empty() {
        eprintln!(
            "warning: {} derivations are not in any cache and will be built locally (cache miss):",
            to_build.len()
        );
        for d in &to_build {
            eprintln!("  {d}");
        }
    }
    if args.dry_run {
        for p in &to_fetch {
            let from = if sizes.contains_key(p) {
                "cache"
            } else {
                "elsewhere"
            };
            rep.text(&format!("  fetch ({from}) {p}\n"))?;
        }
        return Ok(());
    }
    rep.text("✓ Starting pull...\n")?;
    let (fetched_from, built): (Vec<(String, String)>, Vec<String>) = {
        let (_, lines) = nix_build(
            file.as_deref(),
            &chosen,
            &without_cache,
            &args.nix,
            &null_log,
            !args.json,
        )
        .await
        .map_err(|e| {
            if args.verbose {
                e
            } else {
                e.context("realising the installables")
            }
        })?;
        let mut fetched = Vec::new();
        let mut built = Vec::new();
        for l in &lines {
            if let Some(rest) = l.strip_prefix("copying path '") {
                if let Some((p, from)) = rest.split_once("' from '") {
                    fetched.push((
                        p.to_owned(),
                        from.trim_end_matches("'...")
                            .trim_end_matches('/')
                            .to_owned(),
                    ));
                }
            } else if let Some(rest) = l.strip_prefix("building '") {
                built.push(rest.trim_end_matches("'...").to_owned());
            }
        }
        (fetched, built)
    };
    let from_us: Vec<&String> = fetched_from
        .iter()
        .filter(|(_, f)| *f == url)
        .map(|(p, _)| p)
        .collect();
    let (_, got_file, got_nar) = sum_sizes(&sizes, from_us.iter().copied());
    let secs = t0.elapsed().as_secs_f64();
    rep.text(&format!(
        "\n✅ Pull completed\nFetched: {} ({} from {url}: {} download, {} unpacked)\n\
         Built locally: {}\nTime: {}\n{RULE}\n",
        count(fetched_from.len() as u64, "path"),
        from_us.len(),
        human_size(got_file as i64),
        human_size(got_nar as i64),
        built.len(),
        duration(secs)
    ))?;
    rep.event(serde_json::json!({
        "summary": true, "fetched": fetched_from.len(), "fetched_from_cache": from_us.len(),
        "fetched_from_cache_bytes": got_file, "fetched_from_cache_nar_bytes": got_nar,
        "built": built, "secs": secs,
    }))?;
    if !built.is_empty() {
        eprintln!(
            "warning: {} derivations were built locally: the cache did not have them",
            built.len()
        );
    }
    if let Some((cmd, rest)) = args.command.split_first() {
        let st = tokio::process::Command::new(cmd)
            .args(rest)
            .status()
            .await
            .with_context(|| format!("cannot run {cmd:?}"))?;
        if !st.success() {
            std::process::exit(st.code().unwrap_or(1));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn logged_commands_can_be_pasted_into_a_shell() {
        assert_eq!(
            shell_quote(".#homeConfigurations.host"),
            ".#homeConfigurations.host"
        );
        assert_eq!(shell_quote("--file"), "--file");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn runs_in_the_same_second_get_their_own_log() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<PathBuf> = (0..3).map(|_| create_log(dir.path()).unwrap().0).collect();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        assert!(names[0] != names[1] && names[1] != names[2]);
    }

    #[test]
    fn dry_run_lists_are_parsed() {
        let lines: Vec<String> = [
            "these 2 derivations will be built:",
            "  /nix/store/a.drv",
            "  /nix/store/b.drv",
            "these 3 paths will be fetched (0.01 MiB download, 0.02 MiB unpacked):",
            "  /nix/store/x",
            "  /nix/store/y",
            "  /nix/store/z",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (b, f) = parse_dry_run(&lines);
        assert_eq!(b, ["/nix/store/a.drv", "/nix/store/b.drv"]);
        assert_eq!(f, ["/nix/store/x", "/nix/store/y", "/nix/store/z"]);
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
