//! `--help` teaches: every verb, option and argument of the CLI has a description.

#![allow(clippy::unwrap_used)] // tests fail loudly on any unexpected error

mod common;

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
