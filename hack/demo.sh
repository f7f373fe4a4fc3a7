#!/usr/bin/env bash
# svcproxy end to end, in a few seconds after the build: a one-node cluster made of network
# namespaces, the real svcproxy binary programming iptables in the node, real HTTP requests
# to a Service's ClusterIP and NodePort, and an endpoint removal taking effect.
#
#   sudo hack/demo.sh
#
#  external host 192.168.0.2 ──veth── node-a 192.168.0.10  (svcproxy runs here)
#                                      │ routed /32 veths, pods' gateway 10.244.1.1
#        pod-1 10.244.1.11   pod-2 10.244.1.12   pod-3 10.244.1.13   client 10.244.1.100
#
# Every namespace is created by this script (names start with svpdemo-) and deleted on exit,
# also on failure or Ctrl-C. The root namespace's netfilter tables, routes and sysctls are
# never touched, and no packet leaves the demo's own namespaces.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

CLUSTER_IP=10.96.0.10
NODE_IP=192.168.0.10
EXTERNAL_IP=192.168.0.2
NODE_PORT=30080
CLIENT_IP=10.244.1.100
PODS=(pod-1 pod-2 pod-3)
POD_IPS=(10.244.1.11 10.244.1.12 10.244.1.13)
REQUESTS=12

# ---------------------------------------------------------------------------------------------
# Output helpers

if [ -t 1 ]; then
  B=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' R=$'\e[0m'
else
  B="" DIM="" RED="" GREEN="" R=""
fi
STEP_NO=0
STEP="starting"
step() { # a numbered section header
  STEP_NO=$((STEP_NO + 1))
  STEP="$*"
  printf '\n%s==> [%d/9] %s%s\n' "$B" "$STEP_NO" "$*" "$R"
}
say() { printf '    %s\n' "$*"; }
explain() { printf '    %s%s%s\n' "$DIM" "$*" "$R"; }
fail() {
  printf '\n%sFAILED%s in step "%s": %s\n' "$RED" "$R" "$STEP" "$*" >&8
  exit 1
}

# Milliseconds since the epoch.
now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}

# ---------------------------------------------------------------------------------------------
# Cleanup: runs once on every exit path (success, failure, Ctrl-C, SIGTERM).

# The script's own stdout/stderr, for messages from traps: a trap can run while a function's
# output is redirected to /dev/null (e.g. inside wait_for).
exec 7>&1 8>&2

TAG="svpdemo-$$"
NAMESPACES=()
BG_PIDS=()
PROXY_PID=""
BUILD_PID=""
WORK=""
CLEANED=0

