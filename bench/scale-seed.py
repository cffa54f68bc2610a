#!/usr/bin/env python3
"""Seed a larder data directory with N small, valid, signed store paths, fast, and mirror their
narinfos into a directory that nginx serves (what bench/scale.sh measures).

Usage: scale-seed.py DATA STATIC N [CACHE]

DATA is a `larder serve --data` directory whose server has been stopped, with the cache CACHE
(default "bench") created and managed signing (the default). The script writes, in batches of
one transaction each, the rows publishing a path writes (`nars`, `chunks`, `nar_chunks`,
`paths`, `path_refs`, and the size counters `cache_chunks`, `cache_sizes`, `store_sizes`) straight into DATA/larder.db and each NAR as one chunk object under
DATA/store/objects: `larder import` of the same paths goes through HTTP at 70-340 paths/s,
which makes a million paths a matter of hours; this writes thousands a second. Measurements
then go through HTTP only.

Each path is a real NAR of one small regular file (200 bytes to 2 KiB, distinct content),
stored uncompressed (`Compression: none`, its one chunk named by the SHA-256 of its bytes);
names look like a Nix store's (`<hash>-<pname>-<version>`); each path references 0-4 of the
paths before it (so every closure is complete) and is signed with the cache's key, as a push
would have it. STATIC/<hash>.narinfo is the very narinfo larder serves (bench/scale.sh checks a
sample byte for byte); STATIC/hashes lists the hash parts, one a line.
"""

import base64
import hashlib
import os
import random
import sqlite3
import sys
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
NAMES = ["glibc", "bash", "coreutils", "openssl", "zlib", "python3", "perl", "gcc", "libffi",
         "ncurses", "readline", "sqlite", "curl", "git", "nodejs", "rustc", "llvm", "boost",
         "qtbase", "gtk3", "mesa", "systemd", "linux", "firefox", "emacs", "vim", "hm_fontconfig",
         "home-manager-files", "nixos-system", "man-pages", "icu", "libxml2", "harfbuzz"]
BATCH = 20_000


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
    data, static, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = sys.argv[4] if len(sys.argv) > 4 else "bench"
    rng = random.Random(20261205)
    db = sqlite3.connect(f"{data}/larder.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = OFF")
    cache_id, secret = db.execute(
        "SELECT id, secret_key FROM caches WHERE name = ?", (cache,)).fetchone()
    key_name, key_b64 = secret.split(":", 1)
    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(key_b64)[:32])
    (next_nar,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM nars").fetchone()
    objects = f"{data}/store/objects/chunk"
    for d in {a + b for a in NIX32 for b in NIX32}:
        os.makedirs(f"{objects}/{d}", exist_ok=True)
    os.makedirs(static, exist_ok=True)
    now = int(time.time())
    hashes = open(f"{static}/hashes", "w")
    names = []  # every basename so far: references point back into it
    t0 = time.time()
    for b0 in range(0, n, BATCH):
        nars, chunks, nar_chunks, paths, refs_rows = [], [], [], [], []
        for i in range(b0, min(n, b0 + BATCH)):
            h = nix32(rng.getrandbits(160).to_bytes(20, "little"))
            name = f"{rng.choice(NAMES)}-{rng.randint(0, 30)}.{rng.randint(0, 20)}.{i}"
            base = f"{h}-{name}"
            size = rng.randint(200, 2048)
            nar = nar_of((f"{base}\n".encode() * (size // 40 + 1))[:size])
            digest = nix32(hashlib.sha256(nar).digest())
            window = names[-5000:]
            refs = sorted(set(rng.sample(window, min(len(window), rng.randint(0, 4)))))
            fp = (f"1;/nix/store/{base};sha256:{digest};{len(nar)};"
                  + ",".join(f"/nix/store/{r}" for r in refs))
            sig = f"{key_name}:{base64.b64encode(key.sign(fp.encode())).decode()}"
            with open(f"{objects}/{digest[:2]}/{digest}", "wb") as f:
                f.write(nar)
            nar_id = next_nar
            next_nar += 1
            nars.append((nar_id, digest, len(nar), "none", digest, len(nar), now))
            chunks.append((digest, len(nar), now))
            nar_chunks.append((nar_id, 0, digest))
            paths.append((cache_id, h, name, nar_id, " ".join(refs), sig, now))
            refs_rows.extend((cache_id, h, r[:32]) for r in refs)
            with open(f"{static}/{h}.narinfo", "w") as f:
                f.write(f"StorePath: /nix/store/{base}\nURL: nar/{digest}.nar\n"
                        f"Compression: none\nFileHash: sha256:{digest}\nFileSize: {len(nar)}\n"
                        f"NarHash: sha256:{digest}\nNarSize: {len(nar)}\n"
                        f"References: {' '.join(refs)}\nSig: {sig}\n")
            names.append(base)
            hashes.write(h + "\n")
        db.execute("BEGIN")
        db.executemany("INSERT INTO nars (id, nar_hash, nar_size, compression, file_hash, "
                       "file_size, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", nars)
        db.executemany("INSERT INTO chunks (chunk_hash, file_size, created_at) VALUES (?, ?, ?)",
                       chunks)
        db.executemany("INSERT INTO nar_chunks (nar_id, seq, chunk_hash) VALUES (?, ?, ?)",
                       nar_chunks)
        db.executemany("INSERT INTO paths (cache_id, hash, name, nar_id, refs, sigs, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", paths)
        db.executemany("INSERT OR IGNORE INTO path_refs (cache_id, referrer, ref_hash) "
                       "VALUES (?, ?, ?)", refs_rows)
        # The size counters publishing keeps (crates/larder-store/src/meta/sizes.rs): every
        # NAR here is one chunk of distinct content, so each chunk is new to the cache and
        # to the store.
        db.executemany("INSERT INTO cache_chunks (cache_id, chunk_hash, uses) VALUES (?, ?, 1)",
                       [(cache_id, c[0]) for c in chunks])
        nbytes = sum(c[1] for c in chunks)
        db.execute("INSERT INTO cache_sizes (cache_id, shard, paths, size, nar_size, stored) "
                   "VALUES (?, 0, ?, ?, ?, ?) ON CONFLICT (cache_id, shard) DO UPDATE SET "
                   "paths = paths + excluded.paths, size = size + excluded.size, "
                   "nar_size = nar_size + excluded.nar_size, stored = stored + excluded.stored",
                   (cache_id, len(paths), nbytes, nbytes, nbytes))
        db.execute("INSERT INTO store_sizes (shard, chunk_bytes) VALUES (0, ?) ON CONFLICT "
                   "(shard) DO UPDATE SET chunk_bytes = chunk_bytes + excluded.chunk_bytes",
                   (nbytes,))
        db.execute("COMMIT")
        done = min(n, b0 + BATCH)
        print(f"seed: {done} of {n} paths ({done / (time.time() - t0):.0f} paths/s)",
              file=sys.stderr)
    hashes.close()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


if __name__ == "__main__":
    main()
