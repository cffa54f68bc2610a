//! `larder push` and `larder generate-keypair`: push closures from the local Nix store, and
//! make a client-held signing key for a cache.

use std::io::{BufRead, IsTerminal};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use larder_client::local_store::{LocalStore, PathInfo};
use larder_client::push::{self, Observer, Outcome, PushOptions};
use larder_nix::signing::SigningKey;
use larder_nix::signing::CACHE_NIXOS_ORG_KEY_NAME;
use larder_nix::store_path::StorePath;
use larder_ops::plan::{Planner, StorePlanner, UploadSettings};
use larder_ops::pusher::Pusher;

use crate::client_config::{split_cache_arg, target, ClientConfig, Target};
use crate::output::{count, fail_with_hint, human_size, print};

#[derive(clap::Args)]
pub struct PushArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Store paths, paths inside the store, or symlinks to them such as ./result. Without any,
    /// paths are read from standard input (whitespace-separated), e.g.
    /// `nix-store -qR ./result | larder push CACHE`.
    paths: Vec<String>,
    /// Uploads in parallel.
    #[arg(short = 'j', long, default_value_t = 8)]
    jobs: usize,
    /// Compression of NARs on the wire (the server stores its own zstd frames whatever it
    /// receives). [default: none for a server on this machine (localhost, 127.0.0.0/8,
    /// [::1]), where compressing only takes CPU from it; elsewhere the cache's preferred
    /// compression]
    #[arg(long, value_parser = ["zstd", "xz", "none"])]
    compression: Option<String>,
    /// Compression level. [default: 3 for zstd, 6 for xz]
    #[arg(long)]
    level: Option<i32>,
    /// Push only the given paths, not their closures (their references must be in the cache).
    #[arg(long)]
    no_closure: bool,
    /// Skip store paths matching this regular expression (repeatable).
    #[arg(long, value_name = "REGEX")]
    exclude: Vec<String>,
    /// Also push paths signed by an upstream key (by default they are skipped: Nix gets them
    /// from upstream).
    #[arg(long)]
    include_upstream: bool,
    /// Key name that marks a path as available upstream (repeatable).
    /// [default: cache.nixos.org-1 and the upstream keys the cache declares]
    #[arg(long, value_name = "NAME")]
    upstream_key: Vec<String>,
    /// Do not record the deriver (.drv) of pushed paths.
    #[arg(long)]
    omit_deriver: bool,
    /// Show what would be uploaded and its size, without uploading.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object per line, named by its `event` (plan, pushed, skipped, failed,
    /// resumed, interrupted; would-push with --dry-run), the last one the summary. Sizes:
    /// `nar_size`, `nar_bytes` (planned) and `bytes` (pushed) count NAR bytes, `file_size` a
    /// path's stored (compressed) size, `uploaded` the bytes this run sent.
    #[arg(long)]
    json: bool,
    /// NARs larger than this that go up whole are uploaded in parts of this size (each
    /// retried on its own): with --no-chunking, and a path new to the cache (whose first
    /// MiB the cache lacks entirely), which is sent whole rather than in chunks. Default
    /// 32MiB; to a server on this machine (localhost, 127.0.0.0/8, [::1]) no parts: the
    /// server then verifies and stores a NAR as it arrives, where parts wait for the last
    /// (a 256 MiB path went up in 1.2 s rather than 1.9 s).
    #[arg(long, env = "LARDER_PUSH_PART_SIZE", value_name = "SIZE")]
    part_size: Option<String>,
    /// Upload every NAR whole (or in parts, see --part-size) instead of cutting NARs of
    /// 256 KiB and more into chunks and sending only those the cache lacks.
    #[arg(
        long,
        env = "LARDER_PUSH_NO_CHUNKING",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    no_chunking: bool,
    /// An upload request that makes no progress this long (the server takes no bytes and does
    /// not answer: frozen, or a partition) fails, and is retried like a dropped connection;
    /// `0` waits forever. The push daemon reads LARDER_STALL_TIMEOUT too.
    #[arg(long, env = STALL_TIMEOUT_VAR, default_value = "60s", value_name = "DURATION")]
    stall_timeout: String,
}

const STALL_TIMEOUT_VAR: &str = "LARDER_STALL_TIMEOUT";

