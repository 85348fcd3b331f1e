#!/usr/bin/env bash
# Runtime-layout, allocator and logging comparison for campaign-gate, without rebuilding:
# the same release binary under several environments (`[server] runtime` and `workers`
# by their CAMPAIGN_GATE_* overrides, an allocator by LD_PRELOAD, which Rust's default
# System allocator honours, the request log on or off), warm keys only, runs interleaved
# across variants. The log is off (CAMPAIGN_GATE_LOG=warn) unless a variant sets it.
# Needs what benches/load.sh installs and builds.
#
#   benches/variants.sh            (env: RUNS 3, DURATION 8, CONNS 64, THREADS 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/campaign-gate
LIB=/usr/lib/x86_64-linux-gnu
ROUTE=/campaignapi/resources/v3/campaigncontents/4711
VARIANTS=(
  "per-core-2w CAMPAIGN_GATE_SERVER_WORKERS=2"
  "multi-thread-2w CAMPAIGN_GATE_SERVER_RUNTIME=multi-thread TOKIO_WORKER_THREADS=2"
  "per-core-1w CAMPAIGN_GATE_SERVER_WORKERS=1"
  "per-core-2w-jemalloc CAMPAIGN_GATE_SERVER_WORKERS=2 LD_PRELOAD=$LIB/libjemalloc.so.2"
  "per-core-2w-mimalloc CAMPAIGN_GATE_SERVER_WORKERS=2 LD_PRELOAD=$LIB/libmimalloc.so.2"
  "per-core-2w-log-info CAMPAIGN_GATE_SERVER_WORKERS=2 CAMPAIGN_GATE_LOG=info"
)
[ -x "$BIN" ] || { echo "build first: benches/load.sh (or cargo build --release)" >&2; exit 1; }
if [ ! -e "$LIB/libjemalloc.so.2" ] || [ ! -e "$LIB/libmimalloc.so.2" ]; then
  [ "$(id -u)" = 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive ${sudo:-} apt-get install -y -qq libjemalloc2 libmimalloc2.0 >/dev/null
fi

WORK=$(mktemp -d /tmp/campaign-gate-variants.XXXXXX)
STARTED=()
cleanup() {
  local p
  for p in "${STARTED[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${STARTED[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; exit 1; }
ticks() { local s; s=$(cat "/proc/$1/stat"); read -r -a f <<<"${s##*) }"; echo $((f[11] + f[12])); }

BACKEND=$(port)
GATE=$(port)
ADMIN=$(port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes 1;
pid $WORK/nginx/nginx.pid;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  server { listen 127.0.0.1:$BACKEND backlog=4096; location / { return 200 "ok"; } }
}
EOF
/usr/sbin/nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" -g 'daemon off;' &
STARTED+=($!)
wait_port "$BACKEND"
{
  printf '[server]\nlisten = "127.0.0.1:%s"\n[admin]\nlisten = "127.0.0.1:%s"\n' "$GATE" "$ADMIN"
  printf '[upstream]\nurl = "http://127.0.0.1:%s"\n[store]\nurl = "file:%s/store.json"\n' "$BACKEND" "$WORK"
  sed -n '/^\[\[apis\]\]/,$p' "$ROOT/campaign-gate.example.toml"
} >"$WORK/gate.toml"
for i in 1 2 3 4; do
  "$BIN" --config "$WORK/gate.toml" users create "u$i" --type api --grant campaigns >/dev/null
  "$BIN" --config "$WORK/gate.toml" keys generate "u$i" 2>/dev/null >>"$WORK/tokens.txt"
  "$BIN" --config "$WORK/gate.toml" keys generate "u$i" 2>/dev/null >>"$WORK/tokens.txt"
done
cat >"$WORK/rotate.lua" <<'EOF'
local reqs, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format("GET", args[2], { Host = "bench", Authorization = "Bearer " .. line })
  end
  i = math.random(n)
end
function request() i = i % n + 1; return reqs[i] end
function done(s, latency)
  io.write(string.format("RESULT rps=%.0f p99_ms=%.2f errors=%d\n", s.requests / (s.duration / 1e6),
    latency:percentile(99) / 1e3, s.errors.status + s.errors.connect + s.errors.read + s.errors.timeout))
end
EOF

printf 'variant\trun\trps\tp99_ms\tcpu_s_per_10k\tidle_rss_mib\tpeak_rss_mib\n' >"$WORK/runs.tsv"
for run in $(seq "$RUNS"); do
  for v in "${VARIANTS[@]}"; do
    read -r name envs <<<"$v"
    # shellcheck disable=SC2086
    env CAMPAIGN_GATE_LOG=warn $envs "$BIN" serve --config "$WORK/gate.toml" >"$WORK/gate.out" 2>"$WORK/gate.err" &
    pid=$!
    STARTED+=("$pid")
    wait_port "$GATE"
    sleep 0.5
    idle=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    wrk -t"$THREADS" -c"$CONNS" -d2s -s "$WORK/rotate.lua" "http://127.0.0.1:$GATE$ROUTE" -- "$WORK/tokens.txt" "$ROUTE" >/dev/null
    t0=$(ticks "$pid")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$WORK/rotate.lua" "http://127.0.0.1:$GATE$ROUTE" -- "$WORK/tokens.txt" "$ROUTE")
    t1=$(ticks "$pid")
    peak=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
    eval "$(grep '^RESULT' <<<"$out" | sed 's/^RESULT //')"
    # shellcheck disable=SC2154
    awk -v v="$name" -v r="$run" -v rps="$rps" -v p99="$p99_ms" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
      -v d="$DURATION" -v i="$idle" -v p="$peak" \
      'BEGIN { printf "%s\t%s\t%s\t%s\t%.3f\t%.1f\t%.1f\n", v, r, rps, p99, (t / hz) / (rps * d) * 1e4, i / 1024, p / 1024 }' |
      tee -a "$WORK/runs.tsv" >&2
    [ "$errors" = 0 ] || echo "WARNING: $name had $errors errors" >&2
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
echo
echo "| variant | req/s | p99 ms | CPU s / 10k req | idle RSS MiB | peak RSS MiB |"
echo "|---|---:|---:|---:|---:|---:|"
for v in "${VARIANTS[@]}"; do
  read -r name _ <<<"$v"
  printf '| %s |' "$name"
  for col in 3 4 5 6 7; do
    awk -F'\t' -v n="$name" -v c="$col" '$1 == n { print $c }' "$WORK/runs.tsv" | sort -g |
      awk '{ a[NR] = $1 } END { printf " %s |", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
  done
  echo
done
