//! `larder build` (the seed's `cachix-build-all`) and `larder pull` (the seed's
//! `cachix-pull`): build installables and push their closures with a per-installable report,
//! and realise installables from a cache with a report of what was fetched and what built.
//!
//! Installables are flake references (`.#homeConfigurations.host.activationPackage`,
//! `path:/dir#pkg`) or, with `-f FILE`, attributes of a Nix file. Running Nix and reading what
//! it says is [`larder_ops::nix`]; the cache lookups of `pull` are [`larder_ops::pull`]. This
//! module strings the steps together and prints the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use larder_client::local_store::PathInfo;
use larder_client::push::{failure_line, Observer, Outcome};
use larder_nix::store_path::StorePath;
use larder_ops::nix::{self, duration, Log, NixSettings};
use larder_ops::pull::{self, Sizes};
use larder_ops::pusher::Pusher;

use crate::client_config::Target;
use crate::output::{count, fail_with_hint, human_size, print};

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

    fn event(&self, v: &impl serde::Serialize) -> anyhow::Result<()> {
        if self.json {
            print(&format!("{}\n", serde_json::to_string(v)?))
        } else {
            Ok(())
        }
    }
}

/// `nix --version`, or why Nix cannot run, with the fix.
async fn nix_version() -> anyhow::Result<String> {
    nix::version().await.map_err(|e| match e {
        nix::NixError::Run(e) => fail_with_hint(
            format!("cannot run nix: {e}"),
            "install Nix (https://nixos.org/download) and make sure `nix` is on PATH",
        ),
        // Nix runs: what it printed is its version, as far as the report cares.
        other => anyhow::Error::new(other),
    })
}

/// Failures only: the report has the numbers.
struct Quiet(Log);

impl Observer for Quiet {
    fn finished(&self, path: &PathInfo, outcome: &Outcome) {
        match outcome {
            Outcome::Failed { error, .. } => {
                let line = failure_line(&path.path.to_absolute(), error);
                self.0.line(&format!("push failed: {line}"));
                eprintln!("  error: {line}");
            }
            Outcome::Pushed { .. } => self.0.line(&format!("pushed {}", path.path)),
            _ => {}
        }
    }
}

/// One installable's line of `build --json` (fields in alphabetical order, as before).
#[derive(serde::Serialize, Default)]
struct InstallableEvent {
    #[serde(skip_serializing_if = "Option::is_none")]
    build_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<usize>,
    installable: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    present: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    push_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pushed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'static str>,
}

/// The last line of `build --json`.
#[derive(serde::Serialize)]
struct BuildSummary<'a> {
    bytes: u64,
    dry_run: bool,
    failed: usize,
    installables: usize,
    log: &'a Path,
    pushed: usize,
    secs: f64,
    summary: bool,
}

/// A `larder build` run: its report, its log, the push session, and the totals so far.
struct BuildRun {
    rep: Report,
    log: Log,
    log_path: PathBuf,
    pusher: Pusher,
    failed: usize,
    total_paths: usize,
    total_bytes: u64,
}

