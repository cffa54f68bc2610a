//! Small pieces of the text larder prints, shared by the binary and this crate's progress
//! lines.

pub use larder_nix::size::human_size;

/// `1 path`, `2 paths`: a count and its noun, in the right number.
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_in_number() {
        assert_eq!(count(1u64, "path"), "1 path");
        assert_eq!(count(0u64, "path"), "0 paths");
        assert_eq!(count(3u32, "part"), "3 parts");
    }
}
