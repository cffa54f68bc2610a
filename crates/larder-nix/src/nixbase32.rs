//! Nix's own base-32 encoding ("nix32"), used for store path hash parts and hashes in narinfo.
//!
//! It follows `printHash32` and the base-32 branch of `Hash::Hash` in Nix's
//! [`src/libutil/hash.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/hash.cc): the
//! alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`), and the bytes are read as
//! one little-endian number whose 5-bit digits are printed most significant first. That is
//! neither RFC 4648 base32 nor its bit order, so a general-purpose base32 crate cannot be used.
//!
//! A string of `n` characters carries `5n` bits; when that is more than the `8 * len` bits of the
//! decoded bytes, the spare high bits must be zero (Nix rejects them too), so every byte string has
//! exactly one spelling.

use crate::util::shorten;

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A character outside [`ALPHABET`].
    #[error("invalid nix32 character {character:?} at position {position} in {input:?}")]
    InvalidCharacter {
        /// The offending character.
        character: char,
        /// Its character position in the input.
        position: usize,
        /// The input (shortened).
        input: String,
    },
    /// No byte string encodes to this many characters, or not to the expected length.
    #[error("nix32 string {input:?} has length {len}, expected {expected}")]
    InvalidLength {
        /// The input (shortened).
        input: String,
        /// Its length in bytes (anything non-ASCII is invalid anyway).
        len: usize,
        /// What was expected, in words.
        expected: String,
    },
    /// The spare high bits of the first digit are not zero.
    #[error("nix32 string {input:?} has non-zero bits beyond its {byte_len} bytes")]
    NonZeroOverflow {
        /// The input (shortened).
        input: String,
        /// How many bytes the length implies.
        byte_len: usize,
    },
}

/// Number of nix32 characters that encode `byte_len` bytes.
pub const fn encoded_len(byte_len: usize) -> usize {
    if byte_len == 0 {
        0
    } else {
        // Same as Nix's `(hashSize * 8 - 1) / 5 + 1`, without overflowing on huge inputs.
        let bits = byte_len as u128 * 8;
        ((bits - 1) / 5 + 1) as usize
    }
}

/// Number of bytes that a nix32 string of `char_len` characters decodes to, if any.
pub fn decoded_len(char_len: usize) -> Option<usize> {
    let byte_len = (char_len as u128 * 5 / 8) as usize;
    (encoded_len(byte_len) == char_len).then_some(byte_len)
}

/// Encode `bytes` in nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = u16::from(bytes.get(i).copied().unwrap_or(0)) >> j;
        let high = u16::from(bytes.get(i + 1).copied().unwrap_or(0)) << (8 - j);
        let digit = usize::from((low | high) & 0x1f);
        out.push(char::from(ALPHABET.get(digit).copied().unwrap_or(b'0')));
    }
    out
}

fn digit_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        _ => ALPHABET
            .iter()
            .position(|&a| a == c)
            .and_then(|p| u8::try_from(p).ok()),
    }
}

