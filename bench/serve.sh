#!/usr/bin/env bash
# Serving benchmark: larder vs nginx serving the very same cache as static files, in one run.
#
# Builds a test closure with real Nix (tests/oracle/nix-oracle.sh), pushes it into a fresh
# `larder serve` with `nix copy`, mirrors every narinfo and NAR larder serves into a directory
# that nginx serves statically under the same URLs, then measures with wrk (keep-alive):
#   - narinfo requests/s, 1 and 16 connections (cycling over every narinfo of the closure)
#   - NAR download throughput of one BIG_MIB NAR, 1 and 4 connections
# Needs (as root): nix-bin, nginx (nginx-light), wrk, python3, curl.
# Knobs: DUR (seconds per measurement, default 10), BIG_MIB (default 256), NSMALL (default 200).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-10}
BIG_MIB=${BIG_MIB:-256}
NSMALL=${NSMALL:-200}
for tool in nix nginx wrk python3 curl; do
  command -v $tool >/dev/null || { echo "bench: $tool is required (apt-get install -y nix-bin nginx-light wrk python3 curl)" >&2; exit 1; }
done
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsubstituters ='

WORK=$(mktemp -d /tmp/larder-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
log() { printf '[bench] %s\n' "$*" >&2; }

(cd "$ROOT" && cargo build --release -q -p larder)
BIN=$ROOT/target/release/larder

log "building a test closure (BIG_MIB=$BIG_MIB NSMALL=$NSMALL)"
WORKDIR=$WORK/oracle BIG_MIB=$BIG_MIB NSMALL=$NSMALL bash "$ROOT/tests/oracle/nix-oracle.sh" build >/dev/null
TOP=$(cat "$WORK/oracle/top")

"$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" 2>"$WORK/serve.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$WORK/serve.log" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^larder: listening on //p' "$WORK/serve.log")
[ -n "$URL" ] || { cat "$WORK/serve.log" >&2; exit 1; }
export LARDER_SERVER=$URL LARDER_TOKEN=$(cat "$WORK/data/admin-token")
"$BIN" cache create bench >/dev/null
PUSH=$("$BIN" token create --perm push --cache bench)
printf 'machine 127.0.0.1 login x password %s\n' "$PUSH" > "$WORK/netrc"
log "pushing with nix copy"
XDG_CACHE_HOME=$WORK/xdg nix copy --option netrc-file "$WORK/netrc" --to "$URL/bench?compression=zstd" "$TOP"

log "mirroring larder's cache into a static directory for nginx"
mkdir -p "$WORK/static/bench/nar"
python3 - "$URL/bench" "$WORK/static/bench" "$WORK/oracle/closure" "$WORK" <<'PY'
import sys, urllib.request, os
base, out, closure, work = sys.argv[1:5]
def get(u): return urllib.request.urlopen(u, timeout=60).read()
open(f'{out}/nix-cache-info', 'wb').write(get(f'{base}/nix-cache-info'))
narinfos, big = [], (0, None)
for p in open(closure).read().split():
    h = p[len('/nix/store/'):][:32]
    text = get(f'{base}/{h}.narinfo')
    open(f'{out}/{h}.narinfo', 'wb').write(text)
    fields = dict(l.split(': ', 1) for l in text.decode().splitlines() if l)
    data = get(f"{base}/{fields['URL']}")
    open(f"{out}/{fields['URL']}", 'wb').write(data)
    narinfos.append(f'/bench/{h}.narinfo')
    if len(data) > big[0]: big = (len(data), f"/bench/{fields['URL']}")
open(f'{work}/narinfos', 'w').write('\n'.join(narinfos) + '\n')
open(f'{work}/bignar', 'w').write(big[1] + '\n')
print(f'{len(narinfos)} narinfos, biggest NAR {big[0] >> 20} MiB', file=sys.stderr)
PY

NPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 10000000;
  open_file_cache max=10000;
  client_body_temp_path $WORK/nginx-tmp;
  types { text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }
  default_type application/x-nix-nar;
  server { listen 127.0.0.1:$NPORT; root $WORK/static; }
}
NGINX
mkdir -p "$WORK/nginx-tmp"
nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$NPORT/bench/nix-cache-info" >/dev/null && break; sleep 0.1; done
cmp <(curl -sf "$URL/bench/nix-cache-info") <(curl -sf "http://127.0.0.1:$NPORT/bench/nix-cache-info")

{ echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/narinfos"; echo '}'
  echo 'local i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/narinfo.lua"
BIGNAR=$(cat "$WORK/bignar")

# wrk → a number: requests/s, or MB/s of transfer. Fails on any non-2xx answer.
measure() { # $1 = what (rps|mbps) $2 = base URL, rest = wrk args
  local what=$1; shift 2
  local out; out=$(wrk -d"${DUR}s" "$@" 2>&1)
  if grep -q 'Non-2xx' <<<"$out"; then echo "$out" >&2; echo "bench: non-2xx answers" >&2; exit 1; fi
  if [ "$what" = rps ]; then sed -n 's/^Requests\/sec: *//p' <<<"$out"
  else sed -n 's/^Transfer\/sec: *//p' <<<"$out" | python3 -c '
import sys; v = sys.stdin.read().strip(); n, u = float(v[:-2]), v[-2:]
print(round(n * {"KB": 1/1024, "MB": 1, "GB": 1024}[u], 1))'
  fi
}
row() { # name larder nginx
  python3 -c 'import sys; n, l, g = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]); print(f"| {n:<34} | {l:>12.1f} | {g:>12.1f} | {l/g:>6.2f}x |")' "$@"
}
L=$URL; N=http://127.0.0.1:$NPORT
log "measuring ($DUR s each)"
echo "| measurement                        |       larder |        nginx | larder/nginx |"
echo "|------------------------------------|--------------|--------------|--------|"
row "narinfo req/s, 1 connection" "$(measure rps $L -t1 -c1 -s "$WORK/narinfo.lua" "$L")" "$(measure rps $N -t1 -c1 -s "$WORK/narinfo.lua" "$N")"
row "narinfo req/s, 16 connections" "$(measure rps $L -t2 -c16 -s "$WORK/narinfo.lua" "$L")" "$(measure rps $N -t2 -c16 -s "$WORK/narinfo.lua" "$N")"
row "NAR MiB/s, 1 connection" "$(measure mbps $L -t1 -c1 "$L$BIGNAR")" "$(measure mbps $N -t1 -c1 "$N$BIGNAR")"
row "NAR MiB/s, 4 connections" "$(measure mbps $L -t2 -c4 "$L$BIGNAR")" "$(measure mbps $N -t2 -c4 "$N$BIGNAR")"
