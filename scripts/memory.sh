#!/usr/bin/env bash
# The daemon's memory with N one-host STATIC ServiceEntry files of 10
# endpoints each and no proxy connected (BENCHMARKS.md, issue 13 item 3):
# prints VmRSS and VmHWM from /proc 2 s after /ready says every source
# synced (kB from /proc divided by 1,000, as BENCHMARKS.md reports them).
#   scripts/memory.sh target/release/meshreg [N=10000] [xds port=18711] [http port=18712]
set -euo pipefail
bin=$(realpath "${1:?usage: scripts/memory.sh MESHREG_BINARY [N] [XDS_PORT] [HTTP_PORT]}")
n=${2:-10000}
xds_port=${3:-18711}
http_port=${4:-18712}
dir=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir "$dir/config"
python3 - "$dir/config" "$n" <<'PY'
import sys
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    eps = ",".join(f"{{address: 10.{(i >> 8) & 255}.{i & 255}.{j + 1}}}" for j in range(10))
    with open(f"{out}/svc{i:05}.yaml", "w") as f:
        f.write(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}, namespace: default}}
spec:
  hosts: [svc{i}.example.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{eps}]
""")
PY
cat > "$dir/meshreg.yaml" <<YAML
xds:
  listen: 127.0.0.1:$xds_port
http:
  listen: 127.0.0.1:$http_port
sources:
  - kind: serviceentry
    dir: config
YAML
"$bin" --config "$dir/meshreg.yaml" > "$dir/log" 2>&1 &
pid=$!
started=$(date +%s.%N)
for _ in $(seq 1 1200); do
    if curl -sf "http://127.0.0.1:$http_port/ready" > /dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$dir/log" >&2; echo "meshreg exited" >&2; exit 1; fi
    sleep 0.1
done
curl -sf "http://127.0.0.1:$http_port/ready" > /dev/null || { cat "$dir/log" >&2; echo "not ready after 120 s" >&2; exit 1; }
ready=$(date +%s.%N)
sleep 2
rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
printf '%s files: ready after %.2f s; VmRSS %d MB, VmHWM %d MB\n' "$n" "$(echo "$ready - $started" | bc)" $((rss / 1000)) $((hwm / 1000))