/// `--stall-timeout` (or LARDER_STALL_TIMEOUT): `None` for 0, waiting forever.
fn stall_timeout(s: &str) -> anyhow::Result<Option<std::time::Duration>> {
    let d = larder_server::config::parse_duration(s).with_context(|| {
        format!("invalid stall timeout {s:?} (--stall-timeout or {STALL_TIMEOUT_VAR})")
    })?;
    Ok((!d.is_zero()).then_some(d))
}

pub(crate) fn read_stdin_paths() -> anyhow::Result<Vec<String>> {
    if std::io::stdin().is_terminal() {
        return Err(fail_with_hint(
            "no store paths given",
            "pass paths (e.g. `larder push CACHE ./result`) or pipe them in \
             (`nix-store -qR ./result | larder push CACHE`)",
        ));
    }
    let mut out = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("cannot read paths from standard input")?;
        out.extend(line.split_whitespace().map(str::to_owned));
    }
    Ok(out)
}

/// The signing key for `SERVER:CACHE`: `LARDER_SIGNING_KEY`, else the client config.
pub(crate) fn signing_key(cache_arg: &str, url: &str) -> anyhow::Result<Option<SigningKey>> {
    if let Some(k) = crate::env::var("LARDER_SIGNING_KEY") {
        return Ok(Some(
            SigningKey::parse(&k).context("LARDER_SIGNING_KEY is not a Nix secret key")?,
        ));
    }
    let cfg = ClientConfig::load()?;
    let (_, cache) = split_cache_arg(cache_arg);
    match cfg.signing_keys.get(&key_slot(url, cache)) {
        Some(k) => Ok(Some(
            SigningKey::parse(k).context("the signing key in the client config is invalid")?,
        )),
        None => Ok(None),
    }
}

/// A push session to the cache `cache_arg` names, for the automation verbs.
pub(crate) async fn connect_pusher(cache_arg: &str) -> anyhow::Result<Pusher> {
    let t = target(cache_arg)?;
    let key = signing_key(cache_arg, t.client.base_url())?;
    let stall = match crate::env::var(STALL_TIMEOUT_VAR) {
        Some(s) => stall_timeout(&s)?,
        None => Some(push::DEFAULT_STALL_TIMEOUT),
    };
    let mut pusher = Pusher::connect(t.client, t.cache, cache_arg, key).await?;
    pusher.set_stall_timeout(stall);
    Ok(pusher)
}

/// Where a cache's client-held key is kept in the config: `URL/CACHE`.
fn key_slot(url: &str, cache: &str) -> String {
    format!("{}/{cache}", url.trim_end_matches('/'))
}

struct Display {
    json: bool,
    /// "pushed" or "imported", for the per-path lines.
    done: &'static str,
    bar: Option<ProgressBar>,
    bytes: AtomicU64,
    lines: Mutex<()>,
    /// What Ctrl-C would leave: the paths transferred so far and the uploads in progress.
    progress: Mutex<Progress>,
}

/// The paths of a round transferred so far, and those in progress with what the server keeps
/// of them.
#[derive(Default)]
struct Progress {
    /// Paths transferred, and their NAR bytes.
    done: usize,
    done_bytes: u64,
    /// Paths being uploaded, by store path.
    uploading: std::collections::BTreeMap<String, Uploading>,
}

/// A path being uploaded.
#[derive(Clone, Copy)]
struct Uploading {
    /// The parts and NAR bytes of its multi-part upload the server holds (`None`: nothing
    /// kept, as for a NAR sent whole).
    kept: Option<(u32, u64)>,
    nar_size: u64,
}

/// What a round had done when Ctrl-C stopped it.
struct Stopped {
    done: usize,
    done_bytes: u64,
    uploading: Vec<(String, Uploading)>,
}

