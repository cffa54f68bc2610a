#!/usr/bin/env bash
# Push benchmark: the same closure (NCHAIN small paths plus one BIG_MIB random path) pushed
#   1. by `larder push`                                 (its defaults: uncompressed, one request per NAR to this machine)
#   2. by `nix copy --to http://…larder…` (Nix's uploader, its default xz compression)
#   3. by `nix copy --to http://…larder…?compression=zstd`
#   4. by `nix copy --to file://DIR?compression=zstd`   (no network, no server at all)
# each into a fresh `larder serve`, in one run. Needs (as root): nix-bin, python3, curl.
# Then issue 12's push rows (see below: small paths and one LARGE_MIB half-random path, larder
# push vs a local nix copy --to file://).
# Knobs: NCHAIN (default 200), BIG_MIB (default 500), LARGE_MIB (256; 0 skips the rows),
# TINY (0: how many tiny paths to ingest; issue 12 asks for 10000),
# SKIP_XZ=1 to skip the slow xz run. TINY_ONLY=1: only the tiny-path ingest (below); with
# NIX_UPLOADER=1 it also times Nix's own uploader into larder and into nginx accepting PUTs.
# LARGE_ONLY=1 measures only the LARGE_MIB path: `larder push` into a fresh server and a local
# `nix copy --to file://`, ROUNDS times (default 2), each round also with BASELINE_BIN (another
# build, e.g. the commit before a change) when given, alternated: a before/after in one run.
# PUSH_ARGS: more arguments for those pushes (e.g. `--part-size 32MiB`: in parts, as to a remote server).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NCHAIN=${NCHAIN:-200}
BIG_MIB=${BIG_MIB:-500}
. "$ROOT/tests/lib/nix-env.sh"   # the tests' Nix settings: no sandbox, no machine or user nix.conf
WORK=$(mktemp -d /tmp/larder-pushbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
log() { printf '[bench] %s\n' "$*" >&2; }

# BIN=… measures another build (e.g. main's, for a before/after in one session).
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p larder)
  BIN=$ROOT/target/release/larder
fi

