#!/usr/bin/env bash
# Scale benchmark of iptables mode: N services x E endpoints through --manifests-dir into a
# fresh network namespace, measured in one run per N:
#   raw      iptables-restore --noflush of the same full rule set (svcproxy render), fresh netns
#            (capped at RAW_TIMEOUT: on iptables-nft 1.8.9 it is quadratic in the chain count)
#   flush    the same text restored WITHOUT --noflush (flushes the tables: not usable in
#            production, the lower bound of loading that text), fresh netns
#   full     svcproxy's first (full) sync: render + restore, from its log
#   partial  svcproxy's sync after one endpoint changed, from its log, and end to end
#            (file rewritten -> sync finished)
#   rss      svcproxy's peak RSS (VmHWM)
#
# usage: hack/scale-bench.sh [N ...]          (default: 1000 2000 5000 10000; E=10)
# env:   ENDPOINTS=10  BACKEND=nft|legacy (default nft)  TIMEOUT=600 (seconds per step)
#
# Everything runs in namespaces this script creates (svpbench-*) and deletes on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1000 2000 5000 10000)
E=${ENDPOINTS:-10}
BACKEND=${BACKEND:-nft}
TIMEOUT=${TIMEOUT:-600}
RAW_TIMEOUT=${RAW_TIMEOUT:-300}

hack/install-deps.sh
cargo build --release --quiet
BIN=$PWD/target/release/svcproxy
WORK=$(mktemp -d /tmp/svpbench.XXXXXX)
NS=svpbench-$$
PID=""

cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  ip netns del "$NS-raw" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# now_ms, wait_sync
source hack/bench-lib.sh

printf '%-7s %-4s %9s %9s %9s %9s %10s %11s %14s %8s %8s\n' services eps raw_s flush_s full_s full/raw full/flush partial_ms partial_e2e_ms rss_MiB text_MiB
for N in "${counts[@]}"; do
  dir=$WORK/m$N
  python3 hack/gen-manifests.py -n "$N" -e "$E" -o "$dir" --per-file 100 >/dev/null

  # raw restore of the same full rule set into an empty namespace
  "$BIN" render -f "$dir" --hostname-override node-0 --cluster-cidr 10.128.0.0/9 > "$WORK/full.txt"
  size_mib=$(awk -v b="$(stat -c %s "$WORK/full.txt")" 'BEGIN{printf "%.1f", b/1048576}')
  ip netns add "$NS-raw"
  t0=$(now_ms)
  if timeout "$RAW_TIMEOUT" ip netns exec "$NS-raw" "iptables-$BACKEND-restore" --noflush --wait < "$WORK/full.txt"; then
    raw_ms=$(( $(now_ms) - t0 ))
  else
    raw_ms=-1
  fi
  ip netns del "$NS-raw"
  ip netns add "$NS-raw"
  t0=$(now_ms)
  ip netns exec "$NS-raw" "iptables-$BACKEND-restore" --wait < "$WORK/full.txt"
  flush_ms=$(( $(now_ms) - t0 ))
  ip netns del "$NS-raw"

  # svcproxy: full sync at start, then one endpoint change
  ip netns add "$NS"
  ip netns exec "$NS" ip link set lo up
  log=$WORK/svcproxy-$N.log
  RUST_LOG=info ip netns exec "$NS" "$BIN" --manifests-dir "$dir" --hostname-override node-0 \
    --cluster-cidr 10.128.0.0/9 --iptables-backend "$BACKEND" --min-sync-period 100ms \
    --sync-period 1h > "$log" 2>&1 &
  PID=$!
  full_ms=$(wait_sync "$log" 1)

  # Change one endpoint of the first service (10.128.x -> 10.127.x): rewrite its file atomically.
  files=("$dir"/gen-svc-*.yaml); f=${files[0]}
  sed '0,/addresses: \[10\.128\./s//addresses: [10.127./' "$f" > "$dir/.edit.tmp"
  cmp -s "$f" "$dir/.edit.tmp" && { echo "endpoint edit did not change $f" >&2; exit 1; }
  t0=$(now_ms)
  mv "$dir/.edit.tmp" "$f"
  partial_ms=$(wait_sync "$log" 2)
  e2e_ms=$(( $(now_ms) - t0 ))
  grep 'synced rules' "$log" | sed -n 2p | grep -q 'full=false' || { echo "second sync was not partial" >&2; exit 1; }
  rss_kb=$(awk '/VmHWM/{print $2}' "/proc/$PID/status")
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  ip netns del "$NS"

  awk -v n="$N" -v e="$E" -v raw="$raw_ms" -v fl="$flush_ms" -v full="$full_ms" -v p="$partial_ms" \
      -v e2e="$e2e_ms" -v rss="$rss_kb" -v sz="$size_mib" -v cap="$RAW_TIMEOUT" 'BEGIN{
    rawtxt = raw < 0 ? sprintf(">%d", cap) : sprintf("%.2f", raw/1000)
    ratio = raw < 0 ? sprintf("<%.3f", full/1000/cap) : sprintf("%.2f", full/raw)
    printf "%-7d %-4d %9s %9.2f %9.2f %9s %10.2f %11.1f %14d %8.1f %8s\n",
      n, e, rawtxt, fl/1000, full/1000, ratio, full/fl, p, e2e, rss/1024, sz }'
done
