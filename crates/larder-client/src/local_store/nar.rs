//! Streaming a store path's NAR from the filesystem, checked against the store's record.
//!
//! The NAR is produced by [`larder_nix::nar::dump::dump_path`] (byte-identical to
//! `nix-store --dump`) and hashed on its way to the writer, so memory stays bounded by the
//! dump's buffers whatever the path's size. The check happens at the end, which is the only
//! place it can: a caller uploading the stream must treat any error as "discard what was sent"
//! (a server that verifies NarHash rejects it anyway).

use std::io::{self, Write};
use std::path::Path;

use larder_nix::hash::{Sha256, Sha256Hasher};
use larder_nix::nar::dump::dump_path;

use super::{LocalStoreError, NarMismatch, PathInfo};

/// Stream the NAR of `info.path` into `out`, and return `out` once the NAR's hash and size
/// matched `info.nar_hash` and `info.nar_size`.
///
/// Errors: [`LocalStoreError::Corrupt`] (naming the path and the repair command) when the
/// contents differ from the store's record; [`LocalStoreError::Vanished`] when the path is
/// gone (garbage-collected after it was queued), which callers may skip with a warning;
/// [`LocalStoreError::Write`] when `out` fails; [`LocalStoreError::Read`] for other
/// filesystem errors.
pub fn dump_verified<W: Write>(info: &PathInfo, out: W) -> Result<W, LocalStoreError> {
    let (out, actual_hash, actual_size) = dump(info, out, Some(Sha256Hasher::new()))?;
    let actual_hash = actual_hash.unwrap_or(info.nar_hash);
    if actual_hash != info.nar_hash || actual_size != info.nar_size {
        return Err(LocalStoreError::Corrupt {
            path: info.path.clone(),
            mismatch: Box::new(NarMismatch {
                expected_hash: info.nar_hash,
                actual_hash,
                expected_size: info.nar_size,
                actual_size,
            }),
        });
    }
    Ok(out)
}

/// Stream the NAR of `info.path` into `out`, unchecked: for a receiver that measures the NAR
/// itself and says what it found (a larder server answers every upload with the NarHash and
/// NarSize it computed, which `crate::push` compares with the store's record). It spares the
/// client a SHA-256 pass over every NAR it sends, which on a machine that also runs the
/// server is CPU taken from the server's own verification.
///
/// Errors as [`dump_verified`]'s, but never [`LocalStoreError::Corrupt`].
pub fn dump_unverified<W: Write>(info: &PathInfo, out: W) -> Result<W, LocalStoreError> {
    dump(info, out, None).map(|(out, _, _)| out)
}

/// Stream `info.path`'s NAR into `out`, hashing it with `hasher` if given: `out`, the hash
/// and the size.
fn dump<W: Write>(
    info: &PathInfo,
    out: W,
    hasher: Option<Sha256Hasher>,
) -> Result<(W, Option<Sha256>, u64), LocalStoreError> {
    let abs = info.path.to_absolute();
    let root = Path::new(&abs);
    let vanished = || LocalStoreError::Vanished(info.path.clone());
    match std::fs::symlink_metadata(root) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(vanished()),
        Err(source) => {
            return Err(LocalStoreError::Read {
                path: info.path.clone(),
                source,
            })
        }
    }
    let mut writer = HashingWriter {
        inner: out,
        hasher,
        written: 0,
        write_failed: false,
    };
    let dumped = dump_path(root, &mut writer).map(drop);
    match dumped {
        Ok(()) => {}
        Err(source) if writer.write_failed => {
            return Err(LocalStoreError::Write {
                path: info.path.clone(),
                source,
            })
        }
        Err(source) => {
            // A deletion mid-dump shows as some file not found; if the root is gone too,
            // the path was collected rather than damaged.
            return Err(if std::fs::symlink_metadata(root).is_err() {
                vanished()
            } else {
                LocalStoreError::Read {
                    path: info.path.clone(),
                    source,
                }
            });
        }
    }
    let hash = writer.hasher.map(Sha256Hasher::finalize);
    Ok((writer.inner, hash, writer.written))
}

/// Passes bytes on to `inner`, hashing (if asked) and counting what `inner` accepted, and remembers
/// whether `inner` failed (so a write error is not blamed on the store).
struct HashingWriter<W> {
    inner: W,
    hasher: Option<Sha256Hasher>,
    written: u64,
    write_failed: bool,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                let accepted = buf.get(..n).unwrap_or(buf);
                if let Some(h) = &mut self.hasher {
                    h.update(accepted);
                }
                self.written += accepted.len() as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.write_failed = true;
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.write_failed = true)
    }
}
