#!/usr/bin/env bash
# End-to-end load bench: campaign-gate with auth against nginx, side by side, on loopback.
#
#   benches/load.sh
#
# What it does (everything on 127.0.0.1, every process it starts is stopped on exit):
#  1. installs what is missing from Debian (nginx-light, wrk, redis-server/redis-tools,
#     nghttp2-client for h2load, curl, python3) with apt-get;
#  2. builds campaign-gate in release mode (`cargo build --release --locked`);
#  3. starts the backend: nginx, 1 worker, `return 200 "ok"` (and, for uploads, a POST
#     location that reads the whole body before answering);
#  4. starts the peers on the same backend: nginx `proxy_pass` without auth, nginx with
#     `auth_request` to a one-line location (`return 204`), both with WORKERS worker
#     processes, upstream keep-alive, `access_log off`; and, as deployed to check keys,
#     nginx `auth_request` whose subrequest goes to an HTTP auth service (the backend's
#     `location = /auth { return 204; }`, keep-alive; `nginx_auth_service`);
#  5. starts campaign-gate with WORKERS workers (`[server] workers`; for the
#     `multi-thread` layout also TOKIO_WORKER_THREADS) in its default runtime layout
#     (GATE_RUNTIME=multi-thread for the other one) on a private redis-server when the
#     binary supports `redis://` stores, else on the `file:` store (said so);
#  6. creates API users and keys with the CLI (the 10,000 cold keys in bulk: with the
#     `file:` store by writing the store's JSON, with Redis through the CLI in parallel);
#  7. drives keep-alive load with wrk (-t THREADS -c CONNS -d DURATION, a Lua script
#     rotating 8 Authorization headers; the same script and requests for every target),
#     RUNS runs per scenario, interleaved across targets so that noise from other work on
#     the machine spreads evenly; reports medians.
# Scenarios: warm keys (backend direct, nginx proxy_pass, nginx auth_request, nginx
# auth_request to an auth service, campaign-gate), cold keys (10,000 keys each used once),
# small POSTs (a 66-byte JSON event to the events route, warm keys; nginx proxy_pass and
# auth_request, campaign-gate), every request a miss (the same keys rotated with
# cache_ttl 1 ms), invalidation storm
# (Redis only),
# h2c downstream (h2load), 10 MB upload (curl), TLS downstream (self-signed P-256 pair;
# skipped when openssl is missing or the binary has no TLS listener).
#
# Access logs are off on every proxy (nginx `access_log off`, campaign-gate
# CAMPAIGN_GATE_LOG=warn); ACCESS_LOG=1 turns them on for all (to files).
#
# Environment: RUNS (3), DURATION seconds (10), CONNS (64), THREADS wrk threads (2),
# WORKERS proxy workers (2), GATE_RUNTIME (the binary's default), ACCESS_LOG (0),
# OUT results dir (target/load-bench), SKIP_BUILD=1, KEEP=1 keeps the scratch dir,
# SCENARIOS (comma-separated, default all: warm,post,h2c,upload,storm,tls,cold,miss; e.g.
# SCENARIOS=warm for the warm-key comparison alone, which also skips making the 10,000
# cold keys), BIN_B (a second campaign-gate binary: started beside the first on the same
# store and backend, and run in the warm, cold and miss scenarios as `campaign_gate_b`, interleaved with
# it and in alternating order, for an A/B of two builds under the same noise), BIN (the
# campaign-gate binary, default the release build; with SKIP_BUILD=1 to measure a saved one).
# Results: $OUT/results.md and the raw runs beside it. The cold and miss runs on Redis
# also count Redis' CPU, and both CPU figures run to 1.5 s after the load, so that work a
# request leaves for later (the key-use writer's) is counted to the build that leaves it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-2}
ACCESS_LOG=${ACCESS_LOG:-0}
SCENARIOS=${SCENARIOS:-warm,post,h2c,upload,storm,tls,cold,miss}
BIN_B=${BIN_B:-}
want() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
GATE_RUNTIME=${GATE_RUNTIME:-}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/load-bench}
BIN=${BIN:-$TARGET_DIR/release/campaign-gate}
WARM_KEYS=8
COLD_USERS=5000 # x 2 keys each: the most a user may hold
STORM_PER_SEC=100
ROUTE=/campaignapi/resources/v3/campaigncontents/4711
UPLOAD_ROUTE=/campaignapi/resources/v3/events
UPLOAD_BYTES=10000000

log() { printf '[load.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- processes: every one we start is recorded and stopped on exit --------------------
WORK=$(mktemp -d /tmp/campaign-gate-load.XXXXXX)
STARTED=()
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ]; then log "scratch dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget() { # drop a pid we stopped ourselves from the cleanup list
  local keep=() p
  for p in "${STARTED[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
}

# ---- 1. tools ---------------------------------------------------------------------------
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
install_missing nginx:nginx-light wrk:wrk redis-server:redis-server redis-cli:redis-tools \
  h2load:nghttp2-client curl:curl python3:python3
require nginx wrk curl python3

# ---- 2. build ---------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building campaign-gate (release: lto=fat, codegen-units=1; slow the first time)"
  (cd "$ROOT" && cargo build --release --locked --bin campaign-gate) >&2