impl Display {
    fn line(&self, text: String) {
        let _guard = self.lines.lock();
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn json(&self, e: &RoundEvent<'_>) {
        let _guard = self.lines.lock();
        let _ = print_event(e);
    }
}

impl Display {
    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> Stopped {
        let p = self.progress();
        Stopped {
            done: p.done,
            done_bytes: p.done_bytes,
            uploading: p
                .uploading
                .iter()
                .map(|(path, u)| (path.clone(), *u))
                .collect(),
        }
    }
}

impl Observer for Display {
    fn started(&self, path: &PathInfo) {
        self.progress().uploading.insert(
            path.path.to_absolute(),
            Uploading {
                kept: None,
                nar_size: path.nar_size,
            },
        );
    }
    fn resumed(&self, path: &PathInfo, parts: u32, nar_bytes: u64) {
        self.parts_kept(path, parts, nar_bytes);
        if let Some(bar) = &self.bar {
            bar.inc(nar_bytes);
        }
        let p = path.path.to_absolute();
        if self.json {
            self.json(&RoundEvent::Resumed {
                path: p,
                parts,
                nar_bytes,
                nar_size: path.nar_size,
            });
        } else {
            self.line(format!(
                "resuming {p}: the server has {} ({} of {} NAR) from an interrupted upload",
                count(u64::from(parts), "part"),
                human_size(nar_bytes as i64),
                human_size(path.nar_size as i64)
            ));
        }
    }
    fn parts_kept(&self, path: &PathInfo, parts: u32, nar_bytes: u64) {
        self.progress().uploading.insert(
            path.path.to_absolute(),
            Uploading {
                kept: Some((parts, nar_bytes)),
                nar_size: path.nar_size,
            },
        );
    }
    fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    /// The bar counts NAR bytes, the unit of its total: compressed bytes would leave it at a
    /// few percent for text that compresses well.
    fn nar_bytes(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }
    fn retrying(&self, path: &PathInfo, error: &str, attempt: u32) {
        self.line(format!(
            "retrying {} (attempt {attempt}): {error}",
            path.path
        ));
    }
    fn finished(&self, path: &PathInfo, outcome: &Outcome) {
        let p = path.path.to_absolute();
        {
            let mut progress = self.progress();
            progress.uploading.remove(&p);
            if let Outcome::Pushed { .. } = outcome {
                progress.done += 1;
                progress.done_bytes += path.nar_size;
            }
        }
        if self.json {
            let e = match outcome {
                Outcome::Pushed {
                    file_size,
                    uploaded,
                    secs,
                } => RoundEvent::Pushed {
                    path: p,
                    nar_size: path.nar_size,
                    file_size: *file_size,
                    uploaded: *uploaded,
                    seconds: millis(*secs),
                },
                Outcome::AlreadyPresent => RoundEvent::Skipped {
                    path: p,
                    reason: "already in cache",
                },
                Outcome::Vanished => RoundEvent::Skipped {
                    path: p,
                    reason: "vanished from the local store",
                },
                Outcome::Failed { error, uploaded } => RoundEvent::Failed {
                    path: p,
                    error: error.clone(),
                    uploaded: *uploaded,
                },
            };
            self.json(&e);
        } else {
            match outcome {
                // What was sent only: the stored size (`--json`'s `file_size`) is the whole
                // NAR's compressed size, which a resumed or deduplicated upload does not send.
                Outcome::Pushed { uploaded, secs, .. } if self.bar.is_none() => self.line(format!(
                    "{} {p} ({} NAR, {} uploaded, {secs:.1}s)",
                    self.done,
                    human_size(path.nar_size as i64),
                    human_size(*uploaded as i64),
                )),
                Outcome::Pushed { .. } | Outcome::AlreadyPresent => {}
                Outcome::Vanished => self.line(format!(
                    "warning: skipped {p}: it vanished from the local store (garbage-collected?)"
                )),
                // A hint on a line of its own, as after every other error.
                Outcome::Failed { error, .. } => self.line(format!(
                    "error: {}",
                    push::failure_line(&p, error).replacen("; hint: ", "\nhint: ", 1)
                )),
            }
        }
    }
}

/// The upload settings of the cache `t` names, with the signing key for it.
pub(crate) async fn upload_settings(
    t: &Target,
    cache_arg: &str,
    compression: Option<&str>,
    level: Option<i32>,
) -> anyhow::Result<UploadSettings> {
    let key = signing_key(cache_arg, t.client.base_url())?;
    match UploadSettings::for_cache(&t.client, &t.cache, cache_arg, compression, level, key).await {
        Ok(settings) => Ok(settings),
        // No such cache: the error names the closest one that exists (a misspelt name).
        Err(e) if client_status(&e) == Some(404) => {
            crate::client_config::require_cache(t).await?;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The HTTP status of the server's answer an error comes from, if it does.
fn client_status(e: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(ce) = c.downcast_ref::<larder_client::ClientError>() {
            return ce.status();
        }
        cur = c.source();
    }
    None
}

/// The store paths to push: the arguments, or standard input without any, each once.
fn roots(args: &PushArgs) -> anyhow::Result<Vec<StorePath>> {
    let raw = if args.paths.is_empty() {
        read_stdin_paths()?
    } else {
        args.paths.clone()
    };
    if raw.is_empty() {
        return Err(fail_with_hint(
            "no store paths given",
            "pass at least one store path",
        ));
    }
    let mut roots: Vec<StorePath> = Vec::new();
    for a in &raw {
        let p = LocalStore::resolve_arg(a)?;
        if !roots.contains(&p) {
            roots.push(p);
        }
    }
    Ok(roots)
}

/// The push options of `args` over the cache's upload settings.
fn push_options(args: &PushArgs, settings: UploadSettings) -> anyhow::Result<PushOptions> {
    let exclude = args
        .exclude
        .iter()
        .map(|r| regex::Regex::new(r).with_context(|| format!("invalid --exclude regex {r:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(PushOptions {
        jobs: args.jobs.max(1),
        compression: settings.compression,
        level: settings.level,
        closure: !args.no_closure,
        exclude,
        include_upstream: args.include_upstream,
        upstream_keys: if args.upstream_key.is_empty() {
            std::iter::once(CACHE_NIXOS_ORG_KEY_NAME.to_owned())
                .chain(settings.upstream_key_names)
                .collect()
        } else {
            args.upstream_key.clone()
        },
        omit_deriver: args.omit_deriver,
        signing_key: settings.signing_key,
        part_size: match &args.part_size {
            Some(size) => larder_server::config::parse_size(size)
                .context("invalid --part-size")?
                .max(4096),
            None => larder_ops::plan::default_part_size(settings.loopback),
        },
        stall_timeout: stall_timeout(&args.stall_timeout)?,
        chunking: !args.no_chunking,
        ..PushOptions::default()
    })
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let mut t = target(&args.cache)?;
    // No token configured: in a CI job, its OIDC ID token is traded for one.
    t.client = crate::oidc_login::unless_token(t.client, &t.cache).await?;
    let settings =
        upload_settings(&t, &args.cache, args.compression.as_deref(), args.level).await?;
    let opts = push_options(&args, settings)?;
    let roots = roots(&args)?;
    let store = tokio::task::spawn_blocking(LocalStore::open_default)
        .await
        .context("cannot open the local store")??;
    let mut planner = StorePlanner {
        client: &t.client,
        cache: &t.cache,
        store: Some(store),
        roots,
        opts: &opts,
    };
    let how = Run {
        json: args.json,
        dry_run: args.dry_run,
        verb: "push",
    };
    run_rounds(&t, &opts, &how, &mut planner).await
}

/// How [`run_rounds`] reports.
pub(crate) struct Run {
    pub json: bool,
    pub dry_run: bool,
    /// "push" or "import", for messages.
    pub verb: &'static str,
}

impl Run {
    /// "pushed" or "imported".
    fn done(&self) -> &'static str {
        if self.verb == "push" {
            "pushed"
        } else {
            "imported"
        }
    }
}

/// One line of `--json` output: an event named by its `event` field.
#[derive(serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum RoundEvent<'a> {
    Plan {
        paths: usize,
        to_push: usize,
        nar_bytes: u64,
        present: usize,
        upstream: usize,
        excluded: usize,
        dry_run: bool,
    },
    WouldPush {
        path: String,
        nar_size: u64,
    },
    WouldImport {
        path: String,
        nar_size: u64,
    },
    Summary {
        pushed: usize,
        skipped: usize,
        failed: usize,
        bytes: u64,
        /// Bytes sent (compressed NARs, parts, chunk frames), of failed paths too.
        #[serde(skip_serializing_if = "Option::is_none")]
        uploaded: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        dry_run: Option<bool>,
    },
    Resumed {
        path: String,
        parts: u32,
        nar_bytes: u64,
        nar_size: u64,
    },
    Pushed {
        path: String,
        nar_size: u64,
        file_size: u64,
        uploaded: u64,
        seconds: f64,
    },
    Skipped {
        path: String,
        reason: &'static str,
    },
    Failed {
        path: String,
        error: String,
        uploaded: u64,
    },
    Interrupted {
        pushed: usize,
        bytes: u64,
        kept: &'a [KeptJson<'a>],
    },
}

/// A path of an interrupted run whose upload the server keeps parts of.
#[derive(serde::Serialize)]
struct KeptJson<'a> {
    path: &'a str,
    parts: u32,
    nar_bytes: u64,
    nar_size: u64,
}

