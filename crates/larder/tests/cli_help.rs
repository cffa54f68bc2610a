//! `--help` teaches: every verb, option and argument of the CLI has a description; the man
//! pages made from it (`larder manpages`) cover every verb and render cleanly under groff.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::larder_bin;

fn help(cmd: &[&str]) -> String {
    let o = Command::new(larder_bin())
        .args(cmd)
        .arg("-h")
        .env_remove("LARDER_CONFIG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{cmd:?} -h failed");
    String::from_utf8(o.stdout).unwrap()
}

/// The entries of one section (`Commands:`, `Options:`, `Arguments:`) of a short help.
fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != name)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// An entry line that is only a name: `  --json`, `  -s, --server <SERVER>`, `  <ID>`.
fn undocumented(line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    !words.is_empty()
        && words.iter().all(|w| {
            w.starts_with('-') || (w.starts_with('<') && w.ends_with('>')) || w.ends_with(',')
        })
        && line.starts_with("  ")
        && !line.starts_with("        ")
}

#[test]
fn every_verb_option_and_argument_is_described() {
    let mut missing = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(cmd) = todo.pop() {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let text = help(&args);
        seen += 1;
        // Entries start at column 2; wrapped descriptions are indented further.
        for entry in section(&text, "Commands:")
            .into_iter()
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        {
            let mut words = entry.split_whitespace();
            let Some(name) = words.next() else { continue };
            if name == "help" {
                continue;
            }
            if words.next().is_none() {
                missing.push(format!("larder {} {name}: no description", cmd.join(" ")));
            }
            let mut sub = cmd.clone();
            sub.push(name.to_owned());
            todo.push(sub);
        }
        for lines in [section(&text, "Options:"), section(&text, "Arguments:")] {
            for (i, entry) in lines.iter().enumerate() {
                // A wide page puts each description on the next line, indented further.
                let next_describes = lines
                    .get(i + 1)
                    .is_some_and(|n| n.starts_with("          ") && !n.trim().starts_with('-'));
                if undocumented(entry) && !next_describes {
                    missing.push(format!("larder {}: {}", cmd.join(" "), entry.trim()));
                }
            }
        }
    }
    assert!(seen > 30, "only {seen} help pages were found");
    assert!(missing.is_empty(), "undocumented:\n{}", missing.join("\n"));
}

#[test]
fn the_checker_sees_an_undocumented_entry() {
    assert!(undocumented("      --json"));
    assert!(undocumented("  -s, --server <SERVER>  "));
    assert!(undocumented("  <ID>  "));
    assert!(!undocumented("      --json    Print the result as JSON"));
    assert!(!undocumented("  <CACHE>  CACHE or SERVER:CACHE"));
}

/// The verbs a short help lists under `Commands:` (not clap's `help`), each with its
/// one-line description, wrapped lines joined.
fn commands(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in section(text, "Commands:") {
        if line.starts_with("   ") {
            if let Some((_, about)) = out.last_mut() {
                about.push(' ');
                about.push_str(line.trim());
            }
        } else if let Some((name, about)) = line.trim().split_once(char::is_whitespace) {
            out.push((name.to_owned(), about.trim().to_owned()));
        } else {
            out.push((line.trim().to_owned(), String::new()));
        }
    }
    out.retain(|(name, _)| name != "help");
    out
}

/// Every visible verb and nested verb (`["cache", "create"]`), found the way a user finds them:
/// by walking `-h`.
fn verbs() -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(cmd) = todo.pop() {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        for (name, _) in commands(&help(&args)) {
            let mut sub = cmd.clone();
            sub.push(name);
            found.push(sub.clone());
            todo.push(sub);
        }
    }
    found
}

/// groff, required: the pages are checked by the formatter `man` itself uses.
fn groff(args: &[&str], page: &Path) -> std::process::Output {
    Command::new("groff")
        .args(args)
        .arg(page)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run groff ({e}); install it: apt-get install groff-base")
        })
}

/// Rendered text compared as words: groff may print typographic dashes and quotes.
fn words(text: &str) -> String {
    text.replace(['\u{2010}', '\u{2212}'], "-")
        .replace(['\u{2018}', '\u{2019}'], "'")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn man_pages_cover_every_verb_and_render_without_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    // Not there yet: `larder manpages` makes it, as a package's `$out/share/man/man1`.
    let dir = tmp.path().join("share/man/man1");
    let o = Command::new(larder_bin())
        .arg("manpages")
        .arg(&dir)
        .env_remove("LARDER_CONFIG")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let verbs = verbs();
    assert!(verbs.len() > 30, "only {} verbs were found", verbs.len());
    let expected: BTreeSet<String> = std::iter::once("larder.1".to_owned())
        .chain(verbs.iter().map(|v| format!("larder-{}.1", v.join("-"))))
        .collect();
    let written: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(written, expected, "one page per visible verb, and no other");

    for name in &written {
        let page = dir.join(name);
        let o = groff(&["-man", "-Tutf8", "-ww", "-z"], &page);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && stderr.is_empty(), "{name}:\n{stderr}");
    }

    // Lines as long as the text, so no line break or hyphen splits a description; plain text
    // (no bold or underline sequences).
    let render = |name: &str| {
        let o = groff(
            &["-man", "-Tutf8", "-rLL=2000n", "-P-cbou"],
            &dir.join(name),
        );
        assert!(o.status.success(), "{name}");
        words(&String::from_utf8(o.stdout).unwrap())
    };
    let top = render("larder.1");
    // `.TH`'s fields in their places: the manual's name in the header, the source in the
    // footer's left corner.
    assert!(
        top.starts_with("LARDER(1) larder manual LARDER(1)"),
        "{top}"
    );
    assert!(
        top.ends_with(&format!("larder {} LARDER(1)", env!("CARGO_PKG_VERSION"))),
        "{top}"
    );
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "SUBCOMMANDS",
        "VERSION",
    ] {
        assert!(top.contains(section), "larder.1 has no {section}:\n{top}");
    }
    for (verb, about) in commands(&help(&[])) {
        let entry = format!("larder-{verb}(1) {}", words(&about));
        assert!(
            top.contains(&entry),
            "larder.1 does not list `{entry}`:\n{top}"
        );
    }
    let create = render("larder-cache-create.1");
    assert!(create.contains("larder cache create"), "{create}");
    let see_also = create.split("SEE ALSO").nth(1).unwrap_or_default();
    assert!(see_also.contains("larder-cache(1)"), "{create}");
    let cache = render("larder-cache.1");
    let see_also = cache.split("SEE ALSO").nth(1).unwrap_or_default();
    assert!(
        see_also.contains("larder(1), larder-cache-create(1)"),
        "{cache}"
    );
}

#[test]
fn man_pages_into_an_unwritable_place_fail_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let o = Command::new(larder_bin())
        .arg("manpages")
        .arg(file.join("man1"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: cannot create the directory") && stderr.contains("not-a-dir"),
        "{stderr}"
    );
}
