//! `larder push` and `larder generate-keypair`: push closures from the local Nix store, and
//! make a client-held signing key for a cache.

use std::io::{BufRead, IsTerminal};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use larder_client::local_store::{LocalStore, PathInfo};
use larder_client::push::{self, Compression, Observer, Outcome, PushOptions};
use larder_nix::signing::SigningKey;
use larder_nix::store_path::StorePath;
use larder_ops::pusher::Pusher;

use crate::client_config::{split_cache_arg, target, ClientConfig};
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
    /// Compression of uploaded NARs. [default: the cache's preferred compression]
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
    /// One JSON object per line (events), the last one the summary.
    #[arg(long)]
    json: bool,
    /// NARs larger than this are uploaded in parts of this size (each retried on its own).
    #[arg(long, env = "LARDER_PUSH_PART_SIZE", default_value = "32MiB")]
    part_size: String,
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
    Ok(Pusher::connect(t.client, t.cache, cache_arg, key).await?)
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
    fn json(&self, v: serde_json::Value) {
        let _guard = self.lines.lock();
        let _ = print(&(v.to_string() + "\n"));
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
            self.json(serde_json::json!({
                "event": "resumed", "path": p, "parts": parts, "nar_bytes": nar_bytes,
                "nar_size": path.nar_size }));
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
            let v = match outcome {
                Outcome::Pushed {
                    file_size,
                    uploaded,
                    secs,
                } => serde_json::json!({
                    "event": "pushed", "path": p, "nar_size": path.nar_size,
                    "file_size": file_size, "uploaded": uploaded, "seconds": secs }),
                Outcome::AlreadyPresent => {
                    serde_json::json!({"event": "skipped", "path": p, "reason": "already in cache"})
                }
                Outcome::Vanished => {
                    serde_json::json!({"event": "skipped", "path": p, "reason": "vanished from the local store"})
                }
                Outcome::Failed(e) => serde_json::json!({"event": "failed", "path": p, "error": e}),
            };
            self.json(v);
        } else {
            match outcome {
                Outcome::Pushed {
                    file_size,
                    uploaded,
                    secs,
                } if self.bar.is_none() => self.line(format!(
                    "{} {p} ({} NAR, {} uploaded{}, {secs:.1}s)",
                    self.done,
                    human_size(path.nar_size as i64),
                    human_size(*uploaded as i64),
                    if uploaded < file_size {
                        format!(" of {}", human_size(*file_size as i64))
                    } else {
                        String::new()
                    }
                )),
                Outcome::Pushed { .. } | Outcome::AlreadyPresent => {}
                Outcome::Vanished => self.line(format!(
                    "warning: skipped {p}: it vanished from the local store (garbage-collected?)"
                )),
                Outcome::Failed(e) => self.line(format!("error: {p}: {e}")),
            }
        }
    }
}

/// What every upload to the cache uses: its compression (or the one asked for), the level,
/// and the signing key (required when the cache has clients sign).
pub(crate) struct UploadSettings {
    pub compression: Compression,
    pub level: i32,
    pub signing_key: Option<SigningKey>,
    /// Names of the keys the cache trusts as upstream beside cache.nixos.org's (declared in
    /// the server's configuration): paths they signed need not be pushed.
    pub upstream_key_names: Vec<String>,
}

