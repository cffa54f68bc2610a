//! Serialise a filesystem path as a NAR, byte-identical to `nix-store --dump PATH`.
//!
//! Follows `dump` in Nix's
//! [`src/libutil/archive.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/archive.cc):
//! `lstat` each path (symlinks are never followed), a regular file is executable when its
//! owner-execute bit (`S_IXUSR`) is set, directory entries are sorted by the raw bytes of their
//! names, and anything other than a regular file, directory or symlink is an error. File contents
//! are streamed, so memory use does not depend on file sizes. Like Nix, exactly the `lstat` size
//! is read; a file that shrinks meanwhile makes the dump fail rather than produce an invalid NAR.
//!
//! This is the only module of the crate that touches the filesystem (feature `fs`).

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::write::NarWriter;

/// Dump `path` (file, symlink or directory tree) as a NAR to `out`, and return `out`.
pub fn dump_path<W: Write>(path: &Path, out: W) -> io::Result<W> {
    let mut w = NarWriter::new(BufWriter::with_capacity(64 * 1024, out))?;
    dump_node(path, &mut w)?;
    w.finish()?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)
}

fn dump_node<W: Write>(path: &Path, w: &mut NarWriter<W>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| with_path(e, "lstat", path))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| with_path(e, "readlink", path))?;
        w.symlink(os_bytes(target.as_os_str())?)
    } else if ft.is_file() {
        let mut file = fs::File::open(path).map_err(|e| with_path(e, "open", path))?;
        w.regular(is_executable(&meta), meta.len(), &mut file)
            .map_err(|e| with_path(e, "read", path))
    } else if ft.is_dir() {
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| with_path(e, "read directory", path))? {
            let entry = entry.map_err(|e| with_path(e, "read directory", path))?;
            names.push(entry.file_name());
        }
        // Nix sorts with std::map<std::string>: byte order of the raw names.
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        w.begin_directory()?;
        for name in names {
            w.entry(os_bytes(&name)?)?;
            dump_node(&path.join(&name), w)?;
        }
        w.end_directory()
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: unsupported file type (not a file, directory or symlink)",
                path.display()
            ),
        ))
    }
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o100 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    false
}

#[cfg(unix)]
fn os_bytes(s: &std::ffi::OsStr) -> io::Result<&[u8]> {
    use std::os::unix::ffi::OsStrExt as _;
    Ok(s.as_bytes())
}

#[cfg(not(unix))]
fn os_bytes(s: &std::ffi::OsStr) -> io::Result<&[u8]> {
    s.to_str().map(str::as_bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{s:?} is not valid Unicode"),
        )
    })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::nar::listing::Node;
    use crate::nar::parse::summarize;

    #[test]
    fn dumps_a_small_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("b"), b"bee").unwrap();
        std::os::unix::fs::symlink("b", root.join("a")).unwrap();
        fs::create_dir(root.join("c")).unwrap();
        let nar = dump_path(&root, Vec::new()).unwrap();
        let s = summarize(&nar).unwrap();
        let Node::Directory { entries } = s.listing else {
            panic!("not a directory")
        };
        assert_eq!(entries.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(dump_path(&dir.path().join("missing"), Vec::new()).is_err());
    }
}
