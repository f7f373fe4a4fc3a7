#!/usr/bin/env bash
# Userspace-mode data path benchmark: the same traffic direct to a pod and through
# svcproxy --proxy-mode userspace (ClusterIP), measured in one run on a namespace topology:
#
#   client (10.244.1.100) ──veth── node (proxy; routes pods) ──veth── pod (10.244.1.11:8080)
#
#   bulk     one TCP stream for SECONDS, client -> server (Gbit/s), direct vs proxied; ratio
#   latency  COUNT sequential connect + 1-byte round trip + close (p50/p99 µs), direct vs
#            proxied; "added" is the difference (includes the proxy's dial to the endpoint)
#
# Both paths cross the same two veths; the direct one is forwarded by the node's kernel, the
# proxied one is accepted and spliced by svcproxy in the node. Traffic never leaves the
# namespaces this script creates (svpusb-*), which are deleted on exit.
#
#   scale    (with SCALE=N) N services x 3 endpoints from hack/gen-manifests.py: the first
#            sync (N addresses + N listeners) and a sync after one endpoint change, from the
#            proxy's log, in a namespace of its own
#
# usage: sudo hack/userspace-bench.sh        env: SECONDS_BULK=5 COUNT=2000 ROUNDS=3 SCALE=0
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_BULK=${SECONDS_BULK:-5}
SCALE=${SCALE:-0}
COUNT=${COUNT:-2000}
ROUNDS=${ROUNDS:-3}

cargo build --release --quiet --bin svcproxy --example tcp_bench
BIN=$PWD/target/release/svcproxy
TOOL=$PWD/target/release/examples/tcp_bench
WORK=$(mktemp -d /tmp/svpusb.XXXXXX)
P=svpusb-$$
NODE=$P-node CLIENT=$P-client POD=$P-pod
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$NODE" "$CLIENT" "$POD" "$P-scale"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

for ns in "$NODE" "$CLIENT" "$POD"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
nsx "$NODE" sysctl -qw net.ipv4.ip_forward=1
link() { # pod-side namespace, host-side interface, address
  ip -n "$NODE" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$NODE" link set "$2" up
  ip -n "$NODE" addr add 10.244.1.1/32 dev "$2"
  ip -n "$NODE" route add "$3/32" dev "$2"
  ip -n "$1" link set eth0 up
  ip -n "$1" addr add "$3/32" dev eth0
  ip -n "$1" route add 10.244.1.1 dev eth0 scope link
  ip -n "$1" route add default via 10.244.1.1 dev eth0
}
link "$POD" vpod 10.244.1.11
link "$CLIENT" vcli 10.244.1.100

# Background processes are started with ip netns exec directly (it execs, so $! is the
# process itself and the exit trap can stop it).
ip netns exec "$POD" "$TOOL" server 0.0.0.0:8080 & PIDS+=($!)

mkdir -p "$WORK/m"
cat > "$WORK/m/svc.yaml" <<'EOF'
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.244.1.1}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: bench, name: sink}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: tcp, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: bench, name: sink-1, labels: {kubernetes.io/service-name: sink}}
addressType: IPv4
ports: [{name: tcp, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.1.11], nodeName: node-a}]
EOF
ip netns exec "$NODE" env RUST_LOG=warn "$BIN" --proxy-mode userspace --hostname-override node-a \
  --cluster-cidr 10.244.0.0/16 --manifests-dir "$WORK/m" 2> "$WORK/proxy.log" & PIDS+=($!)
PROXY_PID=$!

for _ in $(seq 200); do
  nsx "$CLIENT" "$TOOL" latency 10.96.0.10:80 1 >/dev/null 2>&1 && break
  sleep 0.05
done
nsx "$CLIENT" "$TOOL" latency 10.96.0.10:80 1 >/dev/null || { cat "$WORK/proxy.log"; exit 1; }

