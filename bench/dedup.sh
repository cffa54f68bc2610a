#!/usr/bin/env bash
# Deduplication benchmark (issue 13, "Measure"), server-side chunking: a version series of a
# closure-sized set of store paths, pushed generation after generation
#   - with `larder push` into one `larder serve`, and
#   - with `nix copy --to http://…` (Nix's own uploader) into another,
# reporting per generation the NAR bytes, the bytes the client uploaded (the server's request
# body counter) and the time; after all generations, each cache's logical size (what its limit
# counts) and the bytes it occupies after deduplication, next to one generation's compressed
# size; then the last generation downloaded with `nix copy --from`.
# The series: NPATHS store paths, each built by a derivation from a directory of binary-like and
# text files (TOTAL_MIB in all) and referring to the paths it depends on (a file naming them and
# a header line in its first text file, as scripts and RPATHs do): path p depends on p+1 and
# p+3. Then GENS-1 generations, each changing ~5 % of the bytes (16-256 KiB edits in place and
# insertions that shift what follows) and bumping one dependency (path NPATHS*2/3 is renamed),
# so its store path and the store paths of the two thirds of the closure above it change.
# `larder push` chunks on the client (only the chunks the cache lacks are uploaded); `nix copy`
# uploads whole NARs, which the server chunks. Then the last generation is mirrored into a
# directory served by nginx and downloaded from both (`nix copy --from`, best of two, alternated)
# and its NARs fetched with wrk (every NAR but the biggest, one after another; the biggest).
# BASELINE_BIN=<a build of larder from before chunking> adds the first push (generation 1 into
# an empty cache), alternated between the two builds, ROUNDS times each.
# Needs (as root): nix-bin, python3, curl, wrk, nginx. Knobs: NPATHS (24), TOTAL_MIB (200),
# GENS (5), DUR (wrk seconds, 5), ROUNDS (2), COPY_ROUNDS (alternated `nix copy --from` of
# each, the best counts: 3), FIRST_ONLY=1 (only the first push, with
# BASELINE_BIN), TMPDIR (where the servers' data and the sources go; /tmp).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NPATHS=${NPATHS:-24}
TOTAL_MIB=${TOTAL_MIB:-200}
GENS=${GENS:-5}
DUR=${DUR:-5}
ROUNDS=${ROUNDS:-2}
BASELINE_BIN=${BASELINE_BIN:-}
BUMP=$((NPATHS * 2 / 3))
. "$ROOT/tests/lib/nix-env.sh"
. "$ROOT/bench/lib.sh"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/larder-dedup.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
log() { printf '[dedup] %s\n' "$*" >&2; }

# BIN=… measures another build (e.g. main's, for a before/after in one session).
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p larder)
  BIN=$ROOT/target/release/larder
fi

start_server() { # $1 = name [$2 = binary]; sets URL_$1, ADMIN_$1, PUSH_$1
  local d=$WORK/$1 bin=${2:-$BIN}; rm -rf "$d"; mkdir -p "$d"
  "$bin" serve --listen 127.0.0.1:0 --data "$d/data" 2>"$d/serve.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q 'listening on' "$d/serve.log" 2>/dev/null && break; sleep 0.1; done
  local url admin push
  url=$(sed -n 's/^larder: listening on //p' "$d/serve.log")
  admin=$(cat "$d/data/admin-token")
  LARDER_SERVER=$url LARDER_TOKEN=$admin "$BIN" cache create bench >/dev/null 2>&1
  push=$(LARDER_SERVER=$url LARDER_TOKEN=$admin "$BIN" token create --perm push --cache bench 2>/dev/null)
  printf 'machine 127.0.0.1 login x password %s\n' "$push" > "$d/netrc"
  printf -v "URL_$1" %s "$url"; printf -v "ADMIN_$1" %s "$admin"; printf -v "PUSH_$1" %s "$push"
}
uploaded() { # $1 = url, $2 = admin token: request body bytes received so far
  curl -sf -H "Authorization: Bearer $2" "$1/metrics" |
    awk '/^larder_http_request_body_bytes_total/ {s += $2} END {printf "%d", s}'
}
info() { # $1 = url $2 = admin: "size stored_size"
  curl -sf -H "Authorization: Bearer $2" "$1/api/v1/caches/bench" |
    python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["size"], c["stored_size"])'
}
now() { date +%s.%N; }

log "generating $GENS generations of $NPATHS paths, $TOTAL_MIB MiB"
python3 - "$WORK/src" "$NPATHS" "$TOTAL_MIB" "$GENS" <<'PY'
import os, random, sys
root, n, total, gens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20, int(sys.argv[4])
rng = random.Random(13)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
def text(size):
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
    return bytes(out[:size])
