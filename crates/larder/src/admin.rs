//! Admin verbs: `login`, `authtoken`, `cache …`, `token …`. Each is a thin client of the JSON
//! API; the server enforces every permission.

use std::io::{BufRead, IsTerminal};

use anyhow::Context;
use larder_client::api::{
    CacheInfo, ConfigureCache, CreateCache, CreateToken, Perm, Size, TokenInfo,
};
use larder_client::ApiClient;

use crate::client_config::{config_path, connect, target, ClientConfig, ServerEntry};
use crate::output::{fail_with_hint, human_size, print, print_json};

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Server URL, e.g. http://shoshin:8080
    url: String,
    /// The token (omit it to read it from standard input, which keeps it out of shell history;
    /// an empty answer saves the server without a token, like --anonymous).
    token: Option<String>,
    /// Name of this server in the client config. [default: default]
    #[arg(long)]
    name: Option<String>,
    /// Read the token from standard input.
    #[arg(long)]
    stdin: bool,
    /// Save the server without a token: enough to `use` and `pull` its public caches (a
    /// token is needed for private caches and for pushing).
    #[arg(long, conflicts_with_all = ["token", "stdin"])]
    anonymous: bool,
    /// In a CI job: trade the job's OIDC ID token (LARDER_OIDC_TOKEN, or GitHub Actions'
    /// ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN with audience LARDER_OIDC_AUDIENCE, default URL)
    /// for a token that expires within an hour, and save that.
    #[arg(long, conflicts_with_all = ["token", "stdin", "anonymous"])]
    oidc: bool,
    /// With --oidc: only this cache of those the server's rules grant (repeat for more).
    #[arg(long = "cache", value_name = "CACHE", requires = "oidc")]
    caches: Vec<String>,
}

#[derive(clap::Args)]
pub struct AuthtokenArgs {
    /// The token (omit it, or pass --stdin, to read it from standard input).
    token: Option<String>,
    /// Read the token from standard input.
    #[arg(long)]
    stdin: bool,
}

/// A token typed at `prompt` (shown on a terminal only) or piped in, trimmed.
fn token_from_stdin(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the token from standard input")?;
    Ok(line.trim().to_owned())
}

fn read_token(arg: Option<String>, stdin: bool) -> anyhow::Result<String> {
    let token = match arg {
        Some(t) if !stdin => t.trim().to_owned(),
        _ => token_from_stdin("token: ")?,
    };
    if token.is_empty() {
        return Err(fail_with_hint(
            "no token given",
            "pass it as an argument or on standard input (e.g. `larder login URL --stdin < token-file`)",
        ));
    }
    Ok(token)
}

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let token = if args.oidc {
        let anonymous = ApiClient::new(&args.url, None)?;
        let caches = (!args.caches.is_empty()).then(|| args.caches.clone());
        let t = crate::oidc_login::login_token(&anonymous, caches).await?;
        Some(
            t.token
                .context("the server's answer to the OIDC exchange holds no token")?,
        )
    } else if args.anonymous {
        None
    } else if args.token.is_none() && !args.stdin {
        // Asked for (or piped in); nothing at all means no token.
        Some(token_from_stdin("token (empty for public caches only): ")?).filter(|t| !t.is_empty())
    } else {
        Some(read_token(args.token, args.stdin)?)
    };
    let name = args.name.unwrap_or_else(|| "default".to_owned());
    let client = ApiClient::new(&args.url, token.clone())?;
    let who = client.whoami().await.with_context(|| match token {
        Some(_) => format!("cannot check the token against {}", args.url),
        None => format!("cannot reach a larder server at {}", args.url),
    })?;
    let mut cfg = ClientConfig::load()?;
    cfg.servers.insert(
        name.clone(),
        ServerEntry {
            url: client.base_url().to_owned(),
            token: token.clone(),
        },
    );
    if cfg.default_server.is_none() || name == "default" {
        cfg.default_server = Some(name.clone());
    }
    let path = cfg.save()?;
    if token.is_none() {
        eprintln!(
            "saved {} as server {name:?} in {}, without a token: its public caches can be used \
             and pulled (`larder use CACHE`); `larder login {} TOKEN` adds a token for private \
             caches and pushing",
            client.base_url(),
            path.display(),
            client.base_url()
        );
        return Ok(());
    }
    let scope = match &who.caches {
        None => "all caches".to_owned(),
        Some(c) => format!("caches {}", c.join(", ")),
    };
    eprintln!(
        "logged in to {} as {:?} ({} on {scope}); saved as server {name:?} in {}",
        client.base_url(),
        who.label.unwrap_or_default(),
        Perm::join(&who.perms, "+"),
        path.display()
    );
    Ok(())
}