run() { nsx "$CLIENT" "$TOOL" "$@"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*$1=([0-9.]+).*/\1/"; }

: > "$WORK/bulk_direct"; : > "$WORK/bulk_proxy"; : > "$WORK/lat_direct"; : > "$WORK/lat_proxy"
for r in $(seq "$ROUNDS"); do
  # Interleaved, so background load on the machine hits both paths alike.
  run bulk 10.244.1.11:8080 "$SECONDS_BULK" | awk '{print $2}' >> "$WORK/bulk_direct"
  run bulk 10.96.0.10:80 "$SECONDS_BULK" | awk '{print $2}' >> "$WORK/bulk_proxy"
  run latency 10.244.1.11:8080 "$COUNT" >> "$WORK/lat_direct"
  run latency 10.96.0.10:80 "$COUNT" >> "$WORK/lat_proxy"
done

bd=$(median < "$WORK/bulk_direct"); bp=$(median < "$WORK/bulk_proxy")
d50=$(field p50_us < "$WORK/lat_direct" | median); p50=$(field p50_us < "$WORK/lat_proxy" | median)
d99=$(field p99_us < "$WORK/lat_direct" | median); p99=$(field p99_us < "$WORK/lat_proxy" | median)
rss=$(awk '/VmHWM/ {print $2/1024}' "/proc/$PROXY_PID/status" 2>/dev/null || echo "?")

echo "userspace proxy benchmark ($ROUNDS rounds, medians; bulk ${SECONDS_BULK}s x 1 stream; latency $COUNT connections)"
printf '%-34s %12s %12s %12s\n' "" direct proxied "ratio/added"
printf '%-34s %12.2f %12.2f %12.2f\n' "bulk throughput (Gbit/s)" "$bd" "$bp" "$(echo "$bp / $bd" | bc -l)"
printf '%-34s %12.0f %12.0f %+12.0f\n' "connect+1B round trip p50 (us)" "$d50" "$p50" "$(echo "$p50 - $d50" | bc -l)"
printf '%-34s %12.0f %12.0f %+12.0f\n' "connect+1B round trip p99 (us)" "$d99" "$p99" "$(echo "$p99 - $d99" | bc -l)"
echo "proxy peak RSS: ${rss} MiB"
echo "raw: bulk direct [$(paste -sd' ' "$WORK/bulk_direct")] proxied [$(paste -sd' ' "$WORK/bulk_proxy")]"

if [ "$SCALE" -gt 0 ]; then
  SNS=$P-scale
  ip netns add "$SNS"; nsx "$SNS" ip link set lo up
  python3 hack/gen-manifests.py -n "$SCALE" -e 3 -o "$WORK/scale" --per-file 500 >/dev/null
  ip netns exec "$SNS" env RUST_LOG=info "$BIN" --proxy-mode userspace --hostname-override node-0 \
    --cluster-cidr 10.128.0.0/9 --min-sync-period 100ms --manifests-dir "$WORK/scale" 2> "$WORK/scale.log" & PIDS+=($!)
  SPID=$!
  wait_syncs() { for _ in $(seq 1200); do [ "$(grep -c 'synced rules' "$WORK/scale.log" || true)" -ge "$1" ] && return 0; sleep 0.05; done; tail "$WORK/scale.log"; return 1; }
  wait_syncs 1
  first=$(grep 'synced rules' "$WORK/scale.log" | sed -n 1p | sed -E 's/.*elapsed_ms=([0-9.]+).*/\1/')
  f=$WORK/scale/gen-svc-000000.yaml
  sed -i '0,/\[10\.128\.0\.2\]/s//[10.128.0.250]/' "$f"
  wait_syncs 2
  second=$(grep 'synced rules' "$WORK/scale.log" | sed -n 2p | sed -E 's/.*elapsed_ms=([0-9.]+).*/\1/')
  addrs=$(nsx "$SNS" ip -o addr show dev lo | grep -cE 'inet 10\.(9[6-9]|10[0-9]|11[01])\.' || true)
  listeners=$(nsx "$SNS" ss -Hltn | wc -l)
  srss=$(awk '/VmHWM/ {print $2/1024}' "/proc/$SPID/status" 2>/dev/null || echo "?")
  echo "scale: $SCALE services -> $addrs addresses, $listeners listeners; first sync ${first} ms, sync after one endpoint change ${second} ms; peak RSS ${srss} MiB"
fi