/// Seconds to the millisecond: `--json` says `0.0`, not `4.2e-6`, for a push with nothing to do.
fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

fn print_event(e: &RoundEvent<'_>) -> anyhow::Result<()> {
    print(&(serde_json::to_string(e)? + "\n"))
}

/// Plan, report the plan, then (unless a dry run) execute it with a progress bar or JSON
/// events, and report the summary; an error when any path failed. When the only failures are
/// references evicted from the cache while the push ran ([`push::replan_needed`]), plan and
/// execute again (up to [`push::PUSH_ROUNDS`] rounds).
pub(crate) async fn run_rounds(
    t: &Target,
    opts: &PushOptions,
    how: &Run,
    planner: &mut impl Planner,
) -> anyhow::Result<()> {
    let (plan, skips) = planner.plan().await?;
    report_plan(&plan, &skips, how)?;
    if how.dry_run {
        return report_dry_run(&plan, how);
    }
    let to_transfer = plan.paths.len();
    let summary = execute_rounds(t, plan, opts, how, planner).await?;
    report_summary(&summary, &skips, how)?;
    check_evictions(t, &summary, planner).await?;
    if summary.failed > 0 {
        return Err(fail_with_hint(
            format!(
                "{} of {to_transfer} paths failed to {}",
                summary.failed, how.verb
            ),
            format!(
                "the errors above say why; once they are dealt with (a corrupt store path \
                 repaired, say), running `larder {}` again transfers only what is still missing",
                how.verb
            ),
        ));
    }
    Ok(())
}