pub(crate) async fn upload_settings(
    t: &crate::client_config::Target,
    cache_arg: &str,
    compression: Option<&str>,
    level: Option<i32>,
) -> anyhow::Result<UploadSettings> {
    let cache = t
        .client
        .cache_info(&t.cache)
        .await
        .with_context(|| format!("cannot use cache {:?}", t.cache))?;
    larder_ops::pusher::ensure_can_push(&t.client, &t.cache).await?;
    let requested = compression.unwrap_or(&cache.compression);
    let compression = Compression::from_name(requested)
        .ok_or_else(|| anyhow::anyhow!("unknown compression {requested:?}"))?;
    let level = level.unwrap_or(match compression {
        Compression::Xz => 6,
        _ => 3,
    });
    let signing_key = signing_key(cache_arg, t.client.base_url())?;
    if cache.signing_mode == "client" && signing_key.is_none() {
        return Err(fail_with_hint(
            format!("cache {:?} requires uploads signed by its key {}", cache.name,
                    cache.public_key.clone().unwrap_or_default()),
            format!("set LARDER_SIGNING_KEY, or run `larder generate-keypair {cache_arg}` on the machine that pushes"),
        ));
    }
    let upstream_key_names = cache
        .upstream_keys
        .iter()
        .filter_map(|k| k.split_once(':').map(|(name, _)| name.to_owned()))
        .collect();
    Ok(UploadSettings {
        compression,
        level,
        signing_key,
        upstream_key_names,
    })
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let UploadSettings {
        compression,
        level,
        signing_key,
        upstream_key_names,
    } = upload_settings(&t, &args.cache, args.compression.as_deref(), args.level).await?;
    let exclude = args
        .exclude
        .iter()
        .map(|r| regex::Regex::new(r).with_context(|| format!("invalid --exclude regex {r:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = PushOptions {
        jobs: args.jobs.max(1),
        compression,
        level,
        closure: !args.no_closure,
        exclude,
        include_upstream: args.include_upstream,
        upstream_keys: if args.upstream_key.is_empty() {
            std::iter::once("cache.nixos.org-1".to_owned())
                .chain(upstream_key_names)
                .collect()
        } else {
            args.upstream_key.clone()
        },
        omit_deriver: args.omit_deriver,
        signing_key,
        part_size: larder_server::config::parse_size(&args.part_size)
            .context("invalid --part-size")?
            .max(4096),
        ..PushOptions::default()
    };
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
    let store = tokio::task::spawn_blocking(LocalStore::open_default)
        .await
        .context("cannot open the local store")??;
    let mut planner = PushPlanner {
        t: &t,
        store: Some(store),
        roots,
        opts: &opts,
        include_upstream: args.include_upstream,
    };
    let how = Run {
        json: args.json,
        dry_run: args.dry_run,
        verb: "push",
    };
    run_rounds(&t, &opts, &how, &mut planner).await
}

struct PushPlanner<'a> {
    t: &'a crate::client_config::Target,
    store: Option<LocalStore>,
    roots: Vec<StorePath>,
    opts: &'a PushOptions,
    include_upstream: bool,
}

impl Planner for PushPlanner<'_> {
    async fn plan(&mut self) -> anyhow::Result<(push::Plan, String)> {
        let store = self.store.take().context("the local store was lost")?;
        let (plan, store) = push::plan(
            &self.t.client,
            &self.t.cache,
            store,
            self.roots.clone(),
            self.opts,
        )
        .await
        .context("cannot plan the push")?;
        self.store = Some(store);
        let skips = format!(
            "{} already in the cache, {} signed by an upstream key{}, {} excluded",
            plan.present,
            plan.upstream.len(),
            if plan.upstream.is_empty() || self.include_upstream {
                ""
            } else {
                " (--include-upstream pushes them)"
            },
            plan.excluded
        );
        Ok((plan, skips))
    }
}

/// Makes the plan of each round of [`run_rounds`].
pub(crate) trait Planner {
    /// What to transfer now, and why the other paths are skipped (for the summary line).
    fn plan(&mut self) -> impl std::future::Future<Output = anyhow::Result<(push::Plan, String)>>;
}

/// How [`run_rounds`] reports.
pub(crate) struct Run {
    pub json: bool,
    pub dry_run: bool,
    /// "push" or "import", for messages.
    pub verb: &'static str,
}

