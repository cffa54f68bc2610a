#!/usr/bin/env bash
# Adversarial benchmark (issue #14, "Figures to produce"): larder's promises under crashes and
# attack, measured on the embedded default (SQLite + a directory) and on PostgreSQL + Garage
# with two replicas sharing the database and the bucket (both backends started on loopback by
# larder-testkit's `larder-backends`, as bench/serve.sh does), and printed as one table.
#
# Experiments, in order, on each setup:
#   1. kills: KILLS × `kill -9` of a replica in the middle of a push (`larder push` and
#      `nix copy --to`, alternating; on PostgreSQL the two replicas take turns), each followed
#      by a restart of that replica and the invariant check below. The pushes use fresh closures
#      (a BIG_MIB random file pushed in parts of PART_SIZE, small paths referencing a leaf); the
#      kill lands uniformly within the time one push of that kind takes here (measured first,
#      or KILL_MAX_MS). Reported: kills while the push ran, kills that left staging files
#      (an upload was in flight), pushes that failed or were stuck after the restart.
#   2. eviction: EVICT_ROUNDS rounds of 4 concurrent pushers of overlapping closures into a
#      cache whose `max_size` is toggled between EVICT_LIMIT and none (plus `POST …/gc`) while
#      they push and a reader fetches narinfos and then their NARs; invariants checked after
#      each round. Failed pushes are counted by their error (an evicted closure, the bounds on
#      unfinished multi-part uploads, …), not as violations; a narinfo served whose NAR then is
#      not is a violation.
#   3. load: READERS readers (wrk, keep-alive; narinfos and NARs up to 1 MiB of the kill
#      cache; on PostgreSQL half on each replica) + PUSHERS pushers (each push into a new cache)
#      for READ_SECS: errors, read p50/p99, server RSS at start and end.
#   4. idle: IDLE_CONNS connections that send half a request line and nothing more (reopened
#      whenever the server closes one, from up to 200 per source address 127.0.0.x, so the
#      per-client cap alone does not stop them) held for IDLE_SECS against one replica while a
#      client makes one request per new connection: that client's p50/p99 and errors. Beside
#      them, IDLE_BODIES authenticated uploads that send their head and 4 bytes of a 1 MiB body,
#      then nothing: how many the server closes within IDLE_SECS (header_timeout is 30 s).
#   5. entry bomb: a NAR of one directory with BOMB_ENTRIES empty files, zstd-compressed, PUT
#      the way `nix copy` does: time and peak server RSS during ingest; then 4 concurrent
#      anonymous `GET …/H.ls` of it: time, bytes and peak RSS.
#   6. decompression bomb: a zstd NAR of one file declaring BOMB_GIB GiB of zeros (all of them
#      in the stream) against servers run with max_nar_size = MAX_NAR_SIZE: status, time and
#      server CPU seconds until the answer (must be 413).
#
# Invariant check (after every kill and eviction round; the final one of each experiment
# downloads everything again):
#   HTTP: every path `GET /api/v1/caches/C/paths` lists has its narinfo (on both replicas), every
#   reference has a narinfo, the NAR downloads with the advertised FileSize and FileHash and
#   decompresses to NarSize bytes with NarHash (NARs already verified are checked by a one-byte
#   Range request for presence and size, and downloaded in full again at the end).
#   Database: no published path whose NAR lacks a chunk row, no reference row naming a path the
#   cache lacks, and (directory store) every chunk object of a published path on disk with its size.
#   Staging: after a restart, no `upload-*`/`spool-*` file left in the staging directory or its
#   multi-part directories within STAGING_WAIT seconds (DATA/store/tmp on the embedded default,
#   DATA/tmp with S3). Multi-part upload directories are kept on purpose (a push resumes
#   them); their number and bytes are reported.
#
# Knobs (environment; defaults are the issue's): KILLS=100 EVICT_ROUNDS=8 READ_SECS=60
# READERS=64 PUSHERS=4 IDLE_CONNS=2000 IDLE_SECS=60 BOMB_ENTRIES=8000000 BOMB_GIB=10
# MAX_NAR_SIZE=2GiB BIG_MIB=16 PART_SIZE=2MiB KILL_MAX_MS (default: measured) IDLE_BODIES=16
# EVICT_LIMIT (2.5 × BIG_MIB MiB) STAGING_WAIT=20 SETUPS="embedded scaled" (either or both).
# QUICK=1: KILLS=6 EVICT_ROUNDS=2 READ_SECS=10 IDLE_CONNS=500 IDLE_SECS=35 BOMB_ENTRIES=300000
# BOMB_GIB=3 BIG_MIB=8 (a few minutes). Nix runs with tests/lib/nix-env.sh's settings, a fresh
# XDG_CACHE_HOME per `nix copy`, stalled-download-timeout = 5 and download-attempts = 2. Every push and upload
# uses the admin token (pushes through a push token behave the same; not measured here). LARDER_BIN / LARDER_BACKENDS_BIN: use these binaries instead of building
# (`cargo build --release -p larder -p larder-testkit`). KEEP=1 keeps the work directory.
# Exit status 1 when any invariant was violated (the table is printed first).
#
# Needs (as root, Linux): nix-bin, python3, curl, wrk, zstd, sqlite3, psql, and for the scaled
# setup postgresql and garage (what .ci/run installs); a hard open-file limit above IDLE_CONNS.
# Timing figures depend on the machine and its load: run it on a quiet one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=${QUICK:-0}
q() { if [ "$QUICK" = 1 ]; then echo "$1"; else echo "$2"; fi; }
KILLS=${KILLS:-$(q 6 100)}
EVICT_ROUNDS=${EVICT_ROUNDS:-$(q 2 8)}
READ_SECS=${READ_SECS:-$(q 10 60)}
READERS=${READERS:-64}
PUSHERS=${PUSHERS:-4}
IDLE_CONNS=${IDLE_CONNS:-$(q 500 2000)}
IDLE_SECS=${IDLE_SECS:-$(q 35 60)}
IDLE_BODIES=${IDLE_BODIES:-16}
BOMB_ENTRIES=${BOMB_ENTRIES:-$(q 300000 8000000)}
BOMB_GIB=${BOMB_GIB:-$(q 3 10)}
MAX_NAR_SIZE=${MAX_NAR_SIZE:-2GiB}
BIG_MIB=${BIG_MIB:-$(q 8 16)}
PART_SIZE=${PART_SIZE:-2MiB}
KILL_MAX_MS=${KILL_MAX_MS:-}
EVICT_LIMIT=${EVICT_LIMIT:-$((BIG_MIB * 1024 * 1024 * 5 / 2))}
STAGING_WAIT=${STAGING_WAIT:-20}
SETUPS=${SETUPS:-embedded scaled}
for tool in nix nix-build python3 curl wrk zstd sqlite3; do
  command -v $tool >/dev/null || { echo "adversarial: $tool is required (apt-get install -y nix-bin python3 curl wrk zstd sqlite3)" >&2; exit 1; }