# The LARGE_MIB path of issue 12's rows: half random, half text.
make_large() { # $1 = directory to create
  python3 - "$1" "${LARGE_MIB:-256}" <<'PY'
import os, random, sys
d, mib = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
rng = random.Random(12)
with open(os.path.join(d, "random"), "wb") as f:
    for _ in range(mib // 2):
        f.write(rng.randbytes(1 << 20))
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
with open(os.path.join(d, "text"), "wb") as f:
    left = (mib - mib // 2) << 20
    while left > 0:
        block = bytearray()
        while len(block) < 1 << 20:
            block += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        block = bytes(block[:min(left, 1 << 20)])
        f.write(block)
        left -= len(block)
PY
}

start_server() { # $1 = name, $2 = binary (default $BIN); sets URL, ADMIN, PUSH, SERVER_PID
  local d=$WORK/$1 bin=${2:-$BIN}; mkdir -p "$d"
  "$bin" serve --listen 127.0.0.1:0 --data "$d/data" 2>"$d/serve.log" &
  SERVER_PID=$!; PIDS+=($SERVER_PID)
  for _ in $(seq 100); do grep -q 'listening on' "$d/serve.log" 2>/dev/null && break; sleep 0.1; done
  URL=$(sed -n 's/^larder: listening on //p' "$d/serve.log")
  ADMIN=$(cat "$d/data/admin-token")
  LARDER_SERVER=$URL LARDER_TOKEN=$ADMIN "$bin" cache create bench >/dev/null 2>&1
  PUSH=$(LARDER_SERVER=$URL LARDER_TOKEN=$ADMIN "$bin" token create --perm push --cache bench 2>/dev/null)
  printf 'machine 127.0.0.1 login x password %s\n' "$PUSH" > "$d/netrc"
}
timed() { # prints seconds of "$@"
  local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; exit 1; }; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}

# Nix's own uploader into nginx accepting PUTs (WebDAV) on loopback: what that protocol costs
# Nix itself, with a server that verifies, indexes and signs nothing (the ceiling for any server
# Nix uploads to). nix_into_nginx NAME PATHS… prints seconds.
nix_into_nginx() {
  local d=$WORK/$1; shift; mkdir -p "$d/root/bench" "$d/tmp"
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$d/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $d/tmp;
  client_max_body_size 0;
  server { listen 127.0.0.1:$port; root $d/root; dav_methods PUT; create_full_put_path on; }
}
NGINX
  nginx -c "$d/nginx.conf" -p "$d" & local pid=$!; PIDS+=($pid)
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  timed env XDG_CACHE_HOME=$d/xdg nix copy --to "http://127.0.0.1:$port/bench?compression=zstd" "$@"
  [ "$(find "$d/root/bench" -maxdepth 1 -name '*.narinfo' | wc -l)" = "$#" ] || { echo "nix copy into nginx: incomplete" >&2; exit 1; }
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

# TINY_ONLY=1 measures only the ingest of TINY (default 3000) tiny paths: `larder push` into a
# fresh server and a local `nix copy --to file://`, ROUNDS times, with BASELINE_BIN alternated
# as for LARGE_ONLY.
make_tiny() { # $1 = directory, $2 = how many; prints the store paths
  mkdir -p "$1"
  python3 - "$1" "$2" "$RANDOM" <<'PY'
import os, sys
d, n, salt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for i in range(n):
    with open(os.path.join(d, f"tiny-{salt}-{i}"), "w") as f:
        f.write(f"tiny path {salt} {i}\n")
PY
  (cd "$1" && find . -type f | sed "s|^\./|$1/|" | xargs nix-store --add)
}
if [ "${TINY_ONLY:-0}" = 1 ]; then
  mapfile -t TP < <(make_tiny "$WORK/tiny" "${TINY:-3000}")
  n=0
  for r in $(seq "${ROUNDS:-2}"); do
    for bin in ${BASELINE_BIN:+"$BASELINE_BIN"} "$BIN"; do
      n=$((n + 1))
      start_server "tiny$n" "$bin"
      T=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$bin" push bench "${TP[@]}" ${PUSH_ARGS:-})
      [ "$(LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$bin" cache info bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["paths"])')" = "${#TP[@]}" ] \
        || { echo "larder push: incomplete" >&2; exit 1; }
      kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
      F=$(timed env XDG_CACHE_HOME=$WORK/xt$n nix copy --to "file://$WORK/tinycache$n?compression=zstd" "${TP[@]}")
      rm -rf "$WORK/tiny$n" "$WORK/tinycache$n"
      python3 -c "n, l, f = ${#TP[@]}, $T, $F; print(f'round $r, $bin: larder push {n/l:.0f} paths/s ({l} s), nix copy --to file:// {n/f:.0f} paths/s ({f} s): {f/l:.2f}x')"
      if [ "${NIX_UPLOADER:-0}" = 1 ]; then # Nix's own uploader into this build, and into nginx
        start_server "tinynix$n" "$bin"
        X=$(timed env XDG_CACHE_HOME=$WORK/xn$n nix copy --option netrc-file "$WORK/tinynix$n/netrc" --to "$URL/bench?compression=zstd" "${TP[@]}")
        kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
        G=$(nix_into_nginx "tinynginx$n" "${TP[@]}")
        python3 -c "n, x, g, f = ${#TP[@]}, $X, $G, $F; print(f'round $r, $bin: nix copy --to http://larder {n/x:.0f} paths/s ({f/x:.2f}x file://), --to http://nginx (WebDAV) {n/g:.0f} paths/s ({f/g:.2f}x file://): larder {g/x:.2f}x nginx')"
      fi
    done
  done
  exit 0
fi

if [ "${LARGE_ONLY:-0}" = 1 ]; then
  make_large "$WORK/large"
  LARGE=$(nix-store --add "$WORK/large")
  log "large path: $LARGE, $(nix path-info -S "$LARGE" | awk '{printf "%.1f", $2/1048576}') MiB of NAR"
  n=0
  for r in $(seq "${ROUNDS:-2}"); do
    for bin in ${BASELINE_BIN:+"$BASELINE_BIN"} "$BIN"; do
      n=$((n + 1))
      start_server "large$n" "$bin"
      T=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$bin" push bench "$LARGE" ${PUSH_ARGS:-})
      [ "$(XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXX") nix path-info --store "$URL/bench" "$LARGE" | wc -l)" = 1 ] \
        || { echo "larder push: incomplete" >&2; exit 1; }
      kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
      F=$(timed env XDG_CACHE_HOME=$WORK/xl$n nix copy --to "file://$WORK/largecache$n?compression=zstd" "$LARGE")
      rm -rf "$WORK/large$n" "$WORK/largecache$n"
      echo "round $r, $bin: larder push $T s, nix copy --to file:// $F s"
    done
  done
  exit 0
