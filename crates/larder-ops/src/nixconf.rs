//! Editing `nix.conf` and netrc files the way `larder use` / `larder remove` need, and reading
//! what Nix will make of them.
//!
//! `nix.conf` syntax follows Nix's `Config::parseConfigFile` (libutil/config.cc, and the
//! "Configuration file" section of the Nix manual): one setting per line, `name = value…` with
//! whitespace-separated values, `#` starts a comment anywhere on a line, `include PATH` and
//! `!include PATH` (missing file allowed) splice another file in place, relative to the
//! including file's directory. A plain `name = …` replaces the value set so far; `extra-name =
//! …` appends to it. Old names are aliases (`binary-caches` for `substituters`,
//! `binary-cache-public-keys` for `trusted-public-keys`).
//!
//! Edits are minimal and reversible: a value is appended to the last `extra-` line that still
//! takes effect (or a new `extra-…` line is added at the end), and removal takes out exactly the
//! token that was added, dropping an `extra-` line only when it has no value left. Every other
//! byte — comments, blank lines, ordering, a missing final newline — is kept, so `use` twice
//! changes nothing and `use` then `remove` gives back the original file.
//!
//! netrc is curl's format (what Nix's `netrc-file` points at): `machine HOST login L password
//! P`, tokens separated by any whitespace; curl matches the host name only, never the port.

use std::path::{Path, PathBuf};

/// A `nix.conf` file held as its lines, each with its terminator, so it prints back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixConf {
    lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    /// Whether a `\n` ends the line (false only for a last line without one).
    newline: bool,
}

/// What a line means to Nix.
#[derive(Debug, PartialEq, Eq)]
enum Parsed<'a> {
    Blank,
    Include {
        path: &'a str,
        ignore_missing: bool,
    },
    /// `name = v1 v2 …`: `values` are byte spans of the value tokens within the line.
    Setting {
        name: &'a str,
        values: Vec<(usize, usize)>,
        /// Where the value part ends (the start of a `#` comment, or the end of the line).
        end: usize,
    },
    /// A line Nix would reject; left untouched.
    Invalid,
}

