# Shared by the serving benchmarks (serve.sh, tls.sh); sourced, not run.

# mirror_cache BASE OUT CLOSURE WORK: copy every narinfo and NAR of CLOSURE that the cache at
# BASE serves into OUT, under the same names (what nginx then serves statically). Writes
# WORK/narinfos (the narinfo URL paths), WORK/smallnars (the NAR URL paths of every NAR but the
# biggest), WORK/bignar and WORK/bighash (the biggest NAR).
mirror_cache() {
python3 - "$@" <<'PY'
import sys, urllib.request, os
base, out, closure, work = sys.argv[1:5]
def get(u): return urllib.request.urlopen(u, timeout=60).read()
open(f'{out}/nix-cache-info', 'wb').write(get(f'{base}/nix-cache-info'))
narinfos, nars, big = [], [], (0, None, None)
for p in open(closure).read().split():
    h = p[len('/nix/store/'):][:32]
    text = get(f'{base}/{h}.narinfo')
    open(f'{out}/{h}.narinfo', 'wb').write(text)
    fields = dict(l.split(': ', 1) for l in text.decode().splitlines() if l)
    data = get(f"{base}/{fields['URL']}")
    open(f"{out}/{fields['URL']}", 'wb').write(data)
    narinfos.append(f'/bench/{h}.narinfo')
    nars.append(f"/bench/{fields['URL']}")
    if len(data) > big[0]: big = (len(data), f"/bench/{fields['URL']}", h)
open(f'{work}/narinfos', 'w').write('\n'.join(narinfos) + '\n')
open(f'{work}/bignar', 'w').write(big[1] + '\n')
open(f'{work}/smallnars', 'w').write('\n'.join(n for n in nars if n != big[1]) + '\n')
open(f'{work}/bighash', 'w').write(big[2] + '\n')
print(f'{len(narinfos)} narinfos, biggest NAR {big[0] >> 20} MiB', file=sys.stderr)
PY
}

# nginx_conf WORK PORT [TLS_PORT CERT KEY]: WORK/nginx.conf serving WORK/static on PORT as a
# static file server tuned as it would be for this (sendfile, open-file cache, keep-alive), and
# over TLS on TLS_PORT with CERT and KEY when given.
nginx_conf() {
  local work=$1 port=$2 tls_port=${3:-} cert=${4:-} key=${5:-} tls=""
  if [ -n "$tls_port" ]; then
    tls="server {
    listen 127.0.0.1:$tls_port ssl;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.2 TLSv1.3;
    root $work/static;
  }"
  fi
  cat > "$work/nginx.conf" <<NGINX
user root;
worker_processes auto;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 10000000;
  open_file_cache max=10000;
  client_body_temp_path $work/nginx-tmp;
  types { text/x-nix-narinfo narinfo; text/x-nix-cache-info nix-cache-info; }
  default_type application/x-nix-nar;
  server { listen 127.0.0.1:$port; root $work/static; }
  $tls
}
NGINX
}

# wrk → a number: requests/s, or MB/s of transfer. Fails on any non-2xx answer.
measure() { # $1 = what (rps|mbps) $2 = base URL, rest = wrk args
  local what=$1; shift 2
  wrk -d1s "$@" >/dev/null 2>&1 || true # warm-up: connections, caches, CPU frequency
  local out; out=$(wrk -d"${DUR}s" "$@" 2>&1)
  if grep -q 'Non-2xx' <<<"$out"; then echo "$out" >&2; echo "bench: non-2xx answers" >&2; exit 1; fi
  if [ "$what" = rps ]; then sed -n 's/^Requests\/sec: *//p' <<<"$out"
  else sed -n 's/^Transfer\/sec: *//p' <<<"$out" | python3 -c '
import sys; v = sys.stdin.read().strip(); n, u = float(v[:-2]), v[-2:]
print(round(n * {"KB": 1/1024, "MB": 1, "GB": 1024}[u], 1))'
  fi
}
# row NAME LARDER [SCALED] NGINX: one line of the table, ratios to nginx.
row() {
  python3 -c '
import sys
name, *vals = sys.argv[1:]
vals = [float(v) for v in vals]
g = vals[-1]
cells = "".join(f" {v:>12.1f} |" for v in vals)
ratios = "".join(f" {v / g:>6.2f}x |" for v in vals[:-1])
print(f"| {name:<30} |{cells}{ratios}")' "$@"
}

# random_hits_lua SEED OUT: OUT is a wrk script asking narinfos of random existing hashes of a
# cache seeded by bench/scale.sh in SEED (the hash list read by every wrk thread).
random_hits_lua() {
  cat >"$2" <<LUA
local hashes = {}
for l in io.lines("$1/static/bench/hashes") do hashes[#hashes + 1] = l end
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  return wrk.format("GET", "/bench/" .. hashes[math.random(#hashes)] .. ".narinfo")
end
LUA
}