/// The run's log file, in `--log-dir` or `$XDG_CACHE_HOME/larder/builds`.
fn open_build_log(args: &BuildArgs) -> anyhow::Result<(PathBuf, Log)> {
    let dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => larder_ops::xdg::larder_dir(larder_ops::xdg::Base::Cache)?.join("builds"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (path, file) = nix::create_log(&dir)?;
    Ok((path, Log::new(file)))
}

/// Prerequisites first, so that nothing is built if the push cannot happen: Nix, the cache
/// and its token, free space in the store. Reported as the header.
async fn build_prerequisites(cache: &str, rep: &Report) -> anyhow::Result<Pusher> {
    let mut out = format!("{RULE}\nlarder build → {}\n{RULE}\n", cache);
    let version = nix_version().await?;
    out.push_str(&format!("✓ {version}\n"));
    let pusher = crate::push_cmd::connect_pusher(cache).await?;
    out.push_str(&format!(
        "✓ server {} reachable, token can push to {}\n",
        pusher.client.base_url(),
        pusher.cache
    ));
    match nix::free_bytes() {
        Some(b) if b < MIN_FREE_BYTES => out.push_str(&format!(
            "! only {} free in /nix/store; builds may fail (nix-collect-garbage frees space)\n",
            human_size(b as i64)
        )),
        Some(b) => out.push_str(&format!("✓ {} free in /nix/store\n", human_size(b as i64))),
        None => {}
    }
    rep.text(&(out + "\n"))?;
    Ok(pusher)
}

pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let (cache, chosen, file) =
        with_defaults(&args.cache, &args.installables, &args.file, "build")?;
    let t_all = Instant::now();
    let rep = Report { json: args.json };
    let (log_path, log) = open_build_log(&args)?;
    let installables = if chosen.is_empty() {
        vec![if file.is_some() {
            String::new()
        } else {
            ".".into()
        }]
    } else {
        chosen.clone()
    };
    let pusher = build_prerequisites(&cache, &rep).await?;
    let mut run = BuildRun {
        rep,
        log,
        log_path,
        pusher,
        failed: 0,
        total_paths: 0,
        total_bytes: 0,
    };
    let n = installables.len();
    for (i, inst) in installables.iter().enumerate() {
        let shown = if inst.is_empty() {
            file.as_ref()
                .map_or(String::new(), |f| f.display().to_string())
        } else {
            inst.clone()
        };
        run.installable(
            &args,
            file.as_deref(),
            inst,
            &format!("[{}/{n}]", i + 1),
            shown,
        )
        .await?;
    }
    run.finish(&args, n, t_all)
}

impl BuildRun {
    /// Build one installable and push its closure, reporting both.
    async fn installable(
        &mut self,
        args: &BuildArgs,
        file: Option<&Path>,
        inst: &str,
        counter: &str,
        shown: String,
    ) -> anyhow::Result<()> {
        let verb = if args.dry_run {
            "Would build"
        } else {
            "Building"
        };
        self.rep.text(&format!("{counter} {verb}: {shown}\n"))?;
        self.log.line(&format!("== {counter} {shown}"));
        let t0 = Instant::now();
        let mut extra = args.nix.args();
        if args.dry_run {
            extra.insert(0, "--dry-run".to_owned());
        }
        let installables = [inst.to_owned()];
        let built = nix::Build {
            file,
            installables: &installables,
            args: extra,
            log: &self.log,
            echo: !args.json && (args.verbose || args.dry_run),
        }
        .run()
        .await;
        let outs = match built {
            Ok(b) => b.outputs,
            Err(e) => {
                self.failed += 1;
                let e = anyhow::Error::new(e);
                self.log.line(&format!("failed: {e:#}"));
                self.rep.text(&format!("  └─ ✗ {e:#}\n\n"))?;
                return self.rep.event(&InstallableEvent {
                    installable: shown,
                    stage: Some("build"),
                    error: Some(format!("{e:#}")),
                    build_secs: Some(t0.elapsed().as_secs_f64()),
                    ..InstallableEvent::default()
                });
            }
        };
        if args.dry_run {
            for o in &outs {
                self.rep.text(&format!("  └─ output: {o}\n"))?;
            }
            self.rep.text(
                "  └─ would push their closures (paths already in the cache are skipped)\n\n",
            )?;
            return self.rep.event(&InstallableEvent {
                installable: shown,
                ok: true,
                outputs: Some(outs),
                ..InstallableEvent::default()
            });
        }
        let build_secs = t0.elapsed().as_secs_f64();
        self.rep
            .text(&format!("  └─ Build time: {}\n", duration(build_secs)))?;
        self.push_outputs(shown, outs, build_secs).await
    }

