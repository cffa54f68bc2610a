//! The web UI (SPEC §2.5): server-rendered HTML for people, beside the JSON API for programs.
//!
//! Every page lives under `/ui/` and every asset under `/static/`, both reserved cache names,
//! so no page can shadow a cache's Nix protocol routes (`/<cache>/…`):
//! - `GET /` redirects to `/ui/`, and `GET /<cache>` to `/ui/caches/<cache>` (the addresses
//!   SPEC names); Nix never requests either;
//! - `GET /ui/`: the caches the visitor may read;
//! - `GET /ui/caches/<cache>[?q=TEXT&cursor=C&limit=N]`: usage against the limit as a bar
//!   (the 85 % warning), path count, public key, the `nix.conf` lines and flake block (the
//!   text of `larder cache info`, from [`crate::api::cache_json`]), charts of the last 30
//!   days' size and downloads (the stats API's series, [`crate::stats::series`], drawn as
//!   inline SVG by [`charts`]), pins, and the searchable, keyset-paginated path list (the
//!   contents API's queries, [`crate::api::contents`]);
//! - `GET /ui/caches/<cache>/paths/<path>`: narinfo fields, references and referrers as links,
//!   pins holding the path, the narinfo as served;
//! - `GET|POST /ui/login`, `POST /ui/logout`: the browser's token, kept in a cookie.
//!
//! **Escaping.** Pages are built with `maud`, whose `html!` escapes every interpolated value
//! (`&`, `<`, `>`, `"`, `'`); nothing from the database or the request is ever inserted
//! unescaped. URLs built from values are percent-encoded first ([`pct`]). Pages carry a
//! Content-Security-Policy that allows only this server's stylesheet and script, so even an
//! escaping mistake could not run an inline script.
//!
//! **Who is looking.** An `Authorization` header, exactly as for the API, or else the
//! `larder_token` cookie set by the login form: the token itself, `HttpOnly` (no script can
//! read it), `SameSite=Strict` (no other site's page can make the browser send it), `Secure`
//! when `public_url` is `https://`, and without expiry (gone when the browser session ends, or
//! at "Log out"). Only UI pages read the cookie: the Nix protocol and the API never do, so the
//! hot path is unchanged and no cross-site request can act with it. A private cache the
//! visitor may not pull answers the same 404 as a cache that does not exist.
//!
//! **No JavaScript needed.** Search is a GET form, pages are links, login and logout are
//! plain forms; `copy.js` only adds "Copy" buttons to the copyable blocks.

use std::collections::HashMap;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use larder_nix::store_path::STORE_DIR;
use larder_store::meta::{CacheRow, CacheStats, Keep, PinRow};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use crate::access::can_see;
use crate::api::cache_json;
use crate::api::contents::{list_page, path_detail, PageRequest};
use crate::auth::{principal, principal_for_token, Grant, Principal};
use crate::cache_lookup::load_cache;
use crate::error::ApiError;
use crate::routes::Routes;
use crate::{valid_cache_name, AppState};
use larder_api::PathList;

mod charts;

/// Paths per page of the path list, unless `?limit=` says otherwise.
pub const PAGE_SIZE: i64 = 50;
/// The cookie that holds a browser's token.
pub const COOKIE: &str = "larder_token";

const CSS: &str = include_str!("ui/larder.css");
const JS: &str = include_str!("ui/copy.js");
const CSS_URL: &str = "/static/larder.css";
const JS_URL: &str = "/static/copy.js";

/// `?v=` on the asset links: a digest of both files, so a browser that cached them for an
/// hour still fetches the new ones right after an upgrade.
static ASSET_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use sha2::Digest;
    let d = sha2::Sha256::new()
        .chain_update(CSS)
        .chain_update(JS)
        .finalize();
    hex::encode(&d[..6])
});
/// Only this server's stylesheet and script, no inline code, no framing, forms post here only.
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
                   form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub fn routes() -> Routes {
    Routes::new()
        .get("/", || async { see_other("/ui/") })
        .get("/ui", || async { see_other("/ui/") })
        .get("/ui/", cache_list)
        .get("/ui/login", login_form)
        .post("/ui/login", login)
        .post("/ui/logout", logout)
        .get("/ui/caches/{cache}", cache_page)
        .get("/ui/caches/{cache}/paths/{path}", path_page)
        .get(CSS_URL, || async { asset("text/css; charset=utf-8", CSS) })
        .get(JS_URL, || async {
            asset("text/javascript; charset=utf-8", JS)
        })
        .get("/{cache}", cache_redirect)
}

