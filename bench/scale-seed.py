#!/usr/bin/env python3
"""Write a Nix binary cache directory (what `nix copy --to file://DIR` writes) of N small paths.

Usage: scale-seed.py DIR N [BATCH]

Each path is a real, valid NAR of one small regular file (200 bytes to 2 KiB, distinct content),
stored uncompressed (`Compression: none`) so nothing here needs zstd; names look like a Nix
store's (`<hash>-<pname>-<version>`), and each path references 0-4 others of its batch (BATCH
paths, default 50 000), so every batch is a closure of its own: `larder import` can take one
batch at a time with bounded memory, and a batch's list of store paths is written to
DIR/batches/NNNN. The narinfo is what nginx serves in the benchmark and what larder is fed.
"""

import hashlib
import os
import random
import sys

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
NAMES = ["glibc", "bash", "coreutils", "openssl", "zlib", "python3", "perl", "gcc", "libffi",
         "ncurses", "readline", "sqlite", "curl", "git", "nodejs", "rustc", "llvm", "boost",
         "qtbase", "gtk3", "mesa", "systemd", "linux", "firefox", "emacs", "vim", "hm_fontconfig",
         "home-manager-files", "nixos-system", "man-pages", "icu", "libxml2", "harfbuzz"]


def nix32(b):
    n = len(b)
    out = []
    for i in range((n * 8 - 1) // 5, -1, -1):
        bit = i * 5
        j, k = divmod(bit, 8)
        c = b[j] >> k
        if j + 1 < n:
            c |= b[j + 1] << (8 - k)
        out.append(NIX32[c & 0x1F])
    return "".join(out)


def nar_str(b):
    return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)


def nar_of(contents):
    return b"".join(nar_str(x) for x in (b"nix-archive-1", b"(", b"type", b"regular", b"contents")) \
        + nar_str(contents) + nar_str(b")")


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 50_000
    rng = random.Random(20261205)
    os.makedirs(f"{out}/nar", exist_ok=True)
    os.makedirs(f"{out}/batches", exist_ok=True)
    with open(f"{out}/nix-cache-info", "w") as f:
        f.write("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 50\n")
    hashes = open(f"{out}/hashes", "w")
    for b0 in range(0, n, batch):
        names = []
        for i in range(b0, min(n, b0 + batch)):
            h = nix32(rng.getrandbits(160).to_bytes(20, "little"))
            name = f"{h}-{rng.choice(NAMES)}-{rng.randint(0, 30)}.{rng.randint(0, 20)}.{i}"
            size = rng.randint(200, 2048)
            contents = (f"{name}\n".encode() * (size // 40 + 1))[:size]
            nar = nar_of(contents)
            digest = "sha256:" + nix32(hashlib.sha256(nar).digest())
            refs = sorted(set(rng.sample(names, min(len(names), rng.randint(0, 4)))))
            with open(f"{out}/nar/{digest[7:]}.nar", "wb") as f:
                f.write(nar)
            with open(f"{out}/{h}.narinfo", "w") as f:
                f.write(f"StorePath: /nix/store/{name}\nURL: nar/{digest[7:]}.nar\nCompression: none\n"
                        f"FileHash: {digest}\nFileSize: {len(nar)}\nNarHash: {digest}\n"
                        f"NarSize: {len(nar)}\nReferences: {' '.join(refs)}\n")
            names.append(name)
            hashes.write(h + "\n")
        with open(f"{out}/batches/{b0 // batch:04}", "w") as f:
            f.write("".join(f"/nix/store/{x}\n" for x in names))
        print(f"seed: {min(n, b0 + batch)} of {n} paths written", file=sys.stderr)
    hashes.close()


if __name__ == "__main__":
    main()