fi

log "building a closure: $NCHAIN chained paths + one $BIG_MIB MiB path"
WORKDIR=$WORK/oracle BIG_MIB=$BIG_MIB NCHAIN=$NCHAIN NSMALL=50 bash "$ROOT/tests/oracle/nix-oracle.sh" build >/dev/null
TOP=$(cat "$WORK/oracle/top")
N=$(wc -l < "$WORK/oracle/closure")
NAR_MIB=$(nix path-info -S "$TOP" | awk '{printf "%.0f", $2/1048576}')
log "closure: $N paths, $NAR_MIB MiB of NAR"

check() { # the pushed closure is complete on the server
  XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXX") nix path-info --store "$1" -r "$TOP" | wc -l
}

start_server larder
T_LARDER=$(timed /usr/bin/time -f %M -o "$WORK/client-rss" env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$BIN" push bench "$TOP")
CLIENT_RSS_MIB=$(( $(cat "$WORK/client-rss") / 1024 ))
SERVER_RSS_MIB=$(( $(awk '/VmHWM/ {print $2}' /proc/$SERVER_PID/status) / 1024 ))
[ "$(check "$URL/bench")" = "$N" ] || { echo "larder push: incomplete" >&2; exit 1; }
if [ "${SKIP_XZ:-0}" != 1 ]; then
  start_server nixxz; T_NIXXZ=$(timed env XDG_CACHE_HOME=$WORK/x1 nix copy --option netrc-file "$WORK/nixxz/netrc" --to "$URL/bench" "$TOP")
  [ "$(check "$URL/bench")" = "$N" ] || { echo "nix copy (xz): incomplete" >&2; exit 1; }
else T_NIXXZ=nan; fi
start_server nixzstd; T_NIXZSTD=$(timed env XDG_CACHE_HOME=$WORK/x2 nix copy --option netrc-file "$WORK/nixzstd/netrc" --to "$URL/bench?compression=zstd" "$TOP")
[ "$(check "$URL/bench")" = "$N" ] || { echo "nix copy (zstd): incomplete" >&2; exit 1; }
T_FILE=$(timed env XDG_CACHE_HOME=$WORK/x3 nix copy --to "file://$WORK/filecache?compression=zstd" "$TOP")

# Issue 12's push rows: the closure's small paths, then one LARGE_MIB path (half random, half
# text), each pushed on its own by `larder push` into a fresh server and by a local `nix copy
# --to file://…?compression=zstd`, in MiB/s of NAR. LARGE_MIB=0 skips it.
LARGE_MIB=${LARGE_MIB:-256}
if [ "$LARGE_MIB" != 0 ]; then
  make_large "$WORK/large"
  LARGE=$(nix-store --add "$WORK/large")
  LARGE_NAR_MIB=$(nix path-info -S "$LARGE" | awk '{printf "%.1f", $2/1048576}')
  # Without the oracle's big path and the top path that refers to it.
  mapfile -t SMALL < <(grep -v -e '-big-' -e "$TOP" "$WORK/oracle/closure")
  SMALL_NAR_MIB=$(nix path-info --json "${SMALL[@]}" | python3 -c 'import json,sys; print("%.1f" % (sum(p["narSize"] for p in json.load(sys.stdin)) / 2**20))')
  start_server rows
  T_L_SMALL=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$BIN" push bench "${SMALL[@]}")
  T_L_LARGE=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$BIN" push bench "$LARGE")
  # The large path again, whole (multi-part), into another fresh server.
  start_server rowswhole
  T_L_WHOLE=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH LARDER_PUSH_NO_CHUNKING=1 "$BIN" push bench "$LARGE")
  T_F_SMALL=$(timed env XDG_CACHE_HOME=$WORK/x4 nix copy --to "file://$WORK/rowscache?compression=zstd" "${SMALL[@]}")
  T_F_LARGE=$(timed env XDG_CACHE_HOME=$WORK/x4 nix copy --to "file://$WORK/rowscache?compression=zstd" "$LARGE")
  python3 - "${#SMALL[@]}" "$SMALL_NAR_MIB" "$LARGE_NAR_MIB" "$T_L_SMALL" "$T_L_LARGE" "$T_F_SMALL" "$T_F_LARGE" <<'PY'