fn report_plan(plan: &push::Plan, skips: &str, how: &Run) -> anyhow::Result<()> {
    if how.json {
        return print_event(&RoundEvent::Plan {
            paths: plan.total,
            to_push: plan.paths.len(),
            nar_bytes: plan.nar_bytes(),
            present: plan.present,
            upstream: plan.upstream.len(),
            excluded: plan.excluded,
            dry_run: how.dry_run,
        });
    }
    eprintln!(
        "{}: {} to {} ({} NAR), {skips}",
        count(plan.total as u64, "path"),
        plan.paths.len(),
        how.verb,
        human_size(plan.nar_bytes() as i64)
    );
    Ok(())
}

/// A dry run lists what would be transferred.
fn report_dry_run(plan: &push::Plan, how: &Run) -> anyhow::Result<()> {
    if !how.json {
        let mut out = String::new();
        for p in &plan.paths {
            out.push_str(&format!("{}\t{}\n", p.path, human_size(p.nar_size as i64)));
        }
        return print(&out);
    }
    for p in &plan.paths {
        let (path, nar_size) = (p.path.to_absolute(), p.nar_size);
        print_event(&if how.verb == "push" {
            RoundEvent::WouldPush { path, nar_size }
        } else {
            RoundEvent::WouldImport { path, nar_size }
        })?;
    }
    print_event(&RoundEvent::Summary {
        pushed: 0,
        skipped: plan.total - plan.paths.len(),
        failed: 0,
        bytes: 0,
        uploaded: None,
        seconds: None,
        dry_run: Some(true),
    })
}

/// Execute `plan`, then plan and execute again while the only failures are references the
/// cache evicted meanwhile; Ctrl-C is an error saying what was done.
async fn execute_rounds(
    t: &Target,
    plan: push::Plan,
    opts: &PushOptions,
    how: &Run,
    planner: &mut impl Planner,
) -> anyhow::Result<push::Summary> {
    let to_transfer = plan.paths.len();
    let mut summary = match execute_with_display(t, &plan, opts, how).await {
        Ok(s) => s,
        Err(stopped) => {
            return Err(interrupted(
                how,
                &push::Summary::default(),
                to_transfer,
                stopped,
            ))
        }
    };
    for _ in 1..push::PUSH_ROUNDS {
        if !push::replan_needed(&summary) {
            break;
        }
        let (plan, _) = planner.plan().await?;
        // Planning again helps only if it sends a reference again (not with --no-closure, or
        // when the references were never pushed): otherwise the same failures would repeat.
        let failed: std::collections::HashSet<&str> =
            summary.failures.iter().map(|f| f.path.as_str()).collect();
        if plan
            .paths
            .iter()
            .all(|p| failed.contains(p.path.to_absolute().as_str()))
        {
            break;
        }
        eprintln!(
            "note: {} references were evicted from the cache while this ran; sending them again",
            plan.paths.len()
        );
        match execute_with_display(t, &plan, opts, how).await {
            Ok(later) => summary.absorb(later),
            Err(stopped) => return Err(interrupted(how, &summary, to_transfer, stopped)),
        }
    }
    Ok(summary)
}