    /// Push the closures of an installable's outputs and report it.
    async fn push_outputs(
        &mut self,
        shown: String,
        outs: Vec<String>,
        build_secs: f64,
    ) -> anyhow::Result<()> {
        let roots: Vec<StorePath> = outs
            .iter()
            .filter_map(|o| StorePath::from_absolute(o).ok())
            .collect();
        let t1 = Instant::now();
        let quiet = std::sync::Arc::new(Quiet(self.log.clone()));
        let batch = match self.pusher.push(roots, quiet).await {
            Ok(batch) => batch,
            Err(e) => {
                self.failed += 1;
                let e = anyhow::Error::new(e);
                self.log.line(&format!("push failed: {e:#}"));
                self.rep.text(&format!("  └─ ✗ push failed: {e:#}\n\n"))?;
                return self.rep.event(&InstallableEvent {
                    installable: shown,
                    stage: Some("push"),
                    outputs: Some(outs),
                    build_secs: Some(build_secs),
                    error: Some(format!("{e:#}")),
                    ..InstallableEvent::default()
                });
            }
        };
        let s = &batch.summary;
        let push_secs = t1.elapsed().as_secs_f64();
        self.rep.text(&format!(
            "  └─ Push time: {}\n  └─ Artifacts: {} pushed (~{}), {} already in the cache\n\n",
            duration(push_secs),
            count(s.pushed as u64, "path"),
            human_size(s.bytes as i64),
            batch.present
        ))?;
        self.log
            .line(&format!("pushed {} paths, {} bytes", s.pushed, s.bytes));
        self.total_paths += s.pushed;
        self.total_bytes += s.bytes;
        let ok = s.failed == 0 && batch.invalid.is_empty();
        if !ok {
            self.failed += 1;
            self.rep.text(&format!(
                "  └─ ✗ {} failed to push\n\n",
                count(s.failed as u64, "path")
            ))?;
        }
        self.rep.event(&InstallableEvent {
            installable: shown,
            ok,
            outputs: Some(outs),
            build_secs: Some(build_secs),
            push_secs: Some(push_secs),
            pushed: Some(s.pushed),
            bytes: Some(s.bytes),
            present: Some(batch.present),
            failed: Some(s.failed),
            ..InstallableEvent::default()
        })
    }

    /// The closing report; an error when an installable failed.
    fn finish(&self, args: &BuildArgs, n: usize, t_all: Instant) -> anyhow::Result<()> {
        let failed = self.failed;
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
        self.rep.text(&format!(
            "{RULE}\n{head}\nPushed: {} (~{})\nTotal time: {}\nLogs: {}\n{RULE}\n",
            count(self.total_paths as u64, "path"),
            human_size(self.total_bytes as i64),
            duration(total_secs),
            self.log_path.display()
        ))?;
        self.rep.event(&BuildSummary {
            summary: true,
            installables: n,
            failed,
            pushed: self.total_paths,
            bytes: self.total_bytes,
            secs: total_secs,
            log: &self.log_path,
            dry_run: args.dry_run,
        })?;
        if failed > 0 {
            return Err(fail_with_hint(
                format!("{failed} of {n} installables failed"),
                format!("the log says why: {}", self.log_path.display()),
            ));
        }
        Ok(())
    }
}

/// The plan line of `pull --json` (fields in alphabetical order, as before).
#[derive(serde::Serialize)]
struct PullPlan<'a> {
    build: &'a [String],
    cache_reachable: bool,
    fetch: usize,
    fetch_from_cache: usize,
    fetch_from_cache_bytes: u64,
    fetch_from_cache_nar_bytes: u64,
    fetch_paths: &'a [String],
    plan: bool,
}

/// The last line of `pull --json`.
#[derive(serde::Serialize)]
struct PullSummary<'a> {
    built: &'a [String],
    fetched: usize,
    fetched_from_cache: usize,
    fetched_from_cache_bytes: u64,
    fetched_from_cache_nar_bytes: u64,
    secs: f64,
    summary: bool,
}

