#!/usr/bin/env bash
# Scale benchmark (issue #12): a cache of N paths (default 1 000 000) served by larder, next to
# nginx serving the very same narinfos from a directory, in one run, servers alternated.
#
# Seeding: a `larder serve` creates the data directory and the cache "bench", then stops;
# bench/scale-seed.py writes N small, valid, signed paths straight into its database and object
# directory (thousands a second, where `larder import` over HTTP does 70-340), and the same
# narinfos into the directory nginx serves. Everything measured goes through HTTP:
#   - narinfo GETs of random existing hashes and of random missing ones (what Nix asks most),
#     wrk with 1 and 16 keep-alive connections: requests/s, p50 and p99 latency
#   - the bulk "missing" query of 10 000 hashes (half present), `ls` first page, a search
#   - `gc --dry-run`, then an eviction of 10 % (PATCH max_size + POST gc)
#   - restart time to a healthy /healthz, the cache's info after it, the server's RSS, the
#     database's size
# With PG=1 (default 0) the same database is moved to PostgreSQL (`larder migrate`; started
# on loopback by larder-testkit's `larder-backends`) and measured again as one more column,
# with the NARs in the same local directory.
# Needs (as root): nginx (nginx-light), wrk, python3 with cryptography, curl, sqlite3.
# Knobs: LARDER_BIN (the larder to measure, instead of building this tree), N (paths, default 1000000), DUR (seconds per wrk run, default 10), PG (0/1),
# BASELINE_BIN (another build of larder, measured as one more embedded column on a copy of the
# same data directory), KEEP (a directory: seed once into it and reuse it on later runs),
# SEED_ONLY=1 (seed into KEEP and exit: seed outside a benchmark lock, measure under it),
# LIMITED=1 (the cache gets a max_size of 1 PiB before the narinfo runs, far above its size:
# nothing is evicted, but uses are recorded as in a cache with a size limit).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-1000000}
DUR=${DUR:-10}
PG=${PG:-0}
LIMITED=${LIMITED:-0}
BASELINE_BIN=${BASELINE_BIN:-}
for tool in nginx wrk python3 curl sqlite3; do
  command -v $tool >/dev/null || { echo "bench: $tool is required (apt-get install -y nginx-light wrk python3-cryptography curl sqlite3)" >&2; exit 1; }
done
. "$ROOT/bench/lib.sh" # nginx_conf

