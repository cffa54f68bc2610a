//! Byte counts as people read them, in the binary units Nix itself prints (`nix path-info
//! -Sh`, a dry run's "0.02 MiB unpacked"): `512 B`, `1.5 KiB`, `5.0 MiB`. The web UI and every
//! client verb show sizes through this one function, so the same size reads the same everywhere.

/// `1.5 GiB`-style text: bytes below 1 KiB, else one decimal in the largest unit reached.
pub fn human_size(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 20), "5.0 MiB");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }
}
