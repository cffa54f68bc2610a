#!/usr/bin/env python3
"""The shape of the code, measured: the numbers issue #16's closing note compares.

Usage: python3 bench/code-shape.py [REPO_DIR]   (default: the repository this script is in)

For every crate under crates/: non-test lines of src/ (blank lines and `#[cfg(test)]` modules
left out), functions longer than 80 lines (the binary's are listed by name), cycles between a
crate's top-level modules (`use crate::a` in b and `use crate::b` in a), and, in larder-client
and the binary, `json!` uses and string-indexed reads of JSON values (`v["field"]`,
`.get("field")` on a serde_json value). A reading aid, not a parser: it counts braces outside
strings, chars and comments, which is enough for rustfmt-formatted code.
"""

import os
import re
import sys
from collections import defaultdict

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = 80


def strip(src):
    """Source with strings, chars and comments blanked (newlines kept), so braces can be counted."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == "'":
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", src[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def block_end(lines, start):
    """Index of the line closing the block whose `{` is on or after line `start`."""
    depth, opened = 0, False
    for k in range(start, len(lines)):
        for ch in lines[k]:
            if ch == "{":
                depth += 1
                opened = True
            elif ch == "}":
                depth -= 1
                if opened and depth == 0:
                    return k
        if not opened and lines[k].rstrip().endswith(";"):
            return None  # a declaration without a body
    return None


def test_ranges(lines):
    """Line ranges of `#[cfg(test)]` items."""
    out = []
    for k, line in enumerate(lines):
        if line.strip().startswith("#[cfg(test)]"):
            end = block_end(lines, k + 1)
            if end is not None:
                out.append((k, end))
    return out


FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def analyse(path):
    src = open(path, encoding="utf-8").read()
    raw = src.split("\n")
    clean = strip(src).split("\n")
    tests = test_ranges(clean)
    in_test = [False] * len(clean)
    for a, b in tests:
        for k in range(a, b + 1):
            in_test[k] = True
    code = sum(1 for k, line in enumerate(raw) if line.strip() and not in_test[k])
    fns = []
    for k, line in enumerate(clean):
        m = FN.match(line)
        if m and not in_test[k]:
            end = block_end(clean, k)
            if end is not None:
                fns.append((m.group(6), end - k + 1))
    uses = set(re.findall(r"\bcrate::(\w+)", "\n".join(l for k, l in enumerate(clean) if not in_test[k])))
    body = "\n".join(l for k, l in enumerate(raw) if not in_test[k])
    json_macro = len(re.findall(r"\bjson!\s*\(", body))
    indexed = len(re.findall(r'\w\]?\)?\["[a-z_]+"\]', body)) + len(re.findall(r'\.get\("[a-z_]+"\)\s*\.\s*and_then\(\s*(serde_json::)?Value::', body)) + len(re.findall(r'\.get\("[a-z_]+"\)\s*\.\s*and_then\(\|\w+\|\s*\w+\.as_', body))
    return code, fns, uses, json_macro, indexed


def module_of(src_dir, path):
    rel = os.path.relpath(path, src_dir)
    top = rel.split(os.sep)[0]
    return top[:-3] if top.endswith(".rs") else top


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main():
    crates_dir = os.path.join(ROOT, "crates")
    total = 0
    print(f"{'crate':<16} {'lines':>6} {'fns>80':>6}  cycles")
    details = []
    for crate in sorted(os.listdir(crates_dir)):
        src_dir = os.path.join(crates_dir, crate, "src")
        if not os.path.isdir(src_dir):
            continue
        lines, long_fns, edges, jm, ix = 0, [], defaultdict(set), 0, 0
        for dirpath, _, files in os.walk(src_dir):
            for f in files:
                if not f.endswith(".rs"):
                    continue
                p = os.path.join(dirpath, f)
                code, fns, uses, json_macro, indexed = analyse(p)
                lines += code
                mod = module_of(src_dir, p)
                long_fns += [(n, l, os.path.relpath(p, ROOT)) for n, l in fns if l > LONG]
                for u in uses:
                    if u != mod and os.path.exists(os.path.join(src_dir, u + ".rs")) or os.path.isdir(os.path.join(src_dir, u)):
                        if u != mod:
                            edges[mod].add(u)
                jm += json_macro
                ix += indexed
        total += lines
        cyc = cycles(edges)
        print(f"{crate:<16} {lines:>6} {len(long_fns):>6}  {'; '.join(' <-> '.join(c) for c in cyc) or '-'}")
        if crate in ("larder", "larder-client"):
            details.append(f"{crate}: json! {jm}, string-indexed reads {ix}")
        if crate == "larder":
            for n, l, p in sorted(long_fns, key=lambda t: -t[1]):
                details.append(f"  {l:>4}  {n}  ({p})")
    print(f"{'total':<16} {total:>6}")
    print()
    print("\n".join(details))


if __name__ == "__main__":
    main()
