//! Writing shell text: quoting an argument for `sh`, and finding `nix-store` for the hook
//! scripts (which run with the Nix daemon's `PATH`, not ours).

/// `arg` as a shell needs it typed: unchanged when it is made only of characters no shell
/// treats specially, else in single quotes (a `'` inside becomes `'\''`). The log of `larder
/// build` and the hook scripts use it, so their commands can be pasted into a shell.
pub fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:#=@+,-".contains(c);
    if !arg.is_empty() && !arg.starts_with('#') && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `nix-store` on PATH, absolute (a hook runs with the Nix daemon's PATH, not ours).
pub fn find_nix_store() -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nix-store"))
                .find(|p| p.is_file())
        })
        .map_or_else(|| "nix-store".to_owned(), |p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_commands_can_be_pasted_into_a_shell() {
        assert_eq!(
            shell_quote(".#homeConfigurations.host"),
            ".#homeConfigurations.host"
        );
        assert_eq!(
            shell_quote("/run/user/1000/larder.sock"),
            "/run/user/1000/larder.sock"
        );
        assert_eq!(shell_quote("--file"), "--file");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        // A word starting with `#` would be a comment.
        assert_eq!(shell_quote("#x"), "'#x'");
    }
}