fi
[ -x "$BIN" ] || die "no binary at $BIN"
[ -z "$BIN_B" ] || [ -x "$BIN_B" ] || die "no binary at BIN_B=$BIN_B"
mkdir -p "$OUT"
rm -f "$OUT"/*.tsv "$OUT"/*.txt "$OUT"/results.md

listening() { # port, seconds
  wait_port "$1" "$2" || die "nothing listens on 127.0.0.1:$1 after $2 s"
}

CLK_TCK=$(getconf CLK_TCK)
# utime+stime (all threads) of the given pids and their children, in clock ticks.
cpu_ticks() {
  local total=0 pid p stat fields
  for pid in "$@"; do
    for p in $pid $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do
      stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
      read -r -a fields <<<"${stat##*) }" # fields from the 3rd (state) on
      total=$((total + fields[11] + fields[12]))
    done
  done
  echo "$total"
}
# utime (user space only) of the given pids and their children, in clock ticks.
user_ticks() {
  local total=0 pid p stat fields
  for pid in "$@"; do
    for p in $pid $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do
      stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
      read -r -a fields <<<"${stat##*) }"
      total=$((total + fields[11]))
    done
  done
  echo "$total"
}
status_kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }
rss_kib() { # pid and its children
  local total=0 p
  for p in $1 $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    total=$((total + $(status_kib "$p" VmRSS)))
  done
  echo "$total"
}

# ---- 3./4. backend and nginx peers -------------------------------------------------------
# All at once, each socket held until every port is chosen: one at a time, the kernel
# may hand out the same port twice.
read -r BACKEND_PORT NGX_PROXY_PORT NGX_AUTH_PORT NGX_AUTHSVC_PORT NGX_H2_PORT NGX_TLS_PORT \
  GATE_PORT GATE_ADMIN_PORT GATE_B_PORT GATE_B_ADMIN_PORT REDIS_PORT < <(free_ports 11)

nginx_conf() { # name, workers, server blocks
  local dir=$WORK/nginx-$1 user=""
  mkdir -p "$dir/tmp"
  [ "$(id -u)" = 0 ] && user="user root;"
  cat >"$dir/nginx.conf" <<EOF
$user
worker_processes $2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  $([ "$ACCESS_LOG" = 1 ] && [ "$1" != backend ] && echo "access_log $dir/access.log;" || echo "access_log off;")
  default_type text/plain;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_max_body_size 20m;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  upstream backend {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
$3
}
EOF
  echo "$dir"
}
start_nginx() { # name, workers, server blocks, port
  local dir
  dir=$(nginx_conf "$1" "$2" "$3")
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' &
  STARTED+=($!)
  eval "PID_$(echo "$1" | tr - _)=$!"
  listening "$4" 10
}

PROXY_LOCATION="proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_request_buffering off;"
# TLS material for the TLS scenario, made before nginx reads its config.
TLS_OK=0
TLS_SERVER=""
if command -v openssl >/dev/null 2>&1 &&
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" >/dev/null 2>&1; then
  TLS_OK=1
  TLS_SERVER="
  server {
    listen 127.0.0.1:$NGX_TLS_PORT ssl backlog=4096;
    ssl_certificate $WORK/tls.crt;
    ssl_certificate_key $WORK/tls.key;
    location / { $PROXY_LOCATION }
  }"
fi
start_nginx backend 1 "
  server {
    listen 127.0.0.1:$BACKEND_PORT backlog=4096;
    location / { return 200 \"ok\"; }
    # The auth service of the nginx_auth_service peer: the cheapest one possible.
    location = /auth { return 204; }
    # Uploads: read the whole body before answering, so the client's time is the upload.
    location = $UPLOAD_ROUTE {
      # A small JSON POST (the post scenario) is answered at once, as \`location /\`.
      if (\$http_content_length ~ \"^[0-9]{1,4}\$\") { return 200 \"ok\"; }
      client_body_buffer_size 16m;
      proxy_pass_request_body off;
      proxy_set_header Content-Length \"\";
      proxy_pass http://backend/ok;
    }
  }" "$BACKEND_PORT"
start_nginx proxy "$WORKERS" "
  server {
    listen 127.0.0.1:$NGX_PROXY_PORT backlog=4096;
    location / { $PROXY_LOCATION }
  }
  server {
    listen 127.0.0.1:$NGX_H2_PORT http2 backlog=4096;
    location / { $PROXY_LOCATION }
  }$TLS_SERVER" "$NGX_PROXY_PORT"
start_nginx auth "$WORKERS" "
  server {
    listen 127.0.0.1:$NGX_AUTH_PORT backlog=4096;
    location / { auth_request /_auth; $PROXY_LOCATION }
    location = /_auth { internal; return 204; }
  }
  # auth_request as deployed to check keys: the subrequest goes to an HTTP auth service
  # (here the backend's one-line \`location = /auth { return 204; }\`, over keep-alive).
  upstream authsvc {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_AUTHSVC_PORT backlog=4096;
    location / { auth_request /_auth; $PROXY_LOCATION }
    location = /_auth {
      internal;
      proxy_pass http://authsvc/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length \"\";
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }" "$NGX_AUTH_PORT"
# shellcheck disable=SC2154
log "backend :$BACKEND_PORT (pid $PID_backend), nginx proxy_pass :$NGX_PROXY_PORT, auth_request :$NGX_AUTH_PORT, auth_request to an auth service :$NGX_AUTHSVC_PORT"

# ---- 5. store and gateway -----------------------------------------------------------------
STORE_KIND=file
STORE_URL="file:$WORK/store.json"
if command -v redis-server >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
  STARTED+=($!)
  REDIS_PID=$!
  listening "$REDIS_PORT" 10
  if "$BIN" --store "redis://127.0.0.1:$REDIS_PORT/0" users list >/dev/null 2>"$WORK/redis-probe.err"; then
    STORE_KIND=redis
    STORE_URL="redis://127.0.0.1:$REDIS_PORT/0"
  else
    log "this campaign-gate has no redis:// store yet ($(head -c 200 "$WORK/redis-probe.err")): FALLING BACK TO THE file: STORE"
    kill "$REDIS_PID"
    wait "$REDIS_PID" 2>/dev/null || true
    forget "$REDIS_PID"
  fi
fi
log "store: $STORE_KIND ($STORE_URL)"

{
  cat <<EOF
[server]
listen = "127.0.0.1:$GATE_PORT"
[admin]
listen = "127.0.0.1:$GATE_ADMIN_PORT"
[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"
[store]
url = "$STORE_URL"
EOF
  sed -n '/^\[\[apis\]\]/,$p' "$ROOT/campaign-gate.example.toml"
} >"$WORK/gate.toml"
cg() { "$BIN" --config "$WORK/gate.toml" "$@"; }

# ---- 6. users and keys --------------------------------------------------------------------
log "creating users and keys"
if ! want cold && ! want miss; then
  : >"$WORK/cold_tokens.txt"
elif [ "$STORE_KIND" = file ]; then
  # Bulk: write the store file in its documented format (version 1), as the CLI would
  # leave it, with the 10,000 cold keys; the warm users are then added by the CLI.
  python3 - "$WORK/store.json" "$WORK/cold_tokens.txt" "$COLD_USERS" <<'EOF'
import base64, hashlib, json, sys, uuid
store, tokens_path, users = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = {"version": 1, "generation": 1, "users": {}}
with open(tokens_path, "w") as out:
    for u in range(users):
        keys = []
        for slot in (1, 2):
            key_id = str(uuid.uuid4())
            token = base64.b64encode(f"{key_id}:{uuid.uuid4()}".encode()).decode()
            out.write(token + "\n")
            keys.append({"hash": hashlib.sha256(token.encode()).hexdigest(), "key_id": key_id,
                         "slot": slot, "created_ms": 1, "expires_ms": None, "last_used_ms": None})
        uid = f"cold{u}"
        data["users"][uid] = {"id": uid, "type": "api", "tenant": "bench", "name": "",
                              "disabled": False, "grants": ["campaigns", "events"],
                              "created_ms": 1, "keys": keys}
with open(store, "w") as f:
    json.dump(data, f)
EOF
else
  # Redis: through the CLI, in parallel (one process per user, two keys each).
  seq 0 $((COLD_USERS - 1)) | xargs -P 4 -I{} sh -c \
    '"$0" --config "$1" users create cold{} --type api --grant campaigns --grant events >/dev/null &&
     "$0" --config "$1" keys generate cold{} 2>/dev/null &&
     "$0" --config "$1" keys generate cold{} 2>/dev/null' \
    "$BIN" "$WORK/gate.toml" >"$WORK/cold_tokens.txt"
fi
for i in $(seq 1 $((WARM_KEYS / 2))); do
  cg users create "warm$i" --type api --grant campaigns --grant events >/dev/null
  cg keys generate "warm$i" >>"$WORK/warm_tokens.txt" 2>/dev/null
  cg keys generate "warm$i" >>"$WORK/warm_tokens.txt" 2>/dev/null
done
{ ! want cold && ! want miss; } || [ "$(wc -l <"$WORK/cold_tokens.txt")" -eq $((2 * COLD_USERS)) ] || die "cold keys missing"
[ "$(wc -l <"$WORK/warm_tokens.txt")" -eq "$WARM_KEYS" ] || die "warm keys missing"

GATE_PID=""
GATE_CONF=$WORK/gate.toml
launch_gate() { # binary, config, port, admin port, name -> LAUNCHED_PID
  local log=warn
  [ "$ACCESS_LOG" = 1 ] && log=info
  # shellcheck disable=SC2086
  env TOKIO_WORKER_THREADS="$WORKERS" CAMPAIGN_GATE_SERVER_WORKERS="$WORKERS" CAMPAIGN_GATE_LOG=$log ${GATE_EXTRA_ENV:-} \
    ${GATE_RUNTIME:+CAMPAIGN_GATE_SERVER_RUNTIME=$GATE_RUNTIME} \
    "$1" serve --config "$2" >"$WORK/$5.out" 2>>"$WORK/$5.err" &
  LAUNCHED_PID=$!
  STARTED+=("$LAUNCHED_PID")
  local i
  for ((i = 0; i < 200; i++)); do
    grep -q "campaign-gate listening" "$WORK/$5.out" 2>/dev/null && break
    kill -0 "$LAUNCHED_PID" 2>/dev/null || die "$5 exited: $(tail -5 "$WORK/$5.err")"
    sleep 0.05
  done
  listening "$3" 10
  : >"$WORK/$5.out"
  curl -fsS "http://127.0.0.1:$4/readyz" >/dev/null 2>&1 || sleep 1
}
start_gate() {
  launch_gate "$BIN" "$GATE_CONF" "$GATE_PORT" "$GATE_ADMIN_PORT" gate
  GATE_PID=$LAUNCHED_PID
}
stop_gate() {
  kill "$GATE_PID" 2>/dev/null || true
  wait "$GATE_PID" 2>/dev/null || true
  forget "$GATE_PID"
}
restart_b() { # BIN_B (re)started, with GATE_EXTRA_ENV as given
  kill "$GATE_B_PID" 2>/dev/null || true
  wait "$GATE_B_PID" 2>/dev/null || true
  forget "$GATE_B_PID"
  launch_gate "$BIN_B" "$WORK/gate-b.toml" "$GATE_B_PORT" "$GATE_B_ADMIN_PORT" gate-b
  GATE_B_PID=$LAUNCHED_PID
}
# interleave fn_a fn_b: RUNS runs of fn_a, and with BIN_B of fn_b in alternating order.
interleave() {
  local run
  for run in $(seq 1 "$RUNS"); do
    if [ -z "$BIN_B" ]; then
      "$1" "$run"
    elif ((run % 2)); then
      "$1" "$run" && "$2" "$run"
    else
      "$2" "$run" && "$1" "$run"
    fi
  done
}
start_gate
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(head -1 "$WORK/warm_tokens.txt")" "http://127.0.0.1:$GATE_PORT$ROUTE")
[ "$code" = 200 ] || die "campaign-gate answered $code to a warm key (want 200)"
sleep 1
GATE_IDLE_KIB=$(status_kib "$GATE_PID" VmRSS)
log "campaign-gate :$GATE_PORT (pid $GATE_PID), idle RSS $((GATE_IDLE_KIB / 1024)) MiB"
GATE_B_PID=""
if [ -n "$BIN_B" ]; then
  sed -e "s|^listen = \"127.0.0.1:$GATE_PORT\"|listen = \"127.0.0.1:$GATE_B_PORT\"|" \
    -e "s|^listen = \"127.0.0.1:$GATE_ADMIN_PORT\"|listen = \"127.0.0.1:$GATE_B_ADMIN_PORT\"|" \
    "$WORK/gate.toml" >"$WORK/gate-b.toml"
  launch_gate "$BIN_B" "$WORK/gate-b.toml" "$GATE_B_PORT" "$GATE_B_ADMIN_PORT" gate-b
  GATE_B_PID=$LAUNCHED_PID
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(head -1 "$WORK/warm_tokens.txt")" "http://127.0.0.1:$GATE_B_PORT$ROUTE")
  [ "$code" = 200 ] || die "BIN_B answered $code to a warm key (want 200)"
  log "campaign-gate B ($BIN_B) :$GATE_B_PORT (pid $GATE_B_PID)"
fi

# ---- wrk scripts ----------------------------------------------------------------------
cat >"$WORK/report.lua" <<'EOF'
function report(requests, duration_us, latency, errors)
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d non2xx=%d socket_errors=%d\n",
    requests, duration_us, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
EOF
# The end of both scripts below: the next of the requests prebuilt in `reqs`.
cat >"$WORK/cycle.lua" <<'EOF'
function request()
  i = i % n + 1
  return reqs[i]
end
function done(s, latency)
  report(s.requests, s.duration, latency, s.errors)
end
EOF
# Warm keys: requests prebuilt at init, rotated per request; every thread starts elsewhere.
cat "$WORK/report.lua" - "$WORK/cycle.lua" >"$WORK/rotate.lua" <<'EOF'
local reqs, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format("GET", args[2], { Host = "bench", Authorization = "Bearer " .. line })
  end
  i = math.random(n)
end
EOF
# Small POSTs (the post scenario): a 66-byte JSON event to the events route, in one
# write with its head as clients send it, the warm keys rotated as above.
cat "$WORK/report.lua" - "$WORK/cycle.lua" >"$WORK/post.lua" <<EOF
local reqs, n, i = {}, 0, 0
local body = '{"eventType":"click","campaign":"4711","contact":"c-0000000042"}  '
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format("POST", "$UPLOAD_ROUTE", { Host = "bench", Authorization = "Bearer " .. line,
      ["Content-Type"] = "application/json" }, body)
  end
  i = math.random(n)
end
EOF
# Every request a miss: each thread rotates through its own share of the tokens (every
# THREADS-th), so no two threads ask for one key at about the same time (wrk's threads
# would otherwise draw the same "random" start).
cat "$WORK/report.lua" - "$WORK/cycle.lua" >"$WORK/miss.lua" <<'EOF'
local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
end
local reqs, n, i = {}, 0, 0
function init(args)
  local nthreads, k = tonumber(args[3]), 0
  for line in io.lines(args[1]) do
    if k % nthreads == tid then
      n = n + 1
      reqs[n] = wrk.format("GET", args[2], { Host = "bench", Authorization = "Bearer " .. line })
    end
    k = k + 1
  end
end
EOF
# Cold keys: each thread takes every THREADS-th token, uses each once, and stops when the
# ones left are only enough for the requests still in flight. wrk's own duration is the
# whole -d even after the threads stop, so the time is taken here, from the first request
# to the last response (LuaJIT's FFI: clock_gettime(CLOCK_MONOTONIC)).
cat "$WORK/report.lua" - >"$WORK/cold.lua" <<'EOF'
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } cg_timespec;
  int clock_gettime(int clock, cg_timespec *ts);
]]
local ts = ffi.new("cg_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end
local threads, next_id = {}, 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
local reqs, n, i, quota = {}, 0, 0, 0
first_us, last_us, seen = 0, 0, 0
function init(args)
  local nthreads, per_thread, k = tonumber(args[3]), tonumber(args[4]), 0
  for line in io.lines(args[1]) do
    if k % nthreads == tid then
      n = n + 1
      reqs[n] = wrk.format("GET", args[2], { Host = "bench", Authorization = "Bearer " .. line })
    end
    k = k + 1
  end
  quota = n - per_thread
end
function request()
  if first_us == 0 then first_us = now_us() end
  if i < n then i = i + 1 end
  return reqs[i]
end
function response(status)
  seen = seen + 1
  last_us = now_us()
  if seen >= quota then wrk.thread:stop() end
end
function done(s, latency)
  local first, last, total = math.huge, 0, 0
  for _, t in ipairs(threads) do
    first = math.min(first, t:get("first_us"))
    last = math.max(last, t:get("last_us"))
    total = total + t:get("seen")
  end
  report(total, last - first, latency, s.errors)
end
EOF

# ---- scenario runner ----------------------------------------------------------------------
# run_wrk scenario run url pids-for-cpu [lua script] [tokens] -> one row in $OUT/runs.tsv
# With STORE_CPU=1 (the cold and miss scenarios on Redis) the CPU is read 1.5 s after the
# load ends, so that it counts the work a request leaves behind (the key-use writer
# writes a second after a use), and the last column is Redis' CPU per request too.
RUNS_TSV=$OUT/runs.tsv
printf 'scenario\trun\trps\tp50_ms\tp99_ms\tp999_ms\tcpu_s_per_10k\tnon2xx\tsocket_errors\tuser_us_per_req\tkernel_us_per_req\tstore_cpu_s_per_10k\n' >"$RUNS_TSV"
run_wrk() {
  local scenario=$1 run=$2 url=$3 pids=$4 script=${5:-$WORK/rotate.lua} tokens=${6:-$WORK/warm_tokens.txt}
  local raw=$OUT/$scenario.run$run.txt t0 t1 u0 u1 s0=0 s1=0 store=""
  [ "${STORE_CPU:-0}" = 1 ] && [ "$STORE_KIND" = redis ] && store=$REDIS_PID
  # shellcheck disable=SC2086
  t0=$(cpu_ticks $pids)
  # shellcheck disable=SC2086
  u0=$(user_ticks $pids)
  [ -z "$store" ] || s0=$(cpu_ticks "$store")
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 5s --latency -s "$script" "$url" \
    -- "$tokens" "$ROUTE" "$THREADS" $((CONNS / THREADS)) >"$raw" 2>&1 || true
  [ -z "$store" ] || sleep 1.5
  # shellcheck disable=SC2086
  t1=$(cpu_ticks $pids)
  # shellcheck disable=SC2086
  u1=$(user_ticks $pids)
  [ -z "$store" ] || s1=$(cpu_ticks "$store")
  local line
  line=$(grep '^RESULT' "$raw") || die "wrk failed for $scenario: $(tail -3 "$raw")"
  eval "local ${line#RESULT }"
  # shellcheck disable=SC2154
  awk -v s="$scenario" -v r="$run" -v n="$requests" -v d="$duration_us" -v a="$p50_us" \
    -v b="$p99_us" -v c="$p999_us" -v ticks=$((t1 - t0)) -v hz="$CLK_TCK" -v x="$non2xx" -v e="$socket_errors" -v ut=$((u1 - u0)) \
    -v st=$((s1 - s0)) -v store="$store" \
    'BEGIN { printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.3f\t%.3f\t%d\t%d\t%.2f\t%.2f\t%s\n", s, r, n / (d / 1e6), a / 1e3, b / 1e3, c / 1e3, (ticks / hz) / n * 1e4, x, e, (ut / hz) / n * 1e6, ((ticks - ut) / hz) / n * 1e6, store == "" ? "-" : sprintf("%.3f", (st / hz) / n * 1e4) }' \
    >>"$RUNS_TSV"
  tail -1 "$RUNS_TSV" | awk -F'\t' '{ printf "  %-22s run %s: %7s req/s  p50 %6s ms  p99 %6s ms  p99.9 %6s ms  cpu %s s/10k%s  non2xx %s  errors %s\n", $1, $2, $3, $4, $5, $6, $7, ($12 == "-" ? "" : "  redis " $12 " s/10k"), $8, $9 }' >&2
  [ "$non2xx" = 0 ] || log "WARNING: $scenario run $run had $non2xx non-2xx answers"
}
warmup() { # url [script tokens]
  wrk -t"$THREADS" -c"$CONNS" -d2s -s "${2:-$WORK/rotate.lua}" "$1" -- "${3:-$WORK/warm_tokens.txt}" "$ROUTE" "$THREADS" >/dev/null 2>&1 || true
}

BACKEND_URL=http://127.0.0.1:$BACKEND_PORT$ROUTE
PROXY_URL=http://127.0.0.1:$NGX_PROXY_PORT$ROUTE
AUTH_URL=http://127.0.0.1:$NGX_AUTH_PORT$ROUTE
AUTHSVC_URL=http://127.0.0.1:$NGX_AUTHSVC_PORT$ROUTE
GATE_URL=http://127.0.0.1:$GATE_PORT$ROUTE

# ---- warm keys ------------------------------------------------------------------------
log "warm keys: $RUNS runs x ${DURATION}s per target, wrk -t$THREADS -c$CONNS, interleaved"
GATE_B_URL=http://127.0.0.1:$GATE_B_PORT$ROUTE
if want warm; then
for url in "$BACKEND_URL" "$PROXY_URL" "$AUTH_URL" "$AUTHSVC_URL" "$GATE_URL"; do warmup "$url"; done
[ -z "$BIN_B" ] || warmup "$GATE_B_URL"
for run in $(seq 1 "$RUNS"); do
  run_wrk backend "$run" "$BACKEND_URL" "$PID_backend"
  # shellcheck disable=SC2154
  run_wrk nginx_proxy_pass "$run" "$PROXY_URL" "$PID_proxy"
  # shellcheck disable=SC2154
  run_wrk nginx_auth_request "$run" "$AUTH_URL" "$PID_auth"
  run_wrk nginx_auth_service "$run" "$AUTHSVC_URL" "$PID_auth"
  if [ -n "$BIN_B" ] && [ $((run % 2)) = 0 ]; then
    run_wrk campaign_gate_b "$run" "$GATE_B_URL" "$GATE_B_PID"
    run_wrk campaign_gate "$run" "$GATE_URL" "$GATE_PID"
  else
    run_wrk campaign_gate "$run" "$GATE_URL" "$GATE_PID"
    [ -z "$BIN_B" ] || run_wrk campaign_gate_b "$run" "$GATE_B_URL" "$GATE_B_PID"
  fi
done
fi
# ---- small POSTs ----------------------------------------------------------------------
if want post; then
  log "small POSTs: $RUNS runs x ${DURATION}s per target"
  for url in "$PROXY_URL" "$AUTH_URL" "$GATE_URL"; do warmup "$url" "$WORK/post.lua"; done
  [ -z "$BIN_B" ] || warmup "$GATE_B_URL" "$WORK/post.lua"
  for run in $(seq 1 "$RUNS"); do
    run_wrk nginx_proxy_pass_post "$run" "$PROXY_URL" "$PID_proxy" "$WORK/post.lua"
    run_wrk nginx_auth_request_post "$run" "$AUTH_URL" "$PID_auth" "$WORK/post.lua"
    run_wrk campaign_gate_post "$run" "$GATE_URL" "$GATE_PID" "$WORK/post.lua"
    [ -z "$BIN_B" ] || run_wrk campaign_gate_b_post "$run" "$GATE_B_URL" "$GATE_B_PID" "$WORK/post.lua"
  done
fi

GATE_PEAK_KIB=$(status_kib "$GATE_PID" VmHWM)
GATE_AFTER_KIB=$(status_kib "$GATE_PID" VmRSS)
NGX_PROXY_KIB=$(rss_kib "$PID_proxy")
NGX_AUTH_KIB=$(rss_kib "$PID_auth")

# ---- h2c downstream -------------------------------------------------------------------
H2_TSV=$OUT/h2c.tsv
printf 'scenario\trun\trps\tmean_ms\tfailed\tcpu_s_per_10k\n' >"$H2_TSV"
if ! want h2c; then
  :
elif command -v h2load >/dev/null 2>&1; then
  log "h2c: h2load -t$THREADS -c$CONNS -m1 -D$DURATION, $RUNS runs per target"
  token=$(head -1 "$WORK/warm_tokens.txt")
  for run in $(seq 1 "$RUNS"); do
    for target in "nginx_proxy_pass_h2c http://127.0.0.1:$NGX_H2_PORT$ROUTE $PID_proxy" "campaign_gate_h2c $GATE_URL $GATE_PID"; do
      set -- $target
      raw=$OUT/$1.run$run.txt
      t0=$(cpu_ticks "$3")
      h2load -t"$THREADS" -c"$CONNS" -m1 -D"$DURATION" --warm-up-time=1 \
        -H "authorization: Bearer $token" "$2" >"$raw" 2>&1 || true
      t1=$(cpu_ticks "$3")
      # CPU ticks span the warm-up second too: counted against its share of requests.
      awk -v s="$1" -v r="$run" -v ticks=$((t1 - t0)) -v hz="$CLK_TCK" -v d="$DURATION" '
        /^finished in/ { rps = $4 }
        /^requests:/ { failed = $10 + $12 }
        /^time for request:/ { mean = $6 }
        END { u = mean; ms = u ~ /ms$/ ? u + 0 : (u ~ /us$/ ? u / 1000 : u * 1000);
              printf "%s\t%s\t%.0f\t%.3f\t%d\t%.3f\n", s, r, rps, ms, failed, (ticks / hz) / (rps * (d + 1)) * 1e4 }' "$raw" >>"$H2_TSV"
      tail -1 "$H2_TSV" | awk -F'\t' '{ printf "  %-22s run %s: %7s req/s  mean %s ms  failed %s  cpu %s s/10k\n", $1, $2, $3, $4, $5, $6 }' >&2
    done
  done
else
  log "h2c: SKIPPED, h2load (Debian nghttp2-client) could not be installed"
fi

# ---- 10 MB upload -------------------------------------------------------------------------
UP_TSV=$OUT/upload.tsv
printf 'scenario\trun\tmb_per_s\tstatus\n' >"$UP_TSV"
if want upload; then
head -c "$UPLOAD_BYTES" /dev/urandom >"$WORK/body.bin"
log "upload: $((UPLOAD_BYTES / 1000000)) MB POST with curl, 5 per target"
token=$(head -1 "$WORK/warm_tokens.txt")
for run in 1 2 3 4 5; do
  for target in "backend $BACKEND_PORT" "nginx_proxy_pass $NGX_PROXY_PORT" "nginx_auth_request $NGX_AUTH_PORT" "campaign_gate $GATE_PORT"; do
    set -- $target
    curl -s -o /dev/null --max-time 30 -w "%{time_total} %{http_code}\n" -H 'Expect:' \
      -H 'Content-Type: application/octet-stream' -H "Authorization: Bearer $token" \
      --data-binary @"$WORK/body.bin" "http://127.0.0.1:$2$UPLOAD_ROUTE" |
      awk -v s="$1" -v r="$run" -v b="$UPLOAD_BYTES" '{ printf "%s\t%s\t%.1f\t%s\n", s, r, b / 1e6 / $1, $2 }' >>"$UP_TSV"
  done
done
awk -F'\t' 'NR > 1 && $4 != 200 { bad = bad " " $1 "=" $4 } END { if (bad) print "[load.sh] WARNING: upload statuses:" bad > "/dev/stderr" }' "$UP_TSV"
fi

# ---- invalidation storm (Redis only) --------------------------------------------------
# A key of another user revoked every 10 ms while the warm keys are under load. The
# revocation is the store's own delete-key script: its exact call (EVALSHA, keys and
# arguments) is captured with MONITOR from one `keys delete --now` by the CLI, then
# replayed for other users through one long-lived redis-cli, so the storm costs no
# process spawns. Each storm run is paired with a control run that sends the same number
# of PINGs the same way, and with a baseline run without either.
if ! want storm; then
  :
elif [ "$STORE_KIND" = redis ]; then
  storm_users=$((RUNS * DURATION * STORM_PER_SEC / 2 + 10))
  log "storm: creating $storm_users users with 2 keys each"
  seq 0 "$storm_users" | xargs -P 4 -I{} sh -c \
    '"$0" --config "$1" users create storm{} --type api --grant events >/dev/null &&
     "$0" --config "$1" keys generate storm{} >/dev/null 2>&1 &&
     "$0" --config "$1" keys generate storm{} >/dev/null 2>&1' \
    "$BIN" "$WORK/gate.toml"
  redis-cli -p "$REDIS_PORT" MONITOR >"$WORK/monitor.txt" 2>/dev/null &
  monitor=$!
  STARTED+=("$monitor")
  sleep 0.3
  cg keys delete storm0 --slot 2 --now >/dev/null 2>&1
  sleep 0.3
  kill "$monitor"
  wait "$monitor" 2>/dev/null || true
  forget "$monitor"
  # `... [0 127.0.0.1:port] "EVALSHA" "<sha>" "2" "cg:user:{storm0}" ... "storm0" "2" "now"`
  STORM_CALL=$(grep '"EVALSHA"' "$WORK/monitor.txt" | grep '"now"' | tail -1 | sed 's/^[^]]*] //')
  [ -n "$STORM_CALL" ] || die "storm: could not capture the store's delete-key call"
  log "storm: revoking with: $STORM_CALL"
  storm_loop() { # revoke|control, first storm user: one command every 10 ms for DURATION s
    local n=0 user=$2 now=${EPOCHREALTIME/./} call
    local next=$now end=$((now + DURATION * 1000000)) wait_us pause
    exec 7> >(exec redis-cli -p "$REDIS_PORT" >/dev/null 2>&1)
    exec 8<> <(:) # never written: `read -t` on it sleeps without forking `sleep`
    while [ "$now" -lt "$end" ]; do
      if [ "$1" = revoke ]; then
        # Slot 2 first: deleting it promotes nothing; then slot 1.
        call=${STORM_CALL//storm0/storm$user}
        call=${call% \"2\" \"now\"}
        printf '%s "%s" "now"\n' "$call" $((2 - n % 2)) >&7
        [ $((n % 2)) = 1 ] && user=$((user + 1))
      else
        printf 'PING\n' >&7
      fi
      n=$((n + 1))
      next=$((next + 1000000 / STORM_PER_SEC))
      now=${EPOCHREALTIME/./}
      wait_us=$((next - now))
      if [ "$wait_us" -gt 0 ]; then
        printf -v pause '0.%06d' "$wait_us"
        read -r -t "$pause" -u 8 || true
      fi
      now=${EPOCHREALTIME/./}
    done
    exec 7>&- 8<&-
  }
  metric() { # sum of a counter's samples on the admin endpoint
    curl -fsS "http://127.0.0.1:$GATE_ADMIN_PORT/metrics" 2>/dev/null |
      awk -v m="$1" '$1 == m || index($1, m "{") == 1 { n += $2 } END { printf "%d\n", n }'
  }
  STORM_INVALIDATIONS=0
  STORM_REDIS_TICKS_CONTROL=0
  STORM_REDIS_TICKS_REVOKING=0
  STORM_FLUSHES_BEFORE=$(metric campaign_gate_cache_flushes_total)
  for run in $(seq 1 "$RUNS"); do
    run_wrk storm_baseline "$run" "$GATE_URL" "$GATE_PID"
    r0=$(cpu_ticks "$REDIS_PID")
    storm_loop control 1 &
    loop=$!
    run_wrk storm_control "$run" "$GATE_URL" "$GATE_PID"
    wait "$loop" || true
    r1=$(cpu_ticks "$REDIS_PID")
    before=$(metric campaign_gate_invalidations_total)
    storm_loop revoke $(((run - 1) * DURATION * STORM_PER_SEC / 2 + 1)) &
    loop=$!
    run_wrk storm_revoking "$run" "$GATE_URL" "$GATE_PID"
    wait "$loop" || true
    r2=$(cpu_ticks "$REDIS_PID")
    STORM_REDIS_TICKS_CONTROL=$((STORM_REDIS_TICKS_CONTROL + r1 - r0))
    STORM_REDIS_TICKS_REVOKING=$((STORM_REDIS_TICKS_REVOKING + r2 - r1))
    STORM_INVALIDATIONS=$((STORM_INVALIDATIONS + $(metric campaign_gate_invalidations_total) - before))
  done
  STORM_FLUSHES=$(($(metric campaign_gate_cache_flushes_total) - STORM_FLUSHES_BEFORE))
  STORM_REDIS_CPU=$(awk -v c="$STORM_REDIS_TICKS_CONTROL" -v r="$STORM_REDIS_TICKS_REVOKING" -v hz="$CLK_TCK" \
    'BEGIN { printf "redis-server CPU %.2f s in the control runs, %.2f s in the revoking runs", c / hz, r / hz }')
  log "storm: $STORM_INVALIDATIONS invalidations applied by the gateway in $RUNS revoking runs, $STORM_FLUSHES full cache flushes; $STORM_REDIS_CPU"
else
  log "storm: SKIPPED, needs the Redis store (the file: store flushes the whole cache on any change)"
fi

# ---- TLS downstream -------------------------------------------------------------------
# The same warm-key load over TLS 1.3 (keep-alive, so handshakes are rare): nginx
# proxy_pass with `listen ssl` against campaign-gate with `[server] tls`, same pair.
if ! want tls; then
  :
elif [ "$TLS_OK" = 1 ]; then
  sed 's|^\[server\]$|[server]\ntls = { cert = "'"$WORK"'/tls.crt", key = "'"$WORK"'/tls.key" }|' \
    "$WORK/gate.toml" >"$WORK/gate-tls.toml"
  stop_gate
  GATE_CONF=$WORK/gate-tls.toml
  start_gate
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(head -1 "$WORK/warm_tokens.txt")" "https://127.0.0.1:$GATE_PORT$ROUTE")
  if [ "$code" = 200 ]; then
    log "TLS: $RUNS runs x ${DURATION}s per target"
    warmup "https://127.0.0.1:$NGX_TLS_PORT$ROUTE"
    warmup "https://127.0.0.1:$GATE_PORT$ROUTE"
    for run in $(seq 1 "$RUNS"); do
      run_wrk nginx_proxy_pass_tls "$run" "https://127.0.0.1:$NGX_TLS_PORT$ROUTE" "$PID_proxy"
      run_wrk campaign_gate_tls "$run" "https://127.0.0.1:$GATE_PORT$ROUTE" "$GATE_PID"
    done
  else
    log "TLS: SKIPPED, campaign-gate did not answer over TLS ($code)"
  fi
  stop_gate
  GATE_CONF=$WORK/gate.toml
  start_gate
else
  log "TLS: SKIPPED, openssl could not make a key pair"
fi

# ---- cold keys ------------------------------------------------------------------------
# A fresh gateway per run (empty cache); a short warm-key run first fills the upstream
# pool, then 10,000 keys each used once (the last few per connection are left unused).
# On Redis every cold run starts with the keys' recorded uses cleared: a lookup writes
# a key's use only when the stored one is a minute or more old, and the runs follow each
# other within a minute, so without this only the first run would be every key's first
# use (the costlier case, measured here).
clear_uses() {
  [ "$STORE_KIND" = redis ] || return 0
  redis-cli -p "$REDIS_PORT" EVAL "
    for _, id in ipairs(redis.call('SMEMBERS', 'cg:users')) do
      local keys = 'cg:user:{' .. id .. '}:keys'
      local flat = redis.call('HGETALL', keys)
      for i = 1, #flat, 2 do
        local k = cjson.decode(flat[i + 1])
        k.last_used_ms = ''
        redis.call('HSET', keys, flat[i], cjson.encode(k))
      end
    end" 0 >/dev/null
}
if want cold; then
  log "cold keys: $((2 * COLD_USERS)) keys each used once, $RUNS runs (gateway restarted per run)"
  cold_a() {
    stop_gate
    start_gate
    warmup "$GATE_URL"
    clear_uses
    STORE_CPU=1 run_wrk campaign_gate_cold "$1" "$GATE_URL" "$GATE_PID" "$WORK/cold.lua" "$WORK/cold_tokens.txt"
  }
  cold_b() { # BIN_B, restarted the same way (its own cache; the same keys)
    restart_b
    warmup "$GATE_B_URL"
    clear_uses
    STORE_CPU=1 run_wrk campaign_gate_b_cold "$1" "$GATE_B_URL" "$GATE_B_PID" "$WORK/cold.lua" "$WORK/cold_tokens.txt"
  }
  interleave cold_a cold_b
fi

# ---- every request a miss --------------------------------------------------------------
# The cold-key path held for the whole run: the gateway restarted with `[auth] cache_ttl`
# 1 ms and the 10,000 cold keys rotated, so (nearly) every request is a store lookup
# (concurrent requests for one key share one). Steadier than the cold scenario, whose
# runs last a third of a second. The gateway is restarted as before afterwards.
MISS_LOOKUPS=""
if want miss; then
  log "every request a miss: cache_ttl 1 ms, the $((2 * COLD_USERS)) cold keys rotated, $RUNS runs"
  lookups() { curl -fsS "http://127.0.0.1:$GATE_ADMIN_PORT/metrics" | awk '/^campaign_gate_store_lookups_total / { print $2 }'; }
  stop_gate
  GATE_EXTRA_ENV="CAMPAIGN_GATE_AUTH_CACHE_TTL=1ms" start_gate
  warmup "$GATE_URL" "$WORK/miss.lua" "$WORK/cold_tokens.txt"
  if [ -n "$BIN_B" ]; then # BIN_B the same way, its runs interleaved in alternating order
    GATE_EXTRA_ENV="CAMPAIGN_GATE_AUTH_CACHE_TTL=1ms" restart_b
    warmup "$GATE_B_URL" "$WORK/miss.lua" "$WORK/cold_tokens.txt"
  fi
  miss_a() { STORE_CPU=1 run_wrk campaign_gate_miss "$1" "$GATE_URL" "$GATE_PID" "$WORK/miss.lua" "$WORK/cold_tokens.txt"; }
  miss_b() { STORE_CPU=1 run_wrk campaign_gate_b_miss "$1" "$GATE_B_URL" "$GATE_B_PID" "$WORK/miss.lua" "$WORK/cold_tokens.txt"; }
  l0=$(lookups)
  interleave miss_a miss_b
  l1=$(lookups)
  miss_requests=$(cat "$OUT"/campaign_gate_miss.run*.txt | sed -n 's/^RESULT requests=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
  MISS_LOOKUPS=$(awk -v l=$((l1 - l0)) -v n="$miss_requests" 'BEGIN { if (n > 0) printf "%.2f", l / n; else print "-" }')
  stop_gate
  start_gate
  [ -z "$BIN_B" ] || restart_b
fi

# ---- report ---------------------------------------------------------------------------
median_of() { # tsv file, scenario, column -> median
  awk -F'\t' -v s="$2" -v c="$3" '$1 == s { print $c }' "$1" | sort -g |
    awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
table() { # nginx proxy_pass req/s, nginx auth_request req/s, scenarios... -> a markdown table of their medians
  local proxy=$1 auth=$2 s rps
  shift 2
  echo "| scenario | req/s | p50 ms | p99 ms | p99.9 ms | proxy CPU s / 10k req | vs nginx proxy_pass | vs nginx auth_request |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for s in "$@"; do
    rps=$(median_of "$RUNS_TSV" "$s" 3)
    [ "$rps" = - ] && continue
    echo "| $s | $rps | $(median_of "$RUNS_TSV" "$s" 4) | $(median_of "$RUNS_TSV" "$s" 5) | $(median_of "$RUNS_TSV" "$s" 6) |" \
      "$(median_of "$RUNS_TSV" "$s" 7) | $(ratio "$rps" "$proxy") | $(ratio "$rps" "$auth") |"
  done
}
PROXY_RPS=$(median_of "$RUNS_TSV" nginx_proxy_pass 3)
AUTH_RPS=$(median_of "$RUNS_TSV" nginx_auth_request 3)
GATE_RPS=$(median_of "$RUNS_TSV" campaign_gate 3)
{
  echo "## campaign-gate load bench, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r);" \
    "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "wrk -t$THREADS -c$CONNS -d${DURATION}s, $RUNS runs per scenario (interleaved), medians of each column;" \
    "proxies with $WORKERS workers (campaign-gate runtime: ${GATE_RUNTIME:-default}); backend: nginx, 1 worker, \`return 200\`;" \
    "access logs $([ "$ACCESS_LOG" = 1 ] && echo on || echo off); store: **$STORE_KIND**."
  echo
  table "$PROXY_RPS" "$AUTH_RPS" backend nginx_proxy_pass nginx_auth_request nginx_auth_service campaign_gate \
    campaign_gate_b campaign_gate_cold campaign_gate_b_cold campaign_gate_miss campaign_gate_b_miss storm_baseline \
    storm_control storm_revoking nginx_proxy_pass_tls campaign_gate_tls
  echo
  echo "(For \`backend\` the CPU column is the backend's own; for nginx it counts master and workers;" \
    "for \`nginx_auth_service\` (\`auth_request\` whose subrequest goes to an HTTP auth service, the backend's" \
    "\`return 204\`) it leaves out the auth service's own CPU. The issue's \`auth_request\` peer is \`nginx_auth_request\`.)"
  echo
  echo "CPU per request (less noisy than req/s on a shared machine): campaign-gate uses" \
    "$(ratio "$(median_of "$RUNS_TSV" campaign_gate 7)" "$(median_of "$RUNS_TSV" nginx_proxy_pass 7)") the CPU of nginx proxy_pass and" \
    "$(ratio "$(median_of "$RUNS_TSV" campaign_gate 7)" "$(median_of "$RUNS_TSV" nginx_auth_request 7)") that of nginx auth_request."
  echo "campaign-gate / nginx auth_request to an HTTP auth service: $(ratio "$GATE_RPS" "$(median_of "$RUNS_TSV" nginx_auth_service 3)") req/s."
  echo "Of which (µs per request, user space / kernel): campaign-gate" \
    "$(median_of "$RUNS_TSV" campaign_gate 10) / $(median_of "$RUNS_TSV" campaign_gate 11)," \
    "nginx proxy_pass $(median_of "$RUNS_TSV" nginx_proxy_pass 10) / $(median_of "$RUNS_TSV" nginx_proxy_pass 11)," \
    "nginx auth_request $(median_of "$RUNS_TSV" nginx_auth_request 10) / $(median_of "$RUNS_TSV" nginx_auth_request 11)."
  echo
  if [ -n "$BIN_B" ]; then
    echo "A/B (campaign_gate = $BIN, campaign_gate_b = $BIN_B): B / A" \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_b 3)" "$GATE_RPS") req/s," \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_b 7)" "$(median_of "$RUNS_TSV" campaign_gate 7)") CPU per request;" \
      "B uses $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b 7)" "$(median_of "$RUNS_TSV" nginx_proxy_pass 7)") the CPU of nginx proxy_pass" \
      "at $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b 3)" "$PROXY_RPS") its req/s."
    echo
  fi
  if [ "$(median_of "$RUNS_TSV" campaign_gate_post 3)" != - ]; then
    echo "Small POSTs (a 66-byte JSON event to the events route, warm keys; the backend answers as for GET):"
    echo
    table "$(median_of "$RUNS_TSV" nginx_proxy_pass_post 3)" "$(median_of "$RUNS_TSV" nginx_auth_request_post 3)" \
      nginx_proxy_pass_post nginx_auth_request_post campaign_gate_post campaign_gate_b_post
    echo
    echo "Small POSTs, CPU per request: campaign-gate uses" \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_post 7)" "$(median_of "$RUNS_TSV" nginx_proxy_pass_post 7)") the CPU of nginx proxy_pass$([ -z "$BIN_B" ] ||
        echo " (B $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_post 7)" "$(median_of "$RUNS_TSV" nginx_proxy_pass_post 7)"))")."
    echo
  fi
  if [ "$(median_of "$RUNS_TSV" campaign_gate_tls 3)" != - ]; then
    echo "TLS: campaign-gate / nginx proxy_pass over TLS: $(ratio "$(median_of "$RUNS_TSV" campaign_gate_tls 3)" "$(median_of "$RUNS_TSV" nginx_proxy_pass_tls 3)") req/s," \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_tls 7)" "$(median_of "$RUNS_TSV" nginx_proxy_pass_tls 7)") CPU per request."
    echo
  fi
  echo "Cold keys / warm keys: $(ratio "$(median_of "$RUNS_TSV" campaign_gate_cold 3)" "$GATE_RPS")."
  if [ "$STORE_KIND" = redis ] && [ "$(median_of "$RUNS_TSV" campaign_gate_cold 12)" != - ]; then
    echo "CPU per 10k requests counted to 1.5 s after the load (what a request leaves behind included), gateway / Redis:" \
      "cold $(median_of "$RUNS_TSV" campaign_gate_cold 7) / $(median_of "$RUNS_TSV" campaign_gate_cold 12) s" \
      "$([ -z "$BIN_B" ] || echo "(B $(median_of "$RUNS_TSV" campaign_gate_b_cold 7) / $(median_of "$RUNS_TSV" campaign_gate_b_cold 12) s)")," \
      "every request a miss $(median_of "$RUNS_TSV" campaign_gate_miss 7) / $(median_of "$RUNS_TSV" campaign_gate_miss 12) s" \
      "$([ -z "$BIN_B" ] || echo "(B $(median_of "$RUNS_TSV" campaign_gate_b_miss 7) / $(median_of "$RUNS_TSV" campaign_gate_b_miss 12) s)")."
  fi
  if [ -n "$MISS_LOOKUPS" ]; then
    echo "Every request a miss (cache_ttl 1 ms, 10,000 keys rotated) / warm keys: $(ratio "$(median_of "$RUNS_TSV" campaign_gate_miss 3)" "$GATE_RPS") req/s," \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_miss 7)" "$(median_of "$RUNS_TSV" campaign_gate 7)") CPU per request; $MISS_LOOKUPS store lookups per request."
  fi
  if [ -n "$BIN_B" ] && [ "$(median_of "$RUNS_TSV" campaign_gate_b_miss 3)" != - ]; then
    echo "Every request a miss A/B: B / A $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_miss 3)" "$(median_of "$RUNS_TSV" campaign_gate_miss 3)") req/s," \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_miss 7)" "$(median_of "$RUNS_TSV" campaign_gate_miss 7)") CPU per request."
  fi
  if [ -n "$BIN_B" ] && [ "$(median_of "$RUNS_TSV" campaign_gate_b_cold 3)" != - ]; then
    echo "Cold keys A/B: B / A $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_cold 3)" "$(median_of "$RUNS_TSV" campaign_gate_cold 3)") req/s," \
      "$(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_cold 7)" "$(median_of "$RUNS_TSV" campaign_gate_cold 7)") CPU per request;" \
      "B's cold / B's warm $(ratio "$(median_of "$RUNS_TSV" campaign_gate_b_cold 3)" "$(median_of "$RUNS_TSV" campaign_gate_b 3)")."
  fi
  if ! want storm; then
    echo "Storm: not selected (SCENARIOS=$SCENARIOS)."
  elif [ "$STORE_KIND" = redis ]; then
    echo "Storm: revoking / baseline $(ratio "$(median_of "$RUNS_TSV" storm_revoking 3)" "$(median_of "$RUNS_TSV" storm_baseline 3)")," \
      "revoking / control $(ratio "$(median_of "$RUNS_TSV" storm_revoking 3)" "$(median_of "$RUNS_TSV" storm_control 3)")" \
      "($STORM_INVALIDATIONS invalidations applied in $RUNS x ${DURATION}s, $STORM_FLUSHES full cache flushes;" \
      "the control run sends as many PINGs to Redis the same way; $STORM_REDIS_CPU)."
  else
    echo "Storm: not measured (needs the Redis store)."
  fi
  echo
  echo "Memory (VmRSS / VmHWM; the $STORE_KIND store holds $(($(wc -l <"$WORK/cold_tokens.txt") + WARM_KEYS)) keys): campaign-gate idle $((GATE_IDLE_KIB / 1024)) MiB, after the warm runs $((GATE_AFTER_KIB / 1024)) MiB," \
    "peak $((GATE_PEAK_KIB / 1024)) MiB; nginx proxy_pass (master + workers) $((NGX_PROXY_KIB / 1024)) MiB, auth_request $((NGX_AUTH_KIB / 1024)) MiB."
  if [ "$(wc -l <"$H2_TSV")" -gt 1 ]; then
    echo
    echo "h2c (h2load -c$CONNS -m1, ${DURATION}s):"
    echo
    echo "| scenario | req/s | mean ms | failed | proxy CPU s / 10k req (approx.) |"
    echo "|---|---:|---:|---:|---:|"
    for s in nginx_proxy_pass_h2c campaign_gate_h2c; do
      echo "| $s | $(median_of "$H2_TSV" $s 3) | $(median_of "$H2_TSV" $s 4) | $(median_of "$H2_TSV" $s 5) | $(median_of "$H2_TSV" $s 6) |"
    done
  fi
  if want upload; then
    echo
    echo "10 MB upload (curl, one at a time, median of 5):"
    echo
    echo "| target | MB/s |"
    echo "|---|---:|"
    for s in backend nginx_proxy_pass nginx_auth_request campaign_gate; do
      echo "| $s | $(median_of "$UP_TSV" $s 3) |"
    done
  fi
} >"$OUT/results.md"
cat "$OUT/results.md"
log "raw runs in $OUT"