fn report_summary(summary: &push::Summary, skips: &str, how: &Run) -> anyhow::Result<()> {
    if how.json {
        return print_event(&RoundEvent::Summary {
            pushed: summary.pushed,
            skipped: summary.skipped,
            failed: summary.failed,
            bytes: summary.bytes,
            uploaded: Some(summary.uploaded),
            seconds: Some(millis(summary.seconds)),
            dry_run: None,
        });
    }
    let rate = if summary.seconds > 0.0 {
        summary.bytes as f64 / summary.seconds
    } else {
        0.0
    };
    eprintln!(
        "{} {} ({} NAR, {} uploaded) in {:.1}s ({}/s); skipped {} ({skips}); failed {}",
        how.done(),
        count(summary.pushed as u64, "path"),
        human_size(summary.bytes as i64),
        human_size(summary.uploaded as i64),
        summary.seconds,
        human_size(rate as i64),
        summary.skipped,
        summary.failed
    );
    Ok(())
}

/// A cache over its limit evicts least recently used paths, which can be those just sent: a
/// push whose closure is not all in the cache at the end is no success, since a consumer
/// would build what is missing. Asked once the evictions the push triggered are done.
async fn check_evictions(
    t: &Target,
    summary: &push::Summary,
    planner: &mut impl Planner,
) -> anyhow::Result<()> {
    let settled = if summary.pushed > 0 {
        t.client.cache_info_settled(&t.cache).await.ok()
    } else {
        None
    };
    // A cache whose pins alone exceed its limit evicts what was just pushed: say why.
    if let Some(info) = &settled {
        let over = info.max_size.is_some_and(|m| m > 0 && info.size > m);
        if let Some(w) = crate::admin::limit_warning(info).filter(|_| over) {
            eprintln!("{w}");
        }
    }
    let limited = settled.is_some_and(|c| c.max_size.is_some());
    // Failures that are all references evicted while the push ran (in every round) are
    // this same story, told better by what is missing than by the last failure.
    let only_evictions = summary.failed == 0 || push::replan_needed(summary);
    if !only_evictions || !limited {
        return Ok(());
    }
    let (after, _) = planner.plan().await?;
    if after.paths.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = after
        .paths
        .iter()
        .take(3)
        .map(|p| p.path.to_absolute())
        .collect();
    let c = &t.cache;
    Err(fail_with_hint(
        format!(
            "cache {c:?} evicted {} of this closure to stay under its size limit ({}{})",
            count(after.paths.len() as u64, "path"),
            names.join(", "),
            if after.paths.len() > 3 { ", …" } else { "" }
        ),
        format!(
            "the closure does not fit beside what the cache keeps (its pins and newer \
             paths): raise the limit (`larder cache configure {c} --max-size …`), delete \
             pins it no longer needs (`larder pin list {c}`), or push less; `larder cache \
             info {c}` shows its size and limit"
        ),
    ))
}

