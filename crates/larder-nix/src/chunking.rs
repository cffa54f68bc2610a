//! Content-defined chunking of NARs: where a NAR is cut into the chunks that are stored once
//! and shared between NARs.
//!
//! FastCDC 2020 (Xia et al., "The Design of Fast Content-Defined Chunking for Data
//! Deduplication Based Storage Systems"), through the `fastcdc` crate's cut function with its
//! default gear table and normalisation level 1. The cut points depend only on the bytes, so
//! two NARs sharing a run of bytes longer than a few chunks share the chunks inside it,
//! wherever the run sits. Sizes: at least [`MIN_SIZE`], on average [`AVG_SIZE`], at most
//! [`MAX_SIZE`] (the last chunk of a NAR may be shorter than the minimum); why these, see
//! ARCHITECTURE.md ("Chunks").
//!
//! [`Chunker`] is fed the NAR in blocks of any size and hands out each chunk as soon as its end
//! is known; it holds at most [`MAX_SIZE`] plus one block, whatever the NAR's size, and cuts
//! exactly where chunking the whole NAR at once would. A chunk is named by the SHA-256 of its
//! bytes ([`ChunkId`]), so its name does not depend on how it is compressed.

use fastcdc::v2020::{cut, select_masks, Normalization};

use crate::hash::Sha256;

/// Smallest chunk (except a NAR's last).
pub const MIN_SIZE: usize = 8 << 10;
/// Average chunk size aimed at.
pub const AVG_SIZE: usize = 32 << 10;
/// Largest chunk.
pub const MAX_SIZE: usize = 128 << 10;

/// The name of a chunk: the SHA-256 of its (uncompressed) bytes.
pub type ChunkId = Sha256;

/// Cuts a stream of bytes into content-defined chunks.
#[derive(Debug)]
pub struct Chunker {
    buf: Vec<u8>,
    /// Where the bytes not yet handed out start in `buf`.
    start: usize,
    masks: (u64, u64),
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunker {
    pub fn new() -> Self {
        Chunker {
            buf: Vec::with_capacity(2 * MAX_SIZE),
            start: 0,
            masks: select_masks(AVG_SIZE, Normalization::Level1),
        }
    }

    /// The length of the next chunk of `data` (all of it when it is shorter than the minimum).
    fn next_cut(&self, data: &[u8]) -> usize {
        let (s, l) = self.masks;
        let (_, n) = cut(data, MIN_SIZE, AVG_SIZE, MAX_SIZE, s, l, s << 1, l << 1);
        n.clamp(1, data.len().max(1))
    }

    /// Feed the next bytes; `emit` is called with every chunk completed by them, in order.
    pub fn feed<E>(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.buf.extend_from_slice(data);
        // A cut is final once MAX_SIZE bytes past the chunk's start are known.
        while self.buf.len() - self.start >= MAX_SIZE {
            let rest = self.buf.get(self.start..).unwrap_or_default();
            let n = self.next_cut(rest);
            emit(rest.get(..n).unwrap_or_default())?;
            self.start += n;
        }
        if self.start >= MAX_SIZE {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }

    /// The end of the stream: `emit` is called with the remaining chunks.
    pub fn finish<E>(mut self, emit: &mut impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
        while self.start < self.buf.len() {
            let rest = self.buf.get(self.start..).unwrap_or_default();
            let n = self.next_cut(rest);
            emit(rest.get(..n).unwrap_or_default())?;
            self.start += n;
        }
        Ok(())
    }
}

/// The chunk lengths of `data` chunked at once (what [`Chunker`] must reproduce).
pub fn chunk_lengths(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut c = Chunker::new();
    let mut emit = |b: &[u8]| {
        out.push(b.len());
        Ok::<_, std::convert::Infallible>(())
    };
    let _ = c.feed(data, &mut emit);
    let _ = c.finish(&mut emit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so the tests need no rand crate.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn streaming_cuts_where_whole_chunking_cuts() {
        let data = noise(5 * MAX_SIZE + 12_345, 7);
        let whole: Vec<usize> = fastcdc::v2020::FastCDC::with_level(
            &data,
            MIN_SIZE,
            AVG_SIZE,
            MAX_SIZE,
            Normalization::Level1,
        )
        .map(|c| c.length)
        .collect();
        for block in [1usize, 4096, 65_536, 1 << 20, 3 << 20] {
            let mut got = Vec::new();
            let mut c = Chunker::new();
            let mut emit = |b: &[u8]| {
                got.push(b.len());
                Ok::<_, ()>(())
            };
            for piece in data.chunks(block) {
                c.feed(piece, &mut emit).unwrap();
            }
            c.finish(&mut emit).unwrap();
            assert_eq!(got, whole, "block size {block}");
        }
        assert_eq!(whole.iter().sum::<usize>(), data.len());
        assert!(whole.iter().all(|&n| n <= MAX_SIZE));
        assert!(whole.len() > 5, "{whole:?}");
    }

    #[test]
    fn an_insertion_changes_only_nearby_chunks() {
        let data = noise(8 << 20, 3);
        let mut edited = data.clone();
        edited.splice(3 << 20..3 << 20, b"inserted bytes".iter().copied());
        let cut = |d: &[u8]| {
            let mut hashes = std::collections::HashSet::new();
            let mut offset = 0;
            for n in chunk_lengths(d) {
                hashes.insert(Sha256::digest(&d[offset..offset + n]));
                offset += n;
            }
            hashes
        };
        let (a, b) = (cut(&data), cut(&edited));
        let shared = a.intersection(&b).count();
        assert!(shared + 3 >= a.len(), "{shared} of {} shared", a.len());
    }

    #[test]
    fn small_and_empty_inputs() {
        assert_eq!(chunk_lengths(&[]), Vec::<usize>::new());
        assert_eq!(chunk_lengths(&[1, 2, 3]), vec![3]);
        assert_eq!(chunk_lengths(&noise(MIN_SIZE, 1)), vec![MIN_SIZE]);
    }
}