/// Fail unless the cache's `url` is among Nix's substituters (Nix would build everything).
async fn check_configured(
    t: &Target,
    settings: &NixSettings,
    url: &str,
    cache: &str,
) -> anyhow::Result<()> {
    let subs = settings.list("substituters");
    if subs.iter().any(|s| s.trim_end_matches('/') == url) {
        return Ok(());
    }
    // Suggest `use` only for a cache that exists (a typo gets the closest name instead);
    // a server that is down gets the suggestion anyway.
    if let Err(e) = crate::client_config::require_cache(t).await {
        if e.downcast_ref::<crate::output::Hinted>().is_some() {
            return Err(e);
        }
    }
    Err(fail_with_hint(
        format!("{url} is not among Nix's substituters, so Nix would build everything"),
        format!("run `larder use {cache}` (then `larder doctor {cache}`)"),
    ))
}

/// Whether the cache answers. The Cachix guide's promise: a cache that is down means building
/// locally, not failing. A cache that answers but refuses (a token problem) is still an
/// error: it needs fixing.
async fn probe_cache(t: &Target, url: &str, out: &mut String) -> anyhow::Result<bool> {
    match t.client.nix_cache_info(&t.cache).await {
        Ok(_) => {
            out.push_str("✓ Cache reachable\n");
            Ok(true)
        }
        Err(e) if e.is_transient() => {
            out.push_str(&format!("! Cache unreachable ({e})\n"));
            eprintln!(
                "warning: {url} is unreachable: what no other substituter has will be built locally"
            );
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("cannot use cache {url}")),
    }
}

