#!/usr/bin/env bash
# Push-side queries against a cache of many paths (issue #12: "keep them so at a million"): the
# chunk `missing` query (what `larder push` asks per 4 MiB window) timed on a copy of a seeded
# bench/scale.sh data directory, for one or two builds alternated.
# Usage: KEEP=/work/scale-1m BIN=… [BASELINE_BIN=…] bash bench/missing-at-scale.sh
# Knobs: N (chunk ids per query, 1000), REPS (queries per server start, 20).
set -euo pipefail
: "${KEEP:?KEEP=<a bench/scale.sh KEEP directory>}" "${BIN:?BIN=<larder>}"
N=${N:-1000} REPS=${REPS:-20}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
mkdir -p "$WORK/data/store"
cp "$KEEP/data/larder.db" "$KEEP/data/admin-token" "$WORK/data/"
chmod -R go-rwx "$WORK/data"
CACHE=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select name from caches limit 1').fetchone()[0])" "$WORK/data/larder.db")
python3 - "$N" > "$WORK/body.json" <<'PY'
import json, os, sys, hashlib
alpha = "0123456789abcdfghijklmnpqrsvwxyz"
def nix32(b):
    n = int.from_bytes(b, "little"); return "".join(alpha[(n >> (5 * i)) & 31] for i in range(51, -1, -1))
ids = [nix32(hashlib.sha256(os.urandom(16)).digest()) + ".zst" for _ in range(int(sys.argv[1]))]
print(json.dumps({"session": "scalebench", "chunks": ids}))
PY
measure() { # $1 = binary: prints the median seconds of REPS queries
  "$1" serve --data "$WORK/data" --listen 127.0.0.1:18998 --orphan-scan-interval 0 >"$WORK/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 900); do curl -fsS http://127.0.0.1:18998/healthz >/dev/null 2>&1 && break; sleep 0.2; done
  local t=()
  for _ in $(seq "$REPS"); do
    t+=("$(curl -fsS -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $(cat "$WORK/data/admin-token")" \
      -H 'Content-Type: application/json' --data @"$WORK/body.json" \
      "http://127.0.0.1:18998/api/v1/caches/$CACHE/chunks/missing")")
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '%s\n' "${t[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
paths=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from paths').fetchone()[0])" "$WORK/data/larder.db")
echo "cache $CACHE: $paths paths; $N chunk ids per missing query; median of $REPS"
for round in 1 2; do
  echo "round $round: this build $(measure "$BIN") s"
  [ -n "${BASELINE_BIN:-}" ] && echo "round $round: baseline $(measure "$BASELINE_BIN") s"
done