cleanup() {
  local rc=$?
  trap '' INT TERM
  trap - ERR
  set +e
  [ "$CLEANED" = 1 ] && return
  CLEANED=1
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ] && [ -n "$WORK" ] && [ -s "$WORK/svcproxy.log" ]; then
    printf '\n%s--- last lines of the svcproxy log ---%s\n' "$B" "$R" >&8
    tail -n 30 "$WORK/svcproxy.log" >&8
    printf '%s--------------------------------------%s\n' "$B" "$R" >&8
  fi
  # A build in progress runs in its own process group: stop cargo and its rustc children.
  if [ -n "$BUILD_PID" ]; then
    kill -TERM -- "-$BUILD_PID" 2>/dev/null || true
  fi
  for pid in $PROXY_PID "${BG_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # Anything still running inside the demo's namespaces was started by this script: give it
  # 3 s to exit, then kill it.
  local deadline=$(($(now_ms) + 3000)) left
  while :; do
    left=""
    for ns in "${NAMESPACES[@]}"; do
      left+=" $(ip netns pids "$ns" 2>/dev/null)"
    done
    [ -n "${left// /}" ] && [ "$(now_ms)" -lt "$deadline" ] || break
    sleep 0.05
  done
  for ns in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  for pid in $BUILD_PID $PROXY_PID "${BG_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  for ns in "${NAMESPACES[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
  done
  [ -n "$WORK" ] && rm -rf "$WORK"
  if [ "$rc" -eq 0 ]; then
    printf '\n%sDemo finished: namespaces deleted, background processes stopped.%s\n' "$GREEN" "$R" >&7
  elif [ "${#NAMESPACES[@]}" -gt 0 ]; then
    printf 'Cleaned up: namespaces %s-* deleted, background processes stopped.\n' "$TAG" >&8
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'printf "\nInterrupted.\n" >&8; exit 130' INT
trap 'printf "\nTerminated.\n" >&8; exit 143' TERM
trap 'printf "%sFAILED%s in step \"%s\": command failed (line %s): %s\n" "$RED" "$R" "$STEP" "$LINENO" "$BASH_COMMAND" >&8' ERR

# ---------------------------------------------------------------------------------------------
# Namespace helpers

# Milliseconds since the epoch at which a svcproxy log line was written.
log_ms() {
  date -d "${1%% *}" +%s%3N
}

# Runs a command inside a demo namespace.
in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}

new_ns() { # new_ns VAR suffix: creates svpdemo-PID-suffix with lo up
  local name="$TAG-$2"
  ip netns add "$name"
  NAMESPACES+=("$name")
  in_ns "$name" ip link set lo up
  printf -v "$1" '%s' "$name"
}

# A pod routed from the node (Calico style): veth pair, /32 on both sides, the node's end
# answers as the pods' gateway 10.244.1.1.
link_pod() { # link_pod POD_NS HOST_IF IP
  local pod=$1 host_if=$2 ip=$3
  in_ns "$NODE" ip link add "$host_if" type veth peer name eth0 netns "$pod"
  in_ns "$NODE" ip link set "$host_if" up
  in_ns "$NODE" ip addr add 10.244.1.1/32 dev "$host_if"
  in_ns "$NODE" ip route add "$ip/32" dev "$host_if"
  in_ns "$pod" ip link set eth0 up
  in_ns "$pod" ip addr add "$ip/32" dev eth0
  in_ns "$pod" ip route add 10.244.1.1 dev eth0 scope link
  in_ns "$pod" ip route add default via 10.244.1.1 dev eth0
}

# One HTTP GET from a namespace; prints "NAME CLIENT-IP" or fails.
http_get() { # http_get NS URL
  in_ns "$1" curl -s --connect-timeout 2 --max-time 5 "$2"
}

# Polls a command until it succeeds: wait_for TIMEOUT_S WHAT CMD...
wait_for() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$(($(now_ms) + timeout * 1000))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$PROXY_PID" ] && ! kill -0 "$PROXY_PID" 2>/dev/null; then
      fail "svcproxy exited while waiting for $what"
    fi
    [ "$(now_ms)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
    sleep 0.05
  done
}

# Sends N requests from NS to URL, prints the answers and a count per pod. Sets SPREAD_PODS
# (how many different pods answered), SPREAD_SEEN (" pod-1 pod-3 "), SPREAD_FAILED and
# SPREAD_SOURCES (client addresses the pods saw).
spread() { # spread NS URL N
  local ns=$1 url=$2 n=$3 i out name
  local -A count=() sources=()
  local answers=()
  SPREAD_FAILED=0
  for ((i = 0; i < n; i++)); do
    if out=$(http_get "$ns" "$url") && [ -n "$out" ]; then
      name=${out%% *}
      sources[${out#* }]=1
    else
      name="FAILED"
      SPREAD_FAILED=$((SPREAD_FAILED + 1))
    fi
    answers+=("$name")
    count[$name]=$((${count[$name]:-0} + 1))
  done
  say "answers:  ${answers[*]}"
  SPREAD_PODS=0
  for name in "${PODS[@]}" FAILED; do
    local c=${count[$name]:-0}
    [ "$name" = FAILED ] && [ "$c" -eq 0 ] && continue
    [ "$name" != FAILED ] && [ "$c" -gt 0 ] && SPREAD_PODS=$((SPREAD_PODS + 1))
    local bar=""
    for ((i = 0; i < c; i++)); do bar+="#"; done
    printf '    %-7s %2d  %s\n' "$name" "$c" "$bar"
  done
  SPREAD_SOURCES="${!sources[*]}"
  SPREAD_SEEN=" ${!count[*]} "
}

# ---------------------------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || { echo "hack/demo.sh needs root (network namespaces, iptables): sudo $0" >&2; exit 1; }

step "Installing missing tools (hack/install-deps.sh)"
hack/install-deps.sh
say "iptables, nftables, iproute2, conntrack, curl, python3 and cargo are present."

step "Building svcproxy (cargo build --release)"
# In the background, in its own process group, so that Ctrl-C or SIGTERM stops the build at once.
setsid cargo build --release 7>&- 8>&- &
BUILD_PID=$!
wait "$BUILD_PID" || fail "cargo build --release failed"
BUILD_PID=""
SVCPROXY="$REPO/target/release/svcproxy"
[ -x "$SVCPROXY" ] || fail "$SVCPROXY was not built"
DEMO_START=$(now_ms)

step "Building a one-node cluster out of network namespaces"
WORK=$(mktemp -d /tmp/svpdemo.XXXXXX)
new_ns NODE node
new_ns EXT ext
new_ns CLIENT client
POD_NS=()
for i in 1 2 3; do
  new_ns ns "pod$i"
  POD_NS+=("$ns")
done
# The node routes between pods and the outside (only inside its own namespace).
in_ns "$NODE" sysctl -qw net.ipv4.ip_forward=1
for i in 0 1 2; do
  link_pod "${POD_NS[$i]}" "vp$((i + 1))" "${POD_IPS[$i]}"
done
link_pod "$CLIENT" vpc "$CLIENT_IP"
in_ns "$NODE" ip link add eth-ext type veth peer name eth0 netns "$EXT"
in_ns "$NODE" ip link set eth-ext up
in_ns "$NODE" ip addr add "$NODE_IP/24" dev eth-ext
in_ns "$EXT" ip link set eth0 up
in_ns "$EXT" ip addr add "$EXTERNAL_IP/24" dev eth0
# Like a real node, node-a has a default route (here to the demo's external host): locally
# generated packets to a ClusterIP need a route before NAT rewrites their destination.
in_ns "$NODE" ip route add default via "$EXTERNAL_IP"
for i in 0 1 2; do
  ip netns exec "${POD_NS[$i]}" python3 tests/netns/agent.py http "${PODS[$i]}" 0.0.0.0 8080 \
    >"$WORK/${PODS[$i]}.log" 2>&1 7>&- 8>&- &
  BG_PIDS+=($!)
done
for i in 0 1 2; do
  wait_for 30 "${PODS[$i]} to serve HTTP" http_get "$NODE" "http://${POD_IPS[$i]}:8080/"
done
say "node-a    $NODE_IP          namespace $NODE (svcproxy runs here)"
say "external  $EXTERNAL_IP           namespace $EXT (a host outside the cluster)"
say "client    $CLIENT_IP          namespace $CLIENT (a pod that calls the service)"
for i in 0 1 2; do
  say "${PODS[$i]}     ${POD_IPS[$i]}           namespace ${POD_NS[$i]} (HTTP :8080 answers \"${PODS[$i]} <client-ip>\")"
done

step "Starting svcproxy in node-a with the manifests of examples/demo/"
MANIFESTS="$WORK/manifests"
mkdir "$MANIFESTS"
cp examples/demo/*.yaml "$MANIFESTS/"
say "Service demo/web: type NodePort, ClusterIP $CLUSTER_IP:80, NodePort $NODE_PORT -> pods' port 8080"
say "EndpointSlice:    ${POD_IPS[*]} (pod-1..3, all ready on node-a)"
say "manifests dir:    $MANIFESTS (svcproxy watches it like API-server events)"
CMD=("$SVCPROXY" --proxy-mode iptables --hostname-override node-a --cluster-cidr 10.244.0.0/16
  --min-sync-period 100ms --manifests-dir "$MANIFESTS")
say "\$ ip netns exec $NODE ${CMD[*]/#$REPO\//}"
t0=$(now_ms)
RUST_LOG=info ip netns exec "$NODE" "${CMD[@]}" >"$WORK/svcproxy.log" 2>&1 7>&- 8>&- &
PROXY_PID=$!
wait_for 30 "svcproxy's first sync" grep -q "synced rules" "$WORK/svcproxy.log"
say "svcproxy wrote the rules $(($(log_ms "$(grep -m 1 'synced rules' "$WORK/svcproxy.log")") - t0)) ms after it started. Its log so far:"
sed -e 's/^/      /' "$WORK/svcproxy.log"
wait_for 30 "the ClusterIP to answer from the client pod" http_get "$CLIENT" "http://$CLUSTER_IP/"
# svcproxy picks iptables-nft or iptables-legacy the way kube-proxy does; list with the same one.
IPT=""
for bin in iptables iptables-nft iptables-legacy; do
  if in_ns "$NODE" "$bin" -t nat -L KUBE-SERVICES -n >/dev/null 2>&1; then
    IPT=$bin
    break
  fi
done
[ -n "$IPT" ] || fail "no KUBE-SERVICES chain in node-a's nat table"
# Lists a nat chain (without iptables-nft's notice that svcproxy's backend detection also
# created empty iptables-legacy tables in the namespace).
ipt_list() {
  in_ns "$NODE" "$IPT" -t nat -L "$1" -n 2>&1 | grep -v '^# Warning: iptables-legacy tables present' | sed -e 's/^/      /'
}
SVC_CHAIN=$(in_ns "$NODE" "$IPT" -t nat -S KUBE-SERVICES 2>/dev/null | grep -o 'KUBE-SVC-[A-Z0-9]*' | head -n 1)
[ -n "$SVC_CHAIN" ] || fail "no KUBE-SVC chain for demo/web"

step "Requests through the service spread over the pods"
say "$REQUESTS requests from the client pod to the ClusterIP (curl http://$CLUSTER_IP/):"
spread "$CLIENT" "http://$CLUSTER_IP/" "$REQUESTS"
[ "$SPREAD_FAILED" -eq 0 ] || fail "$SPREAD_FAILED requests to the ClusterIP failed"
# Picks are random: one pod getting none of 12 requests happens (~2%), all going to one does not.
[ "$SPREAD_PODS" -ge 2 ] || fail "every request went to the same pod"
explain "The pods saw the client's own address ($SPREAD_SOURCES): pod-to-service traffic is not masqueraded."
echo
say "$REQUESTS requests from the external host to the NodePort (curl http://$NODE_IP:$NODE_PORT/):"
spread "$EXT" "http://$NODE_IP:$NODE_PORT/" "$REQUESTS"
[ "$SPREAD_FAILED" -eq 0 ] || fail "$SPREAD_FAILED requests to the NodePort failed"
[ "$SPREAD_PODS" -ge 2 ] || fail "every request went to the same pod"
explain "The pods saw $SPREAD_SOURCES, not $EXTERNAL_IP: with externalTrafficPolicy Cluster, external"
explain "traffic is masqueraded to the node so that replies come back through it."
explain "Each connection picks a pod at random (iptables statistic rules), so counts vary from run to run."

step "Removing pod-3 from the EndpointSlice"
SLICE="$MANIFESTS/web-endpointslice.yaml"
grep -v 'name: pod-3' "$SLICE" >"$MANIFESTS/.web-endpointslice.yaml.tmp"
say "New web-endpointslice.yaml without this line (written to a temp file, then mv):"
say "  $(grep 'name: pod-3' "$SLICE")"
log_lines=$(wc -l <"$WORK/svcproxy.log")
t0=$(now_ms)
mv "$MANIFESTS/.web-endpointslice.yaml.tmp" "$SLICE"
# Send requests until svcproxy's rules no longer mention pod-3 and REQUESTS answers in a row
# after that came from other pods.
rules_updated=""
last_pod3=""
streak=0
failures=0
timeline=()
while [ "$streak" -lt "$REQUESTS" ]; do
  [ $(($(now_ms) - t0)) -lt 30000 ] || fail "requests still reach pod-3 30 s after the change"
  kill -0 "$PROXY_PID" 2>/dev/null || fail "svcproxy exited"
  if out=$(http_get "$CLIENT" "http://$CLUSTER_IP/"); then
    name=${out%% *}
  else
    name=FAILED
  fi
  t=$(($(now_ms) - t0))
  timeline+=("$name@${t}ms")
  case $name in
    pod-3) last_pod3=$t streak=0 ;;
    FAILED) failures=$((failures + 1)) streak=0 ;;
    *) [ -z "$rules_updated" ] || streak=$((streak + 1)) ;;
  esac
  if [ -z "$rules_updated" ]; then
    rules=$(in_ns "$NODE" "$IPT" -t nat -S "$SVC_CHAIN" 2>/dev/null || true)
    if [[ "$rules" == *KUBE-SEP-* && "$rules" != *"${POD_IPS[2]}"* ]]; then
      rules_updated=$(($(now_ms) - t0))
      timeline+=("[rules-updated@${rules_updated}ms]")
    fi
  fi
done
say "Requests from the client pod while the change was applied (answer@ms since the mv):"
n=${#timeline[@]}
if [ "$n" -gt 36 ]; then # a slow change: the start and the end are what matter
  timeline=("${timeline[@]:0:12}" "..." "${timeline[@]:n-18}")
fi
printf '%s\n' "${timeline[@]}" | xargs -n 6 | sed -e 's/^/      /'
took=$rules_updated
[ -z "$last_pod3" ] || [ "$last_pod3" -le "$took" ] || took=$last_pod3
say "=> The removal took effect within ${B}$took ms${R}: by then $SVC_CHAIN no longer listed pod-3,"
say "   and the $REQUESTS requests sent after that all went to pod-1/pod-2."
sync_line=$(tail -n +"$((log_lines + 1))" "$WORK/svcproxy.log" | grep -m 1 'synced rules' || true)
if [ -n "$sync_line" ]; then
  elapsed=$(sed -n 's/.*elapsed_ms=\([0-9]*\).*/\1/p' <<<"$sync_line")
  say "   svcproxy logged the end of its sync $(($(log_ms "$sync_line") - t0)) ms after the change (the sync took ${elapsed:-?} ms)."
fi
[ "$failures" -eq 0 ] || fail "$failures request(s) failed while pod-3 was being removed"
explain "svcproxy saw the file change, re-read the file and rewrote only this service's chains"
explain "(written/deleted count chains; the deleted one is pod-3's KUBE-SEP chain). Its log:"
tail -n +"$((log_lines + 1))" "$WORK/svcproxy.log" | sed -e 's/^/      /'
echo
say "$REQUESTS more requests from the client pod to the ClusterIP:"
spread "$CLIENT" "http://$CLUSTER_IP/" "$REQUESTS"
[ "$SPREAD_FAILED" -eq 0 ] || fail "$SPREAD_FAILED requests failed after the removal"
[[ "$SPREAD_SEEN" != *" pod-3 "* ]] || fail "pod-3 still answers after it was removed"

step "What monitoring sees: kube-proxy's metrics and health endpoints"
say "\$ ip netns exec $NODE curl -s http://127.0.0.1:10249/metrics | grep ..."
metrics=$(in_ns "$NODE" curl -s --max-time 2 http://127.0.0.1:10249/metrics) || fail "no answer on the metrics port"
grep -E '^kubeproxy_(sync_proxy_rules_duration_seconds_(count|sum)|sync_proxy_rules_(endpoint|service)_changes_total|sync_proxy_rules_iptables_total|sync_proxy_rules_last_timestamp_seconds) ' <<<"$metrics" \
  | sed -e 's/^/      /'
grep -q '^kubeproxy_sync_proxy_rules_duration_seconds_count [1-9]' <<<"$metrics" || fail "no sync counted in the metrics"
explain "Upstream kube-proxy's metric names, types and buckets, so existing dashboards and alerts work."
say "\$ ip netns exec $NODE curl -s http://127.0.0.1:10256/healthz"
health=$(in_ns "$NODE" curl -s --max-time 2 -w ' (HTTP %{http_code})' http://127.0.0.1:10256/healthz) || fail "no answer on the healthz port"
say "      $health"
[[ "$health" == *"HTTP 200"* ]] || fail "/healthz is not 200"

step "The iptables rules svcproxy wrote in node-a (nat table)"
say "\$ ip netns exec $NODE $IPT -t nat -L KUBE-SERVICES -n"
ipt_list KUBE-SERVICES
explain "Every service IP:port jumps to its KUBE-SVC-... chain; NodePorts are matched last via KUBE-NODEPORTS."
echo
say "\$ ip netns exec $NODE $IPT -t nat -L $SVC_CHAIN -n"
ipt_list "$SVC_CHAIN"
explain "The service's chain picks one endpoint chain (KUBE-SEP-...) per new connection: the first"
explain "with probability 1/2, else the second (pod-3 is gone); each KUBE-SEP DNATs to its pod."

step "Stopping svcproxy and removing its rules (svcproxy --cleanup)"
kill -TERM "$PROXY_PID"
deadline=$(($(now_ms) + 10000))
while kill -0 "$PROXY_PID" 2>/dev/null; do
  [ "$(now_ms)" -lt "$deadline" ] || fail "svcproxy did not exit within 10 s of SIGTERM"
  sleep 0.05
done
wait "$PROXY_PID" || fail "svcproxy exited with status $? after SIGTERM"
PROXY_PID=""
say "svcproxy stopped: $(tail -n 1 "$WORK/svcproxy.log" | sed -e 's/^.*INFO [a-z_:]*: //')"
http_get "$CLIENT" "http://$CLUSTER_IP/" >/dev/null ||
  fail "the service stopped working when svcproxy stopped (rules should stay in place)"
explain "The rules stay in place after a normal stop: the service still answers."
say "\$ ip netns exec $NODE ${SVCPROXY#$REPO/} --cleanup"
in_ns "$NODE" "$SVCPROXY" --cleanup 2>&1 | sed -e 's/^/      /'
left=$(in_ns "$NODE" "$IPT-save" 2>/dev/null | grep -c 'KUBE-' || true)
[ "$left" -eq 0 ] || fail "$left KUBE- lines left in $IPT-save after --cleanup"
if in_ns "$CLIENT" curl -s --connect-timeout 1 "http://$CLUSTER_IP/" >/dev/null; then
  fail "the ClusterIP still answers after --cleanup"
fi
say "$IPT-save in node-a has no KUBE- chains left, and the ClusterIP no longer answers."
say "Demo took $((($(now_ms) - DEMO_START + 500) / 1000)) s after the build."