done
case " $SETUPS " in *" scaled "*) command -v psql >/dev/null || { echo "adversarial: psql is required for the scaled setup" >&2; exit 1; } ;; esac
. "$ROOT/tests/lib/nix-env.sh"   # the tests' Nix settings: no sandbox, no machine or user nix.conf
# stalled-download-timeout and download-attempts bound a `nix copy` whose PUT was cut by a kill:
# Nix 2.8 retries the PUT without its body, the server answers 100 Continue and waits for the
# body, and Nix would wait 300 s (its default) per attempt, 5 attempts (see exp_kills).
NIX_CONFIG+=$'\nconnect-timeout = 5\nnarinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0\nstalled-download-timeout = 5\ndownload-attempts = 2'

hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt $((IDLE_CONNS + 512)) ]; then
  echo "adversarial: the hard open-file limit ($hard) is below IDLE_CONNS + 512; raise it or lower IDLE_CONNS" >&2; exit 1
fi
ulimit -n "$hard"

if [ -z "${LARDER_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p larder -p larder-testkit)
  LARDER_BIN=$ROOT/target/release/larder
  LARDER_BACKENDS_BIN=${LARDER_BACKENDS_BIN:-$ROOT/target/release/larder-backends}
fi
LARDER_BACKENDS_BIN=${LARDER_BACKENDS_BIN:-$(dirname "$LARDER_BIN")/larder-backends}
BIN=$LARDER_BIN

WORK=$(mktemp -d /tmp/larder-adv.XXXXXX)
export XDG_CONFIG_HOME=$WORK/xdg-config  # larder's client config: none but the environment
declare -A SPID SURL SDATA SENV SPORT
BACKENDS_PID=""
cleanup() {
  set +e
  for n in "${!SPID[@]}"; do kill "${SPID[$n]}" 2>/dev/null; done
  for p in $(jobs -p); do [ "$p" = "$BACKENDS_PID" ] || kill "$p" 2>/dev/null; done
  exec 9>&- 2>/dev/null # EOF on larder-backends' stdin: it stops PostgreSQL and Garage
  if [ -n "$BACKENDS_PID" ]; then
    for _ in $(seq 300); do kill -0 "$BACKENDS_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  wait 2>/dev/null
  if [ "${KEEP:-0}" = 1 ]; then echo "adversarial: work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
log() { printf '[adv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
RESULTS=$WORK/results.tsv
: > "$RESULTS"
# put SETUP KEY VALUE: one cell of the table.
put() { printf '%s\t%s\t%s\n' "$2" "$1" "$3" >> "$RESULTS"; }
VIOLATIONS=$WORK/violations
: > "$VIOLATIONS"
violation() { printf '%s\n' "$*" >> "$VIOLATIONS"; log "VIOLATION: $*"; }

# ---------------------------------------------------------------- the Python side
cat > "$WORK/adv.py" <<'PY'
import sys, os, json, time, hashlib, socket, selectors, random, subprocess, threading, http.client
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

A = '0123456789abcdfghijklmnpqrsvwxyz'
def nix32(b):
    n = (len(b) * 8 - 1) // 5 + 1; out = []
    for k in range(n - 1, -1, -1):
        bit = k * 5; i, j = bit // 8, bit % 8
        c = (b[i] >> j) | ((b[i + 1] << (8 - j)) if i + 1 < len(b) else 0); out.append(A[c & 31])
    return ''.join(out)

_local = threading.local()
def request(url, method='GET', headers=None, body=None, timeout=60):
    """(status, headers dict, body bytes); a connection per thread and host, kept alive."""
    u = urllib.parse.urlsplit(url)
    key = u.netloc
    conns = getattr(_local, 'conns', None)
    if conns is None: conns = _local.conns = {}
    for attempt in (0, 1):
        c = conns.get(key)
        if c is None: c = conns[key] = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        try:
            c.request(method, u.path + (('?' + u.query) if u.query else ''), body=body, headers=headers or {})
            r = c.getresponse(); data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        except (http.client.HTTPException, OSError):
            c.close(); conns.pop(key, None)
            if attempt: raise

def list_paths(base, cache, token):
    paths, cursor = [], None
    while True:
        q = 'limit=1000' + (f'&cursor={urllib.parse.quote(cursor)}' if cursor else '')
        st, _, body = request(f'{base}/api/v1/caches/{cache}/paths?{q}', headers={'Authorization': f'Bearer {token}'})
        if st != 200: raise SystemExit(f'listing {cache}: {st} {body[:200]!r}')
        page = json.loads(body); paths += page['paths']; cursor = page['next_cursor']
        if not cursor: return paths

def parse_narinfo(text):
    d = {}
    for line in text.decode().splitlines():
        if ': ' in line: k, v = line.split(': ', 1); d.setdefault(k, v)
    return d

def decompress(data, comp):
    if comp == 'none': return data
    tool = {'zstd': ['zstd', '-dcq'], 'xz': ['xz', '-dc']}[comp]
    return subprocess.run(tool, input=data, stdout=subprocess.PIPE, check=True).stdout

def cmd_check(a):
    """Invariant check through HTTP; prints one JSON object."""
    base, cache, token, statef = a[0], a[1], a[2], a[3]
    others = [x for x in a[4].split(',') if x] if len(a) > 4 else []
    full = len(a) > 5 and a[5] == 'full'
    verified = set(json.load(open(statef))) if os.path.exists(statef) else set()
    listed = list_paths(base, cache, token)
    hashes = {p['hash'] for p in listed}
    res = dict(paths=len(listed), narinfo_missing=0, other_narinfo_missing=0, ref_missing=0,
               nar_bad=0, nar_full=0, nar_ranged=0, details=[])
    lock = threading.Lock()
    def bad(kind, what):
        with lock:
            res[kind] += 1
            if len(res['details']) < 10: res['details'].append(f'{kind}: {what}')
    def one(p):
        h = p['hash']
        st, _, body = request(f'{base}/{cache}/{h}.narinfo')
        if st != 200: return bad('narinfo_missing', f"{p['store_path']} {st}")
        for o in others:
            st2, _, _ = request(f'{o}/{cache}/{h}.narinfo')
            if st2 != 200: bad('other_narinfo_missing', f"{o} {p['store_path']} {st2}")
        ni = parse_narinfo(body)
        for r in ni.get('References', '').split():
            if r[:32] not in hashes:
                st3, _, _ = request(f'{base}/{cache}/{r[:32]}.narinfo')
                if st3 != 200: bad('ref_missing', f"{p['store_path']} -> {r} {st3}")
        url = ni['URL']; fsize = int(ni['FileSize']); key = url + ' ' + ni['FileHash']
        if key in verified and not full:
            st, hd, data = request(f'{base}/{cache}/{url}', headers={'Range': 'bytes=0-0'})
            total = hd.get('content-range', '').rsplit('/', 1)[-1]
            if st != 206 or len(data) != 1 or total != str(fsize):
                bad('nar_bad', f"{url}: range {st} {hd.get('content-range')} FileSize {fsize}")
            with lock: res['nar_ranged'] += 1
            return
        st, _, data = request(f'{base}/{cache}/{url}', timeout=300)
        errs = []
        if st != 200: errs.append(f'status {st}')
        else:
            if len(data) != fsize: errs.append(f'FileSize {len(data)} != {fsize}')
            if 'sha256:' + nix32(hashlib.sha256(data).digest()) != ni['FileHash']: errs.append('FileHash')
            try:
                nar = decompress(data, ni.get('Compression', 'bzip2'))
                if len(nar) != int(ni['NarSize']): errs.append(f"NarSize {len(nar)} != {ni['NarSize']}")
                if 'sha256:' + nix32(hashlib.sha256(nar).digest()) != ni['NarHash']: errs.append('NarHash')
            except Exception as e: errs.append(f'decompress: {e}')
        if errs: return bad('nar_bad', f"{p['store_path']} {url}: {', '.join(errs)}")
        with lock: res['nar_full'] += 1; verified.add(key)
    with ThreadPoolExecutor(8) as ex: list(ex.map(one, listed))
    json.dump(sorted(verified), open(statef, 'w'))
    print(json.dumps(res))

def cmd_urls(a):
    """URL paths of every narinfo and every NAR up to MAX bytes of a cache (for readers)."""
    base, cache, token, out, maxb = a[0], a[1], a[2], a[3], int(a[4])
    urls = []
    for p in list_paths(base, cache, token):
        st, _, body = request(f"{base}/{cache}/{p['hash']}.narinfo")
        if st != 200: continue
        ni = parse_narinfo(body); urls.append(f"/{cache}/{p['hash']}.narinfo")
        if int(ni['FileSize']) <= maxb: urls.append(f"/{cache}/{ni['URL']}")
    open(out, 'w').write('\n'.join(urls) + '\n')
    print(len(urls))

def cmd_evreader(a):
    """During eviction: fetch a listed path's narinfo, then its NAR; a served narinfo whose NAR
    is not served (or short) is a violation."""
    base, cache, token, stop, out = a
    r = dict(narinfos=0, narinfo_gone=0, nars=0, nar_missing=0, details=[])
    while not os.path.exists(stop):
        try: listed = list_paths(base, cache, token)
        except SystemExit: time.sleep(0.2); continue
        if not listed: time.sleep(0.1); continue
        for p in random.sample(listed, min(10, len(listed))):
            st, _, body = request(f"{base}/{cache}/{p['hash']}.narinfo")
            if st != 200: r['narinfo_gone'] += 1; continue
            r['narinfos'] += 1
            ni = parse_narinfo(body)
            st, _, data = request(f"{base}/{cache}/{ni['URL']}", timeout=120)
            r['nars'] += 1
            if st != 200 or len(data) != int(ni['FileSize']):
                r['nar_missing'] += 1
                if len(r['details']) < 10: r['details'].append(f"{p['store_path']} {ni['URL']} {st} {len(data)}")
    json.dump(r, open(out, 'w'))

def pct(xs, p):
    if not xs: return float('nan')
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def cmd_client(a):
    """One request per new connection, sequentially, for SECS: latency percentiles and errors."""
    base, urlsf, secs, out = a[0], a[1], float(a[2]), a[3]
    urls = open(urlsf).read().split()
    u = urllib.parse.urlsplit(base)
    lat, errors, details = [], 0, []
    end = time.time() + secs; i = 0
    while time.time() < end:
        path = urls[i % len(urls)]; i += 1
        t = time.monotonic()
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
            c.request('GET', path); r = c.getresponse(); r.read(); c.close()
            if r.status != 200: errors += 1; details.append(f'{path} {r.status}')
        except Exception as e:
            errors += 1; details.append(f'{path} {type(e).__name__}: {e}')
        lat.append((time.monotonic() - t) * 1000)
    json.dump(dict(requests=len(lat), errors=errors, p50=pct(lat, 50), p99=pct(lat, 99),
                   max=max(lat) if lat else 0, details=details[:5]), open(out, 'w'))

def cmd_idle(a):
    """Hold N connections that sent half a request line; reopen any the server closes."""
    host, port, n, secs, out, ready = a[0], int(a[1]), int(a[2]), float(a[3]), a[4], a[5]
    nbodies, token, cache = int(a[6]), a[7], a[8]
    sel = selectors.DefaultSelector()
    st = dict(opened=0, connect_errors=0, closed_by_server=0, open_min=None, open_end=0,
              bodies=nbodies, bodies_closed=0, bodies_closed_after=[])
    # Authenticated uploads that send their head and 4 bytes of a 1 MiB body, then nothing
    # (what Nix 2.8's body-less PUT retry looks like to the server).
    t0 = time.time()
    bodies = []
    for i in range(nbodies):
        fh = random.choice('01') + ''.join(random.choice(A) for _ in range(51))  # a valid SHA-256 in nix32
        b = socket.create_connection((host, port), timeout=3)
        b.send(f'PUT /{cache}/nar/{fh}.nar.zst HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n'
               f'Content-Type: application/x-nix-nar\r\nContent-Length: 1048576\r\n\r\n'.encode() + b'\x28\xb5\x2f\xfd')
        b.setblocking(False); sel.register(b, selectors.EVENT_READ, -1 - i); bodies.append(b)
    socks = {}
    def open_one(slot):
        s = socket.socket(); s.settimeout(3)
        try:
            s.bind((f'127.0.0.{2 + slot // 200}', 0)); s.connect((host, port)); s.send(b'GET /')
        except OSError:
            st['connect_errors'] += 1; s.close(); return
        s.setblocking(False); sel.register(s, selectors.EVENT_READ, slot); socks[slot] = s
        st['opened'] += 1
    for slot in range(n): open_one(slot)
    open(ready, 'w').write(str(len(socks)))
    end = time.time() + secs
    while time.time() < end:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try: data = s.recv(4096)
            except OSError: data = b''
            if key.data < 0:
                if not data:
                    sel.unregister(s); s.close(); st['bodies_closed'] += 1
                    st['bodies_closed_after'].append(round(time.time() - t0, 1))
                continue
            if not data:
                sel.unregister(s); s.close(); socks.pop(key.data, None); st['closed_by_server'] += 1
        cur = len(socks)
        st['open_min'] = cur if st['open_min'] is None else min(st['open_min'], cur)
        for slot in range(n):
            if slot not in socks: open_one(slot)
    st['open_end'] = len(socks)
    json.dump(st, open(out, 'w'))

def s(b): return len(b).to_bytes(8, 'little') + b + b'\0' * ((8 - len(b) % 8) % 8)

def cmd_bomb_entries(a):
    """A NAR of one directory with N empty files, zstd-compressed into OUT; prints its metadata."""
    n, out = int(a[0]), a[1]
    z = subprocess.Popen(['zstd', '-q', '-3', '-T2', '-o', out, '-f'], stdin=subprocess.PIPE)
    h = hashlib.sha256(); size = 0
    def w(b):
        nonlocal size; h.update(b); size += len(b); z.stdin.write(b)
    w(s(b'nix-archive-1') + s(b'(') + s(b'type') + s(b'directory'))
    pre = s(b'entry') + s(b'(') + s(b'name')
    post = s(b'node') + s(b'(') + s(b'type') + s(b'regular') + s(b'contents') + s(b'') + s(b')') + s(b')')
    width = max(8, len(str(n)))
    batch = []
    for i in range(n):
        batch.append(pre + s(str(i).zfill(width).encode()) + post)
        if len(batch) == 20000: w(b''.join(batch)); batch = []
    w(b''.join(batch) + s(b')'))
    z.stdin.close(); z.wait()
    data = open(out, 'rb').read()
    print(json.dumps(dict(nar_hash='sha256:' + nix32(h.digest()), nar_size=size,
        file_hash='sha256:' + nix32(hashlib.sha256(data).digest()), file_size=len(data))))

def cmd_bomb_zeros(a):
    """A NAR of one regular file of GIB GiB of zeros, zstd-compressed into OUT (NarHash not computed)."""
    gib, out = int(a[0]), a[1]
    z = subprocess.Popen(['zstd', '-q', '-19', '--long=27', '-T2', '-o', out, '-f'], stdin=subprocess.PIPE)
    total = gib << 30
    z.stdin.write(s(b'nix-archive-1') + s(b'(') + s(b'type') + s(b'regular') + s(b'contents') + total.to_bytes(8, 'little'))
    zero = bytes(8 << 20)
    for _ in range(total // len(zero)): z.stdin.write(zero)
    z.stdin.write(s(b')')); z.stdin.close(); z.wait()
    data = open(out, 'rb').read()
    print(json.dumps(dict(nar_size=total + 14 * 8, file_hash='sha256:' + nix32(hashlib.sha256(data).digest()),
                          file_size=len(data))))

def cmd_peak(a):
    """Peak VmRSS (MiB) of PIDs (comma-separated, summed) until STOP exists, sampled every 50 ms."""
    pids, stop = a[0].split(','), a[1]
    peak = 0
    while True:
        tot = 0
        for p in pids:
            try:
                for line in open(f'/proc/{p}/status'):
                    if line.startswith('VmRSS:'): tot += int(line.split()[1])
            except OSError: pass
        peak = max(peak, tot)
        if os.path.exists(stop): break
        time.sleep(0.05)
    print(round(peak / 1024))

def cmd_randhash(a):
    print(''.join(random.choice(A) for _ in range(32)))

getattr(sys.modules[__name__], 'cmd_' + sys.argv[1].replace('-', '_'))(sys.argv[2:])
PY
adv() { python3 "$WORK/adv.py" "$@"; }
rss_mib() { awk '/^VmRSS:/ {printf "%d", $2/1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d[sys.argv[2]])' "$@"; }

# ---------------------------------------------------------------- servers
# start_server NAME DATA ENVFILE: `larder serve` on a port kept across restarts.
start_server() {
  local name=$1
  SDATA[$name]=$2; SENV[$name]=${3:-}; SPORT[$name]=$(free_port)
  SURL[$name]=http://127.0.0.1:${SPORT[$name]}
  restart_server "$name"
}
restart_server() {
  local name=$1 envfile=${SENV[$1]}
  ( if [ -n "$envfile" ]; then set -a; . "$envfile"; set +a; fi
    export LARDER_MAX_NAR_SIZE=$MAX_NAR_SIZE
    exec "$BIN" serve --listen "127.0.0.1:${SPORT[$name]}" --data "${SDATA[$name]}" ) >>"$WORK/serve-$name.log" 2>&1 9>&- &
  SPID[$name]=$!
  local i
  for i in $(seq 600); do
    curl -sf -o /dev/null "${SURL[$name]}/healthz" && return 0
    kill -0 "${SPID[$name]}" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$WORK/serve-$name.log" >&2; echo "adversarial: $name did not start" >&2; exit 1
}
kill9() { kill -9 "${SPID[$1]}"; wait "${SPID[$1]}" 2>/dev/null || true; }
# staging_dir NAME: where the server stages uploads (inside the directory store, or DATA/tmp).
staging_dir() { if [ "$SETUP" = embedded ]; then echo "${SDATA[$1]}/store/tmp"; else echo "${SDATA[$1]}/tmp"; fi; }
# staging_leftovers DIR: staging files (upload-*, spool-*) in DIR and its multi-part directories.
staging_leftovers() { find "$1" -maxdepth 2 -type f \( -name 'upload-*' -o -name 'spool-*' \) 2>/dev/null | wc -l; }
multipart_dirs() { find "$1" -maxdepth 1 -type d -name 'multipart-*' 2>/dev/null | wc -l; }
staging_bytes() { du -sb "$1" 2>/dev/null | cut -f1; }

api() { # METHOD PATH [JSON] → body on stdout, fails on non-2xx
  curl -sS -f -X "$1" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    ${3:+--data "$3"} "$URL_A/api/v1$2"
}

# ---------------------------------------------------------------- content
# Closures for the pushes: NUNITS independent closures of 4 paths (top → small → leaf, top →
# big: BIG_MIB random bytes, top → leaf), built once, pushed into each setup.
NUNITS=$((KILLS + EVICT_ROUNDS * 4 + 2))
log "building $NUNITS test closures of 4 paths ($BIG_MIB MiB random each)"
SALT=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat > "$WORK/units.nix" <<'EOF'
{ salt, n, bigMiB }:
let
  mk = name: script: derivation {
    name = "${name}-${salt}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" ("export PATH=/bin:/usr/bin; set -e; " + script) ];
  };
  unit = i: let
    s = toString i;
    leaf = mk "adv-leaf-${s}" "echo leaf ${s} > $out";
    small = mk "adv-small-${s}" ''mkdir -p $out; j=0; while [ $j -lt 20 ]; do echo "file $j ${leaf}" > $out/f$j; j=$((j+1)); done'';
    big = mk "adv-big-${s}" "head -c ${toString bigMiB}M /dev/urandom > $out";
  in mk "adv-top-${s}" "mkdir -p $out; echo ${leaf} ${small} ${big} > $out/refs";
in builtins.genList unit n
EOF
T0=$(date +%s)
nix-build "$WORK/units.nix" --argstr salt "$SALT" --arg n "$NUNITS" --arg bigMiB "$BIG_MIB" \
  --no-out-link -j2 > "$WORK/units" 2>"$WORK/units-build.log" || { tail "$WORK/units-build.log" >&2; exit 1; }
mapfile -t UNITS < "$WORK/units"
log "built in $(( $(date +%s) - T0 )) s"

log "making the bombs: $BOMB_ENTRIES empty files; $BOMB_GIB GiB of zeros"
T0=$(date +%s)
adv bomb-entries "$BOMB_ENTRIES" "$WORK/entries.nar.zst" > "$WORK/entries.json"
adv bomb-zeros "$BOMB_GIB" "$WORK/zeros.nar.zst" > "$WORK/zeros.json"
log "bombs made in $(( $(date +%s) - T0 )) s: $(cat "$WORK/entries.json"); $(cat "$WORK/zeros.json")"

# push_with METHOD REPLICA CACHE PATHS…: one push, as `larder push` or `nix copy --to`.
push_with() {
  local method=$1 name=$2 cache=$3; shift 3
  if [ "$method" = larder ]; then
    LARDER_SERVER=${SURL[$name]} LARDER_TOKEN=$ADMIN timeout 300 "$BIN" push "$cache" --part-size "$PART_SIZE" "$@"
  else
    XDG_CACHE_HOME=$(mktemp -d "$WORK/xdg.XXXXXX") timeout 300 nix copy --option netrc-file "$WORK/netrc" \
      --to "${SURL[$name]}/$cache?compression=zstd" "$@"
  fi
}

# check LABEL CACHE [full]: the invariant check (HTTP through the first replica, narinfos also
# through the other; database); violations are recorded. Sets CHECK_PATHS.
check() {
  local label=$1 cache=$2 mode=${3:-} others="" out
  [ "$SETUP" = embedded ] || others=${SURL[B]}
  out=$(adv check "$URL_A" "$cache" "$ADMIN" "$WORK/verified-$SETUP" "$others" "$mode") \
    || { violation "$SETUP $label: the check failed to run"; return; }
  echo "$out" >> "$WORK/checks-$SETUP.jsonl"
  CHECK_PATHS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["paths"])' "$out")
  local bad; bad=$(python3 -c '
import json, sys; d = json.loads(sys.argv[1])
n = sum(d[k] for k in ("narinfo_missing", "other_narinfo_missing", "ref_missing", "nar_bad"))
print(n, "; ".join(d["details"]) if n else "")' "$out")
  if [ "${bad%% *}" != 0 ]; then violation "$SETUP $label: HTTP: $bad"; fi
  local db
  db=$(db_check) || { violation "$SETUP $label: the database check failed to run"; return; }
  [ "$db" = "0 0 0" ] || violation "$SETUP $label: database: paths without chunks, dangling references, missing chunk objects = $db"
}
DB_SQL_NOCHUNK="SELECT count(*) FROM paths p WHERE NOT EXISTS (SELECT 1 FROM nar_chunks nc JOIN chunks c ON c.chunk_hash = nc.chunk_hash WHERE nc.nar_id = p.nar_id)"
DB_SQL_DANGLING="SELECT count(*) FROM path_refs r JOIN paths q ON q.cache_id = r.cache_id AND q.hash = r.referrer WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.cache_id = r.cache_id AND p.hash = r.ref_hash)"
DB_SQL_CHUNKS="SELECT DISTINCT c.chunk_hash, c.file_size FROM paths p JOIN nar_chunks nc ON nc.nar_id = p.nar_id JOIN chunks c ON c.chunk_hash = nc.chunk_hash"
sql() {
  if [ "$SETUP" = embedded ]; then sqlite3 -readonly -separator ' ' "file:${SDATA[A]}/larder.db?mode=ro" "$1"
  else psql -qtAX -F ' ' "$PGURL" -c "$1"; fi
}
db_check() {
  local nochunk dangling missing=0 h sz f
  nochunk=$(sql "$DB_SQL_NOCHUNK") && dangling=$(sql "$DB_SQL_DANGLING") || return 1
  if [ "$SETUP" = embedded ]; then
    # one process for every chunk (a stat per chunk from bash took a minute at 40 000 chunks)
    missing=$(sql "$DB_SQL_CHUNKS" | python3 -c '
import os, sys
root, n = sys.argv[1], 0
for line in sys.stdin:
    h, size = line.split()
    try: n += os.stat(f"{root}/{h[:2]}/{h}").st_size != int(size)
    except OSError: n += 1
print(n)' "${SDATA[A]}/store/objects/chunk") || return 1
  fi
  echo "$nochunk $dangling $missing"
}

# ---------------------------------------------------------------- experiments
exp_kills() {
  local cache=kill r name method delay mid=0 inflight=0 dir stuck=0 stuck_what="" pushfail=0 leftover_max=0 wait_max=0 T0 pid
  api POST /caches '{"name":"kill"}' >/dev/null
  # How long each kind of push takes here (the two spare closures, into a cache of their own):
  # kills land uniformly within that time, unless KILL_MAX_MS says otherwise.
  declare -A maxms
  api POST /caches '{"name":"warm"}' >/dev/null
  local spare=1
  for method in larder nix; do
    T0=$(date +%s%N)
    push_with "$method" A warm "${UNITS[$((NUNITS - spare))]}" >>"$WORK/push-$SETUP.log" 2>&1
    maxms[$method]=${KILL_MAX_MS:-$(( ($(date +%s%N) - T0) / 1000000 ))}
    spare=2
  done
  log "$SETUP: a push takes ${maxms[larder]} ms (larder push), ${maxms[nix]} ms (nix copy): kills within that"
  put "$SETUP" "kills: one push takes (larder push, nix copy)" "${maxms[larder]} ms, ${maxms[nix]} ms"
  T0=$(date +%s)
  for r in $(seq "$KILLS"); do
    name=A; method=larder
    if [ "$SETUP" = embedded ]; then [ $((r % 2)) = 0 ] && method=nix
    else [ $((r % 2)) = 0 ] && name=B; [ $(((r / 2) % 2)) = 1 ] && method=nix; fi
    delay=$((RANDOM % maxms[$method]))
    local tp; tp=$(date +%s)
    push_with "$method" "$name" "$cache" "${UNITS[$((r - 1))]}" >>"$WORK/push-$SETUP.log" 2>&1 &
    pid=$!
    sleep "$(awk "BEGIN{print $delay / 1000}")"
    if kill -0 "$pid" 2>/dev/null; then mid=$((mid + 1)); fi
    kill9 "$name"
    dir=$(staging_dir "$name")
    [ "$(staging_leftovers "$dir")" = 0 ] || inflight=$((inflight + 1))
    restart_server "$name"
    wait "$pid" || pushfail=$((pushfail + 1))
    if [ $(( $(date +%s) - tp )) -ge 5 ]; then stuck=$((stuck + 1)); stuck_what+=" $r:$method"; fi
    # staging back to empty: the sweep runs at the replica's first background tick
    local n t=0
    while n=$(staging_leftovers "$dir"); [ "$n" != 0 ] && [ $t -lt $((STAGING_WAIT * 10)) ]; do sleep 0.1; t=$((t + 1)); done
    [ $t -gt "$wait_max" ] && wait_max=$t
    if [ "$n" != 0 ]; then
      violation "$SETUP kill $r: $n staging files left in $dir $STAGING_WAIT s after the restart: $(find "$dir" -maxdepth 2 -type f \( -name 'upload-*' -o -name 'spool-*' \) | head -3 | xargs -n1 basename | tr '\n' ' ')"
      leftover_max=$((n > leftover_max ? n : leftover_max))
    fi
    check "kill $r ($method via $name, ${delay} ms)" "$cache"
    [ $((r % 10)) = 0 ] && log "$SETUP: $r/$KILLS kills, $CHECK_PATHS paths, $mid mid-push"
  done
  check "after $KILLS kills (full download)" "$cache" full
  local secs=$(( $(date +%s) - T0 )) sdir mp=0 mpb=0
  for name in A ${REPL_B:+B}; do
    sdir=$(staging_dir "$name"); mp=$((mp + $(multipart_dirs "$sdir"))); mpb=$((mpb + $(staging_bytes "$sdir")))
  done
  put "$SETUP" "kills: kill -9 mid-push (of N)" "$mid of $KILLS"
  put "$SETUP" "kills: kills leaving staging files (upload in flight)" "$inflight"
  put "$SETUP" "kills: pushes that failed (client retries)" "$pushfail"
  put "$SETUP" "kills: pushes stuck ≥ 5 s (stall timeout)" "$stuck${stuck_what:+ (round:client$stuck_what)}"
  put "$SETUP" "kills: paths published at the end" "$CHECK_PATHS"
  put "$SETUP" "kills: invariant violations" "$(grep -c "^$SETUP kill" "$VIOLATIONS" || true)"
  put "$SETUP" "kills: staging files left (max)" "$leftover_max (swept within $(awk "BEGIN{print $wait_max/10}") s)"
  put "$SETUP" "kills: multipart uploads kept, staging bytes" "$mp dirs, $((mpb >> 20)) MiB"
  put "$SETUP" "kills: run time" "${secs} s"
}

exp_eviction() {
  local cache=evict r p a b name method T0 fails=0 pids=() st rd
  api POST /caches "{\"name\":\"evict\",\"max_size\":$EVICT_LIMIT}" >/dev/null
  T0=$(date +%s)
  local base=$KILLS
  local vb; vb=$(wc -l < "$VIOLATIONS")
  local reads=0 gone=0 nars=0
  for r in $(seq "$EVICT_ROUNDS"); do
    st=$WORK/evstop-$SETUP-$r; rd=$WORK/evread-$SETUP-$r.json
    adv evreader "$URL_A" "$cache" "$ADMIN" "$st" "$rd" & local rpid=$!
    pids=()
    for p in 0 1 2 3; do
      a=${UNITS[$((base + (r - 1) * 4 + p))]}; b=${UNITS[$((base + (r - 1) * 4 + (p + 1) % 4))]}
      method=larder; [ $((p % 2)) = 1 ] && method=nix
      name=A; [ "$SETUP" != embedded ] && [ $((p / 2)) = 1 ] && name=B
      push_with "$method" "$name" "$cache" "$a" "$b" >>"$WORK/evict-push-$SETUP.log" 2>&1 & pids+=($!)
    done
    # toggle the limit (evicting at once when lowered) and collect, while they push
    local alive=1
    while [ $alive = 1 ]; do
      api PATCH /caches/evict '{"max_size":null}' >/dev/null || true
      sleep 0.3
      api PATCH /caches/evict "{\"max_size\":$EVICT_LIMIT}" >/dev/null || true
      api POST /caches/evict/gc >/dev/null 2>&1 || true
      sleep 0.3
      alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    done
    for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
    touch "$st"; wait "$rpid" || true
    local nm; nm=$(jget "$rd" nar_missing)
    reads=$((reads + $(jget "$rd" narinfos))); nars=$((nars + $(jget "$rd" nars))); gone=$((gone + $(jget "$rd" narinfo_gone)))
    [ "$nm" = 0 ] || violation "$SETUP evict round $r: $nm NARs not served after their narinfo was: $(jget "$rd" details)"
    check "evict round $r" "$cache"
  done
  check "after eviction (full download)" "$cache" full
  put "$SETUP" "eviction: rounds × 4 overlapping pushers" "$EVICT_ROUNDS × 4, $fails pushes failed"
  # why they failed: the first error line of each kind in the pushes' output
  local why; why=$(python3 - "$WORK/evict-push-$SETUP.log" <<'PYE'
import re, sys
kinds = [('413 multipart staging bound', r'answered 413: the unfinished multi-part'),
         ('429 16 unfinished uploads', r'answered 429: cache .* unfinished multi-part'),
         ('missing_references', r'missing.references|reference .* is not valid|path\(s\) not in cache'),
         ('evicted (own closure)', r'evicted'),
         ('nix: coroutine has finished', r'coroutine has finished')]
c = {k: 0 for k, _ in kinds}; other = 0
for line in open(sys.argv[1], errors='replace'):
    if not line.startswith('error:') or 'paths failed to push' in line or 'not published: a path it references failed' in line: continue
    for k, rx in kinds:
        if re.search(rx, line): c[k] += 1; break
    else: other += 1
print(', '.join(f'{k} {v}' for k, v in c.items() if v) + (f', other {other}' if other else '') or 'none')
PYE
)
  put "$SETUP" "eviction: push errors by kind" "$why"
  # what the servers counted as rejected uploads so far (kills and eviction), by kind and reason
  local rej; rej=$(for u in "$URL_A" ${REPL_B:+"${SURL[B]}"}; do curl -sf "$u/metrics"; done | python3 -c '
import re, sys, collections
c = collections.Counter()
for m in re.finditer(r"larder_uploads_rejected_total\{kind=\"(\w+)\",reason=\"(\w+)\"\} (\d+)", sys.stdin.read()):
    c[m.group(1) + " " + m.group(2)] += int(m.group(3))
print(", ".join(f"{k} {v}" for k, v in sorted(c.items()) if v) or "none")')
  put "$SETUP" "uploads rejected (metrics, since last restart)" "$rej"
  put "$SETUP" "eviction: reader narinfos → NARs" "$reads → $nars ok ($gone narinfos already evicted)"
  put "$SETUP" "eviction: invariant violations" "$(( $(wc -l < "$VIOLATIONS") - vb ))"
  put "$SETUP" "eviction: paths left, run time" "$CHECK_PATHS, $(( $(date +%s) - T0 )) s"
}

# wrk_stats OUTFILE → "requests errors p50ms p99ms"
wrk_stats() {
  python3 - "$1" <<'PYW'
import re, sys
t = open(sys.argv[1]).read()
def ms(v):
    n, u = re.match(r'([\d.]+)(us|ms|s|m)', v).groups(); return float(n) * {'us': 1e-3, 'ms': 1, 's': 1e3, 'm': 6e4}[u]
req = int(re.search(r'(\d+) requests in', t).group(1))
err = sum(int(x) for x in re.findall(r'(?:connect|read|write|timeout) (\d+)', t))
m = re.search(r'Non-2xx or 3xx responses: (\d+)', t); err += int(m.group(1)) if m else 0
p50 = ms(re.search(r'^\s+50%\s+(\S+)', t, re.M).group(1)); p99 = ms(re.search(r'^\s+99%\s+(\S+)', t, re.M).group(1))
print(req, err, round(p50, 2), round(p99, 2))
PYW
}

exp_load() {
  local n urls T0 deadline i pids=() wpids=()
  n=$(adv urls "$URL_A" kill "$ADMIN" "$WORK/readurls" 1048576)
  { echo 'local paths = {'; sed 's/.*/"&",/' "$WORK/readurls"; echo '}'
    echo 'local i = math.random(#paths)'
    echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$WORK/read.lua"
  local spids=${SPID[A]}${REPL_B:+,${SPID[B]}}
  local rss0a rss0b="" ; rss0a=$(rss_mib "${SPID[A]}"); [ -n "${REPL_B:-}" ] && rss0b=$(rss_mib "${SPID[B]}")
  T0=$(date +%s); deadline=$((T0 + READ_SECS))
  if [ -n "${REPL_B:-}" ]; then
    wrk -t1 -c$((READERS / 2)) -d"${READ_SECS}s" --timeout 10s --latency -s "$WORK/read.lua" "$URL_A" > "$WORK/wrk-$SETUP-A" 2>&1 & wpids+=($!)
    wrk -t1 -c$((READERS - READERS / 2)) -d"${READ_SECS}s" --timeout 10s --latency -s "$WORK/read.lua" "${SURL[B]}" > "$WORK/wrk-$SETUP-B" 2>&1 & wpids+=($!)
  else
    wrk -t2 -c"$READERS" -d"${READ_SECS}s" --timeout 10s --latency -s "$WORK/read.lua" "$URL_A" > "$WORK/wrk-$SETUP-A" 2>&1 & wpids+=($!)
  fi
  for i in $(seq "$PUSHERS"); do
    ( ok=0 fail=0 k=0; name=A; [ -n "${REPL_B:-}" ] && [ $((i % 2)) = 0 ] && name=B
      while [ "$(date +%s)" -lt "$deadline" ]; do
        k=$((k + 1)); c=load-$i-$k
        method=larder; [ $((k % 2)) = 0 ] && method=nix
        if api POST /caches "{\"name\":\"$c\"}" >/dev/null && push_with "$method" "$name" "$c" "${UNITS[$(((i * 7 + k) % KILLS))]}" >>"$WORK/load-push-$SETUP.log" 2>&1
        then ok=$((ok + 1)); else fail=$((fail + 1)); fi
      done
      echo "$ok $fail" > "$WORK/pusher-$SETUP-$i" ) & pids+=($!)
  done
  for i in "${wpids[@]}" "${pids[@]}"; do wait "$i" || true; done
  local rss1a rss1b=""; rss1a=$(rss_mib "${SPID[A]}"); [ -n "${REPL_B:-}" ] && rss1b=$(rss_mib "${SPID[B]}")
  local sa sb="" ok=0 fail=0
  sa=$(wrk_stats "$WORK/wrk-$SETUP-A") || { cat "$WORK/wrk-$SETUP-A" >&2; violation "$SETUP load: wrk failed"; return; }
  [ -n "${REPL_B:-}" ] && sb=$(wrk_stats "$WORK/wrk-$SETUP-B")
  for i in $(seq "$PUSHERS"); do read -r a b < "$WORK/pusher-$SETUP-$i"; ok=$((ok + a)); fail=$((fail + b)); done
  set -- $sa; local req=$1 err=$2 p50=$3 p99=$4
  local lat="p50 $p50, p99 $p99"
  if [ -n "$sb" ]; then set -- $sb; req="$req + $1"; err="$err + $2"; lat="A: $lat; B: p50 $3, p99 $4"; fi
  put "$SETUP" "load: $READERS readers × ${READ_SECS} s: requests" "$req ($n URLs: narinfos, NARs ≤ 1 MiB)"
  put "$SETUP" "load: read errors" "$err"
  put "$SETUP" "load: read latency (ms)" "$lat"
  put "$SETUP" "load: $PUSHERS pushers: pushes ok, failed" "$ok, $fail"
  put "$SETUP" "load: server RSS start → end (MiB)" "${REPL_B:+A: }$rss0a → $rss1a${REPL_B:+; B: $rss0b → $rss1b}"
  [ "$(( ${err// /} ))" = 0 ] || violation "$SETUP load: $err read errors"
  [ "$fail" = 0 ] || violation "$SETUP load: $fail pushes failed under load (see load-push-$SETUP.log)"
}

exp_idle() {
  local port=${SPORT[A]} ready=$WORK/idle-ready-$SETUP hp
  rm -f "$ready"
  adv idle 127.0.0.1 "$port" "$IDLE_CONNS" "$IDLE_SECS" "$WORK/idle-$SETUP.json" "$ready" "$IDLE_BODIES" "$ADMIN" kill & hp=$!
  for _ in $(seq 600); do [ -f "$ready" ] && break; sleep 0.1; done
  local rss; rss=$(rss_mib "${SPID[A]}")
  adv client "$URL_A" "$WORK/readurls" "$IDLE_SECS" "$WORK/idle-client-$SETUP.json"
  wait "$hp" || true
  local c=$WORK/idle-client-$SETUP.json h=$WORK/idle-$SETUP.json
  put "$SETUP" "idle: connections held (opened at start)" "$IDLE_CONNS ($(cat "$ready")), ${IDLE_SECS} s"
  put "$SETUP" "idle: closed by server, reopened; open at end" "$(jget "$h" closed_by_server), $(jget "$h" open_end) (connect errors $(jget "$h" connect_errors))"
  put "$SETUP" "idle: stalled upload bodies closed by server" "$(jget "$h" bodies_closed) of $IDLE_BODIES in ${IDLE_SECS} s"
  put "$SETUP" "idle: client requests, errors" "$(jget "$c" requests), $(jget "$c" errors)"
  put "$SETUP" "idle: client p50 / p99 / max (ms)" "$(printf '%.1f / %.1f / %.1f' "$(jget "$c" p50)" "$(jget "$c" p99)" "$(jget "$c" max)")"
  put "$SETUP" "idle: server RSS with them (MiB)" "$rss → $(rss_mib "${SPID[A]}")"
  [ "$(jget "$c" errors)" = 0 ] || violation "$SETUP idle: client errors: $(jget "$c" details)"
}

exp_entry_bomb() {
  local meta=$WORK/entries.json fh fs nh ns h name=entries stop pk T0 code ms
  fh=$(jget "$meta" file_hash); fs=$(jget "$meta" file_size); nh=$(jget "$meta" nar_hash); ns=$(jget "$meta" nar_size)
  h=$(adv randhash)
  api POST /caches '{"name":"bomb"}' >/dev/null
  local file=${fh#sha256:}.nar.zst
  stop=$WORK/peakstop-$SETUP-1; rm -f "$stop"
  local rss0; rss0=$(rss_mib "${SPID[A]}")
  adv peak "${SPID[A]}" "$stop" > "$WORK/peak-$SETUP-1" & pk=$!
  T0=$(date +%s.%N)
  code=$(curl -sS -o "$WORK/entries-put.out" -w '%{http_code}' -u "x:$ADMIN" -T "$WORK/entries.nar.zst" \
    -H 'Content-Type: application/x-nix-nar' "$URL_A/bomb/nar/$file")
  printf 'StorePath: /nix/store/%s-entry-bomb\nURL: nar/%s\nCompression: zstd\nFileHash: %s\nFileSize: %s\nNarHash: %s\nNarSize: %s\nReferences: \n' \
    "$h" "$file" "$fh" "$fs" "$nh" "$ns" > "$WORK/entries.narinfo"
  local code2; code2=$(curl -sS -o "$WORK/entries-ni.out" -w '%{http_code}' -u "x:$ADMIN" -X PUT --data-binary @"$WORK/entries.narinfo" \
    -H 'Content-Type: text/x-nix-narinfo' "$URL_A/bomb/$h.narinfo")
  ms=$(python3 -c "import time; print(round(time.time() - $T0, 1))")
  touch "$stop"; wait "$pk"
  put "$SETUP" "entry bomb: $BOMB_ENTRIES entries, $((fs >> 10)) KiB zstd, $((ns >> 20)) MiB NAR" "PUT nar $code, narinfo $code2 in ${ms} s"
  put "$SETUP" "entry bomb: peak RSS during ingest (MiB)" "$rss0 → $(cat "$WORK/peak-$SETUP-1")"
  if [ "$code2" != 200 ] && [ "$code2" != 201 ] && [ "$code2" != 204 ]; then
    violation "$SETUP entry bomb: not published ($code $(head -c 300 "$WORK/entries-put.out"); $code2 $(head -c 300 "$WORK/entries-ni.out"))"; return
  fi
  # 4 concurrent anonymous GET …/H.ls
  stop=$WORK/peakstop-$SETUP-2; rm -f "$stop"; rss0=$(rss_mib "${SPID[A]}")
  adv peak "${SPID[A]}" "$stop" > "$WORK/peak-$SETUP-2" & pk=$!
  local i pids=() target
  for i in 1 2 3 4; do
    target=$URL_A; [ -n "${REPL_B:-}" ] && [ $((i % 2)) = 0 ] && target=${SURL[B]}
    curl -sS -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' "$target/bomb/$h.ls" > "$WORK/ls-$SETUP-$i" & pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || true; done
  touch "$stop"; wait "$pk"
  local res; res=$(cat "$WORK"/ls-"$SETUP"-* | awk '{c[$1]++; if ($3 > t) t = $3; b = $2} END {for (k in c) printf "%s×%s ", c[k], k; printf "%d MiB each, slowest %.1f s", b / 1048576, t}')
  put "$SETUP" "entry bomb: 4 concurrent GET .ls" "$res"
  put "$SETUP" "entry bomb: peak RSS during .ls (MiB)" "$rss0 → $(cat "$WORK/peak-$SETUP-2")"
}

exp_zip_bomb() {
  local meta=$WORK/zeros.json fh fs T0 c0 c1 code t
  fh=$(jget "$meta" file_hash); fs=$(jget "$meta" file_size)
  c0=$(cpu_ticks "${SPID[A]}")
  local r; r=$(curl -sS -o "$WORK/zeros-put.out" -w '%{http_code} %{time_total}' -u "x:$ADMIN" -T "$WORK/zeros.nar.zst" \
    -H 'Content-Type: application/x-nix-nar' "$URL_A/bomb/nar/${fh#sha256:}.nar.zst") || true
  c1=$(cpu_ticks "${SPID[A]}")
  code=${r%% *}; t=${r#* }
  put "$SETUP" "zip bomb: $((fs >> 10)) KiB zstd → $BOMB_GIB GiB (max_nar_size $MAX_NAR_SIZE)" "$code in $(printf '%.1f' "$t") s, server CPU $(awk "BEGIN{printf \"%.1f\", ($c1 - $c0) / $(getconf CLK_TCK)}") s"
  [ "$code" = 413 ] || violation "$SETUP zip bomb: answered $code, not 413: $(head -c 300 "$WORK/zeros-put.out")"
}

run_setup() {
  SETUP=$1
  local T0; T0=$(date +%s)
  SPID=(); REPL_B=""
  if [ "$SETUP" = embedded ]; then
    start_server A "$WORK/data-emb-A" ""
    ADMIN=$(cat "$WORK/data-emb-A/admin-token")
  else
    mkfifo "$WORK/backends.stdin"
    "$LARDER_BACKENDS_BIN" <"$WORK/backends.stdin" >"$WORK/backends.env" 2>"$WORK/backends.log" &
    BACKENDS_PID=$!
    exec 9>"$WORK/backends.stdin" # held open: the backends live until this script exits
    for _ in $(seq 600); do grep -q AWS_SECRET_ACCESS_KEY "$WORK/backends.env" 2>/dev/null && break; sleep 0.1; done
    grep -q AWS_SECRET_ACCESS_KEY "$WORK/backends.env" || { cat "$WORK/backends.log" >&2; exit 1; }
    PGURL=$( set -a; . "$WORK/backends.env"; echo "$LARDER_DATABASE")
    # A first (it writes the admin token), then B on the same database and bucket
    start_server A "$WORK/data-pg-A" "$WORK/backends.env"
    start_server B "$WORK/data-pg-B" "$WORK/backends.env"
    REPL_B=1
    ADMIN=$(cat "$WORK/data-pg-A/admin-token")
  fi
  URL_A=${SURL[A]}
  printf 'machine 127.0.0.1 login x password %s\n' "$ADMIN" > "$WORK/netrc"
  log "== $SETUP: kills ($KILLS)"; exp_kills
  log "== $SETUP: eviction ($EVICT_ROUNDS rounds)"; exp_eviction
  log "== $SETUP: load ($READERS readers + $PUSHERS pushers, $READ_SECS s)"; exp_load
  log "== $SETUP: idle connections ($IDLE_CONNS, $IDLE_SECS s)"; exp_idle
  log "== $SETUP: entry bomb ($BOMB_ENTRIES)"; exp_entry_bomb
  log "== $SETUP: decompression bomb ($BOMB_GIB GiB)"; exp_zip_bomb
  put "$SETUP" "setup run time" "$(( $(date +%s) - T0 )) s"
  for n in "${!SPID[@]}"; do kill "${SPID[$n]}" 2>/dev/null || true; wait "${SPID[$n]}" 2>/dev/null || true; done
  SPID=()
}

TSTART=$(date +%s)
for s in $SETUPS; do run_setup "$s"; done

echo
echo "larder adversarial figures ($(date -u +%F), QUICK=$QUICK, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); timings depend on the machine's load)"
python3 - "$RESULTS" "$SETUPS" <<'PYT'
import sys
rows, setups = {}, sys.argv[2].split()
order = []
for line in open(sys.argv[1]):
    k, s, v = line.rstrip('\n').split('\t')
    if k not in rows: rows[k] = {}; order.append(k)
    rows[k][s] = v
names = {'embedded': 'embedded (SQLite + dir)', 'scaled': 'PostgreSQL + Garage, 2 replicas'}
w = max(len(k) for k in order)
print('| ' + 'figure'.ljust(w) + ' | ' + ' | '.join(names[s] for s in setups) + ' |')
print('|' + '-' * (w + 2) + '|' + '|'.join('-' * (len(names[s]) + 2) for s in setups) + '|')
for k in order:
    print('| ' + k.ljust(w) + ' | ' + ' | '.join(rows[k].get(s, '—') for s in setups) + ' |')
PYT
echo "total run time: $(( $(date +%s) - TSTART )) s"
if [ -s "$VIOLATIONS" ]; then
  echo; echo "VIOLATIONS ($(wc -l < "$VIOLATIONS")):"; cat "$VIOLATIONS"; exit 1
fi
echo "no invariant violation"