pub async fn authtoken(args: AuthtokenArgs) -> anyhow::Result<()> {
    let token = read_token(args.token, args.stdin)?;
    let mut cfg = ClientConfig::load()?;
    let name = match cfg.default_server.clone() {
        Some(n) => n,
        None => {
            let url = crate::env::var(crate::env::SERVER).ok_or_else(|| {
                fail_with_hint(
                    "no default server to set the token of",
                    "run `larder login URL TOKEN` first (or set LARDER_SERVER)",
                )
            })?;
            cfg.servers
                .insert("default".into(), ServerEntry { url, token: None });
            cfg.default_server = Some("default".into());
            "default".into()
        }
    };
    let entry = cfg
        .servers
        .get_mut(&name)
        .ok_or_else(|| anyhow::anyhow!("the default server {name:?} is missing from the config"))?;
    let client = ApiClient::new(&entry.url, Some(token.clone()))?;
    client
        .whoami()
        .await
        .with_context(|| format!("cannot check the token against {}", entry.url))?;
    entry.token = Some(token);
    let path = cfg.save()?;
    eprintln!("token of server {name:?} saved in {}", path.display());
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum CacheCommand {
    /// Create a cache (server admin). It gets a managed signing key named
    /// `<cache>.<host>-1`; see `larder generate-keypair` for client-held keys.
    Create {
        /// Cache name: 1-63 of [a-z0-9-], starting with a letter or digit.
        name: String,
        /// Only tokens with pull permission may read it.
        #[arg(long)]
        private: bool,
        /// Storage limit, e.g. 5GiB (least recently used paths are evicted beyond it), or
        /// `none`. [default: none]
        #[arg(long)]
        max_size: Option<String>,
        /// Priority advertised to Nix (lower is preferred; cache.nixos.org is 40). [default: 41]
        #[arg(long)]
        priority: Option<i64>,
        /// Preferred compression of pushed NARs. [default: the server's, zstd]
        #[arg(long, value_parser = ["zstd", "xz", "none"])]
        compression: Option<String>,
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// Print the new cache as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the caches you can see.
    List {
        /// Print the caches as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show size, limit, path count, public key and the nix.conf lines of a cache.
    Info {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// Print the cache as JSON (sizes in bytes).
        #[arg(long)]
        json: bool,
    },
    /// Change a cache's settings (admin on the cache).
    #[command(visible_alias = "update")]
    Configure {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// Make the cache private.
        #[arg(long, conflicts_with = "public")]
        private: bool,
        /// Make the cache public.
        #[arg(long)]
        public: bool,
        /// Storage limit, e.g. 5GiB, or `none` to remove it.
        #[arg(long)]
        max_size: Option<String>,
        /// Priority advertised to Nix (lower is preferred; cache.nixos.org is 40).
        #[arg(long)]
        priority: Option<i64>,
        /// Preferred compression of NARs pushed from now on (stored NARs are kept as they are).
        #[arg(long, value_parser = ["zstd", "xz", "none"])]
        compression: Option<String>,
        #[command(flatten)]
        upstream: UpstreamArgs,
        /// Print the changed cache as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a cache and everything in it (admin on the cache).
    Delete {
        /// CACHE, SERVER:CACHE or the cache's URL (http://HOST:PORT/CACHE)
        cache: String,
        /// Confirm the deletion (required: there is no undo).
        #[arg(long)]
        yes: bool,
    },
}

/// Pull-through settings of `cache create` and `cache configure`.
#[derive(clap::Args, Debug, Default)]
pub struct UpstreamArgs {
    /// Upstream cache asked for the paths this cache lacks (pull-through), e.g.
    /// https://cache.nixos.org: what it serves, signed by a trusted upstream key, is fetched
    /// once and kept. Repeat for more, tried in order; replaces the list; `none` removes
    /// them.
    #[arg(long = "upstream", value_name = "URL")]
    upstreams: Vec<String>,
    /// Public key (name:base64) trusted for upstream paths, beside the server's
    /// upstream_keys (cache.nixos.org's by default). Repeat for more; replaces the list;
    /// `none` removes them.
    #[arg(long = "upstream-key", value_name = "KEY")]
    upstream_keys: Vec<String>,
}

impl UpstreamArgs {
    /// A list flag as the API takes it: `None` when not given, empty for `none`.
    fn list(values: &[String]) -> Option<Vec<String>> {
        match values {
            [] => None,
            [none] if none == "none" => Some(Vec::new()),
            v => Some(v.to_vec()),
        }
    }
}

/// What to tell about a cache near or over its limit (`cache info`, after a push).
pub(crate) fn limit_warning(c: &CacheInfo) -> Option<String> {
    let max = c.max_size.filter(|m| *m > 0)?;
    if c.size > max {
        Some(format!(
            "warning: cache {:?} holds {} against its limit of {}: paths that are not pinned \
             are evicted, least recently used first, even just after their upload; pinned \
             closures never are (see `larder pin list {}` and `larder gc {} --dry-run`)",
            c.name,
            human_size(c.size),
            human_size(max),
            c.name,
            c.name
        ))
    } else if c.near_limit {
        Some(format!(
            "warning: cache {:?} is over 85% of its limit; least recently used paths will be \
             evicted (see `larder gc {} --dry-run`)",
            c.name, c.name
        ))
    } else {
        None
    }
}

/// What the cache occupies after deduplication, next to what its limit counts.
fn stored_line(c: &CacheInfo) -> String {
    if c.size > 0 && c.stored_size > 0 {
        format!(
            "{} after deduplication ({:.0}% of its size)",
            human_size(c.stored_size),
            c.stored_size as f64 * 100.0 / c.size as f64
        )
    } else {
        human_size(c.stored_size)
    }
}

fn print_cache(c: &CacheInfo) -> anyhow::Result<()> {
    let limit = match c.max_size {
        Some(m) if m > 0 => format!(
            " of {} ({:.0}%)",
            human_size(m),
            c.size as f64 * 100.0 / m as f64
        ),
        _ => " (no limit)".to_owned(),
    };
    if let Some(w) = limit_warning(c) {
        eprintln!("{w}");
    }
    let mut conf: String = c.nix_conf.lines().map(|l| format!("  {l}\n")).collect();
    if c.private {
        conf.push_str(&format!(
            "  # private: Nix also needs a pull token in a netrc file (`larder use {}` writes it)\n",
            c.name
        ));
    }
    let upstreams: String = c
        .upstreams
        .iter()
        .map(|u| format!("upstream:    {u}\n"))
        .chain(
            c.upstream_keys
                .iter()
                .map(|k| format!("upstream key: {k}\n")),
        )
        .collect();
    let flake: String = c
        .flake_nix_config
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    print(&format!(
        "cache:       {}\nurl:         {}\nvisibility:  {}\npriority:    {}\ncompression: {}\n\
         size:        {}{limit}\nstored:      {}\npaths:       {}\nsigning:     {}\n\
         public key:  {}\n{upstreams}nix.conf:\n{conf}flake.nix:\n{flake}",
        c.name,
        c.url,
        if c.private { "private" } else { "public" },
        c.priority,
        c.compression,
        human_size(c.size),
        stored_line(c),
        c.paths,
        c.signing_mode,
        c.public_key.as_deref().unwrap_or("(none registered)"),
    ))
}

/// `--max-size`: a size (text, parsed by the server), or `none` (`None`: no limit). 0 is
/// refused, not taken for "no limit".
fn max_size_arg(m: &str) -> anyhow::Result<Option<Size>> {
    if m == "none" {
        return Ok(None);
    }
    if larder_server::config::parse_size(m).is_ok_and(|b| b == 0) {
        return Err(fail_with_hint(
            format!("--max-size {m} is not a limit"),
            "use `--max-size none` to remove the limit, or give a size such as 5GiB",
        ));
    }
    Ok(Some(Size::Text(m.to_owned())))
}

pub async fn cache(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Create {
            name,
            private,
            max_size,
            priority,
            compression,
            upstream,
            json,
        } => {
            create_cache(
                &name,
                private,
                max_size.as_deref(),
                priority,
                compression,
                upstream,
                json,
            )
            .await
        }
        CacheCommand::List { json } => list_caches(json).await,
        CacheCommand::Info { cache, json } => cache_info(&cache, json).await,
        CacheCommand::Configure {
            cache,
            private,
            public,
            max_size,
            priority,
            compression,
            upstream,
            json,
        } => {
            let private = (private || public).then_some(private);
            configure_cache(
                &cache,
                private,
                max_size.as_deref(),
                priority,
                compression,
                upstream,
                json,
            )
            .await
        }
        CacheCommand::Delete { cache, yes } => delete_cache(&cache, yes).await,
    }
}

/// `larder cache create`.
async fn create_cache(
    name: &str,
    private: bool,
    max_size: Option<&str>,
    priority: Option<i64>,
    compression: Option<String>,
    upstream: UpstreamArgs,
    json: bool,
) -> anyhow::Result<()> {
    let t = target(name)?;
    let c = t
        .client
        .create_cache(&CreateCache {
            name: t.cache.clone(),
            private,
            max_size: max_size.map(max_size_arg).transpose()?.flatten(),
            priority,
            compression,
            upstreams: UpstreamArgs::list(&upstream.upstreams).unwrap_or_default(),
            upstream_keys: UpstreamArgs::list(&upstream.upstream_keys).unwrap_or_default(),
        })
        .await
        .with_context(|| format!("cannot create cache {:?}", t.cache))?;
    if json {
        print_json(&c)?;
    } else {
        eprintln!("created cache {:?}", c.name);
        print_cache(&c)?;
    }
    Ok(())
}

/// `larder cache list`: a table, or JSON.
async fn list_caches(json: bool) -> anyhow::Result<()> {
    let caches = connect(None)?
        .list_caches()
        .await
        .context("cannot list caches")?;
    if json {
        print_json(&caches)?;
    } else if caches.is_empty() {
        eprintln!("no caches (create one with `larder cache create NAME`)");
    } else {
        let mut out = format!(
            "{:<24} {:<8} {:>8} {:>12}  {}\n",
            "NAME", "ACCESS", "PATHS", "SIZE", "URL"
        );
        for c in &caches {
            out.push_str(&format!(
                "{:<24} {:<8} {:>8} {:>12}  {}\n",
                c.name,
                if c.private { "private" } else { "public" },
                c.paths,
                human_size(c.size),
                c.url
            ));
        }
        print(&out)?;
    }
    Ok(())
}

/// `larder cache info`.
async fn cache_info(cache: &str, json: bool) -> anyhow::Result<()> {
    let t = target(cache)?;
    // A cache the server does not show: the error names the closest one that exists.
    let c = crate::client_config::require_cache(&t).await?;
    if json {
        print_json(&c)?;
    } else {
        print_cache(&c)?;
    }
    Ok(())
}

/// `larder cache configure`: `private` is `None` when neither --private nor --public was given.
async fn configure_cache(
    cache: &str,
    private: Option<bool>,
    max_size: Option<&str>,
    priority: Option<i64>,
    compression: Option<String>,
    upstream: UpstreamArgs,
    json: bool,
) -> anyhow::Result<()> {
    let t = target(cache)?;
    let body = ConfigureCache {
        private,
        max_size: max_size.map(max_size_arg).transpose()?,
        priority,
        compression,
        upstreams: UpstreamArgs::list(&upstream.upstreams),
        upstream_keys: UpstreamArgs::list(&upstream.upstream_keys),
    };
    if body.is_empty() {
        return Err(fail_with_hint(
            "nothing to change",
            "pass --private/--public, --max-size, --priority, --compression, --upstream or \
             --upstream-key",
        ));
    }
    let c = t
        .client
        .configure_cache(&t.cache, &body)
        .await
        .with_context(|| format!("cannot configure cache {:?}", t.cache))?;
    if json {
        print_json(&c)?;
    } else {
        print_cache(&c)?;
    }
    Ok(())
}

/// `larder cache delete`: only with --yes.
async fn delete_cache(cache: &str, yes: bool) -> anyhow::Result<()> {
    let t = target(cache)?;
    if !yes {
        return Err(fail_with_hint(
            format!("not deleting cache {:?} without confirmation", t.cache),
            format!("this deletes every path in it; run `larder cache delete {cache} --yes`"),
        ));
    }
    t.client
        .delete_cache(&t.cache)
        .await
        .with_context(|| format!("cannot delete cache {:?}", t.cache))?;
    eprintln!("deleted cache {:?}", t.cache);
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once: the server keeps only its hash).
    Create {
        /// Permission: pull, push or admin (repeatable; push implies pull, admin implies push).
        #[arg(long = "perm", required = true, value_parser = ["pull", "push", "admin"])]
        perms: Vec<String>,
        /// Restrict to this cache (repeatable; it must exist); without it the token covers
        /// every cache.
        #[arg(long = "cache")]
        caches: Vec<String>,
        /// Lifetime, e.g. 30d, 12h. [default: never expires]
        #[arg(long)]
        expires: Option<String>,
        /// A label to recognise the token by, e.g. shoshin-desktop.
        #[arg(long)]
        label: Option<String>,
        /// Print the token's record as JSON (the token is its `token` field).
        #[arg(long)]
        json: bool,
        /// Server name from the client config. [default: the default server]
        #[arg(long)]
        server: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        /// Print the tokens as a JSON array.
        #[arg(long)]
        json: bool,
        /// Server name from the client config. [default: the default server]
        #[arg(long)]
        server: Option<String>,
    },
    /// Revoke a token by its id (from `token list`); it stops working within seconds.
    Revoke {
        /// The token's id (the ID column of `token list`, not the secret).
        id: String,
        /// Server name from the client config. [default: the default server]
        #[arg(long)]
        server: Option<String>,
    },
}

fn fmt_time(t: Option<i64>) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let now = larder_store::now_unix();
            let d = (t - now).abs();
            let span = if d >= 86400 {
                format!("{}d", d / 86400)
            } else if d >= 3600 {
                format!("{}h", d / 3600)
            } else if d >= 60 {
                format!("{}m", d / 60)
            } else {
                format!("{d}s")
            };
            if t >= now {
                format!("in {span}")
            } else {
                format!("{span} ago")
            }
        }
    }
}

