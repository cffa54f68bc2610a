#!/usr/bin/env bash
# Garbage collection in a cache of many paths (issue #12: "keep them so at a million"): does a
# collection stall the writes (pushes, cache changes) that arrive while it runs? A server is
# started on a copy of a seeded bench/scale.sh database (its first collection runs at start),
# and for DUR seconds a write (a cache created through the API) is sent every 50 ms; printed:
# the slowest writes, for one or two builds alternated.
# Usage: KEEP=/work/scale-1m BIN=… [BASELINE_BIN=…] bash bench/gc-at-scale.sh
# Knobs: DUR (seconds of writes per server start, 15), ROUNDS (2).
set -euo pipefail
: "${KEEP:?KEEP=<a bench/scale.sh KEEP directory>}" "${BIN:?BIN=<larder>}"
DUR=${DUR:-15} ROUNDS=${ROUNDS:-2}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
PORT=18997
measure() { # $1 = binary: prints the slowest writes while the first collection runs
  rm -rf "$WORK/data"; mkdir -p "$WORK/data/store"
  cp "$KEEP/data/larder.db" "$KEEP/data/admin-token" "$WORK/data/"
  chmod -R go-rwx "$WORK/data"
  local token; token=$(cat "$WORK/data/admin-token")
  "$1" serve --data "$WORK/data" --listen 127.0.0.1:$PORT --orphan-scan-interval 0 >"$WORK/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 900); do curl -fsS http://127.0.0.1:$PORT/healthz >/dev/null 2>&1 && break; sleep 0.05; done
  local end=$((SECONDS + DUR)) i=0
  : > "$WORK/times"
  while [ $SECONDS -lt $end ]; do
    i=$((i + 1))
    curl -fsS -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $token" \
      -H 'Content-Type: application/json' --data "{\"name\":\"gcprobe$i\"}" \
      "http://127.0.0.1:$PORT/api/v1/caches" >> "$WORK/times"
    sleep 0.05
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sort -rn "$WORK/times" | awk '{a[NR]=$1} END {printf "%d writes, slowest %.3f / %.3f / %.3f s, median %.3f s\n", NR, a[1], a[2], a[3], a[int((NR+1)/2)]}'
}
paths=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from paths').fetchone()[0])" "$KEEP/data/larder.db")
echo "$paths paths; a write every 50 ms for $DUR s from the server's start"
for round in $(seq "$ROUNDS"); do
  [ -n "${BASELINE_BIN:-}" ] && echo "round $round: baseline:   $(measure "$BASELINE_BIN")"
  echo "round $round: this build: $(measure "$BIN")"
done