def binary(size):
    # Machine code-like: random, with runs of zeros and repeated tables.
    out = bytearray(rng.randbytes(size))
    for i in range(0, size, 8192):
        out[i:i + 512] = bytes(512)
    return bytes(out)
paths = []
for p in range(n):
    files = {}
    budget = total // n
    k = 0
    while budget > 0:
        size = min(budget, rng.choice([4 << 10, 64 << 10, 512 << 10, 3 << 20]))
        files[f"f{k}"] = text(size) if k % 3 == 0 else binary(size)
        budget -= size
        k += 1
    paths.append(files)
for g in range(1, gens + 1):
    if g > 1:
        changed = 0
        target = total // 20
        while changed < target:
            files = rng.choice(paths)
            name = rng.choice(sorted(files))
            data = bytearray(files[name])
            # Edits of 16-256 KiB: ~5 % of the bytes in a few dozen places (a rebuild
            # changes some files, not every 40 KiB of every file).
            size = rng.randint(16 << 10, 256 << 10)
            at = rng.randrange(0, max(1, len(data)))
            if rng.random() < 0.5:
                data[at:at + size] = rng.randbytes(min(size, len(data) - at))
            else:
                data[at:at] = rng.randbytes(size)
            files[name] = bytes(data)
            changed += size
    for p, files in enumerate(paths):
        d = os.path.join(root, f"g{g}", f"pkg{p}")
        os.makedirs(d)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
PY

# Generation G's store paths, built from its sources: path p refers to p+1 and p+3, path BUMP is
# renamed every generation (a version bump), so it and everything that depends on it change.
cat > "$WORK/gen.nix" <<'NIX'
{ root, g, n, bump }:
let
  pkg = p: builtins.elemAt pkgs p;
  pkgs = builtins.genList (p: derivation {
    name = "pkg${toString p}" + (if p == bump then "-v${toString g}" else "");
    system = builtins.currentSystem;
    builder = "/bin/sh";
    src = builtins.path { path = /. + "${root}/g${toString g}/pkg${toString p}"; name = "src"; };
    deps = map pkg (builtins.filter (q: q < n) [ (p + 1) (p + 3) ]);
    args = [ "-c" ''
      /bin/cp -r $src $out && /bin/chmod -R u+w $out
      /bin/echo "$deps" > $out/deps
      { /bin/echo "#!$deps"; /bin/cat $src/f0; } > $out/f0
    '' ];
  }) n;
in pkgs
NIX
build_gen() { # $1 = generation: prints its store paths
  nix-build "$WORK/gen.nix" --no-out-link --argstr root "$WORK/src" --arg g "$1" \
    --arg n "$NPATHS" --arg bump "$BUMP" 2>"$WORK/build.err" || { cat "$WORK/build.err" >&2; exit 1; }
}

if [ -n "$BASELINE_BIN" ]; then
  log "first push (generation 1 into an empty cache), $ROUNDS rounds, alternated"
  mapfile -t P < <(build_gen 1)
  [ "${#P[@]}" = "$NPATHS" ] || exit 1
  FIRST=()
  for _ in $(seq "$ROUNDS"); do for b in "$BIN" "$BASELINE_BIN"; do
    start_server first "$b"
    t0=$(now)
    LARDER_SERVER=$URL_first LARDER_TOKEN=$PUSH_first "$b" push bench "${P[@]}" >/dev/null 2>"$WORK/push.err" || { cat "$WORK/push.err" >&2; exit 1; }
    FIRST+=("$(python3 -c "print($(now) - $t0)")")
    kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
  done; done
  python3 - "${FIRST[@]}" <<'PY'
import sys
v = [float(x) for x in sys.argv[1:]]
new, old = v[0::2], v[1::2]
print(f"first push, s: this build {' '.join(f'{x:.2f}' for x in new)}; baseline {' '.join(f'{x:.2f}' for x in old)}; best {min(new):.2f} vs {min(old):.2f} = {min(new) / min(old):.2f}x")
PY
  [ "${FIRST_ONLY:-0}" = 1 ] && exit 0
fi