WORK=$(mktemp -d /tmp/larder-scale.XXXXXX)
SEED=${KEEP:-$WORK/seed}
PIDS=()
cleanup() {
  exec 9>&- 2>/dev/null || true # EOF on larder-backends' stdin: it stops PostgreSQL and Garage
  # Not larder-backends itself: killed, it would leave PostgreSQL and Garage running.
  for p in "${PIDS[@]}"; do [ "$p" = "${BACKENDS_PID:-}" ] || kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[scale] %s\n' "$*" >&2; }

if [ -n "${LARDER_BIN:-}" ]; then BIN=$LARDER_BIN # a build made elsewhere
else (cd "$ROOT" && cargo build --release -q -p larder); BIN=$ROOT/target/release/larder; fi

# serve NAME DATA [ENVFILE] [BIN]: start a server on DATA; sets URL_<NAME>, PID_<NAME>, and
# T_<NAME> (milliseconds from start to a healthy /healthz).
serve() {
  local name=$1 data=$2 envfile=${3:-} bin=${4:-$BIN} t0 url
  : >"$WORK/serve-$name.log"
  t0=$(date +%s%N)
  ( if [ -n "$envfile" ]; then set -a; . "$envfile"; set +a; fi
    exec "$bin" serve --listen 127.0.0.1:0 --data "$data" ) 2>>"$WORK/serve-$name.log" &
  printf -v "PID_$name" '%s' $!
  PIDS+=($!)
  for _ in $(seq 6000); do
    url=$(sed -n 's/^larder: listening on //p' "$WORK/serve-$name.log")
    [ -n "$url" ] && curl -sf "$url/healthz" >/dev/null 2>&1 && break
    sleep 0.005
  done
  curl -sf "$url/healthz" >/dev/null || { cat "$WORK/serve-$name.log" >&2; exit 1; }
  printf -v "T_$name" '%s' $(( ($(date +%s%N) - t0) / 1000000 ))
  printf -v "URL_$name" '%s' "$url"
}
stop() { local pid_var=PID_$1; kill "${!pid_var}"; wait "${!pid_var}" 2>/dev/null || true; }

if [ ! -f "$SEED/seeded-$N" ]; then
  rm -rf "$SEED"; mkdir -p "$SEED"
  serve seed "$SEED/data"
  LARDER_SERVER=$URL_seed LARDER_TOKEN=$(cat "$SEED/data/admin-token") "$BIN" cache create bench >/dev/null
  stop seed
  log "seeding $N paths"
  t0=$(date +%s)
  python3 "$ROOT/bench/scale-seed.py" "$SEED/data" "$SEED/static/bench" "$N"
  log "seeded in $(( $(date +%s) - t0 )) s"
  touch "$SEED/seeded-$N"
fi
# SEED_ONLY=1 (with KEEP): stop here, so seeding can run outside the lock that measurements hold.
[ "${SEED_ONLY:-0}" = 1 ] && { log "seeded into $SEED"; exit 0; }
# Every server runs on a copy of the seeded database (the eviction changes it; KEEP reuses the
# seed), all sharing the seeded objects (GC keeps evicted NARs for their grace period).
copy_data() {
  mkdir -p "$1"; cp "$SEED/data/larder.db" "$SEED/data/admin-token" "$1/"
  ln -s "$SEED/data/store" "$1/store"
}
DATA=$WORK/embedded
copy_data "$DATA"
ADMIN=$(cat "$DATA/admin-token")

serve embedded "$DATA"
L=$URL_embedded
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n' >"$SEED/static/bench/nix-cache-info"
# The seeded narinfos are exactly what larder serves.
for h in $(shuf -n 200 "$SEED/static/bench/hashes"); do
  cmp -s <(curl -sf "$L/bench/$h.narinfo") "$SEED/static/bench/$h.narinfo" \
    || { echo "bench: $h.narinfo differs between larder and the seeded copy" >&2; exit 1; }
done
B=
if [ -n "$BASELINE_BIN" ]; then
  copy_data "$WORK/baseline"
  serve baseline "$WORK/baseline" "" "$BASELINE_BIN"
  B=$URL_baseline
fi
P=
if [ "$PG" = 1 ]; then
  (cd "$ROOT" && cargo build --release -q -p larder-testkit --bin larder-backends)
  mkfifo "$WORK/backends.stdin"
  "$ROOT/target/release/larder-backends" <"$WORK/backends.stdin" >"$WORK/backends.env" 2>"$WORK/backends.log" &
  BACKENDS_PID=$!
  PIDS+=($!)
  exec 9>"$WORK/backends.stdin" # held open: the backends live until this script exits
  for _ in $(seq 600); do grep -q LARDER_DATABASE "$WORK/backends.env" 2>/dev/null && break; sleep 0.1; done
  grep -q LARDER_DATABASE "$WORK/backends.env" || { cat "$WORK/backends.log" >&2; exit 1; }
  grep LARDER_DATABASE "$WORK/backends.env" >"$WORK/pg.env"
  log "moving the database to PostgreSQL (larder migrate)"
  t0=$(date +%s)
  (set -a; . "$WORK/pg.env"; set +a
   "$BIN" migrate --from "sqlite://$SEED/data/larder.db" --to "$LARDER_DATABASE" --overwrite >/dev/null)
  log "migrated in $(( $(date +%s) - t0 )) s"
  mkdir -p "$WORK/pg"; cp "$SEED/data/admin-token" "$WORK/pg/"; ln -s "$SEED/data/store" "$WORK/pg/store"
  serve pg "$WORK/pg" "$WORK/pg.env"
  P=$URL_pg
fi

NPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/static" "$WORK/nginx-tmp"
ln -s "$SEED/static/bench" "$WORK/static/bench"
nginx_conf "$WORK" "$NPORT"
sed -i 's/open_file_cache max=10000;/open_file_cache max=10000; disable_symlinks off;/' "$WORK/nginx.conf"
nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
NG=http://127.0.0.1:$NPORT
for _ in $(seq 50); do curl -sf "$NG/bench/nix-cache-info" >/dev/null && break; sleep 0.1; done
h=$(head -1 "$SEED/static/bench/hashes")
cmp <(curl -sf "$L/bench/$h.narinfo") <(curl -sf "$NG/bench/$h.narinfo")

# wrk scripts: random existing hashes (read from the seeded list by every thread) and random
# missing ones (random nix32 strings: a hit among N of 32^32 is impossible).
random_hits_lua "$SEED" "$WORK/hit.lua"
cat >"$WORK/miss.lua" <<'LUA'
local a = "0123456789abcdfghijklmnpqrsvwxyz"
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local t = {}
  for i = 1, 32 do local k = math.random(32); t[i] = a:sub(k, k) end
  return wrk.format("GET", "/bench/" .. table.concat(t) .. ".narinfo")
end
LUA

# wrkm BASE ARGS…: "req/s p50_ms p99_ms", after a 1 s warm-up; 404s are expected for misses.
wrkm() {
  local base=$1; shift
  wrk -d1s --latency "$@" "$base" >/dev/null 2>&1 || true
  wrk -d"${DUR}s" --latency "$@" "$base" 2>&1 | python3 -c '
import sys, re
t = sys.stdin.read()
rps = re.search(r"Requests/sec:\s*([\d.]+)", t).group(1)
def ms(p):
    m = re.search(r"^\s*" + str(p) + r"%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 0.001, "ms": 1, "s": 1000}[u]
print(f"{float(rps):.0f} {ms(50):.3f} {ms(99):.3f}")'
}
# ms CMD…: wall milliseconds of a command.
ms() { local t0; t0=$(date +%s%N); "$@" >/dev/null; echo $(( ($(date +%s%N) - t0) / 1000000 )); }
rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }

COLS=(embedded); URLS=("$L")
[ -z "$B" ] || { COLS+=(baseline); URLS+=("$B"); }
[ -z "$P" ] || { COLS+=(pg); URLS+=("$P"); }
if [ "$LIMITED" = 1 ]; then
  for u in "${URLS[@]}"; do
    curl -sf -X PATCH -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
      --data '{"max_size": 1125899906842624}' "$u/api/v1/caches/bench" >/dev/null
  done
fi
log "N=$N, LIMITED=$LIMITED, load: $(uptime | sed 's/.*load average: //'), $DUR s per run"
head="| narinfo, N=$N |"; sep="|---|"
for c in "${COLS[@]}"; do head+=" $c req/s | p50 ms | p99 ms |"; sep+="---:|---:|---:|"; done
head+=" nginx req/s | p50 ms | p99 ms |"; sep+="---:|---:|---:|"
for c in "${COLS[@]}"; do head+=" $c/nginx |"; sep+="---:|"; done
echo "$head"; echo "$sep"
for kind in hit miss; do
  for conns in 1 16; do
    threads=$(( conns == 1 ? 1 : 2 ))
    cells=(); vals=()
    # alternated: larder, nginx, larder, nginx…; the better of two runs each
    for u in "${URLS[@]}" "$NG"; do
      a=$(wrkm "$u" -t$threads -c$conns -s "$WORK/$kind.lua")
      vals+=("$a")
    done
    for u in "${URLS[@]}" "$NG"; do
      b=$(wrkm "$u" -t$threads -c$conns -s "$WORK/$kind.lua")
      vals+=("$b")
    done
    python3 - "$kind" "$conns" "${#URLS[@]}" "${vals[@]}" <<'PY'
import sys
kind, conns, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = [tuple(map(float, v.split())) for v in sys.argv[4:]]
best = [max(runs[i], runs[i + n + 1]) for i in range(n + 1)]
g = best[-1][0]
cells = "".join(f" {r:.0f} | {p50:.3f} | {p99:.3f} |" for r, p50, p99 in best)
ratios = "".join(f" {b[0] / g:.2f}x |" for b in best[:-1])
print(f"| random {kind}, {conns} conn |{cells}{ratios}")
PY
  done
done
log "load: $(uptime | sed 's/.*load average: //')"

# The JSON API, the eviction, restart, memory, on each larder.
python3 - "$SEED/static/bench/hashes" >"$WORK/missing.json" <<'PY'
import json, random, sys
hs = open(sys.argv[1]).read().split()
rng = random.Random(1)
present = rng.sample(hs, 5000)
absent = ["".join(rng.choice("0123456789abcdfghijklmnpqrsvwxyz") for _ in range(32)) for _ in range(5000)]
print(json.dumps({"paths": present + absent}))
PY
echo
echo "| N=$N |$(printf ' %s |' "${COLS[@]}")"
echo "|---|$(printf -- '---:|%.0s' "${COLS[@]}")"
declare -A R
for i in "${!COLS[@]}"; do
  c=${COLS[$i]}; u=${URLS[$i]}
  auth=(-H "Authorization: Bearer $ADMIN")
  R[$c,missing]=$(ms curl -sf "${auth[@]}" -H 'Content-Type: application/json' --data-binary @"$WORK/missing.json" "$u/api/v1/caches/bench/missing")
  curl -sS -o "$WORK/missing.out" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
    --data-binary @"$WORK/missing.json" "$u/api/v1/caches/bench/missing" >"$WORK/missing.status" || true
  [ "$(cat "$WORK/missing.status")" = 200 ] || { echo "bench: missing query answered $(cat "$WORK/missing.status"): $(head -c 500 "$WORK/missing.out")" >&2; tail -20 "$WORK/serve-$c.log" >&2; exit 1; }
  n_missing=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["missing"]))' "$WORK/missing.out")
  [ "$n_missing" = 5000 ] || { echo "bench: missing query said $n_missing of 10000 missing, not 5000" >&2; exit 1; }
  R[$c,ls]=$(ms curl -sf "${auth[@]}" "$u/api/v1/caches/bench/paths")
  R[$c,search]=$(ms curl -sf "${auth[@]}" "$u/api/v1/caches/bench/paths?query=firefox-3.")
  R[$c,rss]=$(rss "$(eval echo "\$PID_$c")")
