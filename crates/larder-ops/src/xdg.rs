//! The per-user directories of the XDG Base Directory specification
//! (<https://specifications.freedesktop.org/basedir-spec/latest/>), looked up in one place:
//! `$XDG_CONFIG_HOME` (`~/.config`), `$XDG_DATA_HOME` (`~/.local/share`), `$XDG_STATE_HOME`
//! (`~/.local/state`) and `$XDG_CACHE_HOME` (`~/.cache`). An empty variable counts as unset,
//! as the specification says.

use std::path::PathBuf;

/// Neither the XDG variable nor `HOME` is set, so the directory has no default.
#[derive(Debug, thiserror::Error)]
#[error("neither {var} nor HOME is set")]
pub struct NoHome {
    /// The XDG variable looked up first, e.g. `XDG_CONFIG_HOME`.
    pub var: &'static str,
}

/// One of the base directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Config,
    Data,
    State,
    Cache,
}

impl Base {
    /// The variable that names it, and its default under `HOME`.
    fn var_and_default(self) -> (&'static str, &'static str) {
        match self {
            Base::Config => ("XDG_CONFIG_HOME", ".config"),
            Base::Data => ("XDG_DATA_HOME", ".local/share"),
            Base::State => ("XDG_STATE_HOME", ".local/state"),
            Base::Cache => ("XDG_CACHE_HOME", ".cache"),
        }
    }
}

/// An environment variable's value, treating empty as unset.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The base directory: its variable, else its default under `HOME`.
pub fn dir(base: Base) -> Result<PathBuf, NoHome> {
    let (name, default) = base.var_and_default();
    resolve(name, default, var(name), var("HOME"))
}

/// larder's own directory in a base directory: `<base>/larder`.
pub fn larder_dir(base: Base) -> Result<PathBuf, NoHome> {
    Ok(dir(base)?.join("larder"))
}

fn resolve(
    name: &'static str,
    default: &str,
    value: Option<String>,
    home: Option<String>,
) -> Result<PathBuf, NoHome> {
    match (value, home) {
        (Some(v), _) => Ok(PathBuf::from(v)),
        (None, Some(home)) => Ok(PathBuf::from(home).join(default)),
        (None, None) => Err(NoHome { var: name }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_then_home_default_then_error() {
        let (name, default) = Base::State.var_and_default();
        assert_eq!(
            resolve(name, default, Some("/s".into()), Some("/h".into())).ok(),
            Some(PathBuf::from("/s"))
        );
        assert_eq!(
            resolve(name, default, None, Some("/h".into())).ok(),
            Some(PathBuf::from("/h/.local/state"))
        );
        let e = resolve(name, default, None, None)
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("neither XDG_STATE_HOME nor HOME is set"));
    }
}
