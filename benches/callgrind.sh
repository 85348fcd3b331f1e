#!/usr/bin/env bash
# Instructions per warm request: campaign-gate under valgrind's callgrind, on loopback.
#
#   benches/callgrind.sh            # GET with 8 warm keys
#   REQUEST=post benches/callgrind.sh   # a 70-byte JSON POST to the events route
#
# It starts a backend (nginx, 1 worker, `return 200 "ok"`, connections never recycled),
# a private redis-server, and campaign-gate with 1 worker under
# `valgrind --tool=callgrind`; makes 8 warm keys with the CLI; warms up with
# `wrk -t1 -c8 -d3s`; zeroes the counters; runs `wrk -t1 -c8 -d5s`; dumps; and prints
# the instructions per request and the costliest functions, inclusive, per request.
# callgrind counts instructions, not time, so the figure does not depend on what else
# the machine is doing. Under valgrind, SHA-256 runs its software path (about 7.1k
# instructions per request); natively it uses SHA-NI where the CPU has it.
#
# Environment: BIN (default target/release/campaign-gate; SKIP_BUILD=1 to use it as
# is), REQUEST (get | post), OUT (the callgrind file, default
# target/callgrind/warm.<request>.out), TOP (functions listed, 40).
# Needs valgrind, nginx, wrk, redis-server and curl (installed with apt-get if missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${BIN:-$TARGET_DIR/release/campaign-gate}
REQUEST=${REQUEST:-get}
OUT=${OUT:-$TARGET_DIR/callgrind/warm.$REQUEST.out}
TOP=${TOP:-40}
ROUTE_GET=/campaignapi/resources/v3/campaigncontents/4711
ROUTE_POST=/campaignapi/resources/v3/events

log() { printf '[callgrind.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
case $REQUEST in get | post) ;; *) die "REQUEST is get or post, not '$REQUEST'" ;; esac

# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
install_missing valgrind:valgrind nginx:nginx-light wrk:wrk redis-server:redis-server \
  redis-cli:redis-tools curl:curl python3:python3
require valgrind callgrind_control nginx wrk redis-server curl python3

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building campaign-gate (release)"
  (cd "$ROOT" && cargo build --release --locked --bin campaign-gate) >&2
fi
[ -x "$BIN" ] || die "no binary at $BIN"
mkdir -p "$(dirname "$OUT")"

WORK=$(mktemp -d /tmp/campaign-gate-callgrind.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r BACKEND_PORT GATE_PORT ADMIN_PORT REDIS_PORT < <(free_ports 4)

user=""
[ "$(id -u)" = 0 ] && user="user root;"
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
$user
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx;
  scgi_temp_path $WORK/nginx;
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$BACKEND_PORT;
    location / { return 200 "ok"; }
  }
}
EOF
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
wait_port "$BACKEND_PORT" 10 || die "backend did not start"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT" 10 || die "redis-server did not start"

{
  cat <<EOF
[server]
listen = "127.0.0.1:$GATE_PORT"
workers = 1
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[upstream]
url = "http://127.0.0.1:$BACKEND_PORT"
[store]
url = "redis://127.0.0.1:$REDIS_PORT/0"
EOF
  sed -n '/^\[\[apis\]\]/,$p' "$ROOT/campaign-gate.example.toml"
} >"$WORK/gate.toml"
for i in 1 2 3 4 5 6 7 8; do
  "$BIN" --config "$WORK/gate.toml" users create "warm$i" --type api \
    --grant campaigns --grant events >/dev/null
  "$BIN" --config "$WORK/gate.toml" keys generate "warm$i" >>"$WORK/tokens.txt" 2>/dev/null
done
[ "$(wc -l <"$WORK/tokens.txt")" = 8 ] || die "could not make the 8 warm keys"

cat >"$WORK/load.lua" <<EOF
local reqs = {}
local n = 0
init = function(args)
  for t in io.lines("$WORK/tokens.txt") do
    local h = {["Host"] = "bench", ["Authorization"] = "Bearer " .. t}
    if "$REQUEST" == "post" then
      h["Content-Type"] = "application/json"
      reqs[#reqs + 1] = wrk.format("POST", "$ROUTE_POST", h,
        '{"eventType":"click","campaign":"4711","contact":"c-0000000042"}  ')
    else
      reqs[#reqs + 1] = wrk.format("GET", "$ROUTE_GET", h)
    end
  end
end
request = function() n = n + 1; return reqs[n % #reqs + 1] end
EOF

log "campaign-gate under callgrind (slow to start)"
rm -f "$OUT"
CAMPAIGN_GATE_LOG=warn valgrind --tool=callgrind --dump-instr=no --compress-strings=no \
  --compress-pos=no --callgrind-out-file="$OUT" "$BIN" --config "$WORK/gate.toml" serve \
  >"$WORK/gate.log" 2>&1 &
GATE_PID=$!
PIDS+=("$GATE_PID")
wait_port "$GATE_PORT" 120 || die "campaign-gate did not start: $(tail -5 "$WORK/gate.log")"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: bench" \
  -H "Authorization: Bearer $(head -1 "$WORK/tokens.txt")" "http://127.0.0.1:$GATE_PORT$ROUTE_GET")
[ "$code" = 200 ] || die "a warm key got $code, not 200"

wrk -t1 -c8 -d3s -s "$WORK/load.lua" "http://127.0.0.1:$GATE_PORT" >/dev/null
callgrind_control -z "$GATE_PID" >/dev/null
wrk -t1 -c8 -d5s -s "$WORK/load.lua" "http://127.0.0.1:$GATE_PORT" >"$WORK/wrk.txt"
callgrind_control -d "$GATE_PID" >/dev/null
grep -q 'Non-2xx' "$WORK/wrk.txt" && die "non-2xx answers: $(cat "$WORK/wrk.txt")"
REQS=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
kill "$GATE_PID" 2>/dev/null || true
wait "$GATE_PID" 2>/dev/null || true
DUMP=$(ls -t "$OUT".* 2>/dev/null | head -1)
[ -n "$DUMP" ] || die "callgrind wrote no dump"
TOTAL=$(awk '/^(summary|totals):/ { t = $2 } END { print t }' "$DUMP")
echo "requests: $REQS; instructions: $TOTAL; per request: $((TOTAL / REQS)) ($REQUEST; dump $DUMP)"
echo "inclusive instructions per request, costliest first:"
callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null |
  awk -v n="$REQS" -v top="$TOP" '
    /^ *[0-9,]+ \([ 0-9.]+%\) / && !/PROGRAM TOTALS/ {
      c = $1; gsub(",", "", c)
      name = $0; sub(/^ *[0-9,]+ \([ 0-9.]+%\) +/, "", name); sub(/ \[.*\]$/, "", name)
      sub(/^\?\?\?:/, "", name)
      printf "%9.0f  %s\n", c / n, name
      if (++k >= top) exit
    }'