/// Whitespace-separated tokens of `s` (Nix splits on space, tab, CR and LF) as byte spans.
fn token_spans(s: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        let ws = matches!(c, ' ' | '\t' | '\r' | '\n');
        match (ws, start) {
            (true, Some(st)) => {
                out.push((st, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((st, s.len()));
    }
    out
}

fn parse_line(text: &str) -> Parsed<'_> {
    let end = text.find('#').unwrap_or(text.len());
    let toks = token_spans(&text[..end]);
    let tok = |i: usize| &text[toks[i].0..toks[i].1];
    match toks.len() {
        0 => Parsed::Blank,
        1 => Parsed::Invalid,
        n => match tok(0) {
            "include" | "!include" if n == 2 => Parsed::Include {
                path: tok(1),
                ignore_missing: tok(0) == "!include",
            },
            "include" | "!include" => Parsed::Invalid,
            name if tok(1) == "=" => Parsed::Setting {
                name,
                values: toks[2..].to_vec(),
                end,
            },
            _ => Parsed::Invalid,
        },
    }
}

/// The current and old names of a setting.
fn aliases(key: &str) -> &'static [&'static str] {
    match key {
        "substituters" => &["substituters", "binary-caches"],
        "trusted-public-keys" => &["trusted-public-keys", "binary-cache-public-keys"],
        "trusted-substituters" => &["trusted-substituters", "trusted-binary-caches"],
        "trusted-users" => &["trusted-users"],
        "netrc-file" => &["netrc-file"],
        "allowed-users" => &["allowed-users"],
        _ => &[],
    }
}

/// Whether `name` sets `key`: `Some(false)` for the plain name, `Some(true)` for `extra-…`.
fn matches_key(name: &str, key: &str) -> Option<bool> {
    let names = aliases(key);
    if names.contains(&name) || name == key {
        return Some(false);
    }
    let base = name.strip_prefix("extra-")?;
    (names.contains(&base) || base == key).then_some(true)
}

/// Values compare equal when they name the same thing: substituter URLs ignore a trailing `/`.
pub fn same_value(a: &str, b: &str) -> bool {
    a == b || (a.contains("://") && a.trim_end_matches('/') == b.trim_end_matches('/'))
}

impl NixConf {
    pub fn parse(text: &str) -> NixConf {
        let mut lines = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('\n') {
                Some(i) => {
                    lines.push(Line {
                        text: rest[..i].to_owned(),
                        newline: true,
                    });
                    rest = &rest[i + 1..];
                }
                None => {
                    lines.push(Line {
                        text: rest.to_owned(),
                        newline: false,
                    });
                    rest = "";
                }
            }
        }
        NixConf { lines }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for l in &self.lines {
            out.push_str(&l.text);
            if l.newline {
                out.push('\n');
            }
        }
        out
    }

    /// The value of list setting `key` after this file (and what it includes, read with `load`)
    /// is applied on top of `inherited`.
    pub fn list(
        &self,
        key: &str,
        inherited: Vec<String>,
        dir: &Path,
        load: &dyn Fn(&Path) -> Option<String>,
    ) -> Vec<String> {
        self.fold(key, inherited, dir, load, 0)
    }

    fn fold(
        &self,
        key: &str,
        mut acc: Vec<String>,
        dir: &Path,
        load: &dyn Fn(&Path) -> Option<String>,
        depth: usize,
    ) -> Vec<String> {
        for l in &self.lines {
            match parse_line(&l.text) {
                Parsed::Include { path, .. } if depth < 16 => {
                    let p = dir.join(path);
                    if let Some(text) = load(&p) {
                        let sub_dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                        acc = NixConf::parse(&text).fold(key, acc, &sub_dir, load, depth + 1);
                    }
                }
                Parsed::Setting { name, values, .. } => {
                    if let Some(extra) = matches_key(name, key) {
                        if !extra {
                            acc.clear();
                        }
                        acc.extend(values.iter().map(|&(s, e)| l.text[s..e].to_owned()));
                    }
                }
                _ => {}
            }
        }
        acc
    }

    /// The last value of single-valued setting `key` in this file (includes not followed).
    pub fn single(&self, key: &str) -> Option<String> {
        let mut found = None;
        for l in &self.lines {
            if let Parsed::Setting { name, values, .. } = parse_line(&l.text) {
                if matches_key(name, key) == Some(false) {
                    found = Some(
                        values
                            .iter()
                            .map(|&(s, e)| &l.text[s..e])
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
            }
        }
        found
    }

    /// Paths of the `include`/`!include` lines, resolved against `dir`.
    pub fn includes(&self, dir: &Path) -> Vec<PathBuf> {
        self.lines
            .iter()
            .filter_map(|l| match parse_line(&l.text) {
                Parsed::Include { path, .. } => Some(dir.join(path)),
                _ => None,
            })
            .collect()
    }

    /// Add `value` to list setting `key` unless `present` says it is already in effect. Appends
    /// to the last `extra-key` line that no plain `key` line overrides, or adds an
    /// `extra-key = value` line at the end. Returns whether the file changed.
    pub fn add_value(&mut self, key: &str, value: &str, present: bool) -> bool {
        if present {
            return false;
        }
        let mut last_plain = None;
        let mut last_extra = None;
        for (i, l) in self.lines.iter().enumerate() {
            if let Parsed::Setting { name, .. } = parse_line(&l.text) {
                match matches_key(name, key) {
                    Some(false) => last_plain = Some(i),
                    Some(true) => last_extra = Some(i),
                    None => {}
                }
            }
        }
        if let Some(i) = last_extra.filter(|&e| last_plain.is_none_or(|p| e > p)) {
            let line = &mut self.lines[i];
            if let Parsed::Setting { values, end, .. } = parse_line(&line.text) {
                // After the last value (or after `=`), before any trailing blanks and comment.
                let at = values
                    .last()
                    .map(|&(_, e)| e)
                    .unwrap_or_else(|| line.text[..end].find('=').map(|p| p + 1).unwrap_or(end));
                line.text.insert_str(at, &format!(" {value}"));
                return true;
            }
        }
        self.push_line(format!("extra-{key} = {value}"));
        true
    }

    /// Set single-valued `key` to `value` by adding a line, unless the file already sets it.
    pub fn set_if_absent(&mut self, key: &str, value: &str) -> bool {
        if self.single(key).is_some() {
            return false;
        }
        self.push_line(format!("{key} = {value}"));
        true
    }

    /// A new last line. A file without a final newline keeps not having one, so removing the
    /// line later restores it exactly.
    fn push_line(&mut self, text: String) {
        let newline = match self.lines.last_mut() {
            Some(last) if !last.newline => {
                last.newline = true;
                false
            }
            _ => true,
        };
        self.lines.push(Line { text, newline });
    }

    fn remove_line(&mut self, i: usize) {
        let removed = self.lines.remove(i);
        if !removed.newline && i == self.lines.len() {
            if let Some(prev) = self.lines.last_mut() {
                prev.newline = false;
            }
        }
    }

    /// Take `value` out of every `key`/`extra-key` line. An `extra-` line left without values is
    /// dropped; a plain line is kept (`substituters =` with nothing means "none", which is what
    /// is left). Returns whether the file changed.
    pub fn remove_value(&mut self, key: &str, value: &str) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < self.lines.len() {
            let text = &self.lines[i].text;
            let mut drop_line = false;
            if let Parsed::Setting { name, values, .. } = parse_line(text) {
                if let Some(extra) = matches_key(name, key) {
                    let hits: Vec<_> = values
                        .iter()
                        .filter(|&&(s, e)| same_value(&text[s..e], value))
                        .copied()
                        .collect();
                    if !hits.is_empty() {
                        changed = true;
                        if extra && hits.len() == values.len() {
                            drop_line = true;
                        } else {
                            let mut t = text.clone();
                            for &(s, e) in hits.iter().rev() {
                                // Take the blank before the token with it (the one `add_value` put).
                                let ws = t[..s].trim_end_matches([' ', '\t']).len();
                                t.replace_range(ws..e, "");
                            }
                            self.lines[i].text = t;
                        }
                    }
                }
            }
            if drop_line {
                self.remove_line(i);
            } else {
                i += 1;
            }
        }
        changed
    }

    /// Drop the lines setting single-valued `key` to exactly `value`.
    pub fn remove_setting(&mut self, key: &str, value: &str) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < self.lines.len() {
            let hit = match parse_line(&self.lines[i].text) {
                Parsed::Setting { name, values, .. } => {
                    matches_key(name, key) == Some(false)
                        && values.len() == 1
                        && &self.lines[i].text[values[0].0..values[0].1] == value
                }
                _ => false,
            };
            if hit {
                self.remove_line(i);
                changed = true;
            } else {
                i += 1;
            }
        }
        changed
    }
}

