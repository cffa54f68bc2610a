//! The web UI in a real browser: Debian's headless Chromium, driven through chromedriver
//! (WebDriver, plain HTTP + JSON), against a real `larder serve` holding paths built and pushed
//! with real Nix.
//!
//! The main walk runs with JavaScript *disabled*, to prove no page needs it: the anonymous
//! cache list hides the private cache, typing in the search form narrows the path list,
//! "Next page" links walk every path once, a path page links its references and referrers, and
//! the login form makes the private cache appear (logging out hides it again). A second session
//! emulates a phone (390 px, `mobile: true`, so the viewport meta tag decides the layout) with
//! JavaScript on: nothing overflows sideways, and the copy buttons appear.
//!
//! The cache page's pictures are checked as drawn: the size bar at its percentage, and the
//! charts' marks for today carrying what the stats API recorded for the downloads made here.
//!
//! Screenshots (full pages, desktop and phone; the cache page also in the dark theme) are
//! written to `<target>/web-ui-screenshots/`;
//! the test prints the directory. Chromium and chromedriver are required: `.ci/run` installs
//! them (`chromium`, `chromium-driver`); without them the test fails.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const W3C_ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn require_browser() -> PathBuf {
    for (what, path) in [
        ("chromium", CHROMIUM),
        ("chromium-driver", "/usr/bin/chromedriver"),
    ] {
        assert!(
            Path::new(path).exists(),
            "the web UI test needs Debian's {what} ({path} is missing); `.ci/run` installs it \
             (apt-get install chromium chromium-driver)"
        );
    }
    PathBuf::from("/usr/bin/chromedriver")
}

