#!/usr/bin/env bash
# TLS benchmark: what native TLS (`tls_cert`, `tls_key`) costs, measured against nginx
# terminating TLS for the very same files, in one run.
#
# Builds a test closure with real Nix (tests/oracle/nix-oracle.sh), pushes it into a fresh
# `larder serve` with `nix copy`, copies that data directory for a second `larder serve` over
# HTTPS, mirrors every narinfo and NAR into a directory that nginx serves over HTTP and over
# HTTPS (same certificate: EC P-256, made here with openssl), then measures with wrk:
#   - narinfo requests/s, 1 and 16 keep-alive connections (cycling over the closure's narinfos)
#   - NAR download throughput of one BIG_MIB NAR, 1 and 4 connections
#   - new connections/s, 16 connections each sending one narinfo request and closing (for
#     HTTPS, a full handshake per request: what TLS costs a client that does not keep alive)
# Needs (as root): nix-bin, nginx (nginx-light), wrk, python3, curl, openssl.
# Knobs: DUR (seconds per measurement, default 10), BIG_MIB (default 256), NSMALL (default 200).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-10}
BIG_MIB=${BIG_MIB:-256}
NSMALL=${NSMALL:-200}
for tool in nix nginx wrk python3 curl openssl; do
  command -v $tool >/dev/null || { echo "bench: $tool is required (apt-get install -y nix-bin nginx-light wrk python3 curl openssl)" >&2; exit 1; }
done
. "$ROOT/tests/lib/nix-env.sh"   # the tests' Nix settings: no sandbox, no machine or user nix.conf
. "$ROOT/bench/lib.sh"           # mirror_cache, nginx_conf, measure

WORK=$(mktemp -d /tmp/larder-tlsbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
log() { printf '[bench] %s\n' "$*" >&2; }

(cd "$ROOT" && cargo build --release -q -p larder)
BIN=$ROOT/target/release/larder

log "building a test closure (BIG_MIB=$BIG_MIB NSMALL=$NSMALL)"
WORKDIR=$WORK/oracle BIG_MIB=$BIG_MIB NSMALL=$NSMALL bash "$ROOT/tests/oracle/nix-oracle.sh" build >/dev/null
TOP=$(cat "$WORK/oracle/top")

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 2>/dev/null

# serve NAME ARGS…: a `larder serve` on DATA-NAME; sets SERVED to its URL.
serve() {
  local name=$1; shift
  "$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data-$name" "$@" >/dev/null 2>"$WORK/serve-$name.log" &
  PIDS+=($!)
  for _ in $(seq 300); do grep -q 'listening on' "$WORK/serve-$name.log" 2>/dev/null && break; sleep 0.1; done
  SERVED=$(sed -n 's/^larder: listening on //p' "$WORK/serve-$name.log")
  [ -n "$SERVED" ] || { cat "$WORK/serve-$name.log" >&2; exit 1; }
}
serve plain; PLAIN=$SERVED
ADMIN=$(cat "$WORK/data-plain/admin-token")
LARDER_SERVER=$PLAIN LARDER_TOKEN=$ADMIN "$BIN" cache create bench >/dev/null
PUSH=$(LARDER_SERVER=$PLAIN LARDER_TOKEN=$ADMIN "$BIN" token create --perm push --cache bench)
printf 'machine 127.0.0.1 login x password %s\n' "$PUSH" > "$WORK/netrc"
log "pushing with nix copy"
XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXXXX") nix copy --option netrc-file "$WORK/netrc" \
  --to "$PLAIN/bench?compression=zstd" "$TOP"
log "mirroring the cache into a static directory for nginx"
mkdir -p "$WORK/static/bench/nar"
mirror_cache "$PLAIN/bench" "$WORK/static/bench" "$WORK/oracle/closure" "$WORK"
# The same cache over HTTPS: a copy of the data directory (one server per SQLite database).
cp -a "$WORK/data-plain" "$WORK/data-tls"
rm -f "$WORK/data-tls/lock"
serve tls --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem"; TLS=$SERVED

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NPORT=$(port); NTLS=$(port)
nginx_conf "$WORK" "$NPORT" "$NTLS" "$WORK/cert.pem" "$WORK/key.pem"
mkdir -p "$WORK/nginx-tmp"
nginx -c "$WORK/nginx.conf" -p "$WORK" >/dev/null &
PIDS+=($!)
NGINX_PLAIN=http://127.0.0.1:$NPORT; NGINX_TLS=https://127.0.0.1:$NTLS
for _ in $(seq 50); do curl -sf "$NGINX_PLAIN/bench/nix-cache-info" >/dev/null && break; sleep 0.1; done
# Every server answers the same bytes.
for u in "$PLAIN" "$TLS" "$NGINX_TLS"; do
  cmp <(curl -sf --cacert "$WORK/cert.pem" "$u/bench/nix-cache-info") <(curl -sf "$NGINX_PLAIN/bench/nix-cache-info")
done
BIGHASH=$(cat "$WORK/bighash")
cmp <(curl -sf --cacert "$WORK/cert.pem" "$TLS/bench/$BIGHASH.narinfo") <(curl -sf "$NGINX_PLAIN/bench/$BIGHASH.narinfo")

{ echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/narinfos"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/narinfo.lua"
BIGNAR=$(cat "$WORK/bignar")

# line NAME WRK-ARGS… SUFFIX: larder and nginx, plain and TLS, and the ratios.
line() {
  local name=$1 what=$2 suffix=${*: -1}; set -- "${@:3:$#-3}"
  local lp np lt nt
  lp=$(measure "$what" "" "$@" "$PLAIN$suffix")
  np=$(measure "$what" "" "$@" "$NGINX_PLAIN$suffix")
  lt=$(measure "$what" "" "$@" "$TLS$suffix")
  nt=$(measure "$what" "" "$@" "$NGINX_TLS$suffix")
  python3 -c '
import sys
name, lp, np, lt, nt = sys.argv[1], *map(float, sys.argv[2:])
print(f"| {name:<34} | {lp:>9.1f} | {np:>9.1f} | {lt:>9.1f} | {nt:>9.1f} | {lt / nt:>6.2f}x | {lt / lp:>6.2f}x | {nt / np:>6.2f}x |")' \
    "$name" "$lp" "$np" "$lt" "$nt"
}
log "measuring ($DUR s each)"
echo "| measurement                        | larder http | nginx http | larder https | nginx https | https larder/nginx | larder https/http | nginx https/http |"
echo "|------------------------------------|-----------|-----------|-----------|-----------|---------|---------|---------|"
line "narinfo req/s, 1 connection" rps -t1 -c1 -s "$WORK/narinfo.lua" ""
line "narinfo req/s, 16 connections" rps -t2 -c16 -s "$WORK/narinfo.lua" ""
line "NAR MiB/s, 1 connection" mbps -t1 -c1 "$BIGNAR"
line "NAR MiB/s, 4 connections" mbps -t2 -c4 "$BIGNAR"
line "new connections/s, 16 at a time" rps -t2 -c16 -H "Connection: close" -s "$WORK/narinfo.lua" ""