/// The host part of an `http(s)://` URL, without port or user info (what curl's netrc lookup
/// matches).
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit('@').next()?;
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// One netrc entry: where it is in the text and what it says.
#[derive(Debug, PartialEq, Eq)]
pub struct NetrcEntry {
    start: usize,
    end: usize,
    pub login: Option<String>,
    pub password: Option<String>,
}

/// The `machine HOST …` entry of a netrc text.
pub fn netrc_lookup(text: &str, host: &str) -> Option<NetrcEntry> {
    let toks = token_spans(text);
    let tok = |i: usize| &text[toks[i].0..toks[i].1];
    let mut i = 0;
    while i < toks.len() {
        if tok(i) == "machine" && i + 1 < toks.len() && tok(i + 1) == host {
            let start = toks[i].0;
            let mut end = toks[i + 1].1;
            let (mut login, mut password) = (None, None);
            let mut j = i + 2;
            while j + 1 < toks.len() && !matches!(tok(j), "machine" | "default" | "macdef") {
                match tok(j) {
                    "login" => login = Some(tok(j + 1).to_owned()),
                    "password" => password = Some(tok(j + 1).to_owned()),
                    _ => {}
                }
                end = toks[j + 1].1;
                j += 2;
            }
            return Some(NetrcEntry {
                start,
                end,
                login,
                password,
            });
        }
        i += 1;
    }
    None
}