/// `<target>/web-ui-screenshots`, emptied.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("web-ui-screenshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A chromedriver process and one browser session.
struct Browser {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromedriver and a headless Chromium (fresh profile) with `args`.
    fn start(driver: &Path, javascript: bool, args: &[&str]) -> Browser {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = rt.block_on(async {
                match http.get(format!("{base}/status")).send().await {
                    Ok(r) => r.json::<Value>().await.ok(),
                    Err(_) => None,
                }
            });
            if ready.is_some_and(|v| v["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut chrome_args = vec![
            "--headless=new".to_owned(),
            // Root in a container: Chromium's sandbox needs user namespaces it may not get.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        chrome_args.extend(args.iter().map(|a| a.to_string()));
        let mut options = json!({ "binary": CHROMIUM, "args": chrome_args });
        if !javascript {
            options["prefs"] = json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
        let mut b = Browser {
            rt,
            http,
            base,
            session: String::new(),
            driver: child,
            _profile: profile,
        };
        let v = b.call(
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
            } } }),
        );
        b.session = v["sessionId"].as_str().unwrap().to_owned();
        b
    }

    /// One WebDriver command; panics with the driver's error.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.base);
        let v: Value = self.rt.block_on(async {
            let req = match method {
                "GET" => self.http.get(&url),
                "DELETE" => self.http.delete(&url),
                _ => self.http.post(&url).json(&body),
            };
            let resp = req.send().await.expect("chromedriver answers");
            resp.json().await.expect("chromedriver answers JSON")
        });
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {method} {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), json!({ "url": url }));
    }
    fn url(&self) -> String {
        self.call("GET", &self.s("/url"), Value::Null)
            .as_str()
            .unwrap()
            .to_owned()
    }
    fn title(&self) -> String {
        self.call("GET", &self.s("/title"), Value::Null)
            .as_str()
            .unwrap()
            .to_owned()
    }
    fn source(&self) -> String {
        self.call("GET", &self.s("/source"), Value::Null)
            .as_str()
            .unwrap()
            .to_owned()
    }
    fn all(&self, css: &str) -> Vec<String> {
        self.call(
            "POST",
            &self.s("/elements"),
            json!({ "using": "css selector", "value": css }),
        )
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[W3C_ELEMENT].as_str().unwrap().to_owned())
        .collect()
    }
    fn one(&self, css: &str) -> String {
        let found = self.all(css);
        assert!(
            !found.is_empty(),
            "no element matches {css:?} on {}",
            self.url()
        );
        found[0].clone()
    }
    fn text(&self, element: &str) -> String {
        self.call(
            "GET",
            &self.s(&format!("/element/{element}/text")),
            Value::Null,
        )
        .as_str()
        .unwrap()
        .to_owned()
    }
    fn attr(&self, element: &str, name: &str) -> Option<String> {
        self.call(
            "GET",
            &self.s(&format!("/element/{element}/attribute/{name}")),
            Value::Null,
        )
        .as_str()
        .map(str::to_owned)
    }
    /// The element's rendered box: `(width, height)` in CSS pixels.
    fn size(&self, element: &str) -> (f64, f64) {
        let r = self.call(
            "GET",
            &self.s(&format!("/element/{element}/rect")),
            Value::Null,
        );
        (r["width"].as_f64().unwrap(), r["height"].as_f64().unwrap())
    }
    fn texts(&self, css: &str) -> Vec<String> {
        self.all(css).iter().map(|e| self.text(e)).collect()
    }
    /// Click the element `css`, a link or a submit button: every click in this test navigates,
    /// so wait (up to 15 s) until the page's URL changes. WebDriver may answer a click that
    /// submits a form before the navigation it starts, and reading the URL then races it.
    fn click(&self, css: &str) {
        let before = self.url();
        let e = self.one(css);
        self.call("POST", &self.s(&format!("/element/{e}/click")), json!({}));
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.url() == before {
            assert!(
                Instant::now() < deadline,
                "clicking {css} on {before} did not navigate"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn type_into(&self, css: &str, text: &str) {
        let e = self.one(css);
        self.call(
            "POST",
            &self.s(&format!("/element/{e}/value")),
            json!({ "text": text }),
        );
    }
    fn clear(&self, css: &str) {
        let e = self.one(css);
        self.call("POST", &self.s(&format!("/element/{e}/clear")), json!({}));
    }
    fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            json!({ "script": script, "args": [] }),
        )
    }
    fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            "POST",
            &self.s("/goog/cdp/execute"),
            json!({ "cmd": cmd, "params": params }),
        )
    }

    /// A PNG of the whole page (not only the window), written to `dir/name.png`.
    fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let metrics = self.cdp("Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let png = self.cdp(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": { "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1 },
            }),
        );
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png["data"].as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self
                .rt
                .block_on(async { self.http.delete(&url).send().await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Build with real Nix: `top` (referencing `dep`) and `hellos` independent paths, in one
/// `nix-build`; returns (top, dep, hellos).
fn build_paths(hellos: usize) -> (String, String, Vec<String>) {
    let tag = unique_tag();
    let mk = |name: &str, content: &str| {
        format!(
            "derivation {{ name = \"{name}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [\"-c\" \"echo {content} > $out\"]; }}"
        )
    };
    let mut items = vec![format!(
        "(let dep = {}; in {})",
        mk(&format!("libgreet-{tag}"), "lib"),
        mk(&format!("greeter-app-{tag}"), "${dep}")
    )];
    for i in 0..hellos {
        items.push(format!(
            "({})",
            mk(&format!("hello-{i}-{tag}"), &format!("hello{i}"))
        ));
    }
    let expr = format!("[ {} ]", items.join(" "));
    let outs = build_expr(&expr);
    assert_eq!(outs.len(), hellos + 1, "{outs:?}");
    let top = outs[0].clone();
    let refs = larder_testkit::nix::command("nix-store")
        .args(["-q", "--references", &top])
        .output()
        .unwrap();
    let dep = String::from_utf8(refs.stdout).unwrap().trim().to_owned();
    assert!(dep.contains("-libgreet-"), "{dep}");
    (top, dep, outs[1..].to_vec())
}

fn basename(p: &str) -> &str {
    p.strip_prefix("/nix/store/").unwrap()
}

#[test]
fn web_ui_in_headless_chromium() {
    let driver = require_browser();
    require_nix();
    let shots = screenshot_dir();
    eprintln!("web UI screenshots: {}", shots.display());

    let server = Server::start();
    server.create_cache("public-cache", &[]);
    server.create_cache("team-secret", &["--private"]);
    let push = server.token("push", "public-cache");
    let (top, dep, hellos) = build_paths(5);
    let mut pushed: Vec<&str> = vec![&top];
    pushed.extend(hellos.iter().map(String::as_str));
    let mut args = vec!["push", "public-cache"];
    args.extend(pushed.iter());
    server.cli_ok(&push, &args);
    server.cli_ok(&push, &["pin", "public-cache", "release", &top]);
    let secret_push = server.token("push", "team-secret");
    server.cli_ok(&secret_push, &["push", "team-secret", &hellos[0]]);
    let reader = server.token("pull", "team-secret");
    // A limit the pushed paths fill to 90 %: past the 85 % warning, under the limit.
    let info: Value =
        serde_json::from_str(&server.cli_ok(&push, &["cache", "info", "public-cache", "--json"]))
            .unwrap();
    let max = info["size"].as_i64().unwrap() * 100 / 90;
    server.cli_ok(
        &server.admin_token,
        &[
            "cache",
            "configure",
            "public-cache",
            "--max-size",
            &format!("{max}B"),
        ],
    );
    // Downloads for the cache page's charts: every pushed narinfo, and `top`'s NAR twice.
    let mut top_nar = String::new();
    for p in &pushed {
        let (code, narinfo) = server.http(
            "GET",
            &format!("/public-cache/{}.narinfo", &basename(p)[..32]),
            None,
        );
        assert_eq!(code, 200, "{narinfo}");
        if *p == top.as_str() {
            top_nar = narinfo
                .lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .unwrap()
                .to_owned();
        }
    }
    for _ in 0..2 {
        let (code, _) = server.http("GET", &format!("/public-cache/{top_nar}"), None);
        assert_eq!(code, 200);
    }
    // The server writes what it counted every 2 s.
    let today = larder_server::stats::date(larder_server::stats::today());
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let (code, body) = server.http("GET", "/api/v1/caches/public-cache/stats", None);
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let t = v["days"][29].clone();
        if t["nar_requests"] == 2 && t["narinfo_requests"].as_i64() >= Some(pushed.len() as i64) {
            assert_eq!(t["date"], today.as_str());
            break t;
        }
        assert!(Instant::now() < deadline, "downloads not recorded: {t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut all: BTreeSet<String> = hellos.iter().cloned().collect();
    all.insert(top.clone());
    all.insert(dep.clone());
    let url = &server.url;

    // ---- desktop, JavaScript disabled -------------------------------------------------------
    let b = Browser::start(&driver, false, &["--window-size=1280,900"]);
    assert!(
        b.script_disabled_check(),
        "this session must run without JavaScript"
    );

    // The cache list: `/` leads there; anonymous visitors do not see the private cache.
    b.goto(&format!("{url}/"));
    assert_eq!(b.url(), format!("{url}/ui/"));
    assert_eq!(b.title(), "Caches · larder");
    let names = b.texts("ul.caches h2 a");
    assert_eq!(names, vec!["public-cache"], "{}", b.source());
    assert!(!b.source().contains("team-secret"));
    b.screenshot(&shots, "1-cache-list-anonymous-desktop");
    b.goto(&format!("{url}/ui/caches/team-secret"));
    assert!(b.title().starts_with("404"), "{}", b.title());

    // The cache page: usage against the limit, the nix.conf lines, pins, the paths.
    b.goto(&format!("{url}/public-cache"));
    assert_eq!(b.url(), format!("{url}/ui/caches/public-cache"));
    let info: Value =
        serde_json::from_str(&server.cli_ok(&push, &["cache", "info", "public-cache", "--json"]))
            .unwrap();
    let blocks = b.texts("pre[data-copy]");
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    assert_eq!(blocks[0], info["public_key"].as_str().unwrap());
    assert_eq!(
        blocks[1].trim_end(),
        info["nix_conf"].as_str().unwrap().trim_end()
    );
    assert_eq!(
        blocks[2].trim_end(),
        info["flake_nix_config"].as_str().unwrap().trim_end()
    );
    let bar = b.one("svg.sizebar");
    assert_eq!(b.attr(&bar, "data-percent").as_deref(), Some("90"));
    let usage = b.text(&b.one(".usage"));
    assert!(usage.ends_with("(90 %)"), "{usage}");
    // The charts: drawn (a box on screen), today's marks carrying the recorded numbers.
    assert_eq!(b.all("figure.chart svg").len(), 3);
    for css in ["#chart-size svg", "#chart-bytes svg", "#chart-requests svg"] {
        let (w, h) = b.size(&b.one(css));
        assert!(w > 250.0 && h > 100.0, "{css} is {w}×{h}");
    }
    let value = |css: &str| {
        let e = b.one(&format!("{css}[data-date='{today}']"));
        let (w, h) = b.size(&e);
        assert!(w > 0.0 && h > 0.0, "{css} of today is not drawn");
        b.attr(&e, "data-value").unwrap().parse::<i64>().unwrap()
    };
    assert_eq!(
        value("#chart-bytes rect.bar"),
        stats["bytes"].as_i64().unwrap()
    );
    assert_eq!(value("#chart-requests rect.bar.nar"), 2);
    assert_eq!(
        value("#chart-requests rect.bar.narinfo"),
        stats["narinfo_requests"].as_i64().unwrap()
    );
    assert_eq!(
        value("#chart-size circle.point"),
        info["size"].as_i64().unwrap()
    );
    assert!(b.text(&b.one("#chart-requests figcaption")).contains("NAR"));
    let warning = b.text(&b.one("#usage-h ~ .warning"));
    assert!(warning.contains("over 85 %"), "{warning}");
    assert_eq!(
        b.texts("#pins-h + table tbody td[data-label=Name]"),
        vec!["release"]
    );
    assert!(b.all("button.copy").is_empty(), "no script ran");
    b.screenshot(&shots, "2-cache-page-desktop");
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    );
    b.screenshot(&shots, "9-cache-page-dark-desktop");
    b.cdp("Emulation.setEmulatedMedia", json!({ "features": [] }));

    // Pagination: pages of 3 by following "Next page"; every path exactly once, by name.
    b.goto(&format!("{url}/ui/caches/public-cache?limit=3"));
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let rows = b.texts("#path-list td.path a");
        pages += 1;
        assert!(!rows.is_empty() && rows.len() <= 3, "{rows:?}");
        seen.extend(rows);
        if b.all("a[rel=next]").is_empty() {
            break;
        }
        b.click("a[rel=next]");
        assert!(b.url().contains("cursor="), "{}", b.url());
    }
    assert_eq!(pages, 3);
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        seen.len(),
        seen_set.len(),
        "a path was listed twice: {seen:?}"
    );
    assert_eq!(seen_set, all);
    let mut by_name = seen.clone();
    by_name.sort_by_key(|p| basename(p)[33..].to_owned());
    assert_eq!(seen, by_name, "listed by name");
    b.click("nav.pages a");
    assert!(
        !b.url().contains("cursor="),
        "back to the first page: {}",
        b.url()
    );

    // Search: type into the form and submit it (a GET form: no script involved).
    b.goto(&format!("{url}/ui/caches/public-cache"));
    b.type_into("#q", "HELLO-");
    b.click("form.search button[type=submit]");
    assert!(b.url().contains("q=HELLO-"), "{}", b.url());
    let found: BTreeSet<String> = b.texts("#path-list td.path a").into_iter().collect();
    assert_eq!(found, hellos.iter().cloned().collect::<BTreeSet<_>>());
    assert!(b.text(&b.one("#count")).starts_with("5 path(s) match"));
    b.screenshot(&shots, "3-search-desktop");
    b.clear("#q");
    b.type_into("#q", "libgreet");
    b.click("form.search button[type=submit]");
    assert_eq!(b.texts("#path-list td.path a"), vec![dep.clone()]);

    // A path page: its references and referrers are links; follow them both ways.
    b.goto(&format!("{url}/ui/caches/public-cache"));
    b.click(&format!("#path-list a[href$='{}']", basename(&top)));
    assert_eq!(b.text(&b.one("h1")), &basename(&top)[33..]);
    assert_eq!(b.texts("#references a"), vec![dep.clone()]);
    assert!(b.texts("#referrers a").is_empty());
    assert!(b.source().contains("release"), "the pin holding it");
    b.screenshot(&shots, "4-path-page-desktop");
    b.click("#references a");
    assert_eq!(b.text(&b.one("h1")), &basename(&dep)[33..]);
    assert_eq!(b.texts("#referrers a"), vec![top.clone()]);

    // Log in with a token that can pull the private cache: it appears; log out: it is gone.
    b.goto(&format!("{url}/ui/"));
    b.click("header nav a");
    assert!(
        b.url().starts_with(&format!("{url}/ui/login")),
        "{}",
        b.url()
    );
    b.type_into("#token", &reader);
    b.click("form.login button[type=submit]");
    assert_eq!(b.url(), format!("{url}/ui/"));
    assert_eq!(
        b.texts("ul.caches h2 a"),
        vec!["public-cache", "team-secret"]
    );
    b.click("ul.caches a[href='/ui/caches/team-secret']");
    assert_eq!(b.texts("#path-list td.path a"), vec![hellos[0].clone()]);
    assert!(b.source().contains("netrc"), "the private-cache hint");
    b.screenshot(&shots, "5-private-cache-logged-in-desktop");
    b.click("header form button");
    assert_eq!(b.url(), format!("{url}/ui/"));
    assert_eq!(b.texts("ul.caches h2 a"), vec!["public-cache"]);
    drop(b);

    // ---- phone, JavaScript enabled ----------------------------------------------------------
    let p = Browser::start(&driver, true, &["--window-size=390,844"]);
    p.cdp(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true }),
    );
    let path_page = format!("/ui/caches/public-cache/paths/{}", basename(&top));
    for (page, name) in [
        ("/ui/", "6-cache-list-phone"),
        ("/ui/caches/public-cache", "7-cache-page-phone"),
        (path_page.as_str(), "8-path-page-phone"),
    ] {
        p.goto(&format!("{url}{page}"));
        let width = p.script("return [window.innerWidth, document.documentElement.scrollWidth]");
        assert_eq!(width[0], 390, "the viewport meta tag sets the layout width");
        assert!(
            width[1].as_i64().unwrap() <= 390,
            "{page} overflows sideways on a phone: {width}"
        );
        p.screenshot(&shots, name);
    }
    // The script's progressive enhancement: a copy button per copyable block.
    p.goto(&format!("{url}/ui/caches/public-cache"));
    assert_eq!(p.all("button.copy").len(), 3);

    let files: Vec<String> = std::fs::read_dir(&shots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 9, "{files:?}");
    eprintln!(
        "web UI screenshots: {} ({} files)",
        shots.display(),
        files.len()
    );
}

impl Browser {
    /// Whether scripts are off in this session's pages (the page's own `<noscript>`-free check:
    /// a script that would change the title does not run).
    fn script_disabled_check(&self) -> bool {
        self.goto("data:text/html,<title>before</title><script>document.title='after'</script>");
        self.title() == "before"
    }
}
