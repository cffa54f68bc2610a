#!/usr/bin/env bash
# Serving benchmark: larder vs nginx serving the very same cache as static files, in one run;
# with SCALED=1 (the default) also larder scaled out (PostgreSQL metadata, NARs in a Garage
# bucket, both started on loopback by larder-testkit's `larder-backends`), on the same closure.
#
# Builds a test closure with real Nix (tests/oracle/nix-oracle.sh), pushes it into a fresh
# `larder serve` with `nix copy`, mirrors every narinfo and NAR larder serves into a directory
# that nginx serves statically under the same URLs, then measures with wrk (keep-alive):
#   - narinfo requests/s, 1 and 16 connections (cycling over every narinfo of the closure)
#   - small NARs requests/s (every NAR of the closure but the big one, 2-20 KiB), 1 and 16
#     connections
#   - NAR download throughput of one BIG_MIB NAR, 1 and 4 connections
#   - end to end: `nix copy --from` of the closure into an empty store (seconds; the ratio is
#     the time over nginx's, lower is better)
# Needs (as root): nix-bin, nginx (nginx-light), wrk, python3, curl; for SCALED=1 also
# postgresql and garage (what .ci/run installs).
# Knobs: LARDER_BIN (the larder to measure, instead of building this tree), DUR (seconds per
# measurement, default 10), BIG_MIB (default 256), NSMALL (default 200), NCHAIN (small chained
# paths, default 296: with the oracle's six others, the 302-path closure of issue 12's table),
# SCALED (1 = also measure the PostgreSQL+Garage setup, 0 = embedded vs nginx only),
# BASELINE_BIN (another build of larder, e.g. the commit before a change: measured in the same
# run as one more embedded column, so a change is compared with what it replaced).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-10}
SCALED=${SCALED:-1}
BASELINE_BIN=${BASELINE_BIN:-}
BIG_MIB=${BIG_MIB:-256}
NSMALL=${NSMALL:-200}
NCHAIN=${NCHAIN:-296}
for tool in nix nginx wrk python3 curl; do
  command -v $tool >/dev/null || { echo "bench: $tool is required (apt-get install -y nix-bin nginx-light wrk python3 curl)" >&2; exit 1; }
done
. "$ROOT/tests/lib/nix-env.sh"   # the tests' Nix settings: no sandbox, no machine or user nix.conf
. "$ROOT/bench/lib.sh"           # mirror_cache, nginx_conf, measure, row