/// The netrc text with `machine HOST login LOGIN password PASSWORD`, or `None` when it already
/// says exactly that.
pub fn netrc_upsert(text: &str, host: &str, login: &str, password: &str) -> Option<String> {
    let line = format!("machine {host} login {login} password {password}");
    match netrc_lookup(text, host) {
        Some(e) if e.login.as_deref() == Some(login) && e.password.as_deref() == Some(password) => {
            None
        }
        Some(e) => Some(format!("{}{line}{}", &text[..e.start], &text[e.end..])),
        None => {
            let sep = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            Some(format!("{text}{sep}{line}\n"))
        }
    }
}

/// The netrc text without HOST's entry (and the line it stood on), or `None` if it has none.
pub fn netrc_remove(text: &str, host: &str) -> Option<String> {
    let e = netrc_lookup(text, host)?;
    let line_start = text[..e.start].rfind('\n').map(|p| p + 1).unwrap_or(0);
    let start = if text[line_start..e.start].trim().is_empty() {
        line_start
    } else {
        e.start
    };
    let after = &text[e.end..];
    let end = match after.find('\n') {
        Some(p) if after[..p].trim().is_empty() && start == line_start => e.end + p + 1,
        None if after.trim().is_empty() => text.len(),
        _ => e.end,
    };
    Some(format!("{}{}", &text[..start], &text[end..]))
}

/// Whether an entry of `trusted-users` admits `user`: the name itself, `@group` for one of
/// `groups`, or `*`.
pub fn user_matches(entries: &[String], user: &str, groups: &[String]) -> Option<String> {
    entries
        .iter()
        .find(|e| {
            e.as_str() == "*"
                || e.as_str() == user
                || e.strip_prefix('@')
                    .is_some_and(|g| groups.iter().any(|x| x == g))
        })
        .cloned()
}

/// Whether the Nix daemon will use the substituters a user configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// No daemon: Nix runs as this user and reads its own config.
    SingleUser,
    Root,
    /// In `trusted-users` through this entry.
    TrustedUser(String),
    /// The URL is in the daemon's `trusted-substituters`; `key_trusted` says whether the daemon
    /// also trusts the cache's key (untrusted users cannot add keys).
    TrustedSubstituter {
        key_trusted: bool,
    },
    /// The daemon ignores this user's extra substituters.
    Untrusted {
        user: String,
    },
}

impl Trust {
    pub fn works(&self) -> bool {
        !matches!(
            self,
            Trust::Untrusted { .. } | Trust::TrustedSubstituter { key_trusted: false }
        )
    }
}

/// What decides [`Trust`], gathered by [`probe_trust`].
#[derive(Debug, Clone)]
pub struct TrustInputs {
    pub multi_user: bool,
    pub uid: Option<u32>,
    pub user: String,
    pub groups: Vec<String>,
    /// From the system nix.conf (what the daemon reads).
    pub trusted_users: Vec<String>,
    pub trusted_substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
}