done
for i in "${!COLS[@]}"; do
  c=${COLS[$i]}; u=${URLS[$i]}
  auth=(-H "Authorization: Bearer $ADMIN")
  R[$c,dry]=$(ms curl -sf -X POST "${auth[@]}" "$u/api/v1/caches/bench/gc?dry_run=true")
done
# Restart: the embedded server on its own data, PostgreSQL's on its database.
for i in "${!COLS[@]}"; do
  c=${COLS[$i]}
  stop "$c"
  case $c in
    embedded) serve embedded "$DATA" ;;
    baseline) serve baseline "$WORK/baseline" "" "$BASELINE_BIN" ;;
    pg) serve pg "$WORK/pg" "$WORK/pg.env" ;;
  esac
  R[$c,restart]=$(eval echo "\$T_$c")
  URLS[$i]=$(eval echo "\$URL_$c")
done
# Eviction of 10 %: max_size at 90 % of the stored size, then an eviction and GC.
for i in "${!COLS[@]}"; do
  c=${COLS[$i]}; u=${URLS[$i]}
  auth=(-H "Authorization: Bearer $ADMIN")
  info() { curl -sf "${auth[@]}" "$u/api/v1/caches/bench" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
  # The cache's info, the first after the restart (what `larder cache info`, the web UI and
  # /metrics read): counters, not scans of the paths and chunks.
  R[$c,info]=$(ms curl -sf "${auth[@]}" "$u/api/v1/caches/bench")
  size=$(info size); before=$(info paths)
  # Lowering max_size evicts at once (the PATCH answers after it); the POST runs GC.
  t0=$(date +%s%N)
  curl -sf -X PATCH "${auth[@]}" -H 'Content-Type: application/json' \
    --data "{\"max_size\": $(( size * 9 / 10 ))}" "$u/api/v1/caches/bench" >/dev/null
  curl -sf -X POST "${auth[@]}" "$u/api/v1/caches/bench/gc" >/dev/null
  R[$c,evict]=$(( ($(date +%s%N) - t0) / 1000000 ))
  R[$c,evicted]=$(( before - $(info paths) ))
done
R[embedded,db]=$(( $(du -sk "$DATA"/larder.db* | awk '{s+=$1} END {print s}') / 1024 ))
[ -z "$B" ] || R[baseline,db]=$(( $(du -sk "$WORK/baseline"/larder.db* | awk '{s+=$1} END {print s}') / 1024 ))
if [ -n "$P" ]; then
  R[pg,db]=$(set -a; . "$WORK/pg.env"; set +a
    psql "$LARDER_DATABASE" -Atc 'SELECT pg_database_size(current_database()) / 1048576' 2>/dev/null || echo "?")
fi
line() { local label=$1 key=$2 s="| $1 |"; for c in "${COLS[@]}"; do s+=" ${R[$c,$key]} |"; done; echo "$s"; }
line "bulk missing query, 10 000 hashes (ms)" missing
line "ls, first page (ms)" ls
line "search \"firefox-3.\" (ms)" search
line "gc --dry-run (ms)" dry
line "cache info, first after restart (ms)" info
line "evict 10 % + GC (ms)" evict
line "paths evicted" evicted
line "restart to healthy /healthz (ms)" restart
line "RSS after the narinfo runs (MiB)" rss
line "database size (MiB)" db
log "load: $(uptime | sed 's/.*load average: //')"
