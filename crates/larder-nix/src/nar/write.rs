//! Streaming NAR encoder over any [`std::io::Write`]; no filesystem access.
//!
//! Emits exactly what `dump` in Nix's
//! [`src/libutil/archive.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/archive.cc)
//! emits for the same tree. The caller describes the tree depth first; [`NarWriter`] checks that
//! the description is a valid NAR (one root, entries strictly ascending by bytes, valid names,
//! file sizes as announced) and refuses anything else with an [`std::io::ErrorKind::InvalidInput`]
//! error wrapping a [`WriteError`]. After any error the writer is unusable.
//!
//! ```
//! use larder_nix::nar::write::NarWriter;
//! let mut w = NarWriter::new(Vec::new())?;
//! w.begin_directory()?;
//! w.entry("bin")?;
//! w.begin_directory()?;
//! w.entry("hello")?;
//! w.regular_bytes(true, b"#!/bin/sh\necho hi\n")?;
//! w.end_directory()?;
//! w.entry("lib")?;
//! w.symlink("bin")?;
//! w.end_directory()?;
//! let nar: Vec<u8> = w.finish()?;
//! # let s = larder_nix::nar::parse::summarize(&nar).unwrap();
//! # assert_eq!(s.nar_size, nar.len() as u64);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, Read, Write};

use super::parse::{MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN};
use super::{padding, MAGIC};
use crate::util::shorten_bytes;