pub fn decide_trust(t: &TrustInputs, url: &str, key: Option<&str>) -> Trust {
    if !t.multi_user {
        return Trust::SingleUser;
    }
    if t.uid == Some(0) || t.user == "root" {
        return Trust::Root;
    }
    if let Some(e) = user_matches(&t.trusted_users, &t.user, &t.groups) {
        return Trust::TrustedUser(e);
    }
    if t.trusted_substituters.iter().any(|s| same_value(s, url)) {
        let key_trusted = key.is_none_or(|k| t.trusted_public_keys.iter().any(|x| x == k));
        return Trust::TrustedSubstituter { key_trusted };
    }
    Trust::Untrusted {
        user: t.user.clone(),
    }
}

// ---- reading the live system (not unit-tested: it depends on the host) ----

/// `$NIX_CONF_DIR/nix.conf`, by default `/etc/nix/nix.conf`: what the daemon and root read.
pub fn system_conf_path() -> PathBuf {
    let dir = crate::xdg::var("NIX_CONF_DIR").unwrap_or_else(|| "/etc/nix".to_owned());
    PathBuf::from(dir).join("nix.conf")
}

pub const DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";

/// A multi-user install: Nix talks to a daemon that applies its own config, not the user's.
pub fn multi_user() -> bool {
    match crate::xdg::var("NIX_REMOTE") {
        Some(r) => r == "daemon" || r.starts_with("unix://"),
        None => Path::new(DAEMON_SOCKET).exists(),
    }
}

/// The real user id of this process (`getuid(2)`).
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

pub fn read_optional(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The name `/etc/passwd`-format `text` gives to `id` (field 1 of the line whose field 3 is it).
fn name_of_id(text: &str, id: u32) -> Option<String> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2].parse() == Ok(id) && !f[0].is_empty()).then(|| f[0].to_owned())
    })
}

