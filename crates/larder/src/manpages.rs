//! `larder manpages DIR`: man pages made from the clap definitions, so they say what `--help`
//! says and cannot drift from it.
//!
//! One page per command, named the way git names its pages (`git-commit(1)`): `larder.1`,
//! `larder-push.1`, `larder-cache.1`, `larder-cache-create.1`, … so `man larder-cache-create`
//! finds the verb. clap_mangen renders NAME, SYNOPSIS, DESCRIPTION, OPTIONS (with each
//! option's `LARDER_…` variable), SUBCOMMANDS and VERSION; this module adds ENVIRONMENT to the
//! top page (every variable, from [`crate::env`]) and SEE ALSO (the parent page and the
//! children's), last as man-pages(7) orders sections
//! (<https://man7.org/linux/man-pages/man7/man-pages.7.html>). Hidden commands and clap's
//! generated `help` subcommands get no page.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap_mangen::roff::{bold, roman, Roff};

/// The section every page goes in: user commands.
const SECTION: &str = "1";

/// Write a page for `cmd` and for every visible subcommand under it into `dir` (created if
/// missing); returns the files written.
pub fn write_all(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    // `larder help cache` is not a page of its own. A global setting: no nested command
    // gets clap's `help` verb either, so no SUBCOMMANDS lists one.
    let mut cmd = cmd.disable_help_subcommand(true);
    // Building fills in what the pages print: each subcommand's display name
    // (`larder-cache-create`), its bin name for the synopsis (`larder cache create`) and the
    // propagated version.
    cmd.build();
    let pages = pages(&cmd, None);
    // `a b-c` and `a-b c` would share a page: a naming bug to fix in the commands, not
    // something to overwrite silently.
    let mut names = std::collections::HashSet::new();
    if let Some(page) = pages.iter().find(|p| !names.insert(&p.file)) {
        anyhow::bail!(
            "two commands would share the man page {}; rename one",
            page.file
        );
    }
    let mut written = Vec::new();
    for page in pages {
        let path = dir.join(&page.file);
        std::fs::write(&path, &page.text)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// One rendered page.
struct Page {
    file: String,
    text: String,
}

/// The pages of `cmd` and of its visible subcommands, depth first.
fn pages(cmd: &clap::Command, parent: Option<&clap::Command>) -> Vec<Page> {
    let name = page_name(cmd);
    let man = clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section(SECTION)
        // No date: the pages are made when larder is packaged, and a build date (1980-01-01 under
        // Nix's SOURCE_DATE_EPOCH) would say nothing. Quoted, because `.TH` takes its fields by
        // position and clap_mangen writes an empty one as nothing, which would shift the source
        // and manual into the date's and source's places.
        .date("\"\"")
        .source(format!(
            "larder {}",
            cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"))
        ))
        .manual("larder manual");
    let mut roff = Vec::new();
    // Rendering into memory cannot fail.
    let _ = man.render(&mut roff);
    let mut text = String::from_utf8_lossy(&roff).into_owned();
    if parent.is_none() {
        text.push_str(&environment());
    }
    text.push_str(&see_also(cmd, parent));
    let mut out = vec![Page {
        file: man.get_filename(),
        text: ascii_only(&text),
    }];
    for sub in visible_subcommands(cmd) {
        out.extend(pages(sub, Some(cmd)));
    }
    out
}

/// `larder-cache-create`: what clap set as the display name when the command was built.
fn page_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// ENVIRONMENT, on the top page: every variable larder reads ([`crate::env::all`]).
fn environment() -> String {
    let mut roff = Roff::default();
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in crate::env::all() {
        roff.control("TP", []);
        roff.text([bold(name)]);
        roff.text([roman(meaning)]);
    }
    roff.to_roff()
}

/// SEE ALSO: the parent page, then the children's; on the top page also Nix's, whose
/// settings `larder use` writes.
fn see_also(cmd: &clap::Command, parent: Option<&clap::Command>) -> String {
    let mut refs: Vec<(String, &str)> = Vec::new();
    if let Some(p) = parent {
        refs.push((page_name(p).to_owned(), SECTION));
    }
    refs.extend(visible_subcommands(cmd).map(|s| (page_name(s).to_owned(), SECTION)));
    if parent.is_none() {
        refs.extend([("nix".to_owned(), "1"), ("nix.conf".to_owned(), "5")]);
    }
    let mut line = Vec::new();
    for (i, (name, section)) in refs.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(name.as_str()));
        line.push(roman(format!("({section})")));
    }
    let mut roff = Roff::default();
    roff.control("SH", ["SEE ALSO"]);
    // Left-aligned and unhyphenated: justifying a list of names stretches the gaps between
    // them, and a name split at a line end is not one to type. It is the last section, so
    // nothing after it needs either back.
    roff.control("ad", ["l"]);
    roff.control("nh", []);
    roff.text(line);
    // `to_roff`, not `render`: the page above already defined the apostrophe string `render`
    // prepends, and these names hold no apostrophe.
    roff.to_roff()
}

/// The page with every non-ASCII character (`…` in the help) as a groff escape (`\[u2026]`):
/// troff reads its input as Latin-1 unless a preprocessor (man-db's `preconv`) converts it
/// first, so escaped pages render the same under `man`, plain `groff -man` and mandoc.
fn ascii_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

    use super::*;

    fn tool() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .about("Does things")
            .subcommand(
                clap::Command::new("group")
                    .about("A group of verbs")
                    .subcommand(clap::Command::new("leaf").about("The leaf verb")),
            )
            .subcommand(clap::Command::new("secret").about("Not shown").hide(true))
    }

    #[test]
    fn one_page_per_visible_command_and_none_for_hidden_or_help() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("share/man/man1");
        let written = write_all(tool(), &out).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["tool-group-leaf.1", "tool-group.1", "tool.1"]);
    }

    #[test]
    fn see_also_links_the_parent_and_the_children() {
        let dir = tempfile::tempdir().unwrap();
        write_all(tool(), dir.path()).unwrap();
        let group = std::fs::read_to_string(dir.path().join("tool-group.1")).unwrap();
        let see_also = group.split(".SH \"SEE ALSO\"").nth(1).unwrap();
        assert!(see_also.contains(r"\fBtool\fR(1)"), "{see_also}");
        assert!(
            see_also.contains(r"\fBtool\-group\-leaf\fR(1)"),
            "{see_also}"
        );
        assert!(!group.contains("tool-group-help") && !group.contains(r"tool\-group\-help"));
    }

    #[test]
    fn two_commands_with_one_page_name_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let clash = clap::Command::new("t")
            .subcommand(clap::Command::new("a-b"))
            .subcommand(clap::Command::new("a").subcommand(clap::Command::new("b")));
        let e = write_all(clash, dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("t-a-b.1"), "{e:#}");
    }

    #[test]
    fn non_ascii_text_becomes_a_groff_escape() {
        assert_eq!(ascii_only("a … b"), r"a \[u2026] b");
        assert_eq!(ascii_only("\u{1F600}"), r"\[u1F600]");
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = write_all(tool(), &file.join("man1")).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot create the directory"),
            "{e:#}"
        );
    }
}