/// Nix itself would stop at an unreachable cache (with its default `fallback = false`, a
/// substituter that cannot be reached is an error): the options that leave it out of this
/// run and let Nix build what no substituter can give.
fn without_cache(settings: &NixSettings, url: &str) -> Vec<String> {
    let others: Vec<String> = settings
        .list("substituters")
        .into_iter()
        .filter(|s| s.trim_end_matches('/') != url)
        .collect();
    [
        "--option",
        "substituters",
        &others.join(" "),
        "--option",
        "fallback",
        "true",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// What a pull will do: (to build, to fetch, the sizes of those the cache has).
struct PullPlanned {
    to_build: Vec<String>,
    to_fetch: Vec<String>,
    sizes: Sizes,
}

/// Ask Nix what it would build and fetch (a dry run), and the cache what it has of that.
async fn plan_pull(
    args: &PullArgs,
    t: &Target,
    file: Option<&Path>,
    chosen: &[String],
    skip: &[String],
    reachable: bool,
    url: &str,
) -> anyhow::Result<PullPlanned> {
    let null_log = Log::discard()?;
    let mut dry_args = vec!["--dry-run".to_owned()];
    dry_args.extend(skip.iter().cloned());
    dry_args.extend(args.nix.args());
    let dry = nix::Build {
        file,
        installables: chosen,
        args: dry_args,
        log: &null_log,
        echo: false,
    }
    .run()
    .await?;
    let (to_build, to_fetch) = nix::parse_dry_run(&dry.log);
    let sizes = if reachable {
        pull::in_cache(&t.client, &t.cache, &to_fetch)
            .await
            .unwrap_or_else(|e| {
                let e = anyhow::Error::new(e);
                eprintln!("warning: cannot look paths up in {url} ({e:#}); Nix decides alone");
                HashMap::new()
            })
    } else {
        HashMap::new()
    };
    Ok(PullPlanned {
        to_build,
        to_fetch,
        sizes,
    })
}

/// Report the plan; with `--dry-run`, each path to fetch too.
fn report_plan(
    rep: &Report,
    p: &PullPlanned,
    cache: &str,
    reachable: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let (ours, ours_file, ours_nar) = pull::sum_sizes(&p.sizes, p.to_fetch.iter());
    rep.text(&format!(
        "Plan: {} to fetch, {ours} of them from {} ({} download, {} unpacked); \
         {} to build locally\n",
        count(p.to_fetch.len() as u64, "path"),
        cache,
        human_size(ours_file as i64),
        human_size(ours_nar as i64),
        count(p.to_build.len() as u64, "derivation"),
    ))?;
    rep.event(&PullPlan {
        plan: true,
        cache_reachable: reachable,
        fetch: p.to_fetch.len(),
        fetch_from_cache: ours,
        fetch_from_cache_bytes: ours_file,
        fetch_from_cache_nar_bytes: ours_nar,
        build: &p.to_build,
        fetch_paths: &p.to_fetch,
    })?;
    if !p.to_build.is_empty() {
        eprintln!(
            "warning: {} derivations are not in any cache and will be built locally (cache miss):",
            p.to_build.len()
        );
        for d in &p.to_build {
            eprintln!("  {d}");
        }
    }
    if dry_run {
        for path in &p.to_fetch {
            let from = if p.sizes.contains_key(path) {
                "cache"
            } else {
                "elsewhere"
            };
            rep.text(&format!("  fetch ({from}) {path}\n"))?;
        }
    }
    Ok(())
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
    let settings = NixSettings::read().await?;
    check_configured(&t, &settings, &url, &cache).await?;
    out.push_str(&format!("✓ Cache configured: {url}\n"));
    let reachable = probe_cache(&t, &url, &mut out).await?;
    if reachable {
        pull::nix_can_read(&settings, &url, &t.cache, &cache).await?;
    }
    rep.text(&out)?;
    let skip = if reachable {
        vec![]
    } else {
        without_cache(&settings, &url)
    };
    let planned = plan_pull(&args, &t, file.as_deref(), &chosen, &skip, reachable, &url).await?;
    report_plan(&rep, &planned, &t.cache, reachable, args.dry_run)?;
    if args.dry_run {
        return Ok(());
    }
    rep.text("✓ Starting pull...\n")?;
    realise(
        &args,
        &rep,
        file.as_deref(),
        &chosen,
        skip,
        &planned.sizes,
        &url,
        t0,
    )
    .await?;
    run_after(&args.command).await
}

/// Realise the installables and report what was fetched (and how much from the cache) and
/// what was built.
#[allow(clippy::too_many_arguments)]
async fn realise(
    args: &PullArgs,
    rep: &Report,
    file: Option<&Path>,
    chosen: &[String],
    skip: Vec<String>,
    sizes: &Sizes,
    url: &str,
    t0: Instant,
) -> anyhow::Result<()> {
    let null_log = Log::discard()?;
    let mut nix_args = skip;
    nix_args.extend(args.nix.args());
    let built = nix::Build {
        file,
        installables: chosen,
        args: nix_args,
        log: &null_log,
        echo: !args.json,
    }
    .run()
    .await
    .map_err(|e| {
        let e = anyhow::Error::new(e);
        if args.verbose {
            e
        } else {
            e.context("realising the installables")
        }
    })?;
    let (fetched_from, built) = nix::parse_realised(&built.log);
    let from_us: Vec<&String> = fetched_from
        .iter()
        .filter(|(_, f)| f == url)
        .map(|(p, _)| p)
        .collect();
    let (_, got_file, got_nar) = pull::sum_sizes(sizes, from_us.iter().copied());
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
    rep.event(&PullSummary {
        summary: true,
        fetched: fetched_from.len(),
        fetched_from_cache: from_us.len(),
        fetched_from_cache_bytes: got_file,
        fetched_from_cache_nar_bytes: got_nar,
        built: &built,
        secs,
    })?;
    if !built.is_empty() {
        eprintln!(
            "warning: {} derivations were built locally: the cache did not have them",
            built.len()
        );
    }
    Ok(())
}

/// Run the command given after `--`; exit with its status when it fails.
async fn run_after(command: &[String]) -> anyhow::Result<()> {
    if let Some((cmd, rest)) = command.split_first() {
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