/// The report of a run Ctrl-C stopped (exit status 130): what was transferred (`before`, the
/// earlier rounds, and `stopped`), what the server keeps of the uploads in progress, and that
/// running the command again resumes. In JSON, an `interrupted` event says the same.
fn interrupted(
    how: &Run,
    before: &push::Summary,
    planned: usize,
    stopped: Stopped,
) -> anyhow::Error {
    let done = before.pushed + stopped.done;
    let bytes = before.bytes + stopped.done_bytes;
    let (doing, done_verb) = if how.verb == "push" {
        ("pushing", "pushed")
    } else {
        ("importing", "imported")
    };
    if how.json {
        let kept: Vec<KeptJson> = stopped
            .uploading
            .iter()
            .filter_map(|(p, u)| {
                u.kept
                    .filter(|(parts, _)| *parts > 0)
                    .map(|(parts, nar_bytes)| KeptJson {
                        path: p,
                        parts,
                        nar_bytes,
                        nar_size: u.nar_size,
                    })
            })
            .collect();
        let _ = print_event(&RoundEvent::Interrupted {
            pushed: done,
            bytes,
            kept: &kept,
        });
    }
    let mut msg = format!(
        "interrupted after {doing} {done} of {} ({} NAR)",
        count(planned as u64, "path"),
        human_size(bytes as i64)
    );
    const SHOWN: usize = 5;
    let (kept, lost): (Vec<_>, Vec<_>) = stopped
        .uploading
        .iter()
        .partition(|(_, u)| u.kept.is_some_and(|(parts, _)| parts > 0));
    for (p, u) in kept.iter().take(SHOWN) {
        let (parts, nar_bytes) = u.kept.unwrap_or_default();
        msg.push_str(&format!(
            "\n  kept on the server: {} ({} of {} NAR) of {p}",
            count(u64::from(parts), "part"),
            human_size(nar_bytes as i64),
            human_size(u.nar_size as i64)
        ));
    }
    if kept.len() > SHOWN {
        msg.push_str(&format!(
            "\n  … and parts of {} more",
            count((kept.len() - SHOWN) as u64, "path")
        ));
    }
    if !lost.is_empty() {
        // Small paths go up many to a request: the server may have published some of them
        // after the answer stopped being awaited.
        let names: Vec<&str> = lost.iter().take(3).map(|(p, ..)| p.as_str()).collect();
        msg.push_str(&format!(
            "\n  in flight, {}: the next run skips those the server published and sends the \
             rest again: {}{}",
            count(lost.len() as u64, "path"),
            names.join(", "),
            if lost.len() > 3 { ", …" } else { "" }
        ));
    }
    let parts = if kept.is_empty() {
        String::new()
    } else {
        format!(
            ", and of a path sent in parts only the parts the server does not have (by default \
             it keeps them for {} min after the last one)",
            larder_server::config::DEFAULT_MULTIPART_IDLE_TTL.as_secs() / 60
        )
    };
    crate::output::interrupted_with_hint(
        msg,
        format!(
            "run the same command again to resume: it skips what the cache has (what was \
             {done_verb}, and more){parts}"
        ),
    )
}

