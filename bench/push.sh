#!/usr/bin/env bash
# Push benchmark: the same closure (NCHAIN small paths plus one BIG_MIB random path) pushed
#   1. by `larder push`                                 (zstd, client-side compression)
#   2. by `nix copy --to http://…larder…` (Nix's uploader, its default xz compression)
#   3. by `nix copy --to http://…larder…?compression=zstd`
#   4. by `nix copy --to file://DIR?compression=zstd`   (no network, no server at all)
# each into a fresh `larder serve`, in one run. Needs (as root): nix-bin, python3, curl.
# Knobs: NCHAIN (default 200), BIG_MIB (default 500), SKIP_XZ=1 to skip the slow xz run.
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

(cd "$ROOT" && cargo build --release -q -p larder)
BIN=$ROOT/target/release/larder

log "building a closure: $NCHAIN chained paths + one $BIG_MIB MiB path"
WORKDIR=$WORK/oracle BIG_MIB=$BIG_MIB NCHAIN=$NCHAIN NSMALL=50 bash "$ROOT/tests/oracle/nix-oracle.sh" build >/dev/null
TOP=$(cat "$WORK/oracle/top")
N=$(wc -l < "$WORK/oracle/closure")
NAR_MIB=$(nix path-info -S "$TOP" | awk '{printf "%.0f", $2/1048576}')
log "closure: $N paths, $NAR_MIB MiB of NAR"

start_server() { # $1 = name; sets URL, ADMIN
  local d=$WORK/$1; mkdir -p "$d"
  "$BIN" serve --listen 127.0.0.1:0 --data "$d/data" 2>"$d/serve.log" &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q 'listening on' "$d/serve.log" 2>/dev/null && break; sleep 0.1; done
  URL=$(sed -n 's/^larder: listening on //p' "$d/serve.log")
  ADMIN=$(cat "$d/data/admin-token")
  LARDER_SERVER=$URL LARDER_TOKEN=$ADMIN "$BIN" cache create bench >/dev/null 2>&1
  PUSH=$(LARDER_SERVER=$URL LARDER_TOKEN=$ADMIN "$BIN" token create --perm push --cache bench 2>/dev/null)
  printf 'machine 127.0.0.1 login x password %s\n' "$PUSH" > "$d/netrc"
}
timed() { # prints seconds of "$@"
  local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/last.err" || { cat "$WORK/last.err" >&2; exit 1; }; t1=$(date +%s.%N)
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
check() { # the pushed closure is complete on the server
  XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXX") nix path-info --store "$1" -r "$TOP" | wc -l
}

start_server larder; SERVER_PID=${PIDS[-1]}
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

echo "peak RSS during larder push: client $CLIENT_RSS_MIB MiB, server $SERVER_RSS_MIB MiB"
python3 - "$N" "$NAR_MIB" "$T_LARDER" "$T_NIXXZ" "$T_NIXZSTD" "$T_FILE" <<'PY'
import sys, math
n, mib, l, xz, zs, f = sys.argv[1], float(sys.argv[2]), *map(float, sys.argv[3:])
print(f"closure: {n} paths, {mib:.0f} MiB NAR")
print("| push method                                   | seconds |   MiB/s | larder speed-up |")
print("|-----------------------------------------------|---------|---------|-----------------|")
for name, t in [("larder push (zstd)", l), ("nix copy --to http://larder (xz, default)", xz),
                ("nix copy --to http://larder?compression=zstd", zs), ("nix copy --to file://…?compression=zstd", f)]:
    if math.isnan(t): continue
    print(f"| {name:<45} | {t:7.2f} | {mib/t:7.1f} | {t/l:14.2f}x |")
PY