import sys
n = sys.argv[1]
sm, lm, ls, ll, fs, fl = map(float, sys.argv[2:])
print(f"issue 12 push rows ({n} small paths, {sm:.1f} MiB of NAR; one large path, {lm:.1f} MiB):")
print("| part        | larder push s | MiB/s | nix copy file:// s | MiB/s | larder / nix copy |")
print("|-------------|---------------|-------|--------------------|-------|-------------------|")
for name, m, l, f in [("small paths", sm, ls, fs), ("large path", lm, ll, fl), ("overall", sm + lm, ls + ll, fs + fl)]:
    print(f"| {name:<11} | {l:13.2f} | {m/l:5.1f} | {f:18.2f} | {m/f:5.1f} | {f/l:16.2f}x |")
PY
  python3 -c "print(f'large path pushed whole (LARDER_PUSH_NO_CHUNKING=1): {$T_L_WHOLE:.2f} s, {$LARGE_NAR_MIB/$T_L_WHOLE:.1f} MiB/s, {$T_F_LARGE/$T_L_WHOLE:.2f}x nix copy')"
fi

# Issue 12's ingest row: TINY tiny paths (a few bytes each, no references) pushed by `larder
# push` and by Nix's own uploader into fresh servers, and by a local `nix copy --to file://`,
# in paths/s. TINY=0 (the default) skips it.
TINY=${TINY:-0}
if [ "$TINY" != 0 ]; then
  mapfile -t TP < <(make_tiny "$WORK/tiny" "$TINY")
  start_server tinyl
  T_T_L=$(timed env LARDER_SERVER=$URL LARDER_TOKEN=$PUSH "$BIN" push bench "${TP[@]}")
  start_server tinyn
  T_T_N=$(timed env XDG_CACHE_HOME=$WORK/x5 nix copy --option netrc-file "$WORK/tinyn/netrc" --to "$URL/bench?compression=zstd" "${TP[@]}")
  T_T_F=$(timed env XDG_CACHE_HOME=$WORK/x6 nix copy --to "file://$WORK/tinycache?compression=zstd" "${TP[@]}")
  T_T_G=$(nix_into_nginx tinyg "${TP[@]}")
  python3 -c "
n, l, nx, f, g = ${#TP[@]}, $T_T_L, $T_T_N, $T_T_F, $T_T_G
print(f'ingest of {n} tiny paths, paths/s: larder push {n/l:.0f} ({f/l:.2f}x), nix copy --to http://larder {n/nx:.0f} ({f/nx:.2f}x), nix copy --to file:// {n/f:.0f}, nix copy --to http://nginx (WebDAV, the ceiling of Nix uploading over HTTP) {n/g:.0f} ({f/g:.2f}x; larder {g/nx:.2f}x nginx)')"
fi

echo "peak RSS during larder push: client $CLIENT_RSS_MIB MiB, server $SERVER_RSS_MIB MiB"
python3 - "$N" "$NAR_MIB" "$T_LARDER" "$T_NIXXZ" "$T_NIXZSTD" "$T_FILE" <<'PY'
import sys, math
n, mib, l, xz, zs, f = sys.argv[1], float(sys.argv[2]), *map(float, sys.argv[3:])
print(f"closure: {n} paths, {mib:.0f} MiB NAR")
print("| push method                                   | seconds |   MiB/s | larder speed-up |")
print("|-----------------------------------------------|---------|---------|-----------------|")
for name, t in [("larder push (its defaults)", l), ("nix copy --to http://larder (xz, default)", xz),
                ("nix copy --to http://larder?compression=zstd", zs), ("nix copy --to file://…?compression=zstd", f)]:
    if math.isnan(t): continue
    print(f"| {name:<45} | {t:7.2f} | {mib/t:7.1f} | {t/l:14.2f}x |")
PY