/// Completes when the user presses Ctrl-C (never, if SIGINT cannot be caught).
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One round: execute `plan` with a progress bar (on a terminal) or JSON events. Ctrl-C stops
/// it at once (uploads in flight are dropped; the server keeps the parts it stored, and the
/// upload is not abandoned, so the next run resumes it): `Err` says what it had done.
async fn execute_with_display(
    t: &Target,
    plan: &push::Plan,
    opts: &PushOptions,
    how: &Run,
) -> Result<push::Summary, Stopped> {
    let bar = (!how.json && std::io::stderr().is_terminal() && !plan.paths.is_empty()).then(|| {
        let bar = ProgressBar::new(plan.nar_bytes());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {bytes}/{total_bytes} of NAR {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let display = Arc::new(Display {
        json: how.json,
        done: if how.verb == "push" {
            "pushed"
        } else {
            "imported"
        },
        bar,
        bytes: AtomicU64::new(0),
        lines: Mutex::new(()),
        progress: Mutex::default(),
    });
    let summary = tokio::select! {
        s = push::execute(&t.client, &t.cache, plan, opts, display.clone()) => Ok(s),
        () = ctrl_c() => Err(display.stopped()),
    };
    if let Some(bar) = &display.bar {
        bar.finish_and_clear();
    }
    summary
}

#[derive(clap::Args)]
pub struct KeypairArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE) (you need admin on it).
    cache: String,
    /// Replace the key of a cache that already has paths or a client-held key. The paths
    /// already in the cache stay signed by the old key only: consumers must keep trusting it
    /// (next to the new one) until those paths are pushed again or gone.
    #[arg(long)]
    rotate: bool,
    /// Also print `export LARDER_SIGNING_KEY=…` (the secret key) on standard output, to paste
    /// into a CI secret or another pushing machine. Without it the secret is never shown: it
    /// is only written to the client config (mode 0600), where `push` finds it.
    #[arg(long)]
    print_secret: bool,
}

/// Make a signing key locally, register its public half with the cache (switching it to
/// client signing), and keep the secret in the client config (mode 0600).
pub async fn generate_keypair(args: KeypairArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let cache = t
        .client
        .cache_info(&t.cache)
        .await
        .with_context(|| format!("cannot use cache {:?}", t.cache))?;
    let old_key = cache.public_key.clone().unwrap_or_default();
    check_rotation(&t, &cache, &old_key, &args)?;
    let key = new_key(&t, &old_key)?;
    let public = key.verifying_key().to_string();
    let path = register_key(&t, &key, &public).await?;
    report_keypair(&t, &args, &path, &public, &old_key, cache.paths)?;
    if args.print_secret {
        print(&format!(
            "export LARDER_SIGNING_KEY={}\n",
            key.to_secret_string()
        ))
    } else {
        print(&format!("{public}\n"))
    }
}

/// A new key strands what the old one signed: only on purpose (`--rotate`).
fn check_rotation(
    t: &Target,
    cache: &larder_client::api::CacheInfo,
    old_key: &str,
    args: &KeypairArgs,
) -> anyhow::Result<()> {
    if !(cache.signing_mode == "client" || cache.paths > 0) || args.rotate {
        return Ok(());
    }
    let what = if cache.signing_mode == "client" {
        "already has a client-held key".to_owned()
    } else {
        format!("already holds {} paths signed by its key", cache.paths)
    };
    Err(fail_with_hint(
        format!("cache {:?} {what} ({old_key}); a new key would leave those paths unverifiable for consumers that trust only the new one", t.cache),
        format!(
            "to push with the existing key from another machine, copy its LARDER_SIGNING_KEY; \
             to replace it anyway, run `larder generate-keypair {} --rotate`",
            args.cache
        ),
    ))
}

/// A fresh key named `CACHE.HOST-client-N`, N one more than the old key's.
fn new_key(t: &Target, old_key: &str) -> anyhow::Result<SigningKey> {
    let host = t
        .client
        .base_url()
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_owned();
    // Each rotation gets a new name (`-client-2`, …): two keys never share one.
    let generation = old_key
        .split_once(':')
        .and_then(|(name, _)| name.rsplit_once("-client-"))
        .and_then(|(_, n)| n.parse::<u32>().ok())
        .map_or(1, |n| n + 1);
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    SigningKey::from_seed(&format!("{}.{host}-client-{generation}", t.cache), seed)
        .context("cannot make a key")
}

/// Register the public half with the cache and keep the secret in the client config; the
/// config file.
async fn register_key(
    t: &Target,
    key: &SigningKey,
    public: &str,
) -> anyhow::Result<std::path::PathBuf> {
    t.client
        .register_public_key(&t.cache, public)
        .await
        .with_context(|| format!("cannot register the public key with cache {:?}", t.cache))?;
    let mut cfg = ClientConfig::load()?;
    cfg.signing_keys.insert(
        key_slot(t.client.base_url(), &t.cache),
        key.to_secret_string(),
    );
    let path = cfg.save()?;
    Ok(path)
}

/// Say where the key is, what consumers must trust, and what to do on other machines.
fn report_keypair(
    t: &Target,
    args: &KeypairArgs,
    path: &std::path::Path,
    public: &str,
    old_key: &str,
    paths: i64,
) -> anyhow::Result<()> {
    eprintln!(
        "cache {:?} now requires uploads signed by {public}\nthe secret key is in {} (mode \
         0600, `signing_keys`), where `larder push` on this machine finds it; substituters \
         must trust the public key above (larder use {} does this)",
        t.cache,
        path.display(),
        args.cache
    );
    if !args.print_secret {
        eprintln!(
            "to push from another machine or CI, set LARDER_SIGNING_KEY there to that secret \
             (`--print-secret` prints it when the key is made)"
        );
    }
    if paths > 0 {
        eprintln!(
            "warning: the {} paths already in the cache are signed by {old_key} only; \
             consumers must trust both keys until they are pushed again:\n  \
             extra-trusted-public-keys = {old_key} {public}",
            paths
        );
    }
    Ok(())
}