/// Decode a nix32 string of any valid length. Rejects characters outside the alphabet, lengths
/// that no byte string encodes to, and non-zero spare bits.
pub fn decode(s: &str) -> Result<Vec<u8>, DecodeError> {
    let Some(byte_len) = decoded_len(s.len()) else {
        return Err(DecodeError::InvalidLength {
            input: shorten(s),
            len: s.len(),
            expected: "a length that some byte string encodes to".to_owned(),
        });
    };
    let mut out = vec![0u8; byte_len];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decode a nix32 string that must encode exactly `N` bytes.
pub fn decode_fixed<const N: usize>(s: &str) -> Result<[u8; N], DecodeError> {
    if s.len() != encoded_len(N) {
        return Err(DecodeError::InvalidLength {
            input: shorten(s),
            len: s.len(),
            expected: format!("{} characters ({N} bytes)", encoded_len(N)),
        });
    }
    let mut out = [0u8; N];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decode `s` into `out`, whose length the caller has matched to `s.len()`.
fn decode_into(s: &str, out: &mut [u8]) -> Result<(), DecodeError> {
    let bytes = s.as_bytes();
    let out_len = out.len();
    for (n, &c) in bytes.iter().rev().enumerate() {
        let Some(digit) = digit_value(c) else {
            let byte_pos = bytes.len() - 1 - n;
            // Report the whole (possibly multi-byte) character this byte belongs to.
            let (position, character) = s
                .char_indices()
                .enumerate()
                .find(|(_, (start, ch))| *start <= byte_pos && byte_pos < start + ch.len_utf8())
                .map_or((byte_pos, char::REPLACEMENT_CHARACTER), |(i, (_, ch))| {
                    (i, ch)
                });
            return Err(DecodeError::InvalidCharacter {
                character,
                position,
                input: shorten(s),
            });
        };
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let wide = u16::from(digit) << j;
        if let Some(b) = out.get_mut(i) {
            *b |= (wide & 0xff) as u8;
        }
        let carry = (wide >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 || (i >= out_len && digit != 0) => {
                return Err(DecodeError::NonZeroOverflow {
                    input: shorten(s),
                    byte_len: out_len,
                });
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // sha256("") as printed by `nix hash to-base32`.
        let sha256_empty: [u8; 32] = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(
            encode(&sha256_empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode_fixed::<32>("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
            Ok(sha256_empty)
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(decode(""), Ok(vec![]));
        assert_eq!(encode(&[0x1f]), "0z");
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(decode("7z"), Ok(vec![0xff]));
        assert_eq!(encode(&[0; 20]), "0".repeat(32));
        assert_eq!(encode(&[0xff; 20]), "z".repeat(32));
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(1), 2);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        for n in 0..200 {
            assert_eq!(decoded_len(encoded_len(n)), Some(n));
        }
        assert_eq!(decoded_len(1), None);
        assert_eq!(decoded_len(3), None);
        let _ = encoded_len(usize::MAX);
        let _ = decoded_len(usize::MAX);
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            decode("0e"),
            Err(DecodeError::InvalidCharacter {
                character: 'e',
                position: 1,
                ..
            })
        ));
        assert!(matches!(
            decode(&format!("ü{}", "0".repeat(50))),
            Err(DecodeError::InvalidCharacter {
                character: 'ü',
                position: 0,
                ..
            })
        ));
        assert!(matches!(
            decode("0é"),
            Err(DecodeError::InvalidLength { .. })
        ));
        assert!(matches!(
            decode("0"),
            Err(DecodeError::InvalidLength { .. })
        ));
        // 2 chars = 10 bits for 1 byte: the top two bits of the first digit must be zero.
        assert!(matches!(
            decode("8z"),
            Err(DecodeError::NonZeroOverflow { .. })
        ));
        assert!(decode_fixed::<32>(&format!("1{}", "0".repeat(51))).is_ok());
        assert!(matches!(
            decode_fixed::<32>(&format!("2{}", "0".repeat(51))),
            Err(DecodeError::NonZeroOverflow { .. })
        ));
        assert!(matches!(
            decode_fixed::<20>("00"),
            Err(DecodeError::InvalidLength { .. })
        ));
        assert!(matches!(
            decode_fixed::<20>(&"Z".repeat(32)),
            Err(DecodeError::InvalidCharacter { .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&s), Ok(bytes));
        }

        #[test]
        fn roundtrip_fixed(bytes in any::<[u8; 20]>()) {
            prop_assert_eq!(decode_fixed::<20>(&encode(&bytes)), Ok(bytes));
        }

        #[test]
        fn decode_never_panics_and_is_canonical(s in "[0-9a-z]{0,60}") {
            if let Ok(bytes) = decode(&s) {
                prop_assert_eq!(encode(&bytes), s);
            }
        }

        #[test]
        fn decode_never_panics_on_any_text(s in "\\PC{0,60}") {
            let _ = decode(&s);
            let _ = decode_fixed::<32>(&s);
        }
    }
}