/// What a token can do now: `revoked`, `expired`, `ended` (every cache it was scoped to was
/// deleted; the server grants it nothing) or `active`.
fn token_state(t: &TokenInfo) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= larder_store::now_unix()) {
        "expired"
    } else if t.caches.as_ref().is_some_and(Vec::is_empty) {
        "ended"
    } else {
        "active"
    }
}

/// The CACHES column of `token list`: `*` for every cache, else the names, with deleted
/// caches (scopes that ended with them) marked.
fn token_scope(t: &TokenInfo) -> String {
    let Some(live) = &t.caches else {
        return "*".into();
    };
    live.iter()
        .cloned()
        .chain(t.deleted_caches.iter().map(|c| format!("{c}(deleted)")))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            perms,
            caches,
            expires,
            label,
            json,
            server,
        } => {
            let client = connect(server.as_deref())?;
            let caches = if caches.is_empty() {
                None
            } else {
                Some(caches)
            };
            let t: TokenInfo = client
                .create_token(&CreateToken {
                    perms: perms
                        .iter()
                        .map(|p| p.parse::<Perm>())
                        .collect::<Result<_, _>>()?,
                    caches,
                    expires_in: expires,
                    label: label.unwrap_or_default(),
                })
                .await
                .context("cannot create the token")?;
            if json {
                print_json(&t)?;
            } else {
                print(&format!("{}\n", t.token.clone().unwrap_or_default()))?;
                eprintln!(
                    "created token {} ({} on {}); it is shown only once",
                    t.id,
                    Perm::join(&t.perms, "+"),
                    t.caches
                        .as_ref()
                        .map(|c| c.join(", "))
                        .unwrap_or_else(|| "all caches".into())
                );
            }
        }
        TokenCommand::List { json, server } => {
            let tokens = connect(server.as_deref())?
                .list_tokens()
                .await
                .context("cannot list tokens")?;
            if json {
                print_json(&tokens)?;
            } else {
                let mut out = format!(
                    "{:<16} {:<20} {:<16} {:<20} {:<10} {}\n",
                    "ID", "LABEL", "PERMS", "CACHES", "EXPIRES", "STATE"
                );
                for t in &tokens {
                    out.push_str(&format!(
                        "{:<16} {:<20} {:<16} {:<20} {:<10} {}\n",
                        t.id,
                        t.label,
                        Perm::join(&t.perms, "+"),
                        token_scope(t),
                        fmt_time(t.expires_at),
                        token_state(t)
                    ));
                }
                print(&out)?;
            }
        }
        TokenCommand::Revoke { id, server } => {
            connect(server.as_deref())?
                .revoke_token(&id)
                .await
                .with_context(|| format!("cannot revoke token {id}"))?;
            eprintln!("revoked token {id}");
        }
    }
    let _ = config_path;
    Ok(())
}
