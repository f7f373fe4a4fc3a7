#!/usr/bin/env bash
# Scale benchmark of nftables mode, same harness as hack/scale-bench.sh (gen-manifests.py,
# --manifests-dir into a fresh network namespace, timings from svcproxy's "synced rules" log):
#   raw      `nft -f` of the same full transaction (svcproxy render --proxy-mode nftables)
#            into a fresh netns, timed in the same run
#   full     svcproxy's first (full) sync: render + transaction, from its log
#   endpoint the sync after one endpoint of one service changed: from the log, and end to end
#            (file renamed into place -> sync finished)
#   newsvc   the sync after one new service appeared: from the log, and end to end
#   rss      svcproxy's peak RSS (VmHWM)
#   connect  TCP connect latency from the node to a ClusterIP (median / p99 over 2000
#            connects, microseconds), the pod behind it in its own namespace
#
# usage: hack/scale-bench-nft.sh [N ...]      (default: 10 10000; E=10)
# env:   ENDPOINTS=10  TIMEOUT=600 (seconds per step)
#
# Everything runs in namespaces this script creates (svpnft-*) and deletes on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(10 10000)
E=${ENDPOINTS:-10}
TIMEOUT=${TIMEOUT:-600}

hack/install-deps.sh
cargo build --release --quiet
BIN=$PWD/target/release/svcproxy
WORK=$(mktemp -d /tmp/svpnft.XXXXXX)
NS=svpnft-$$
PID=""
SRV=""

cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null || true
  for n in "$NS" "$NS-raw" "$NS-pod"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# now_ms, wait_sync
source hack/bench-lib.sh

# The service the connect latency is measured through: ClusterIP 10.96.255.1:80 -> one pod
# at 10.255.255.1:8080 in its own namespace.
latency_service() {
  cat <<'EOF'
apiVersion: v1
kind: Service
metadata: {namespace: bench, name: latency}
spec:
  clusterIP: 10.96.255.1
  clusterIPs: [10.96.255.1]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: bench, name: latency-s1, labels: {kubernetes.io/service-name: latency}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.255.255.1]
    nodeName: node-0
    conditions: {ready: true}
EOF
}

CONNECT_PY='
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket()
    t = time.perf_counter()
    s.connect((host, port))
    lat.append((time.perf_counter() - t) * 1e6)
    s.close()
lat.sort()
print(f"{lat[len(lat)//2]:.0f} {lat[int(len(lat)*0.99)]:.0f}")
'
SERVER_PY='
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.255.255.1", 8080)); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()
'

printf '%-8s %-4s %8s %8s %8s %11s %14s %11s %14s %8s %12s %12s %8s\n' \
  services eps raw_s full_s full/raw endpoint_ms endpoint_e2e_ms newsvc_ms newsvc_e2e_ms rss_MiB \
  connect_us connect_p99 text_MiB
for N in "${counts[@]}"; do
  dir=$WORK/m$N
  python3 hack/gen-manifests.py -n "$N" -e "$E" -o "$dir" --per-file 100 >/dev/null

  # raw nft -f of the same full transaction into an empty namespace
  "$BIN" render --proxy-mode nftables -f "$dir" --hostname-override node-0 \
    --cluster-cidr 10.128.0.0/9 > "$WORK/full.nft"
  size_mib=$(awk -v b="$(stat -c %s "$WORK/full.nft")" 'BEGIN{printf "%.1f", b/1048576}')
  ip netns add "$NS-raw"
  t0=$(now_ms)
  ip netns exec "$NS-raw" nft -f "$WORK/full.nft"
  raw_ms=$(( $(now_ms) - t0 ))
  echo "N=$N: raw nft -f ${raw_ms} ms" >&2
  ip netns del "$NS-raw"

  # node namespace with a pod namespace behind a veth (for the connect latency)
  ip netns add "$NS"; ip netns add "$NS-pod"
  ip netns exec "$NS" ip link set lo up
  ip netns exec "$NS-pod" ip link set lo up
  ip link add svpnft-n$$ netns "$NS" type veth peer name eth0 netns "$NS-pod"
  ip netns exec "$NS" ip addr add 10.255.255.254/24 dev svpnft-n$$
  ip netns exec "$NS" ip link set svpnft-n$$ up
  ip netns exec "$NS-pod" ip addr add 10.255.255.1/24 dev eth0
  ip netns exec "$NS-pod" ip link set eth0 up
  ip netns exec "$NS" ip route add default via 10.255.255.1
  ip netns exec "$NS-pod" python3 -c "$SERVER_PY" & SRV=$!

  log=$WORK/svcproxy-$N.log
  RUST_LOG=info ip netns exec "$NS" "$BIN" --proxy-mode nftables --manifests-dir "$dir" \
    --hostname-override node-0 --cluster-cidr 10.128.0.0/9 --min-sync-period 0s \
    --sync-period 1h > "$log" 2>&1 &
  PID=$!
  full_ms=$(wait_sync "$log" 1)
  echo "N=$N: full sync ${full_ms} ms" >&2

  # One endpoint of the first service changes (10.128.x -> 10.127.x): file renamed into place.
  files=("$dir"/gen-svc-*.yaml); f=${files[0]}
  sed '0,/addresses: \[10\.128\./s//addresses: [10.127./' "$f" > "$dir/.edit.tmp"
  cmp -s "$f" "$dir/.edit.tmp" && { echo "endpoint edit did not change $f" >&2; exit 1; }
  t0=$(now_ms)
  mv "$dir/.edit.tmp" "$f"
  ep_ms=$(wait_sync "$log" 2)
  ep_e2e=$(( $(now_ms) - t0 ))
  [[ $(grep 'synced rules' "$log" | sed -n 2p) == *full=false* ]] || { echo "endpoint sync was not a delta" >&2; exit 1; }

  # One new service (the latency service).
  latency_service > "$WORK/.latency.tmp"
  t0=$(now_ms)
  mv "$WORK/.latency.tmp" "$dir/latency.yaml"
  new_ms=$(wait_sync "$log" 3)
  new_e2e=$(( $(now_ms) - t0 ))
  [[ $(grep 'synced rules' "$log" | sed -n 3p) == *full=false* ]] || { echo "new-service sync was not a delta" >&2; exit 1; }

  rss_kb=$(awk '/VmHWM/{print $2}' "/proc/$PID/status")
  read -r c50 c99 < <(ip netns exec "$NS" python3 -c "$CONNECT_PY" 10.96.255.1 80 2000)

  echo "N=$N: svcproxy log:" >&2; grep 'synced rules' "$log" >&2
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  kill "$SRV"; wait "$SRV" 2>/dev/null || true; SRV=""
  ip netns del "$NS"; ip netns del "$NS-pod"

  awk -v n="$N" -v e="$E" -v raw="$raw_ms" -v full="$full_ms" -v ep="$ep_ms" -v epe="$ep_e2e" \
      -v nw="$new_ms" -v nwe="$new_e2e" -v rss="$rss_kb" -v c50="$c50" -v c99="$c99" -v sz="$size_mib" 'BEGIN{
    printf "%-8d %-4d %8.2f %8.2f %8.2f %11.1f %14d %11.1f %14d %8.1f %12d %12d %8s\n",
      n, e, raw/1000, full/1000, full/raw, ep, epe, nw, nwe, rss/1024, c50, c99, sz }'
done
