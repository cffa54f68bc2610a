//! The `.ls` listing of a NAR: what `nix ls-store --json -R` prints and what a binary cache
//! serves as `<hash>.ls` when `write-nar-listing=true`.
//!
//! Follows `listNar` in Nix's
//! [`src/libstore/nar-accessor.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libstore/nar-accessor.cc)
//! and its JSON writer in
//! [`src/libutil/json.cc`](https://github.com/NixOS/nix/blob/2.8.0/src/libutil/json.cc). The
//! document is `{"version":1,"root":NODE}` with no whitespace, where a node is one of
//!
//! ```text
//! {"type":"regular","size":N,"executable":true,"narOffset":N}   ("executable" only when true)
//! {"type":"symlink","target":"..."}
//! {"type":"directory","entries":{"name":NODE,...}}                 (names in byte order)
//! ```
//!
//! `narOffset` is the offset in the NAR of the file's first content byte. Strings are escaped as
//! Nix does: `"` and `\` with a backslash, `\n` `\r` `\t` by name, other bytes below 0x20 as
//! `\u00xx`, everything else (UTF-8 included) as is. [`Node::to_ls_json`] is byte-identical to the
//! `.ls` file Nix writes for any tree whose names and targets are UTF-8.

use std::collections::BTreeMap;

/// One node of a NAR listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file.
    Regular {
        /// Length of its contents.
        size: u64,
        /// Whether the executable bit is set.
        executable: bool,
        /// Offset of its first content byte within the NAR.
        nar_offset: u64,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points (not resolved).
        target: String,
    },
    /// A directory.
    Directory {
        /// Its entries by name; `BTreeMap` order is byte order, as in the NAR.
        entries: BTreeMap<String, Node>,
    },
}

impl Node {
    /// The whole `.ls` document for a NAR whose root is `self`: `{"version":1,"root":…}`.
    pub fn to_ls_json(&self) -> String {
        let mut out = String::from("{\"version\":1,\"root\":");
        self.write_json(&mut out);
        out.push('}');
        out
    }

    /// This node alone as JSON, in the same spelling as [`Node::to_ls_json`].
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    pub(crate) fn write_json(&self, out: &mut String) {
        match self {
            Node::Regular {
                size,
                executable,
                nar_offset,
            } => {
                out.push_str("{\"type\":\"regular\",\"size\":");
                out.push_str(&size.to_string());
                if *executable {
                    out.push_str(",\"executable\":true");
                }
                // Nix omits a zero offset; a real file's contents never start at 0.
                if *nar_offset != 0 {
                    out.push_str(",\"narOffset\":");
                    out.push_str(&nar_offset.to_string());
                }
                out.push('}');
            }
            Node::Symlink { target } => {
                out.push_str("{\"type\":\"symlink\",\"target\":");
                push_json_string(out, target);
                out.push('}');
            }
            Node::Directory { entries } => {
                out.push_str("{\"type\":\"directory\",\"entries\":{");
                for (i, (name, node)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    push_json_string(out, name);
                    out.push(':');
                    node.write_json(out);
                }
                out.push_str("}}");
            }
        }
    }

    /// Total size of all regular files below (and including) this node.
    pub fn total_file_size(&self) -> u64 {
        match self {
            Node::Regular { size, .. } => *size,
            Node::Symlink { .. } => 0,
            Node::Directory { entries } => entries
                .values()
                .map(Node::total_file_size)
                .fold(0, u64::saturating_add),
        }
    }
}

/// Append `s` as a JSON string literal, escaped exactly like Nix's `toJSON`.
pub(crate) fn push_json_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c) as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX.get(b >> 4).copied().unwrap_or(b'0')));
                out.push(char::from(HEX.get(b & 0xf).copied().unwrap_or(b'0')));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_layout() {
        let mut entries = BTreeMap::new();
        entries.insert(
            "b\"\\\n\r\t\u{1}é".to_owned(),
            Node::Symlink {
                target: "../x y".to_owned(),
            },
        );
        entries.insert(
            "a".to_owned(),
            Node::Regular {
                size: 3,
                executable: true,
                nar_offset: 96,
            },
        );
        entries.insert(
            "c".to_owned(),
            Node::Regular {
                size: 0,
                executable: false,
                nar_offset: 200,
            },
        );
        entries.insert(
            "d".to_owned(),
            Node::Directory {
                entries: BTreeMap::new(),
            },
        );
        let root = Node::Directory { entries };
        let json = root.to_ls_json();
        assert_eq!(
            json,
            concat!(
                r#"{"version":1,"root":{"type":"directory","entries":{"#,
                r#""a":{"type":"regular","size":3,"executable":true,"narOffset":96},"#,
                r#""b\"\\\n\r\t\u0001é":{"type":"symlink","target":"../x y"},"#,
                r#""c":{"type":"regular","size":0,"narOffset":200},"#,
                r#""d":{"type":"directory","entries":{}}}}}"#
            )
        );
        // It is valid JSON that means the same thing.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["root"]["entries"]["b\"\\\n\r\t\u{1}é"]["target"],
            "../x y"
        );
        assert_eq!(root.total_file_size(), 3);
    }
}