/// The names of this process's groups: its effective group and supplementary groups
/// (`getegid(2)`, `getgroups(2)`), named by `/etc/group` like `id -Gn` does.
fn group_names() -> Vec<String> {
    let groups = read_optional(Path::new("/etc/group")).unwrap_or_default();
    let mut ids = vec![rustix::process::getegid()];
    ids.extend(rustix::process::getgroups().unwrap_or_default());
    let mut names = Vec::new();
    for gid in ids {
        if let Some(n) = name_of_id(&groups, gid.as_raw()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names
}

/// The list `key` of the system nix.conf (includes followed), starting from Nix's default.
pub fn system_list(key: &str, default: &[&str]) -> Vec<String> {
    let path = system_conf_path();
    let conf = NixConf::parse(&read_optional(&path).unwrap_or_default());
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    conf.list(
        key,
        default.iter().map(|s| (*s).to_owned()).collect(),
        &dir,
        &read_optional,
    )
}

pub fn probe_trust() -> TrustInputs {
    let uid = current_uid();
    TrustInputs {
        multi_user: multi_user(),
        uid: Some(uid),
        user: read_optional(Path::new("/etc/passwd"))
            .and_then(|p| name_of_id(&p, uid))
            .or_else(|| crate::xdg::var("USER"))
            .unwrap_or_default(),
        groups: group_names(),
        trusted_users: system_list("trusted-users", &["root"]),
        trusted_substituters: system_list("trusted-substituters", &[]),
        trusted_public_keys: system_list(
            "trusted-public-keys",
            &[larder_nix::signing::CACHE_NIXOS_ORG_KEY],
        ),
    }
}

/// What works instead when the daemon ignores this user's substituters.
pub fn untrusted_advice(cache_arg: &str, url: &str, key: Option<&str>) -> String {
    let key = key.unwrap_or("KEY");
    let sys = system_conf_path();
    format!(
        "what works instead:\n  \
         - an admin adds to {sys}:\n      trusted-substituters = {url}\n      \
         extra-trusted-public-keys = {key}\n    (then restarts nix-daemon), or adds you to \
         `trusted-users` there\n  \
         - as root: `sudo larder use {cache_arg} --mode root-nixconf` (NixOS: `--mode nixos`)\n  \
         - for a first `nixos-rebuild` (run as root): sudo nixos-rebuild switch \
         --option extra-substituters {url} --option extra-trusted-public-keys {key}",
        sys = sys.display()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    const URL: &str = "http://shoshin:8080/work";
    const KEY: &str = "work.shoshin-1:AAAA=";

    fn no_includes(_: &Path) -> Option<String> {
        None
    }

    fn subs(c: &NixConf) -> Vec<String> {
        c.list(
            "substituters",
            vec!["https://cache.nixos.org".into()],
            Path::new("/"),
            &no_includes,
        )
    }

    fn use_(text: &str) -> String {
        let mut c = NixConf::parse(text);
        let s = subs(&c).iter().any(|v| same_value(v, URL));
        c.add_value("substituters", URL, s);
        let k = c
            .list("trusted-public-keys", vec![], Path::new("/"), &no_includes)
            .iter()
            .any(|v| v == KEY);
        c.add_value("trusted-public-keys", KEY, k);
        c.render()
    }

    fn remove(text: &str) -> String {
        let mut c = NixConf::parse(text);
        c.remove_value("substituters", URL);
        c.remove_value("trusted-public-keys", KEY);
        c.render()
    }

    #[test]
    fn parse_render_is_byte_exact() {
        for t in [
            "",
            "\n",
            "a = b",
            "a = b\n\n# c\r\n  x  =  y   # z\n",
            "garbage line\n",
        ] {
            assert_eq!(NixConf::parse(t).render(), t);
        }
    }

    #[test]
    fn add_to_empty_file_then_idempotent_then_remove() {
        let once = use_("");
        assert_eq!(
            once,
            format!("extra-substituters = {URL}\nextra-trusted-public-keys = {KEY}\n")
        );
        assert_eq!(use_(&once), once, "second use changes nothing");
        assert_eq!(remove(&once), "");
    }

    #[test]
    fn preserves_comments_and_unrelated_lines() {
        let orig =
            "# my config\nsubstituters = https://cache.nixos.org  # official\n\nmax-jobs = 4\n";
        let once = use_(orig);
        assert!(once.starts_with(orig), "{once}");
        assert!(once.contains(&format!("extra-substituters = {URL}\n")));
        assert_eq!(use_(&once), once);
        assert_eq!(remove(&once), orig);
    }

    #[test]
    fn appends_to_existing_extra_line_before_its_comment() {
        let orig = "extra-substituters = https://nix-community.cachix.org   # caches\nextra-trusted-public-keys = a:b=\n";
        let once = use_(orig);
        assert_eq!(
            once,
            format!(
                "extra-substituters = https://nix-community.cachix.org {URL}   # caches\nextra-trusted-public-keys = a:b= {KEY}\n"
            )
        );
        assert_eq!(use_(&once), once);
        assert_eq!(remove(&once), orig);
    }

    #[test]
    fn multiple_values_on_one_line_and_trailing_slash() {
        let orig = format!("substituters = https://cache.nixos.org {URL}/ https://x\n");
        let c = NixConf::parse(&orig);
        assert!(subs(&c).iter().any(|v| same_value(v, URL)));
        // Already there (with a trailing slash): nothing added.
        assert_eq!(
            use_(&orig),
            format!("{orig}extra-trusted-public-keys = {KEY}\n")
        );
        // remove keeps the plain line and its other values.
        assert_eq!(
            remove(&orig),
            "substituters = https://cache.nixos.org https://x\n"
        );
        // A plain line left empty stays (it means "no substituters").
        assert_eq!(
            remove(&format!("substituters = {URL}\n")),
            "substituters =\n"
        );
    }

    #[test]
    fn plain_key_after_extra_overrides_it() {
        // The URL is in an extra- line that a later plain line discards: not in effect.
        let orig = format!("extra-substituters = {URL}\nsubstituters = https://cache.nixos.org\n");
        let c = NixConf::parse(&orig);
        assert!(!subs(&c).iter().any(|v| same_value(v, URL)));
        let once = use_(&orig);
        // Not appended to the overridden line: a new extra- line at the end.
        assert!(once.ends_with(&format!(
            "extra-substituters = {URL}\nextra-trusted-public-keys = {KEY}\n"
        )));
        assert_eq!(use_(&once), once);
    }

    #[test]
    fn old_names_are_aliases() {
        let orig = format!(
            "binary-caches = https://cache.nixos.org {URL}\nbinary-cache-public-keys = {KEY}\n"
        );
        assert_eq!(use_(&orig), orig);
        assert_eq!(
            remove(&orig),
            "binary-caches = https://cache.nixos.org\nbinary-cache-public-keys =\n"
        );
    }

    #[test]
    fn no_final_newline_round_trips() {
        let orig = "max-jobs = 4";
        let once = use_(orig);
        assert_eq!(
            once,
            format!("max-jobs = 4\nextra-substituters = {URL}\nextra-trusted-public-keys = {KEY}")
        );
        assert_eq!(use_(&once), once);
        assert_eq!(remove(&once), orig);
    }

    #[test]
    fn include_lines_are_kept_and_followed_for_presence() {
        let files: HashMap<PathBuf, String> = [
            (
                PathBuf::from("/etc/nix/caches.conf"),
                format!("extra-substituters = {URL}\n"),
            ),
            (
                PathBuf::from("/etc/nix/sub/deeper.conf"),
                format!("extra-trusted-public-keys = {KEY}\n"),
            ),
            (
                PathBuf::from("/etc/nix/sub.conf"),
                "include sub/deeper.conf\n".to_owned(),
            ),
        ]
        .into_iter()
        .collect();
        let load = |p: &Path| files.get(p).cloned();
        let orig = "include caches.conf\n!include missing.conf\n!include sub.conf\n";
        let c = NixConf::parse(orig);
        let dir = Path::new("/etc/nix");
        let s = c.list("substituters", vec![], dir, &load);
        let k = c.list("trusted-public-keys", vec![], dir, &load);
        assert_eq!(s, vec![URL.to_owned()]);
        assert_eq!(k, vec![KEY.to_owned()]);
        assert_eq!(c.includes(dir).len(), 3);
        let mut c2 = c.clone();
        assert!(!c2.add_value("substituters", URL, true));
        assert!(!c2.add_value("trusted-public-keys", KEY, true));
        assert_eq!(c2.render(), orig);
        // Without following includes the lines stay and the values go at the end.
        assert_eq!(
            use_(orig),
            format!("{orig}extra-substituters = {URL}\nextra-trusted-public-keys = {KEY}\n")
        );
        assert_eq!(remove(&use_(orig)), orig);
    }

    #[test]
    fn invalid_lines_are_left_alone() {
        let orig = "this is not valid\nsubstituters=nospace\n";
        assert_eq!(remove(&use_(orig)), orig);
    }

    #[test]
    fn netrc_file_setting() {
        let mut c = NixConf::parse("# x\n");
        assert!(c.set_if_absent("netrc-file", "/home/u/.config/larder/netrc"));
        assert!(!c.set_if_absent("netrc-file", "/other"));
        assert_eq!(
            c.single("netrc-file").as_deref(),
            Some("/home/u/.config/larder/netrc")
        );
        assert!(c.remove_setting("netrc-file", "/home/u/.config/larder/netrc"));
        assert_eq!(c.render(), "# x\n");
    }

    #[test]
    fn netrc_edits() {
        let t = netrc_upsert("", "shoshin", "larder", "tok1").unwrap();
        assert_eq!(t, "machine shoshin login larder password tok1\n");
        assert_eq!(netrc_upsert(&t, "shoshin", "larder", "tok1"), None);
        let other = "machine github.com\n  login me\n  password gh\n";
        let both = netrc_upsert(other, "shoshin", "larder", "tok1").unwrap();
        assert_eq!(
            both,
            format!("{other}machine shoshin login larder password tok1\n")
        );
        let updated = netrc_upsert(&both, "shoshin", "larder", "tok2").unwrap();
        assert!(updated.ends_with("password tok2\n") && updated.starts_with(other));
        let e = netrc_lookup(&updated, "github.com").unwrap();
        assert_eq!(
            (e.login.as_deref(), e.password.as_deref()),
            (Some("me"), Some("gh"))
        );
        assert_eq!(netrc_remove(&updated, "shoshin").unwrap(), other);
        assert_eq!(netrc_remove(&t, "shoshin").unwrap(), "");
        assert_eq!(netrc_remove(other, "shoshin"), None);
        // Multi-line entry replaced in place, the rest untouched.
        let m = netrc_upsert(
            "machine shoshin\n login a\n password b\nmachine x login y password z\n",
            "shoshin",
            "larder",
            "t",
        )
        .unwrap();
        assert_eq!(
            m,
            "machine shoshin login larder password t\nmachine x login y password z\n"
        );
        // No final newline.
        assert_eq!(
            netrc_upsert("machine x login y password z", "h", "l", "p").unwrap(),
            "machine x login y password z\nmachine h login l password p\n"
        );
    }

    #[test]
    fn ids_are_named_from_passwd_and_group_files() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\nalice:x:1000:100::/home/alice:/bin/sh\n";
        assert_eq!(name_of_id(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(name_of_id(passwd, 0).as_deref(), Some("root"));
        assert_eq!(name_of_id(passwd, 7), None);
        assert_eq!(
            name_of_id("wheel:x:10:alice\n", 10).as_deref(),
            Some("wheel")
        );
    }

    #[test]
    fn hosts() {
        assert_eq!(url_host("http://127.0.0.1:8080/c"), Some("127.0.0.1"));
        assert_eq!(
            url_host("https://u:p@cache.example.org/c?x"),
            Some("cache.example.org")
        );
        assert_eq!(url_host("http://[::1]:80/c"), Some("::1"));
        assert_eq!(url_host("nope"), None);
    }

    fn inputs() -> TrustInputs {
        TrustInputs {
            multi_user: true,
            uid: Some(1000),
            user: "alice".into(),
            groups: vec!["users".into(), "wheel".into()],
            trusted_users: vec!["root".into()],
            trusted_substituters: vec![],
            trusted_public_keys: vec![],
        }
    }

    #[test]
    fn trust_decisions() {
        let t = inputs();
        assert_eq!(
            decide_trust(&t, URL, Some(KEY)),
            Trust::Untrusted {
                user: "alice".into()
            }
        );
        assert_eq!(
            decide_trust(
                &TrustInputs {
                    multi_user: false,
                    ..t.clone()
                },
                URL,
                None
            ),
            Trust::SingleUser
        );
        assert_eq!(
            decide_trust(
                &TrustInputs {
                    uid: Some(0),
                    ..t.clone()
                },
                URL,
                None
            ),
            Trust::Root
        );
        let g = TrustInputs {
            trusted_users: vec!["root".into(), "@wheel".into()],
            ..t.clone()
        };
        assert_eq!(
            decide_trust(&g, URL, None),
            Trust::TrustedUser("@wheel".into())
        );
        let other_group = TrustInputs {
            trusted_users: vec!["@admin".into()],
            ..t.clone()
        };
        assert!(!decide_trust(&other_group, URL, None).works());
        let star = TrustInputs {
            trusted_users: vec!["*".into()],
            ..t.clone()
        };
        assert!(decide_trust(&star, URL, None).works());
        let ts = TrustInputs {
            trusted_substituters: vec![format!("{URL}/")],
            ..t.clone()
        };
        assert_eq!(
            decide_trust(&ts, URL, Some(KEY)),
            Trust::TrustedSubstituter { key_trusted: false }
        );
        let tsk = TrustInputs {
            trusted_public_keys: vec![KEY.into()],
            ..ts
        };
        assert!(decide_trust(&tsk, URL, Some(KEY)).works());
    }
}