start_server push; start_server nixcopy
printf '%-4s %12s | %12s %8s %8s | %12s %8s %8s\n' gen "NAR MiB" "push up MiB" "%" "s" "copy up MiB" "%" "s"
for g in $(seq "$GENS"); do
  mapfile -t P < <(build_gen "$g")
  [ "${#P[@]}" = "$NPATHS" ] || exit 1
  NAR=$(nix path-info -s "${P[@]}" | awk '{s += $2} END {printf "%d", s}')
  b0=$(uploaded "$URL_push" "$ADMIN_push"); t0=$(now)
  LARDER_SERVER=$URL_push LARDER_TOKEN=$PUSH_push "$BIN" push bench "${P[@]}" >/dev/null 2>"$WORK/push.err" || { cat "$WORK/push.err" >&2; exit 1; }
  t1=$(now); b1=$(uploaded "$URL_push" "$ADMIN_push")
  c0=$(uploaded "$URL_nixcopy" "$ADMIN_nixcopy"); t2=$(now)
  XDG_CACHE_HOME=$WORK/xdg-$g nix copy --option netrc-file "$WORK/nixcopy/netrc" --to "$URL_nixcopy/bench?compression=zstd" "${P[@]}" 2>"$WORK/copy.err" || { cat "$WORK/copy.err" >&2; exit 1; }
  t3=$(now); c1=$(uploaded "$URL_nixcopy" "$ADMIN_nixcopy")
  python3 -c "
nar, up, cp = $NAR, $b1 - $b0, $c1 - $c0
print(f'{$g:<4} {nar/2**20:12.1f} | {up/2**20:12.1f} {100*up/nar:7.1f}% {$t1-$t0:8.2f} | {cp/2**20:12.1f} {100*cp/nar:7.1f}% {$t3-$t2:8.2f}')"
  [ "$g" = 1 ] && read -r GEN1_SIZE _ < <(info "$URL_push" "$ADMIN_push")
done
for s in push nixcopy; do
  u=URL_$s a=ADMIN_$s
  read -r size stored < <(info "${!u}" "${!a}")
  python3 -c "print(f'$s: logical {$size/2**20:.1f} MiB, stored after dedup {$stored/2**20:.1f} MiB = {$stored/$GEN1_SIZE:.2f}x one generation ({$GEN1_SIZE/2**20:.1f} MiB)')"
done
KEY=$(curl -sf "$URL_push/api/v1/caches/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])')
log "mirroring the last generation into a static directory for nginx"
printf '%s\n' "${P[@]}" > "$WORK/closure"
mkdir -p "$WORK/static/bench/nar"
mirror_cache "$URL_push/bench" "$WORK/static/bench" "$WORK/closure" "$WORK"
NPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nginx_conf "$WORK" "$NPORT"
mkdir -p "$WORK/nginx-tmp"
nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
N=http://127.0.0.1:$NPORT
for _ in $(seq 50); do curl -sf "$N/bench/nix-cache-info" >/dev/null && break; sleep 0.1; done
copy_from() { # $1 = base URL: seconds to substitute the last generation into an empty store
  local store t0 t1; store=$(mktemp -d "$WORK/dl.XXXXXX")
  t0=$(now)
  NIX_CONFIG="$NIX_CONFIG
trusted-public-keys = $KEY" XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXXXX") \
    nix copy --from "$1" --to "$store" "${P[@]}" 2>"$WORK/copy.err" || { cat "$WORK/copy.err" >&2; exit 1; }
  t1=$(now)
  local got; got=$(nix path-info --store "$store" -r "${P[@]}" 2>/dev/null | wc -l)
  [ "$got" = "${#P[@]}" ] || { echo "dedup: nix copy --from $1 gave $got of ${#P[@]} paths" >&2; exit 1; }
  rm -rf "$store" 2>/dev/null || { chmod -R u+w "$store"; rm -rf "$store"; }
  python3 -c "print(f'{$t1 - $t0:.3f}')"
}
# The pushes leave about a GiB of dirty pages (both servers' stores, the mirror): written out
# now, not in the middle of whichever download comes first (that one took 1.5x as long).
sync
D=()
for _ in $(seq "${COPY_ROUNDS:-3}"); do D+=("$(copy_from "$URL_push/bench")" "$(copy_from "$N/bench")"); done
{ echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/smallnars"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/smallnar.lua"
BIGNAR=$(cat "$WORK/bignar")
echo "| download of the last generation ($(python3 -c "print(f'{$NAR/2**20:.0f}')") MiB of NAR) | larder | nginx | larder/nginx |"
echo "|--------------------------------|--------------|--------------|--------|"
python3 -c "
v = [float(x) for x in '${D[*]}'.split()]
l, n = min(v[0::2]), min(v[1::2])
print(f'| {\"nix copy --from, s (lower wins)\":<30} | {l:>12.2f} | {n:>12.2f} | {l / n:>6.2f}x |')"
row "NARs but the biggest, req/s" $(measure rps "" -t1 -c1 -s "$WORK/smallnar.lua" "$URL_push") \
  $(measure rps "" -t1 -c1 -s "$WORK/smallnar.lua" "$N")
row "biggest NAR, MiB/s" $(measure mbps "" -t1 -c1 "$URL_push$BIGNAR") $(measure mbps "" -t1 -c1 "$N$BIGNAR")
