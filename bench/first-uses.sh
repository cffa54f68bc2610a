#!/usr/bin/env bash
# What writing paths' first uses costs a server answering random narinfos: each BIN given
# serves a copy of a seeded cache (bench/scale.sh's KEEP directory, default 100 000 paths) and
# takes wrk's random hits with 16 connections twice: the first pass writes the first use of
# almost every path (a cache without a size limit writes a path's use once per 10 minutes),
# the second writes almost nothing. Per pass: requests/s, the server's CPU time and the bytes
# it wrote (/proc/PID/io), builds alternated as given.
#   KEEP=/work/scale-100k bench/first-uses.sh NEW_BIN OLD_BIN NEW_BIN
# Seed first with: N=100000 KEEP=DIR SEED_ONLY=1 bench/scale.sh. Knobs: DUR (seconds, 8).
set -euo pipefail
SEED=${KEEP:?KEEP= a directory seeded by bench/scale.sh}
DUR=${DUR:-8}
[ $# -gt 0 ] || { echo "usage: KEEP=DIR $0 BIN..." >&2; exit 1; }
W=$(mktemp -d /tmp/larder-first-uses.XXXXXX)
PID=
trap '[ -z "$PID" ] || kill $PID 2>/dev/null; rm -rf "$W"' EXIT
. "$(dirname "$0")/lib.sh" # random_hits_lua
random_hits_lua "$SEED" "$W/hit.lua"
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; } # clock ticks (100/s)
written() { awk '/^write_bytes/ {print $2}' "/proc/$PID/io"; }
echo "| build | pass | req/s | server CPU ms | written MiB |"
echo "|---|---|---:|---:|---:|"
for BIN in "$@"; do
  rm -rf "$W/d"; mkdir "$W/d"
  cp "$SEED/data/larder.db" "$SEED/data/admin-token" "$W/d/"; ln -s "$SEED/data/store" "$W/d/store"
  "$BIN" serve --listen 127.0.0.1:0 --data "$W/d" 2>"$W/log" &
  PID=$!
  url=
  for _ in $(seq 3000); do
    url=$(sed -n 's/^larder: listening on //p' "$W/log")
    [ -n "$url" ] && curl -sf "$url/healthz" >/dev/null && break
    sleep 0.02
  done
  sleep 3 # the start's own work (the filter of misses, garbage collection's first scan)
  for pass in first second; do
    c0=$(cpu); w0=$(written)
    r=$(wrk -t2 -c16 -d"${DUR}s" -s "$W/hit.lua" "$url/bench/x" | awk '/Requests\/sec/ {print $2}')
    sleep 4 # two flushes
    c1=$(cpu); w1=$(written)
    echo "| $(basename "$BIN") | $pass | ${r%.*} | $(( (c1 - c0) * 10 )) | $(( (w1 - w0) / 1048576 )) |"
  done
  kill $PID; wait $PID 2>/dev/null || true; PID=
done