// ---- who is looking -------------------------------------------------------------------------

/// The visitor of a page.
struct Viewer {
    principal: Principal,
    /// Signed in with the login cookie (the page offers "Log out").
    by_cookie: bool,
    /// The cookie's token no longer works (revoked, expired): the response deletes it.
    stale_cookie: bool,
}

impl Viewer {
    fn grant(&self) -> Option<&Grant> {
        self.principal.grant()
    }
}

/// The token in the `larder_token` cookie, if the request has one.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().trim().to_owned())
        .filter(|v| !v.is_empty())
}

async fn viewer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        // Credentials sent on purpose: a bad one is a 401, as everywhere else.
        return Ok(Viewer {
            principal: principal(state, headers).await?,
            by_cookie: false,
            stale_cookie: false,
        });
    }
    let Some(token) = cookie_token(headers) else {
        return Ok(Viewer {
            principal: Principal::Anonymous,
            by_cookie: false,
            stale_cookie: false,
        });
    };
    match principal_for_token(state, &token).await {
        Ok(p) => Ok(Viewer {
            principal: p,
            by_cookie: true,
            stale_cookie: false,
        }),
        Err(ApiError::InvalidToken(_)) => Ok(Viewer {
            principal: Principal::Anonymous,
            by_cookie: false,
            stale_cookie: true,
        }),
        Err(e) => Err(e),
    }
}

/// The cache `name` if the visitor may read it. A private cache the visitor may not pull is
/// the same 404 as a missing one, built by the same function.
async fn visible_cache(
    state: &AppState,
    v: &Viewer,
    name: &str,
) -> Result<std::sync::Arc<CacheRow>, ApiError> {
    let no_such_cache = || ApiError::not_found(format!("no cache named {name:?}"));
    let c = match load_cache(state, name).await {
        Ok(c) => c,
        Err(ApiError::NotFound(_)) => return Err(no_such_cache()),
        Err(e) => return Err(e),
    };
    if !can_see(&v.principal, &c) {
        return Err(no_such_cache());
    }
    Ok(c)
}

// ---- responses ------------------------------------------------------------------------------

fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(l) => (StatusCode::SEE_OTHER, [(header::LOCATION, l)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

fn secure_cookies(state: &AppState) -> bool {
    state.config.public_url.starts_with("https://")
}

fn set_cookie(state: &AppState, value: &str, delete: bool) -> HeaderValue {
    let mut c = cookie::Cookie::build((COOKIE, value))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure_cookies(state));
    if delete {
        c = c.max_age(cookie::time::Duration::ZERO);
    }
    // Tokens are checked to be cookie-safe before they get here.
    HeaderValue::from_str(&c.build().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("larder_token=; Max-Age=0"))
}

/// An HTML page with the headers every page carries.
fn html_response(
    state: &AppState,
    status: StatusCode,
    v: Option<&Viewer>,
    body: Markup,
) -> Response {
    let mut resp = (status, body.into_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Pages may show a private cache: never kept by a shared cache or the back button's disk.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if v.is_some_and(|v| v.stale_cookie) {
        h.insert(header::SET_COOKIE, set_cookie(state, "", true));
    }
    resp
}

/// The error page for `e`, with `e`'s status (logged as the API logs it).
fn error_page(state: &AppState, e: ApiError, v: Option<&Viewer>, here: &str) -> Response {
    let status = e.status();
    let message = e.to_string();
    // Logs internal errors once, the way every API error is logged.
    drop(e.into_response());
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = html! {
        h1 { (title) }
        p.error role="alert" { (message) }
        p { a href="/ui/" { "Back to the list of caches" } }
    };
    html_response(state, status, v, layout(&title, v, here, &[], body))
}

/// Render `content` for a visitor, or the error page.
fn respond(
    state: &AppState,
    v: &Viewer,
    here: &str,
    result: Result<(String, Vec<Crumb>, Markup), ApiError>,
) -> Response {
    match result {
        Ok((title, crumbs, content)) => html_response(
            state,
            StatusCode::OK,
            Some(v),
            layout(&title, Some(v), here, &crumbs, content),
        ),
        Err(e) => error_page(state, e, Some(v), here),
    }
}

// ---- layout and small pieces ----------------------------------------------------------------

/// A breadcrumb: a label and, except for the current page, a link.
struct Crumb(String, Option<String>);

fn login_href(here: &str) -> String {
    if here.starts_with("/ui/") && here != "/ui/login" {
        format!("/ui/login?next={}", pct(here))
    } else {
        "/ui/login".to_owned()
    }
}

fn layout(
    title: &str,
    v: Option<&Viewer>,
    here: &str,
    crumbs: &[Crumb],
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · larder" }
                link rel="stylesheet" href=(format!("{CSS_URL}?v={}", *ASSET_VERSION));
                script src=(format!("{JS_URL}?v={}", *ASSET_VERSION)) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.site {
                    a.brand href="/ui/" { "lar" span { "der" } }
                    nav aria-label="Account" {
                        @match v.and_then(Viewer::grant) {
                            Some(g) => {
                                span {
                                    "Signed in: "
                                    strong { @if g.label.is_empty() { "token " (g.id) } @else { (g.label) } }
                                }
                                @if v.is_some_and(|v| v.by_cookie) {
                                    form method="post" action="/ui/logout" {
                                        button.link type="submit" { "Log out" }
                                    }
                                }
                            }
                            None => { a href=(login_href(here)) { "Log in" } }
                        }
                    }
                }
                main #main {
                    @if !crumbs.is_empty() {
                        nav aria-label="Breadcrumb" {
                            ol.crumbs {
                                @for Crumb(label, href) in crumbs {
                                    li {
                                        @match href {
                                            Some(h) => { a href=(h) { (label) } }
                                            None => { span aria-current="page" { (label) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if v.is_some_and(|v| v.stale_cookie) {
                        p.warning role="status" {
                            "The token saved in this browser no longer works (revoked or expired): \
                             you are browsing anonymously. "
                            a href=(login_href(here)) { "Log in again" }
                        }
                    }
                    (content)
                }
                footer.site {
                    "larder " (env!("CARGO_PKG_VERSION")) " · "
                    a href="/api/v1/openapi.json" { "JSON API" } " · "
                    a href="/metrics" { "metrics" }
                }
            }
        }
    }
}

/// Percent-encoding for a path segment or a query value.
pub use larder_nix::url::encode_component as pct;

fn cache_href(cache: &str) -> String {
    format!("/ui/caches/{}", pct(cache))
}

/// The page of a store path (absolute or basename) in a cache.
fn path_href(cache: &str, store_path: &str) -> String {
    let base = store_path
        .strip_prefix(STORE_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(store_path);
    format!("{}/paths/{}", cache_href(cache), pct(base))
}

/// A page of the path list: search text, cursor, page size (when not the default).
fn list_href(cache: &str, q: Option<&str>, cursor: Option<&str>, limit: Option<i64>) -> String {
    let mut params = Vec::new();
    if let Some(q) = q {
        params.push(format!("q={}", pct(q)));
    }
    if let Some(c) = cursor {
        params.push(format!("cursor={}", pct(c)));
    }
    if let Some(l) = limit {
        params.push(format!("limit={l}"));
    }
    let mut href = cache_href(cache);
    if !params.is_empty() {
        href.push('?');
        href.push_str(&params.join("&"));
    }
    href.push_str("#paths");
    href
}

/// Bytes in binary units, as the CLI shows them (one definition, in larder-nix).
pub use larder_nix::size::human_size;

/// A Unix time as `YYYY-MM-DD HH:MM UTC` and as an RFC 3339 `datetime`.
fn utc(ts: i64) -> (String, String) {
    let (y, m, d) = crate::stats::civil_from_days(ts.div_euclid(86_400));
    let s = ts.rem_euclid(86_400);
    let (hh, mm, ss) = (s / 3600, s % 3600 / 60, s % 60);
    (
        format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC"),
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    )
}

fn time(ts: i64) -> Markup {
    let (text, iso) = utc(ts);
    html! { time datetime=(iso) { (text) } }
}

fn last_use(ts: Option<i64>) -> Markup {
    match ts {
        Some(t) => time(t),
        None => html! { span.muted { "never" } },
    }
}

fn badge(private: bool) -> Markup {
    html! {
        @if private { span.badge.private { "private" } } @else { span.badge { "public" } }
    }
}

fn percent(size: i64, max: i64) -> String {
    format!("{:.0} %", size as f64 * 100.0 / max as f64)
}

/// Size against the limit: a bar (marked at the warning threshold) and the numbers; without
/// a limit, the size alone.
fn usage(name: &str, size: i64, max_size: Option<i64>) -> Markup {
    html! {
        @match max_size.filter(|m| *m > 0) {
            Some(max) => {
                (charts::size_bar(name, size, max))
                span.usage { (human_size(size)) " of " (human_size(max)) " (" (percent(size, max)) ")" }
            }
            None => { span.usage { (human_size(size)) " stored " span.muted { "(no limit)" } } }
        }
    }
}

/// A block of text to copy (nix.conf lines, a flake block, a key) under its caption; copy.js
/// puts a "Copy" button beside the caption.
fn copyable(caption: Markup, what: &str, text: &str) -> Markup {
    html! {
        div.copyable {
            div.copy-head { p { (caption) } }
            pre data-copy=(what) { (text) }
        }
    }
}

fn keep_text(k: &Keep) -> String {
    match k {
        Keep::Forever => "forever".to_owned(),
        Keep::Revisions(n) => format!("newest {n} revision(s)"),
        Keep::Days(n) => format!("{n} day(s)"),
    }
}

fn basename(store_path: &str) -> &str {
    store_path
        .strip_prefix(STORE_DIR)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(store_path)
}

// ---- pages ----------------------------------------------------------------------------------

fn here(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned())
}

async fn cache_redirect(Path(name): Path<String>) -> Response {
    if valid_cache_name(&name) {
        see_other(&cache_href(&name))
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn cache_list(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let here = here(&uri);
    let v = match viewer(&state, &headers).await {
        Ok(v) => v,
        Err(e) => return error_page(&state, e, None, &here),
    };
    let result = cache_list_content(&state, &v, &here).await;
    respond(&state, &v, &here, result)
}

async fn cache_list_content(
    state: &AppState,
    v: &Viewer,
    here: &str,
) -> Result<(String, Vec<Crumb>, Markup), ApiError> {
    let stats: HashMap<i64, CacheStats> = state.meta.all_cache_stats().await?.into_iter().collect();
    let caches: Vec<CacheRow> = state
        .meta
        .list_caches()
        .await?
        .into_iter()
        .filter(|c| can_see(&v.principal, c))
        .collect();
    let empty = CacheStats::default();
    let anonymous = v.grant().is_none();
    let content = html! {
        h1 { "Caches" }
        @if caches.is_empty() {
            p { "No caches to show." }
        } @else {
            ul.caches.grid {
                @for c in &caches {
                    @let s = stats.get(&c.id).unwrap_or(&empty);
                    li {
                        article.card {
                            h2 { a href=(cache_href(&c.name)) { (c.name) } " " (badge(c.private)) }
                            p.muted { (s.paths) " paths · priority " (c.priority) }
                            (usage(&c.name, s.size, c.max_size))
                            @if crate::retention::over_warning(c, s.size) {
                                p.warning { "Over 85 % of its limit." }
                            }
                        }
                    }
                }
            }
        }
        @if anonymous {
            p.muted { "Private caches appear once you " a href=(login_href(here)) { "log in" } " with a token that can pull them." }
        }
    };
    Ok(("Caches".to_owned(), vec![], content))
}

/// `?q=` search text, `?cursor=` (the last path of the previous page), `?limit=` page size.
#[derive(Deserialize)]
struct ListParams {
    q: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

async fn cache_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path(name): Path<String>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let here = here(&uri);
    let v = match viewer(&state, &headers).await {
        Ok(v) => v,
        Err(e) => return error_page(&state, e, None, &here),
    };
    let result = cache_content(&state, &v, &name, params).await;
    respond(&state, &v, &here, result)
}

async fn cache_content(
    state: &AppState,
    v: &Viewer,
    name: &str,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<(String, Vec<Crumb>, Markup), ApiError> {
    let c = visible_cache(state, v, name).await?;
    let Query(p) =
        params.map_err(|e| ApiError::bad(format!("invalid query: {}", e.body_text())))?;
    let q = p.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let cursor = p.cursor.as_deref().filter(|c| !c.is_empty());
    let req = PageRequest::parse(q, cursor, p.limit.unwrap_or(PAGE_SIZE))?;
    let info = cache_json(state, &c).await?;
    let pins = state.meta.list_pins(c.id).await?;
    let page = list_page(state, &c, &req).await?;
    let stats = crate::stats::series(state, &c, crate::stats::DEFAULT_DAYS, info.size).await?;
    let content = html! {
        h1 { (c.name) " " (badge(c.private)) }
        div.grid {
            section.card aria-labelledby="usage-h" {
                h2 #usage-h { "Usage" }
                (usage(&c.name, info.size, info.max_size))
                @if info.near_limit {
                    p.warning role="status" {
                        "This cache is over 85 % of its limit: the least recently used paths will \
                         be evicted (see " code { "larder gc " (c.name) " --dry-run" } ")."
                    }
                }
                dl.facts {
                    dt { "Paths" } dd { (info.paths) }
                    dt { "Stored" } dd { (human_size(info.size)) " (" (human_size(info.nar_size)) " uncompressed)" }
                    dt { "After deduplication" } dd { (human_size(info.stored_size)) " (chunks shared between NARs and caches counted once)" }
                    dt { "Limit" } dd { @match info.max_size { Some(m) => { (human_size(m)) }, None => { "none" } } }
                    dt { "Priority" } dd { (info.priority) }
                    dt { "Compression" } dd { (info.compression) }
                    dt { "Signing" } dd { (info.signing_mode) }
                }
            }
            section.card aria-labelledby="use-h" {
                h2 #use-h { "Use this cache" }
                @match &info.public_key {
                    Some(k) => { (copyable(html! { "Public key:" }, "public key", k)) }
                    None => { p.muted { "No key registered yet (" code { "larder generate-keypair " (c.name) } ")." } }
                }
                (copyable(
                    html! { "Run " code { "larder use " (c.name) } ", or add to " code { "nix.conf" } ":" },
                    "nix.conf lines",
                    &info.nix_conf,
                ))
                @if c.private {
                    p.muted { "Private: Nix also needs a pull token in a netrc file (" code { "larder use " (c.name) } " writes it)." }
                }
                (copyable(html! { "In a " code { "flake.nix" } ":" }, "flake nixConfig block", &info.flake_nix_config))
            }
        }
        section.card #activity aria-labelledby="activity-h" {
            h2 #activity-h { "Size and downloads, last " (stats.days.len()) " days" }
            (charts::charts(&stats))
        }
        section.card aria-labelledby="pins-h" {
            h2 #pins-h { "Pins" }
            (pins_table(&c.name, &pins))
        }
        section.card #paths aria-labelledby="paths-h" {
            h2 #paths-h { "Paths" }
            (path_list(&c.name, q, p.limit, &req, &page))
        }
    };
    Ok((
        c.name.clone(),
        vec![
            Crumb("Caches".into(), Some("/ui/".into())),
            Crumb(c.name.clone(), None),
        ],
        content,
    ))
}

fn pins_table(cache: &str, pins: &[PinRow]) -> Markup {
    html! {
        @if pins.is_empty() {
            p.muted { "No pins. " code { "larder pin " (cache) " NAME PATH" } " keeps a closure from eviction." }
        } @else {
            table.rows {
                thead { tr { th { "Name" } th.num { "Revision" } th { "Store path" } th { "Kept" } th { "Pinned" } } }
                tbody {
                    @for p in pins {
                        tr {
                            td data-label="Name" { (p.name) }
                            td.num data-label="Revision" { (p.revision) }
                            td.path { a href=(path_href(cache, &p.store_path)) { (p.store_path) } }
                            td data-label="Kept" { (keep_text(&p.keep)) }
                            td data-label="Pinned" { (time(p.created_at)) }
                        }
                    }
                }
            }
        }
    }
}

fn path_list(
    cache: &str,
    q: Option<&str>,
    limit: Option<i64>,
    req: &PageRequest,
    page: &PathList,
) -> Markup {
    html! {
        form.search method="get" action=(cache_href(cache)) role="search" {
            div.field {
                label for="q" { "Search store paths" }
                input #q type="search" name="q" value=[q] placeholder="name or hash, e.g. python3"
                    maxlength="200" autocomplete="off";
            }
            @if let Some(l) = limit { input type="hidden" name="limit" value=(l); }
            button.primary type="submit" { "Search" }
            @if q.is_some() { a href=(list_href(cache, None, None, limit)) { "Show all" } }
        }
        p #count role="status" {
            @match q {
                Some(q) => { (page.total) " path(s) match “" (q) "”." }
                None => { (page.total) " path(s)." }
            }
            @if req.after.is_some() { " Showing the paths after the previous page." }
        }
        @if !page.paths.is_empty() {
            table.rows #path-list {
                thead { tr { th { "Store path" } th.num { "NAR size" } th.num { "Stored" } th { "Uploaded" } th { "Last use" } } }
                tbody {
                    @for p in &page.paths {
                        tr {
                            td.path {
                                a href=(path_href(cache, &p.store_path)) { (p.store_path) }
                                @if let Some(u) = &p.upstream { " " span.muted.upstream title=(u) { "(from upstream)" } }
                            }
                            td.num data-label="NAR size" { (human_size(p.nar_size)) }
                            td.num data-label="Stored" { (human_size(p.file_size)) }
                            td data-label="Uploaded" { (time(p.uploaded_at)) }
                            td data-label="Last use" { (last_use(p.last_used_at)) }
                        }
                    }
                }
            }
        }
        nav.pages aria-label="Pages" {
            @if req.after.is_some() {
                a href=(list_href(cache, q, None, limit)) { "« First page" }
            }
            @if let Some(next) = &page.next_cursor {
                a rel="next" href=(list_href(cache, q, Some(next), limit)) { "Next page »" }
            }
        }
    }
}

async fn path_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Path((name, path)): Path<(String, String)>,
) -> Response {
    let here = here(&uri);
    let v = match viewer(&state, &headers).await {
        Ok(v) => v,
        Err(e) => return error_page(&state, e, None, &here),
    };
    let result = path_content(&state, &v, &name, &path).await;
    respond(&state, &v, &here, result)
}

async fn path_content(
    state: &AppState,
    v: &Viewer,
    name: &str,
    arg: &str,
) -> Result<(String, Vec<Crumb>, Markup), ApiError> {
    let c = visible_cache(state, v, name).await?;
    let d = path_detail(state, &c, arg).await?;
    let cache = c.name.as_str();
    let content = html! {
        h1 { (d.name) }
        (copyable(html! { "Store path:" }, "store path", &d.store_path))
        section.card aria-labelledby="narinfo-h" {
            h2 #narinfo-h { "Narinfo" }
            dl.facts {
                dt { "StorePath" } dd.mono { (d.store_path) }
                dt { "URL" } dd.mono { (d.url) }
                dt { "Compression" } dd { (d.compression) }
                dt { "FileHash" } dd.mono { (d.file_hash) }
                dt { "FileSize" } dd { (d.file_size) " bytes (" (human_size(d.file_size)) ")" }
                dt { "NarHash" } dd.mono { (d.nar_hash) }
                dt { "NarSize" } dd { (d.nar_size) " bytes (" (human_size(d.nar_size)) ")" }
                dt { "Deriver" } dd.mono { @match &d.deriver { Some(x) => { (x) }, None => { span.muted { "none" } } } }
                @if let Some(ca) = &d.ca { dt { "CA" } dd.mono { (ca) } }
                dt { "Sig" } dd.mono {
                    @for (i, s) in d.sigs.iter().enumerate() { @if i > 0 { br; } (s) }
                    @if d.sigs.is_empty() { span.muted { "none" } }
                }
                dt { "Uploaded" } dd { (time(d.uploaded_at)) }
                @if let Some(u) = &d.upstream { dt { "From upstream" } dd.mono { (u) } }
                dt { "Last use" } dd { (last_use(d.last_used_at)) }
            }
            details {
                summary { "The narinfo as served" }
                pre { (d.narinfo) }
            }
        }
        div.grid {
            section.card aria-labelledby="refs-h" {
                h2 #refs-h { "References (" (d.references.len()) ")" }
                @if d.references.is_empty() {
                    p.muted { "None." }
                } @else {
                    ul.paths #references {
                        @for r in &d.references {
                            li {
                                @if r.in_cache {
                                    a href=(path_href(cache, &r.store_path)) { (r.store_path) }
                                    @if r.store_path == d.store_path { " " span.muted { "(itself)" } }
                                } @else {
                                    span.mono { (r.store_path) } " " span.muted { "(upstream, not in this cache)" }
                                }
                            }
                        }
                    }
                }
            }
            section.card aria-labelledby="referrers-h" {
                h2 #referrers-h { "Referrers (" (d.referrer_count) ")" }
                @if d.referrers.is_empty() {
                    p.muted { "No path of this cache references it." }
                } @else {
                    ul.paths #referrers {
                        @for r in &d.referrers {
                            li { a href=(path_href(cache, r)) { (r) } }
                        }
                    }
                    @if d.referrer_count > d.referrers.len() as i64 {
                        p.muted { "and " (d.referrer_count - d.referrers.len() as i64) " more" }
                    }
                }
            }
        }
        section.card aria-labelledby="pinned-h" {
            h2 #pinned-h { "Pins holding it" }
            @if d.pins.is_empty() {
                p.muted { "None: it may be evicted when the cache needs room." }
            } @else {
                ul {
                    @for p in &d.pins {
                        li {
                            strong { (p.name) } " (revision " (p.revision) ")"
                            @if p.store_path != d.store_path {
                                ", through " a href=(path_href(cache, &p.store_path)) { (basename(&p.store_path)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok((
        d.name.clone(),
        vec![
            Crumb("Caches".into(), Some("/ui/".into())),
            Crumb(c.name.clone(), Some(cache_href(cache))),
            Crumb(d.name.clone(), None),
        ],
        content,
    ))
}

// ---- login ----------------------------------------------------------------------------------

#[derive(Deserialize)]
struct NextParam {
    next: Option<String>,
}

/// Where to go after logging in: a UI page of this server, never another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && n.len() <= 2048
                && !n.contains("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n
        }
        _ => "/ui/",
    }
}

fn login_body(next: &str, error: Option<&str>) -> Markup {
    html! {
        h1 { "Log in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        p {
            "Paste a larder token that can pull the private caches you want to browse, e.g. from "
            code { "larder token create --perm pull --cache NAME --label browser" } "."
        }
        form.login method="post" action="/ui/login" {
            div {
                label for="token" { "Token" }
                input #token type="password" name="token" required autocomplete="current-password"
                    maxlength="256" spellcheck="false";
            }
            input type="hidden" name="next" value=(next);
            div { button.primary type="submit" { "Log in" } }
        }
        p.muted {
            "The token is kept in a cookie that scripts cannot read and other sites cannot send, \
             until you log out or close the browser. It gives this browser what the token allows."
        }
    }
}

async fn login_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<NextParam>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let v = match viewer(&state, &headers).await {
        Ok(v) => v,
        Err(e) => return error_page(&state, e, None, "/ui/login"),
    };
    let next = params.as_ref().ok().and_then(|p| p.next.as_deref());
    let body = login_body(safe_next(next), None);
    html_response(
        &state,
        StatusCode::OK,
        Some(&v),
        layout("Log in", Some(&v), "/ui/login", &[], body),
    )
}

/// Whether a form post comes from this server's own pages. Browsers send `Origin` on every
/// POST; a request without one is not from a browser's cross-site form.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Tokens are `larder_` + nix32; anything else could not be a cookie value anyway.
fn cookie_safe(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !same_origin(&headers) {
        return error_page(
            &state,
            ApiError::Forbidden("a login form must be sent from this server's own page".into()),
            None,
            "/ui/login",
        );
    }
    let Ok(Form(f)) = form else {
        return error_page(
            &state,
            ApiError::bad("the login form needs a token"),
            None,
            "/ui/login",
        );
    };
    let token = f.token.trim();
    let next = safe_next(f.next.as_deref());
    let refused = |msg: &str| {
        let body = login_body(next, Some(msg));
        html_response(
            &state,
            StatusCode::UNAUTHORIZED,
            None,
            layout("Log in", None, "/ui/login", &[], body),
        )
    };
    if token.is_empty() || !cookie_safe(token) {
        return refused("That is not a larder token.");
    }
    match principal_for_token(&state, token).await {
        Ok(Principal::Token(_)) => {
            let mut resp = see_other(next);
            resp.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(&state, token, false));
            resp
        }
        Ok(Principal::Anonymous) | Err(ApiError::InvalidToken(_)) => {
            refused("This token does not work: it is unknown, revoked or expired.")
        }
        Err(e) => error_page(&state, e, None, "/ui/login"),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !same_origin(&headers) {
        return error_page(
            &state,
            ApiError::Forbidden("a logout form must be sent from this server's own page".into()),
            None,
            "/ui/",
        );
    }
    let mut resp = see_other("/ui/");
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&state, "", true));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    #[test]
    fn maud_escapes_every_special_character() {
        let hostile = r#"<script>alert("x")</script> & 'q'"#;
        let out = html! { p title=(hostile) { (hostile) } }.into_string();
        assert!(!out.contains("<script>"), "{out}");
        assert!(
            out.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; "),
            "{out}"
        );
        // In an attribute, a quote cannot end the value early.
        assert!(
            !out.contains(r#"title="<"#) && !out.contains(r#""x""#),
            "{out}"
        );
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(pct("abc-1.2_~"), "abc-1.2_~");
        assert_eq!(pct("a b/c?d=e&f+g#h"), "a%20b%2Fc%3Fd%3De%26f%2Bg%23h");
        assert_eq!(pct("\"><"), "%22%3E%3C");
        assert_eq!(pct("é"), "%C3%A9");
        assert_eq!(
            path_href(
                "c",
                "/nix/store/0c7r5yq0hqd8pycr1pwn6pqw2f3p8fbl-g++-13?x=1"
            ),
            "/ui/caches/c/paths/0c7r5yq0hqd8pycr1pwn6pqw2f3p8fbl-g%2B%2B-13%3Fx%3D1"
        );
        assert_eq!(
            list_href("c", Some("a&b"), Some("h-n=1"), Some(5)),
            "/ui/caches/c?q=a%26b&cursor=h-n%3D1&limit=5#paths"
        );
        assert_eq!(list_href("c", None, None, None), "/ui/caches/c#paths");
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc(0).0, "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400).1, "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_764_097_036).1, "2025-11-25T18:57:16Z");
        assert_eq!(utc(-1).1, "1969-12-31T23:59:59Z");
        assert_eq!(utc(4_107_542_400).1, "2100-03-01T00:00:00Z");
    }

    #[test]
    fn sizes_are_binary_units() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(5 << 20), "5.0 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    #[test]
    fn next_after_login_stays_in_the_ui() {
        assert_eq!(safe_next(Some("/ui/caches/c?q=x")), "/ui/caches/c?q=x");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil",
            "/ui/\\evil",
            "/metrics",
            "/ui/a b",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; larder_token=larder_abc ; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("larder_abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "x=1".parse().unwrap());
        h.append(header::COOKIE, "larder_token=t2".parse().unwrap());
        assert_eq!(cookie_token(&h).as_deref(), Some("t2"));
        h.clear();
        h.append(header::COOKIE, "larder_token=".parse().unwrap());
        assert_eq!(cookie_token(&h), None);
    }

    #[test]
    fn cross_site_posts_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "cache.example:8080".parse().unwrap());
        assert!(
            same_origin(&h),
            "no Origin: not a browser's cross-site form"
        );
        h.insert(header::ORIGIN, "http://cache.example:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            "https://cache.example:8080".parse().unwrap(),
        );
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
