#!/usr/bin/env bash
# Soak: one mesh-proxy sidecar (release build) under steady load for MINUTES (default 10),
# with churn: bursts of new connections (`Connection: close`, one request per connection)
# every 10 s and a config change (hot reload) every 5 s. Samples the proxy's RSS and open
# file descriptors every 10 s and prints a markdown report:
#   - RSS growth after warm-up (first minute) to the end of the load: must stay under 10 %;
#   - file descriptors: idle after a warm-up with the same mix, and idle 5 s after the load
#     stops: must return to that baseline;
#   - errors: wrk's socket errors and non-2xx answers for the steady load and the churn;
#   - reloads applied / rejected (admin /metrics).
#
#   scripts/soak.sh [MINUTES]        # needs wrk and haproxy (Debian packages)
#
# The backend is HAProxy answering 200 itself (`http-request return`, one thread): fast enough
# that the proxy, not the backend, is what is soaked.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"

for tool in wrk haproxy curl; do
    command -v "$tool" >/dev/null || { echo "soak needs $tool (apt-get install $tool)" >&2; exit 1; }
done

cargo build --release --quiet -p mesh-proxy --bin mesh-proxy
bin="$(pwd)/target/release/mesh-proxy"

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend_port="$(free_port)"
outbound_port="$(free_port)"
admin_port="$(free_port)"

cat >"$work/backend.cfg" <<EOF
global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend backend
    bind 127.0.0.1:$backend_port
    http-request return status 200 content-type text/plain string hello
EOF
haproxy -f "$work/backend.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=("$!")

# The proxy's config; `config N` varies the route's timeout so that each write is a change.
config() {
    cat <<EOF
apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: soak, namespace: default }
spec:
  workload: { name: soak, labels: { app: soak } }
  outbound: { listen: "127.0.0.1:$outbound_port" }
  admin: { listen: "127.0.0.1:$admin_port" }
  concurrency: 2
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: backend, namespace: default }
spec:
  hosts: [backend]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{ number: 80, name: http, protocol: HTTP }]
  endpoints: [{ address: 127.0.0.1, ports: { http: $backend_port } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: backend, namespace: default }
spec:
  hosts: [backend]
  http:
  - timeout: $((10 + $1 % 20))s
    route: [{ destination: { host: backend } }]
EOF
}
config 0 >"$work/mesh.yaml"
RUST_LOG=warn "$bin" run --config "$work/mesh.yaml" >"$work/proxy.log" 2>&1 &
proxy="$!"
pids+=("$proxy")
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$admin_port/ready" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "http://127.0.0.1:$admin_port/ready" >/dev/null || { cat "$work/proxy.log" >&2; exit 1; }

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$proxy/status"; }
fds() { ls "/proc/$proxy/fd" | wc -l; }
metric() { curl -fsS "http://127.0.0.1:$admin_port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

url="http://127.0.0.1:$outbound_port/"
# One request through before any load: the backend and the route work.
if [ "$(curl -sS -o /dev/null -w '%{http_code}' -H "Host: backend" "$url")" != 200 ]; then
    echo "no 200 through the proxy" >&2
    cat "$work/haproxy.log" "$work/proxy.log" >&2
    exit 1
fi
# Warm up with the same mix as the soak (steady connections and a burst of new ones at
# once), so the upstream pool reaches the size the load needs: pooled connections stay
# open up to the idle timeout (1 h, Istio's), and the baseline has to include them.
wrk -t1 -c32 -d3s -H "Host: backend" "$url" >/dev/null &
wrk -t1 -c16 -d2s -H "Host: backend" -H "Connection: close" "$url" >/dev/null
wait "$!"
sleep 2
fd_base="$(fds)"
rss_start="$(rss_kb)"

seconds=$((minutes * 60))
wrk -t1 -c32 -d"${seconds}s" -H "Host: backend" "$url" >"$work/steady.txt" 2>&1 &
steady="$!"
pids+=("$steady")

samples="$work/samples.tsv"
echo -e "t_s\trss_kb\tfds" >"$samples"
start="$(date +%s)"
n=0
churn_reqs=0
churn_errors=0
while kill -0 "$steady" 2>/dev/null; do
    sleep 5
    n=$((n + 1))
    config "$n" >"$work/mesh.yaml.tmp" && mv "$work/mesh.yaml.tmp" "$work/mesh.yaml"
    if ((n % 2 == 0)); then
        t=$(($(date +%s) - start))
        echo -e "$t\t$(rss_kb)\t$(fds)" >>"$samples"
        # A second of new connections, one request each.
        out="$(wrk -t1 -c16 -d1s -H "Host: backend" -H "Connection: close" "$url" 2>&1 || true)"
        churn_reqs=$((churn_reqs + $(awk '/requests in/ {print $1}' <<<"$out")))
        errs="$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' <<<"$out")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
        churn_errors=$((churn_errors + ${errs:-0} + ${non2xx:-0}))
    fi
done
sleep 5
fd_end="$(fds)"
rss_end="$(rss_kb)"

# Warm-up: the first minute (a fifth of shorter runs); its last sample is the reference.
warm=$((seconds / 5 < 60 ? seconds / 5 : 60))
rss_warm="$(awk -F'\t' -v w="$warm" 'NR > 1 && $1 >= w {print $2; exit}' "$samples")"
rss_warm="${rss_warm:-$rss_start}"
rss_max="$(awk -F'\t' -v w="$warm" 'NR > 1 && $1 >= w && $2 > m {m = $2} END {print m + 0}' "$samples")"
fd_max="$(awk -F'\t' 'NR > 1 && $3 > m {m = $3} END {print m + 0}' "$samples")"
growth="$(awk -v a="$rss_warm" -v b="$rss_max" 'BEGIN {printf "%.1f", (b - a) * 100 / a}')"
steady_reqs="$(awk '/requests in/ {print $1}' "$work/steady.txt")"
steady_errs="$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$work/steady.txt")"
steady_non2xx="$(awk '/Non-2xx/ {print $NF}' "$work/steady.txt")"
rps="$(awk '/Requests\/sec/ {print $2}' "$work/steady.txt")"
applied="$(metric 'mesh_config_reloads_total{result="success"}')"
rejected="$(metric 'mesh_config_reloads_total{result="rejected"}')"

cat <<EOF
### Soak: ${minutes} min, $(date -u +%Y-%m-%d)

\`scripts/soak.sh $minutes\` on $(nproc) vCPU ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(uname -r); mesh-proxy release, concurrency 2; backend HAProxy $(haproxy -v | awk 'NR==1 {print $3}') answering itself; wrk on the same machine.

| figure | value |
|---|---|
| steady load (wrk -c32) | ${steady_reqs:-0} requests, ${rps:-0} rps, socket errors ${steady_errs:-0}, non-2xx ${steady_non2xx:-0} |
| churn (1 s of \`Connection: close\` every 10 s) | ${churn_reqs} requests, errors ${churn_errors} |
| config reloads applied / rejected | ${applied:-?} / ${rejected:-?} |
| RSS at start / after warm-up (${warm} s) / max after warm-up / end | $((rss_start / 1024)) / $((rss_warm / 1024)) / $((rss_max / 1024)) / $((rss_end / 1024)) MiB |
| RSS growth after warm-up | ${growth} % (limit 10 %) |
| open fds: idle after warm-up / max under load / idle 5 s after | ${fd_base} / ${fd_max} / ${fd_end} |
EOF
echo
echo "Samples (t s, RSS kB, fds):"
column -t "$samples" | sed 's/^/    /'