WORK=$(mktemp -d /tmp/larder-bench.XXXXXX)
PIDS=()
cleanup() {
  exec 9>&- 2>/dev/null || true # EOF on larder-backends' stdin: it stops PostgreSQL and Garage
  for p in "${PIDS[@]}"; do [ "$p" = "${BACKENDS_PID:-}" ] || kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { printf '[bench] %s\n' "$*" >&2; }

if [ -n "${LARDER_BIN:-}" ]; then BIN=$LARDER_BIN # a build made elsewhere
else (cd "$ROOT" && cargo build --release -q -p larder); BIN=$ROOT/target/release/larder; fi

log "building a test closure (BIG_MIB=$BIG_MIB NSMALL=$NSMALL NCHAIN=$NCHAIN)"
WORKDIR=$WORK/oracle BIG_MIB=$BIG_MIB NSMALL=$NSMALL NCHAIN=$NCHAIN bash "$ROOT/tests/oracle/nix-oracle.sh" build >/dev/null
TOP=$(cat "$WORK/oracle/top")

# start_larder NAME [ENVFILE]: a `larder serve` with its own data directory (and the settings
# of ENVFILE, sourced), a cache "bench" into which `nix copy` pushes the closure. Sets URL_<NAME>.
start_larder() {
  local name=$1 envfile=${2:-} bin=${3:-$BIN}
  ( if [ -n "$envfile" ]; then set -a; . "$envfile"; set +a; fi
    exec "$bin" serve --listen 127.0.0.1:0 --data "$WORK/data-$name" ) 2>"$WORK/serve-$name.log" &
  PIDS+=($!)
  for _ in $(seq 300); do grep -q 'listening on' "$WORK/serve-$name.log" 2>/dev/null && break; sleep 0.1; done
  local url; url=$(sed -n 's/^larder: listening on //p' "$WORK/serve-$name.log")
  [ -n "$url" ] || { cat "$WORK/serve-$name.log" >&2; exit 1; }
  local admin; admin=$(cat "$WORK/data-$name/admin-token")
  LARDER_SERVER=$url LARDER_TOKEN=$admin "$BIN" cache create bench >/dev/null
  local push; push=$(LARDER_SERVER=$url LARDER_TOKEN=$admin "$BIN" token create --perm push --cache bench)
  printf 'machine 127.0.0.1 login x password %s\n' "$push" > "$WORK/netrc-$name"
  log "pushing with nix copy into larder ($name)"
  XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXXXX") nix copy --option netrc-file "$WORK/netrc-$name" \
    --to "$url/bench?compression=zstd" "$TOP"
  printf -v "URL_$name" '%s' "$url"
}

start_larder embedded
URL=$URL_embedded
if [ -n "$BASELINE_BIN" ]; then
  start_larder baseline "" "$BASELINE_BIN"
fi
if [ "$SCALED" = 1 ]; then
  # The scaled-out setup on this same machine: PostgreSQL metadata and a Garage bucket for the
  # NARs, both started on loopback by larder-testkit (as the tests do) and stopped at exit.
  (cd "$ROOT" && cargo build --release -q -p larder-testkit --bin larder-backends)
  mkfifo "$WORK/backends.stdin"
  "$ROOT/target/release/larder-backends" <"$WORK/backends.stdin" >"$WORK/backends.env" 2>"$WORK/backends.log" &
  BACKENDS_PID=$!
  PIDS+=($!)
  exec 9>"$WORK/backends.stdin" # held open: the backends live until this script exits
  for _ in $(seq 600); do grep -q AWS_SECRET_ACCESS_KEY "$WORK/backends.env" 2>/dev/null && break; sleep 0.1; done
  grep -q AWS_SECRET_ACCESS_KEY "$WORK/backends.env" || { cat "$WORK/backends.log" >&2; exit 1; }
  start_larder scaled "$WORK/backends.env"
  # A second replica on the same database and bucket that redirects NAR downloads to presigned
  # URLs: what Garage itself serves, the ceiling of streaming through larder.
  ( set -a; . "$WORK/backends.env"; set +a
    exec "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data-presigned" --nar-redirect presigned ) \
    2>"$WORK/serve-presigned.log" &
  PIDS+=($!)
  for _ in $(seq 300); do grep -q 'listening on' "$WORK/serve-presigned.log" 2>/dev/null && break; sleep 0.1; done
  URL_presigned=$(sed -n 's/^larder: listening on //p' "$WORK/serve-presigned.log")
  [ -n "$URL_presigned" ] || { cat "$WORK/serve-presigned.log" >&2; exit 1; }
fi

log "mirroring larder's cache into a static directory for nginx"
mkdir -p "$WORK/static/bench/nar"
mirror_cache "$URL/bench" "$WORK/static/bench" "$WORK/oracle/closure" "$WORK"

NPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nginx_conf "$WORK" "$NPORT"
mkdir -p "$WORK/nginx-tmp"
nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$NPORT/bench/nix-cache-info" >/dev/null && break; sleep 0.1; done
cmp <(curl -sf "$URL/bench/nix-cache-info") <(curl -sf "http://127.0.0.1:$NPORT/bench/nix-cache-info")

{ echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/narinfos"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/narinfo.lua"
BIGNAR=$(cat "$WORK/bignar")
{ echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/smallnars"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/smallnar.lua"

L=$URL; N=http://127.0.0.1:$NPORT
S=${URL_scaled:-}
if [ -n "$S" ]; then
  BIGNAR_S=/bench/$(curl -sf "$S/bench/$(cat "$WORK/bighash").narinfo" | sed -n 's/^URL: //p')
  # The scaled-out server answers the same narinfo URLs with the same bodies.
  cmp <(curl -sf "$L/bench/$(cat "$WORK/bighash").narinfo" | grep -v '^Sig:') \
      <(curl -sf "$S/bench/$(cat "$WORK/bighash").narinfo" | grep -v '^Sig:')
fi
B=${URL_baseline:-}
if [ -n "$B" ]; then # the baseline serves the same URLs (its own signature aside)
  cmp <(curl -sf "$L/bench/$(cat "$WORK/bighash").narinfo" | grep -v '^Sig:') \
      <(curl -sf "$B/bench/$(cat "$WORK/bighash").narinfo" | grep -v '^Sig:')
fi
# each WHAT ARGS… URL_SUFFIX: the measurement on larder, [baseline,] [larder scaled,] nginx.
each() {
  local what=$1 suffix=${*: -1}; set -- "${@:2:$#-2}"
  measure "$what" "" "$@" "$L${suffix/@NAR@/$BIGNAR}"
  [ -z "$B" ] || measure "$what" "" "$@" "$B${suffix/@NAR@/$BIGNAR}"
  [ -z "$S" ] || measure "$what" "" "$@" "$S${suffix/@NAR@/${BIGNAR_S:-}}"
  measure "$what" "" "$@" "$N${suffix/@NAR@/$BIGNAR}"
}
log "measuring ($DUR s each)"
if [ -n "$B" ]; then
  log "baseline: $BASELINE_BIN, embedded, the same closure"
  if [ -n "$S" ]; then
    echo "| measurement                    | larder embedded | baseline | larder PG+S3 |        nginx | embedded/nginx | baseline/nginx | PG+S3/nginx |"
    echo "|--------------------------------|--------------|--------------|--------------|--------------|---------|---------|---------|"
  else
    echo "| measurement                    |       larder |     baseline |        nginx | larder/nginx | baseline/nginx |"
    echo "|--------------------------------|--------------|--------------|--------------|--------|--------|"
  fi
elif [ -n "$S" ]; then
  echo "| measurement                    | larder embedded | larder PG+S3 |        nginx | embedded/nginx | PG+S3/nginx |"
  echo "|--------------------------------|--------------|--------------|--------------|---------|---------|"
  log "embedded: SQLite + local directory; PG+S3: PostgreSQL + Garage (NARs streamed through larder)"
else
  echo "| measurement                    |       larder |        nginx | larder/nginx |"
  echo "|--------------------------------|--------------|--------------|--------|"
fi
row "narinfo req/s, 1 connection" $(each rps -t1 -c1 -s "$WORK/narinfo.lua" "")
row "narinfo req/s, 16 connections" $(each rps -t2 -c16 -s "$WORK/narinfo.lua" "")
row "small NARs req/s, 1 connection" $(each rps -t1 -c1 -s "$WORK/smallnar.lua" "")
row "small NARs req/s, 16 connections" $(each rps -t2 -c16 -s "$WORK/smallnar.lua" "")
row "NAR MiB/s, 1 connection" $(each mbps -t1 -c1 "@NAR@")
row "NAR MiB/s, 4 connections" $(each mbps -t2 -c4 "@NAR@")
# End to end: `nix copy --from` of the whole closure into an empty store, from larder and from
# nginx (the same narinfos, signed by larder's key, and NARs), alternated, the better of two
# runs each (seconds; the ratio is larder's time over nginx's: lower is better).
# Each server signs with its own key, and the keys of servers on one host share a name (Nix keeps
# one key per name), so each copy trusts only the key of the server it reads from; nginx serves
# larder's narinfos, signed with larder's key.
key_of() { curl -sf "$1/api/v1/caches/bench" | python3 -c 'import json,sys; print(json.load(sys.stdin)["public_key"])'; }
copy_from() { # copy_from BASE KEY: seconds to substitute the closure from BASE into a fresh store
  local store t0 t1; store=$(mktemp -d "$WORK/dl.XXXXXX")
  t0=$(date +%s%N)
  NIX_CONFIG="$NIX_CONFIG
trusted-public-keys = $2" XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXXXX") \
    nix copy --from "$1" --to "$store" "$TOP" >/dev/null 2>"$WORK/copy.log" ||
    { cat "$WORK/copy.log" >&2; echo "bench: nix copy --from $1 failed" >&2; exit 1; }
  t1=$(date +%s%N)
  # Timed only if the whole closure arrived.
  local got; got=$(nix path-info --store "$store" -r "$TOP" 2>/dev/null | wc -l)
  [ "$got" = "$(wc -l <"$WORK/oracle/closure")" ] ||
    { echo "bench: nix copy --from $1 gave $got paths of the closure" >&2; exit 1; }
  rm -rf "$store" 2>/dev/null || { chmod -R u+w "$store"; rm -rf "$store"; }
  python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}')"
}
E2E_BASES=("$L/bench"); E2E_KEYS=("$(key_of "$L")")
[ -z "$B" ] || { E2E_BASES+=("$B/bench"); E2E_KEYS+=("$(key_of "$B")"); }
[ -z "$S" ] || { E2E_BASES+=("$S/bench"); E2E_KEYS+=("$(key_of "$S")"); }
E2E_BASES+=("$N/bench"); E2E_KEYS+=("${E2E_KEYS[0]}")
E2E=()
for _ in 1 2; do for i in "${!E2E_BASES[@]}"; do
  E2E+=("$(copy_from "${E2E_BASES[$i]}" "${E2E_KEYS[$i]}")"); done; done
python3 - "${#E2E_BASES[@]}" "${E2E[@]}" <<'PY'
import sys
n, v = int(sys.argv[1]), [float(x) for x in sys.argv[2:]]
best = [min(v[i], v[i + n]) for i in range(n)]
cells = "".join(f" {b:>12.2f} |" for b in best)
ratios = "".join(f" {b / best[-1]:>6.2f}x |" for b in best[:-1])
print(f"| {'nix copy --from, s (lower wins)':<30} |{cells}{ratios}")
PY
if [ -n "$S" ]; then
  DIRECT=$(curl -s -o /dev/null -w '%{redirect_url}' "$URL_presigned$BIGNAR_S")
  [ -n "$DIRECT" ] || { echo "bench: no presigned redirect for $BIGNAR_S" >&2; exit 1; }
  log "Garage itself, the same NAR by its presigned URL (what PG+S3 streams through larder):"
  log "  1 connection: $(measure mbps "" -t1 -c1 "$DIRECT") MiB/s, 4 connections: $(measure mbps "" -t2 -c4 "$DIRECT") MiB/s"
fi