/// A call sequence that would not produce a valid NAR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A node was started where none is expected (the root is complete, or `entry` was not called).
    #[error("a node was written where none is expected (call entry() first, or the root is done)")]
    UnexpectedNode,
    /// `entry` or `end_directory` outside a directory, or while an entry still lacks its node.
    #[error("{call}() called outside an open directory or before the previous entry's node")]
    NotInDirectory {
        /// The misplaced call.
        call: &'static str,
    },
    /// An entry name that Nix would refuse.
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidName {
        /// The name (shortened, lossily decoded).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Entry names not strictly ascending by bytes (this includes duplicates).
    #[error("entry {name:?} does not sort after the previous entry {previous:?}")]
    Unsorted {
        /// The name (shortened).
        name: String,
        /// The previous name (shortened).
        previous: String,
    },
    /// A symlink target longer than the parser accepts.
    #[error("symlink target of {len} bytes exceeds {MAX_TARGET_LEN}")]
    TargetTooLong {
        /// Its length.
        len: usize,
    },
    /// Directories nested deeper than the parser accepts.
    #[error("directories nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// The reader of a regular file ended before the announced size.
    #[error("file contents ended after {got} of {size} announced bytes")]
    ShortContents {
        /// Bytes read.
        got: u64,
        /// Bytes announced.
        size: u64,
    },
    /// `finish` before the root node was complete.
    #[error("NAR is incomplete: the root node is not finished")]
    Incomplete,
    /// A previous call failed; the output is not a NAR.
    #[error("an earlier write failed; this NAR writer cannot be used any more")]
    Poisoned,
}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> Self {
        let kind = match e {
            WriteError::ShortContents { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

#[derive(Debug)]
struct Frame {
    last: Option<Vec<u8>>,
    /// `entry()` was called and its node has not been written yet.
    pending: bool,
}

/// Writes one NAR to `W`; see the module docs.
#[derive(Debug)]
pub struct NarWriter<W: Write> {
    out: W,
    stack: Vec<Frame>,
    root_done: bool,
    poisoned: bool,
    written: u64,
}

impl<W: Write> NarWriter<W> {
    /// Start a NAR on `out` (writes the magic string).
    pub fn new(out: W) -> io::Result<Self> {
        let mut w = Self {
            out,
            stack: Vec::new(),
            root_done: false,
            poisoned: false,
            written: 0,
        };
        w.guard(|w| w.string(MAGIC.as_bytes()))?;
        Ok(w)
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// A regular file of `size` bytes read from `contents` (exactly `size` bytes are read;
    /// fewer is an error).
    pub fn regular(
        &mut self,
        executable: bool,
        size: u64,
        contents: &mut impl Read,
    ) -> io::Result<()> {
        self.guard(|w| {
            w.expect_node()?;
            w.strings(&[b"(", b"type", b"regular"])?;
            if executable {
                w.strings(&[b"executable", b""])?;
            }
            w.string(b"contents")?;
            w.raw(&size.to_le_bytes())?;
            let mut limited = contents.take(size);
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            loop {
                let n = match limited.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                w.raw(buf.get(..n).unwrap_or_default())?;
                got += n as u64;
            }
            if got != size {
                return Err(WriteError::ShortContents { got, size }.into());
            }
            w.pad(size)?;
            w.string(b")")?;
            w.node_done()
        })
    }

    /// A regular file with the given contents.
    pub fn regular_bytes(&mut self, executable: bool, contents: &[u8]) -> io::Result<()> {
        self.regular(executable, contents.len() as u64, &mut &*contents)
    }

    /// A symlink pointing at `target`.
    pub fn symlink(&mut self, target: impl AsRef<[u8]>) -> io::Result<()> {
        let target = target.as_ref();
        self.guard(|w| {
            w.expect_node()?;
            if target.len() > MAX_TARGET_LEN {
                return Err(WriteError::TargetTooLong { len: target.len() }.into());
            }
            w.strings(&[b"(", b"type", b"symlink", b"target", target, b")"])?;
            w.node_done()
        })
    }

    /// Start a directory; add its entries with [`NarWriter::entry`] and close it with
    /// [`NarWriter::end_directory`].
    pub fn begin_directory(&mut self) -> io::Result<()> {
        self.guard(|w| {
            w.expect_node()?;
            if w.stack.len() >= MAX_DEPTH {
                return Err(WriteError::TooDeep.into());
            }
            w.strings(&[b"(", b"type", b"directory"])?;
            w.stack.push(Frame {
                last: None,
                pending: false,
            });
            Ok(())
        })
    }

    /// Announce the next entry of the open directory; the next node written is its content.
    /// Names must be strictly ascending by bytes.
    pub fn entry(&mut self, name: impl AsRef<[u8]>) -> io::Result<()> {
        let name = name.as_ref();
        self.guard(|w| {
            let frame = match w.stack.last_mut() {
                Some(f) if !f.pending => f,
                _ => return Err(WriteError::NotInDirectory { call: "entry" }.into()),
            };
            if let Some(reason) = name_problem(name) {
                return Err(WriteError::InvalidName {
                    name: shorten_bytes(name),
                    reason,
                }
                .into());
            }
            if let Some(previous) = &frame.last {
                if name <= previous.as_slice() {
                    return Err(WriteError::Unsorted {
                        name: shorten_bytes(name),
                        previous: shorten_bytes(previous),
                    }
                    .into());
                }
            }
            frame.last = Some(name.to_vec());
            frame.pending = true;
            w.strings(&[b"entry", b"(", b"name", name, b"node"])
        })
    }

    /// Close the innermost open directory.
    pub fn end_directory(&mut self) -> io::Result<()> {
        self.guard(|w| {
            match w.stack.last() {
                Some(f) if !f.pending => {}
                _ => {
                    return Err(WriteError::NotInDirectory {
                        call: "end_directory",
                    }
                    .into())
                }
            }
            w.stack.pop();
            w.string(b")")?;
            w.node_done()
        })
    }

    /// Check the NAR is complete, flush, and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if self.poisoned {
            return Err(WriteError::Poisoned.into());
        }
        if !self.root_done {
            return Err(WriteError::Incomplete.into());
        }
        self.out.flush()?;
        Ok(self.out)
    }

    /// Run `f`, poisoning the writer if it fails.
    fn guard(&mut self, f: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if self.poisoned {
            return Err(WriteError::Poisoned.into());
        }
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn expect_node(&self) -> io::Result<()> {
        let ok = match self.stack.last() {
            None => !self.root_done,
            Some(f) => f.pending,
        };
        if ok {
            Ok(())
        } else {
            Err(WriteError::UnexpectedNode.into())
        }
    }

    /// A node just ended: close the entry it belongs to, or finish the root.
    fn node_done(&mut self) -> io::Result<()> {
        match self.stack.last_mut() {
            None => {
                self.root_done = true;
                Ok(())
            }
            Some(f) => {
                f.pending = false;
                self.string(b")")
            }
        }
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let zeros = [0u8; 8];
        let n = padding(len) as usize;
        self.raw(zeros.get(..n).unwrap_or_default())
    }

    fn string(&mut self, s: &[u8]) -> io::Result<()> {
        self.raw(&(s.len() as u64).to_le_bytes())?;
        self.raw(s)?;
        self.pad(s.len() as u64)
    }

    fn strings(&mut self, ss: &[&[u8]]) -> io::Result<()> {
        ss.iter().try_for_each(|s| self.string(s))
    }
}

/// Why Nix would refuse `name` as a directory entry, if it would.
pub(crate) fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name == b"." || name == b".." {
        Some("\".\" and \"..\" are not allowed")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains NUL")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 255 bytes")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind_of(e: io::Error) -> WriteError {
        e.into_inner()
            .and_then(|b| b.downcast::<WriteError>().ok())
            .map(|b| *b)
            .expect("a WriteError")
    }

    #[test]
    fn single_file_layout() {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.regular_bytes(false, b"hi").unwrap();
        let nar = w.finish().unwrap();
        let mut want = Vec::new();
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hi",
            b")",
        ] {
            want.extend_from_slice(&(s.len() as u64).to_le_bytes());
            want.extend_from_slice(s);
            want.resize(want.len() + padding(s.len() as u64) as usize, 0);
        }
        assert_eq!(nar, want);
    }

    #[test]
    fn refuses_bad_structure() {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.begin_directory().unwrap();
        w.entry("b").unwrap();
        w.symlink("x").unwrap();
        assert!(matches!(
            kind_of(w.entry("a").unwrap_err()),
            WriteError::Unsorted { .. }
        ));
        assert!(matches!(
            kind_of(w.entry("c").unwrap_err()),
            WriteError::Poisoned
        ));

        for name in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            let mut w = NarWriter::new(Vec::new()).unwrap();
            w.begin_directory().unwrap();
            assert!(matches!(
                kind_of(w.entry(name).unwrap_err()),
                WriteError::InvalidName { .. }
            ));
        }

        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.begin_directory().unwrap();
        w.entry("a").unwrap();
        w.symlink("x").unwrap();
        assert!(matches!(
            kind_of(w.entry("a").unwrap_err()),
            WriteError::Unsorted { .. }
        ));

        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.begin_directory().unwrap();
        assert!(matches!(
            kind_of(w.symlink("x").unwrap_err()),
            WriteError::UnexpectedNode
        ));

        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.symlink("x").unwrap();
        assert!(matches!(
            kind_of(w.symlink("y").unwrap_err()),
            WriteError::UnexpectedNode
        ));

        let mut w = NarWriter::new(Vec::new()).unwrap();
        assert!(matches!(
            kind_of(w.end_directory().unwrap_err()),
            WriteError::NotInDirectory { .. }
        ));

        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.begin_directory().unwrap();
        assert!(matches!(
            kind_of(w.finish().unwrap_err()),
            WriteError::Incomplete
        ));

        let mut w = NarWriter::new(Vec::new()).unwrap();
        let e = w.regular(false, 10, &mut &b"short"[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(matches!(
            kind_of(e),
            WriteError::ShortContents { got: 5, size: 10 }
        ));
    }

    #[test]
    fn reads_only_the_announced_size() {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        let mut r = &b"abcdef"[..];
        w.regular(true, 3, &mut r).unwrap();
        assert_eq!(r, b"def");
        let nar = w.finish().unwrap();
        let s = crate::nar::parse::summarize(&nar).unwrap();
        assert_eq!(
            s.listing,
            crate::nar::listing::Node::Regular {
                size: 3,
                executable: true,
                nar_offset: 128
            }
        );
    }
}
