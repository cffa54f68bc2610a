//! Contents verbs: `larder ls CACHE`, `larder path-info CACHE PATH` and `larder path delete
//! CACHE PATH`, thin clients of `/api/v1/caches/{c}/paths[/{path}]` (see the README's
//! "Cache contents").

use anyhow::Context;
use larder_client::api::{PathDetail, PathEntry, PathList};
use larder_nix::store_path::STORE_DIR;

use crate::client_config::target;
use crate::output::{human_size, print, print_json};
use crate::retention_cmd::{store_path_arg, when};

/// Paths per page of `--all`.
const ALL_PAGE: u32 = 1000;

#[derive(clap::Args)]
pub struct LsArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// Only paths whose `<hash>-<name>` contains TEXT (case-insensitive).
    #[arg(long, short = 'q', value_name = "TEXT")]
    query: Option<String>,
    /// Paths per page (1-1000). [default: 100]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
    /// Start after this path: the cursor a previous page printed.
    #[arg(long, conflicts_with = "all")]
    cursor: Option<String>,
    /// Every page, not just the first.
    #[arg(long)]
    all: bool,
    /// Print the page (with --all, every path) as JSON, with the total and the next cursor.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PathInfoArgs {
    /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
    cache: String,
    /// A store path, its hash part, or a symlink to it (./result).
    path: String,
    /// Print the path's narinfo fields, references and referrers as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum PathCommand {
    /// Delete a path from a cache (admin on the cache). Refused while other paths of the
    /// cache reference it, unless --with-referrers, which deletes them too; refused for a
    /// pinned closure (delete the pin first).
    Delete {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// A store path, its hash part, or a symlink to it (./result).
        path: String,
        /// Also delete every path that (transitively) references it.
        #[arg(long)]
        with_referrers: bool,
        /// Print the deleted paths as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What the server should look up for PATH: the basename of a store path (also behind a
/// symlink such as ./result), or a hash part / basename as given.
fn path_arg(arg: &str) -> anyhow::Result<String> {
    let in_store = arg.starts_with(&format!("{STORE_DIR}/"));
    if in_store || std::fs::symlink_metadata(arg).is_ok() {
        let abs = store_path_arg(arg)?;
        return Ok(abs
            .strip_prefix(&format!("{STORE_DIR}/"))
            .unwrap_or(&abs)
            .to_owned());
    }
    Ok(arg.to_owned())
}

fn last_use(t: Option<i64>) -> String {
    t.map_or_else(|| "never".to_owned(), when)
}

fn table(paths: &[PathEntry]) -> String {
    let mut out = format!(
        "{:>10} {:>10} {:<10} {:<10} {}\n",
        "NAR SIZE", "STORED", "UPLOADED", "LAST USE", "STORE PATH"
    );
    for p in paths {
        out.push_str(&format!(
            "{:>10} {:>10} {:<10} {:<10} {}\n",
            human_size(p.nar_size),
            human_size(p.file_size),
            when(p.uploaded_at),
            last_use(p.last_used_at),
            p.store_path
        ));
        if p.upstream.is_some() {
            // Fetched from an upstream (pull-through), not pushed.
            out.insert_str(out.len() - 1, "  [upstream]");
        }
    }
    out
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let context = || format!("cannot list the paths of cache {:?}", t.cache);
    let query = args.query.as_deref();
    if !args.all {
        let page = t
            .client
            .list_paths(&t.cache, query, args.limit, args.cursor.as_deref())
            .await
            .with_context(context)?;
        if args.json {
            return print_json(&page);
        }
        print(&table(&page.paths))?;
        let what = match query {
            Some(q) => format!("{} path(s) match {q:?}", page.total),
            None => format!("{} path(s)", page.total),
        };
        match &page.next_cursor {
            Some(c) => eprintln!(
                "{what}; {} shown. Next page: larder ls {}{} --cursor {c} (or --all)",
                page.paths.len(),
                args.cache,
                query.map(|q| format!(" --query {q:?}")).unwrap_or_default(),
            ),
            None => eprintln!("{what}"),
        }
        return Ok(());
    }
    let limit = args.limit.unwrap_or(ALL_PAGE);
    let mut all = PathList {
        paths: Vec::new(),
        next_cursor: None,
        total: 0,
    };
    let mut cursor: Option<String> = None;
    loop {
        let page = t
            .client
            .list_paths(&t.cache, query, Some(limit), cursor.as_deref())
            .await
            .with_context(context)?;
        all.total = page.total;
        if !args.json {
            // Stream the table page by page: a large cache prints as it arrives.
            let text = table(&page.paths);
            let text = if cursor.is_some() {
                text.split_once('\n')
                    .map_or("", |(_, rows)| rows)
                    .to_owned()
            } else {
                text
            };
            print(&text)?;
        } else {
            all.paths.extend(page.paths);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if args.json {
        return print_json(&all);
    }
    eprintln!("{} path(s)", all.total);
    Ok(())
}

fn print_detail(d: &PathDetail) -> anyhow::Result<()> {
    let mut out = format!(
        "store path:  {}\nurl:         {}\ncompression: {}\nfile:        {} ({})\n\
         nar:         {} ({})\n",
        d.store_path,
        d.url,
        d.compression,
        human_size(d.file_size),
        d.file_hash,
        human_size(d.nar_size),
        d.nar_hash,
    );
    if let Some(drv) = &d.deriver {
        out.push_str(&format!("deriver:     {drv}\n"));
    }
    if let Some(ca) = &d.ca {
        out.push_str(&format!("ca:          {ca}\n"));
    }
    out.push_str(&format!(
        "uploaded:    {}\nlast use:    {}\n",
        when(d.uploaded_at),
        last_use(d.last_used_at)
    ));
    if let Some(u) = &d.upstream {
        out.push_str(&format!("upstream:    {u} (fetched, not pushed)\n"));
    }
    out.push_str(&format!("signatures ({}):\n", d.sigs.len()));
    for s in &d.sigs {
        out.push_str(&format!("  {s}\n"));
    }
    out.push_str(&format!("references ({}):\n", d.references.len()));
    for r in &d.references {
        let note = if r.in_cache { "" } else { "  (upstream)" };
        out.push_str(&format!("  {}{note}\n", r.store_path));
    }
    out.push_str(&format!("referrers ({}):\n", d.referrer_count));
    for r in &d.referrers {
        out.push_str(&format!("  {r}\n"));
    }
    if d.referrer_count > d.referrers.len() as i64 {
        out.push_str(&format!(
            "  … and {} more\n",
            d.referrer_count - d.referrers.len() as i64
        ));
    }
    if d.pins.is_empty() {
        out.push_str("pins:        none (eviction may remove it)\n");
    } else {
        out.push_str("pins (never evicted while pinned):\n");
        for p in &d.pins {
            out.push_str(&format!(
                "  {} revision {} ({})\n",
                p.name, p.revision, p.store_path
            ));
        }
    }
    print(&out)
}

pub async fn path_info(args: PathInfoArgs) -> anyhow::Result<()> {
    let t = target(&args.cache)?;
    let path = path_arg(&args.path)?;
    let d = t
        .client
        .path_info(&t.cache, &path)
        .await
        .with_context(|| format!("cannot get {path} from cache {:?}", t.cache))?;
    if args.json {
        return print_json(&d);
    }
    print_detail(&d)
}

pub async fn path(cmd: PathCommand) -> anyhow::Result<()> {
    match cmd {
        PathCommand::Delete {
            cache,
            path,
            with_referrers,
            json,
        } => {
            let t = target(&cache)?;
            let arg = path_arg(&path)?;
            let report = t
                .client
                .delete_path(&t.cache, &arg, with_referrers)
                .await
                .with_context(|| format!("cannot delete {arg} from cache {:?}", t.cache))?;
            if json {
                return print_json(&report);
            }
            let lines: String = report
                .deleted
                .iter()
                .map(|d| format!("{}\n", d.store_path))
                .collect();
            print(&lines)?;
            eprintln!(
                "deleted {} path(s) from cache {:?}, {} freed",
                report.deleted.len(),
                report.cache,
                human_size(report.freed)
            );
            Ok(())
        }
    }
}