/// Plan, report the plan, then (unless a dry run) execute it with a progress bar or JSON
/// events, and report the summary; an error when any path failed. When the only failures are
/// references evicted from the cache while the push ran ([`push::replan_needed`]), plan and
/// execute again (up to [`push::PUSH_ROUNDS`] rounds).
pub(crate) async fn run_rounds(
    t: &crate::client_config::Target,
    opts: &PushOptions,
    how: &Run,
    planner: &mut impl Planner,
) -> anyhow::Result<()> {
    let (plan, skips) = planner.plan().await?;
    if how.json {
        print(
            &(serde_json::json!({
                "event": "plan", "paths": plan.total, "to_push": plan.paths.len(),
                "nar_bytes": plan.nar_bytes(), "present": plan.present,
                "upstream": plan.upstream.len(), "excluded": plan.excluded,
                "dry_run": how.dry_run,
            })
            .to_string()
                + "\n"),
        )?;
    } else {
        eprintln!(
            "{}: {} to {} ({} NAR), {skips}",
            count(plan.total as u64, "path"),
            plan.paths.len(),
            how.verb,
            human_size(plan.nar_bytes() as i64)
        );
    }
    if how.dry_run {
        if how.json {
            for p in &plan.paths {
                print(&(serde_json::json!({"event": format!("would-{}", how.verb), "path": p.path.to_absolute(), "nar_size": p.nar_size}).to_string() + "\n"))?;
            }
            print(&(serde_json::json!({"event": "summary", "pushed": 0, "skipped": plan.total - plan.paths.len(), "failed": 0, "bytes": 0, "dry_run": true}).to_string() + "\n"))?;
        } else {
            let mut out = String::new();
            for p in &plan.paths {
                out.push_str(&format!("{}\t{}\n", p.path, human_size(p.nar_size as i64)));
            }
            print(&out)?;
        }
        return Ok(());
    }
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
        eprintln!(
            "note: {} references were evicted from the cache while this ran; sending them again",
            plan.paths.len()
        );
        match execute_with_display(t, &plan, opts, how).await {
            Ok(later) => summary.absorb(later),
            Err(stopped) => return Err(interrupted(how, &summary, to_transfer, stopped)),
        }
    }
    if how.json {
        print(
            &(serde_json::json!({
                "event": "summary", "pushed": summary.pushed, "skipped": summary.skipped,
                "failed": summary.failed, "bytes": summary.bytes, "file_bytes": summary.file_bytes,
                "seconds": summary.seconds,
            })
            .to_string()
                + "\n"),
        )?;
    } else {
        let rate = if summary.seconds > 0.0 {
            summary.bytes as f64 / summary.seconds
        } else {
            0.0
        };
        eprintln!(
            "{} {} ({} NAR, {} uploaded) in {:.1}s ({}/s); skipped {} ({skips}); failed {}",
            if how.verb == "push" {
                "pushed"
            } else {
                "imported"
            },
            count(summary.pushed as u64, "path"),
            human_size(summary.bytes as i64),
            human_size(summary.file_bytes as i64),
            summary.seconds,
            human_size(rate as i64),
            summary.skipped,
            summary.failed
        );
    }
    // A cache over its limit evicts least recently used paths, which can be those just sent:
    // a push whose closure is not all in the cache at the end is no success, since a consumer
    // would build what is missing. Asked once the evictions the push triggered are done.
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
    if summary.failed == 0 && limited {
        let (after, _) = planner.plan().await?;
        if !after.paths.is_empty() {
            let names: Vec<String> = after
                .paths
                .iter()
                .take(3)
                .map(|p| p.path.to_absolute())
                .collect();
            return Err(fail_with_hint(
                format!(
                    "cache {:?} evicted {} of this closure to stay under its size limit ({}{})",
                    t.cache,
                    count(after.paths.len() as u64, "path"),
                    names.join(", "),
                    if after.paths.len() > 3 { ", …" } else { "" }
                ),
                format!(
                    "the closure does not fit beside what the cache keeps (its pins and newer \
                     paths): raise the limit (`larder cache configure {} --max-size …`), delete \
                     pins it no longer needs (`larder pin list {}`), or push less; `larder cache \
                     info {}` shows its size and limit",
                    t.cache, t.cache, t.cache
                ),
            ));
        }
    }
    if summary.failed > 0 {
        return Err(fail_with_hint(
            format!(
                "{} of {to_transfer} paths failed to {}",
                summary.failed, how.verb
            ),
            format!(
                "the errors above say why; running `larder {}` again transfers only what is still missing",
                how.verb
            ),
        ));
    }
    Ok(())
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
        let kept: Vec<serde_json::Value> = stopped
            .uploading
            .iter()
            .filter_map(|(p, u)| {
                u.kept.filter(|(parts, _)| *parts > 0).map(|(parts, nar_bytes)| {
                    serde_json::json!({"path": p, "parts": parts, "nar_bytes": nar_bytes, "nar_size": u.nar_size})
                })
            })
            .collect();
        let _ = print(
            &(serde_json::json!({
                "event": "interrupted", "pushed": done, "bytes": bytes, "kept": kept,
            })
            .to_string()
                + "\n"),
        );
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
        let names: Vec<&str> = lost.iter().take(3).map(|(p, ..)| p.as_str()).collect();
        msg.push_str(&format!(
            "\n  sent again from the start by the next run: {}{}",
            names.join(", "),
            if lost.len() > 3 { ", …" } else { "" }
        ));
    }
    crate::output::interrupted_with_hint(
        msg,
        format!(
            "run the same command again to resume: it skips what was {done_verb} and sends only the \
             parts the server does not have (it keeps them for {} min after the last one)",
            larder_server::config::MULTIPART_IDLE_TTL.as_secs() / 60
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
    t: &crate::client_config::Target,
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
    let cache = t
        .client
        .cache_info(&t.cache)
        .await
        .with_context(|| format!("cannot use cache {:?}", t.cache))?;
    let old_key = cache.public_key.clone().unwrap_or_default();
    // A new key strands what the old one signed: only on purpose.
    if (cache.signing_mode == "client" || cache.paths > 0) && !args.rotate {
        let what = if cache.signing_mode == "client" {
            "already has a client-held key".to_owned()
        } else {
            format!("already holds {} paths signed by its key", cache.paths)
        };
        return Err(fail_with_hint(
            format!("cache {:?} {what} ({old_key}); a new key would leave those paths unverifiable for consumers that trust only the new one", t.cache),
            format!(
                "to push with the existing key from another machine, copy its LARDER_SIGNING_KEY; \
                 to replace it anyway, run `larder generate-keypair {} --rotate`",
                args.cache
            ),
        ));
    }
    // Each rotation gets a new name (`-client-2`, …): two keys never share one.
    let generation = old_key
        .split_once(':')
        .and_then(|(name, _)| name.rsplit_once("-client-"))
        .and_then(|(_, n)| n.parse::<u32>().ok())
        .map_or(1, |n| n + 1);
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let key = SigningKey::from_seed(&format!("{}.{host}-client-{generation}", t.cache), seed)
        .context("cannot make a key")?;
    let public = key.verifying_key().to_string();
    t.client
        .send(
            t.client
                .request(
                    reqwest::Method::POST,
                    &format!("/api/v1/caches/{}/public-key", t.cache),
                )
                .json(&serde_json::json!({ "public_key": public })),
        )
        .await
        .with_context(|| format!("cannot register the public key with cache {:?}", t.cache))?;
    let mut cfg = ClientConfig::load()?;
    cfg.signing_keys.insert(
        key_slot(t.client.base_url(), &t.cache),
        key.to_secret_string(),
    );
    let path = cfg.save()?;
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
    if cache.paths > 0 {
        eprintln!(
            "warning: the {} paths already in the cache are signed by {old_key} only; \
             consumers must trust both keys until they are pushed again:\n  \
             extra-trusted-public-keys = {old_key} {public}",
            cache.paths
        );
    }
    // Standard output: the public key, for scripts; the secret only when asked for.
    if args.print_secret {
        print(&format!(
            "export LARDER_SIGNING_KEY={}\n",
            key.to_secret_string()
        ))
    } else {
        print(&format!("{public}\n"))
    }
}
