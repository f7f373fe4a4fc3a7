#!/usr/bin/env bash
# How do FULL iptables syncs scale on the iptables-nft backend with --noflush, and which
# restore-input shape keeps them linear?  Findings: hack/NOFLUSH-STUDY.md.
#
# Usage: hack/noflush-study.sh [-n "1000 2000 5000 10000"] [-e 5] [-k "250 1000 2000"]
#                              [-c CAP_SECONDS] [-v VERIFY_N] [-p PROFILE_N] [-o RESULTS.tsv]
#
#   -n  service counts (each with -e endpoints, 1 in 10 NodePort, 3 nodes)
#   -e  endpoints per service (default 5)
#   -k  chunk sizes (user chains per restore) for the chunk:K strategy
#   -c  time cap per measurement; a strategy that hit it is skipped at larger N (default 120)
#   -v  N at which every strategy's final ruleset is compared with the baseline's (2000)
#   -p  N at which the time is broken down (decls vs rules vs jumps, strace) (2000)
#   -s  "as-is"-like strategies that do not help (split-tables, dashN, decl-first-desc) run
#       only up to this N (default 2000)
#   -o  also write the result rows as TSV to this file
#
# Everything runs inside throwaway network namespaces (ip netns add; all deleted by a trap
# on exit); the root namespace's rules are never read or written. Needs root, iptables
# 1.8.x (nft and legacy), python3, and target/release/svcproxy (built if missing; set
# SVCPROXY to use another binary).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
NS_LIST="1000 2000 5000 10000"
EPS=5
KS="250 1000 2000"
CAP=120
VERIFY_N=2000
PROFILE_N=2000
SLOW_MAX_N=2000
TSV=""
while getopts "n:e:k:c:v:p:s:o:h" opt; do
  case $opt in
    n) NS_LIST=$OPTARG ;; e) EPS=$OPTARG ;; k) KS=$OPTARG ;; c) CAP=$OPTARG ;;
    v) VERIFY_N=$OPTARG ;; p) PROFILE_N=$OPTARG ;; s) SLOW_MAX_N=$OPTARG ;; o) TSV=$OPTARG ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done

[ "$(id -u)" = 0 ] || { echo "needs root (ip netns)" >&2; exit 1; }
for t in ip iptables-nft-restore iptables-nft-save iptables-legacy-restore python3 timeout; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
SVCPROXY=${SVCPROXY:-$ROOT/target/release/svcproxy}
if [ ! -x "$SVCPROXY" ]; then
  (cd "$ROOT" && cargo build --release) >&2
fi
SHAPE="$HERE/noflush-shape.py"
GEN="$HERE/gen-manifests.py"

WORK=$(mktemp -d /tmp/noflush-study.XXXXXX)
CREATED_NS=()
NSSEQ=0
cleanup() {
  local ns
  for ns in "${CREATED_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# newns: sets NS to a fresh, empty network namespace (loopback up).
newns() {
  NSSEQ=$((NSSEQ + 1))
  NS="nfstudy-$$-$NSSEQ"
  ip netns add "$NS"
  CREATED_NS+=("$NS")
  ip -n "$NS" link set lo up
}
delns() { ip netns del "$1" 2>/dev/null || true; }

# The timed loop runs inside the namespace (one `ip netns exec` per measurement, not per
# batch), each restore under the cap that is left. Prints seconds, or ">CAP".
cat > "$WORK/apply.sh" <<'EOF'
#!/usr/bin/env bash
mode=$1 cap=$2 dir=$3
case $mode in
  nft-noflush) cmd=(iptables-nft-restore --noflush) ;;
  nft-flush) cmd=(iptables-nft-restore) ;;
  legacy-noflush) cmd=(iptables-legacy-restore -w --noflush) ;;
esac
start=$(date +%s%N)
for f in "$dir"/*.rules; do
  now=$(date +%s%N)
  left=$(( cap * 1000000000 - (now - start) ))
  if [ $left -le 0 ]; then echo ">$cap"; exit 0; fi
  { timeout --signal=KILL "$(awk -v l=$left 'BEGIN{printf "%.3f", l/1e9}')" "${cmd[@]}" < "$f" > /dev/null 2> "$dir/err"; } 2> /dev/null
  rc=$?
  if [ $rc = 137 ] || [ $rc = 124 ]; then echo ">$cap"; exit 0; fi
  if [ $rc != 0 ]; then echo "FAIL(rc=$rc: $(head -c 200 "$dir/err" | tr '\n' ' '))"; exit 0; fi
done
end=$(date +%s%N)
awk -v d=$((end - start)) 'BEGIN{printf "%.3f\n", d/1e9}'
EOF
chmod +x "$WORK/apply.sh"

ROWS="$WORK/rows.tsv"
: > "$ROWS"
declare -A EXCEEDED=()
row() { # N phase strategy seconds batches note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$ROWS"
  printf '%7s  %-6s  %-26s %10s  %5s  %s\n' "$@" >&2
}

median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

# canon NS: the namespace's filter+nat ruleset without counters, chains sorted.
canon() { ip netns exec "$1" iptables-nft-save -t filter > "$WORK/save.txt"
          ip netns exec "$1" iptables-nft-save -t nat >> "$WORK/save.txt"
          python3 "$SHAPE" --canon < "$WORK/save.txt"; }

# shape N STRATEGY -> prints the directory holding the batches
shape() {
  local d="$WORK/shape-$1-${2//[:\/]/_}"
  if [ ! -d "$d" ]; then python3 "$SHAPE" "$2" "$d" < "$WORK/render-$1.txt"; fi
  echo "$d"
}

# empty N STRATEGY MODE: time the strategy on fresh, empty namespaces (median of 3 when
# the first run is under 3 s); at VERIFY_N also compare the final ruleset with the
# baseline's.
empty() {
  local n=$1 strat=$2 mode=$3 key="empty/$2/$3" label d t note="" ts i
  label=$strat
  [ "$mode" = nft-noflush ] || label="$strat [$mode]"
  if [ -n "${EXCEEDED[$key]:-}" ]; then
    row "$n" empty "$label" ">$CAP" - "skipped: over the cap at N=${EXCEEDED[$key]}"; return
  fi
  d=$(shape "$n" "$strat")
  newns
  t=$(ip netns exec "$NS" "$WORK/apply.sh" "$mode" "$CAP" "$d")
  if [ "$n" = "$VERIFY_N" ] && [ "$mode" = nft-noflush ] && [[ $strat != decls-only* ]] &&
     [[ $t != ">"* ]] && [[ $t != FAIL* ]]; then
    canon "$NS" > "$WORK/canon-$strat.txt"
    if [ "$strat" = asis ]; then note="reference ruleset";
    elif [ -f "$WORK/canon-asis.txt" ]; then
      if cmp -s "$WORK/canon-asis.txt" "$WORK/canon-$strat.txt"; then note="same ruleset as baseline";
      else note="RULESET DIFFERS"; diff "$WORK/canon-asis.txt" "$WORK/canon-$strat.txt" | head -5 >&2; fi
    fi
  fi
  delns "$NS"
  if [[ $t == ">"* ]]; then EXCEEDED[$key]=$n; fi
  if [[ $t != ">"* ]] && [[ $t != FAIL* ]] && awk -v t="$t" 'BEGIN{exit !(t < 3)}'; then
    ts=$t
    for i in 2 3; do
      newns; ts="$ts $(ip netns exec "$NS" "$WORK/apply.sh" "$mode" "$CAP" "$d")"; delns "$NS"
    done
    t=$(tr ' ' '\n' <<< "$ts" | median); note="${note:+$note; }median of 3"
  fi
  row "$n" empty "$label" "$t" "$(ls "$d" | grep -c rules)" "$note"
}

# steady N NSNAME STRATEGY MODE: re-apply on a namespace that already holds the full table.
steady() {
  local n=$1 ns=$2 strat=$3 mode=$4 key="steady/$3/$4" label d t ts i note=""
  label=$strat
  [ "$mode" = nft-noflush ] || label="$strat [$mode]"
  if [ -n "${EXCEEDED[$key]:-}" ]; then
    row "$n" steady "$label" ">$CAP" - "skipped: over the cap at N=${EXCEEDED[$key]}"; return
  fi
  d=$(shape "$n" "$strat")
  t=$(ip netns exec "$ns" "$WORK/apply.sh" "$mode" "$CAP" "$d")
  if [[ $t == ">"* ]]; then EXCEEDED[$key]=$n; fi
  if [[ $t != ">"* ]] && [[ $t != FAIL* ]] && awk -v t="$t" 'BEGIN{exit !(t < 3)}'; then
    ts=$t
    for i in 2 3; do ts="$ts $(ip netns exec "$ns" "$WORK/apply.sh" "$mode" "$CAP" "$d")"; done
    t=$(tr ' ' '\n' <<< "$ts" | median); note="median of 3"
  fi
  row "$n" steady "$label" "$t" "$(ls "$d" | grep -c rules)" "$note"
}

echo "iptables: $(iptables-nft --version); kernel $(uname -r); $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
printf '%7s  %-6s  %-26s %10s  %5s  %s\n' N phase strategy seconds rst note >&2
STUDY_START=$(date +%s)

for n in $NS_LIST; do
  python3 "$GEN" -n "$n" -e "$EPS" -o "$WORK/manifests-$n"
  "$SVCPROXY" render -f "$WORK/manifests-$n" --hostname-override node-0 \
    --cluster-cidr 10.128.0.0/9 > "$WORK/render-$n.txt"
  rm -rf "$WORK/manifests-$n"
  chains=$(grep -c '^:' "$WORK/render-$n.txt")
  lines=$(wc -l < "$WORK/render-$n.txt")
  row "$n" info "render" - - "$chains chains, $lines lines"

  # a) baseline, b) without --noflush, c) legacy
  empty "$n" asis nft-noflush
  empty "$n" asis nft-flush
  empty "$n" asis legacy-noflush
  # d) candidates
  empty "$n" allchains nft-noflush
  for k in $KS; do empty "$n" "chunk:$k" nft-noflush; done
  if [ "$n" -le "$SLOW_MAX_N" ]; then
    empty "$n" split-tables nft-noflush
    empty "$n" dashN nft-noflush
    empty "$n" decl-first-desc nft-noflush
  fi

  # e) steady state: all chains exist (populated with the allchains shape, checked to
  # equal the baseline's ruleset at VERIFY_N), then re-apply the full batch, and a
  # partial batch of 6 chains (one service's SVC + 5 SEP chains).
  newns; SNS=$NS
  ip netns exec "$SNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" allchains)" > /dev/null
  if [ "$n" = "$VERIFY_N" ] && [ -f "$WORK/canon-asis.txt" ]; then
    if canon "$SNS" | cmp -s - "$WORK/canon-asis.txt"; then
      row "$n" steady "populate (allchains)" - 1 "same ruleset as baseline"
    else row "$n" steady "populate (allchains)" - 1 "RULESET DIFFERS"; fi
  fi
  steady "$n" "$SNS" asis nft-noflush
  steady "$n" "$SNS" allchains nft-noflush
  kbest=$(awk -F'\t' -v n="$n" '$1==n && $2=="empty" && $3 ~ /^chunk:/ && $4 !~ /[>F]/ {print $4, $3}' "$ROWS" | sort -g | head -1 | cut -d' ' -f2)
  [ -n "$kbest" ] && steady "$n" "$SNS" "$kbest" nft-noflush
  steady "$n" "$SNS" partial:1 nft-noflush
  steady "$n" "$SNS" partial:1-allchains nft-noflush
  if [ "$n" = "$(echo $NS_LIST | tr ' ' '\n' | sort -g | tail -1)" ]; then
    # where does the -S prelude start to pay off for partial batches?
    for m in 10 100 300 1000; do
      [ "$m" -lt "$n" ] || continue
      steady "$n" "$SNS" "partial:$m" nft-noflush
      steady "$n" "$SNS" "partial:$m-allchains" nft-noflush
    done
  fi
  delns "$SNS"

  # At VERIFY_N: a steady-state *change* (every service loses one endpoint) on top of
  # foreign rules (a foreign nat chain jumped to from PREROUTING, FORWARD policy DROP) must
  # give the same ruleset with the winning shape as with the baseline, and must leave the
  # foreign rules and policy alone.
  if [ "$n" = "$VERIFY_N" ] && [ "$EPS" -gt 1 ]; then
    python3 "$GEN" -n "$n" -e $((EPS - 1)) -o "$WORK/manifests-$n-b"
    "$SVCPROXY" render -f "$WORK/manifests-$n-b" --hostname-override node-0 \
      --cluster-cidr 10.128.0.0/9 > "$WORK/render-$n-b.txt"
    rm -rf "$WORK/manifests-$n-b"
    for s in asis allchains; do
      python3 "$SHAPE" "$s" "$WORK/change-$s" < "$WORK/render-$n-b.txt"
      newns
      ip netns exec "$NS" sh -c 'iptables-nft -t nat -N FOREIGN && iptables-nft -t nat -A FOREIGN -j RETURN &&
        iptables-nft -t nat -A PREROUTING -j FOREIGN && iptables-nft -P FORWARD DROP'
      # populated the fast way (its result was checked against the baseline above)
      ip netns exec "$NS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" allchains)" > /dev/null
      t=$(ip netns exec "$NS" "$WORK/apply.sh" nft-noflush "$CAP" "$WORK/change-$s")
      canon "$NS" > "$WORK/canon-change-$s.txt"
      delns "$NS"
      note="endpoints $EPS -> $((EPS - 1)) over foreign rules"
      if [ "$s" = allchains ]; then
        if cmp -s "$WORK/canon-change-asis.txt" "$WORK/canon-change-allchains.txt"; then
          note="$note; same ruleset as baseline"; else note="$note; RULESET DIFFERS"; fi
      fi
      if grep -q -- '-A PREROUTING -j FOREIGN' "$WORK/canon-change-$s.txt" &&
         grep -q '^:FORWARD DROP' "$WORK/canon-change-$s.txt"; then
        note="$note; foreign rules kept"; else note="$note; FOREIGN RULES LOST"; fi
      row "$n" change "$s" "$t" 1 "$note"
    done
  fi

  newns; LNS=$NS
  ip netns exec "$LNS" "$WORK/apply.sh" legacy-noflush "$CAP" "$(shape "$n" asis)" > /dev/null
  steady "$n" "$LNS" asis legacy-noflush
  steady "$n" "$LNS" partial:1 legacy-noflush
  delns "$LNS"

  # where does the time go (once, at PROFILE_N)
  if [ "$n" = "$PROFILE_N" ]; then
    for s in decls-only decls-only-desc; do empty "$n" "$s" nft-noflush; done
    newns; PNS=$NS
    # rules only, into chains that exist and are empty (re-declaring them flushes them)
    for s in rules-only rules-only-allchains rules-only-nojump; do
      ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" decls-only)" > /dev/null
      t=$(ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" "$s")")
      row "$n" prof "$s" "$t" 1 "chains exist and are empty"
    done
    ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" decls-only)" > /dev/null
    d=$(shape "$n" rules-only)
    /usr/bin/time -f "%e %U %S" -o "$WORK/time.txt" ip netns exec "$PNS" \
      iptables-nft-restore --noflush < "$d/000.rules" > /dev/null
    read -r w u s < "$WORK/time.txt"
    row "$n" prof "rules-only user/sys" "$w" 1 "user ${u}s, sys ${s}s"
    if command -v strace > /dev/null; then
      ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" decls-only)" > /dev/null
      ip netns exec "$PNS" strace -c -f -o "$WORK/strace.txt" iptables-nft-restore --noflush \
        < "$d/000.rules" > /dev/null
      sendto=$(awk '$NF=="sendto"{print $4}' "$WORK/strace.txt")
      row "$n" prof "rules-only strace" - 1 "sendto calls (one GETCHAIN per chain named in the batch): ${sendto:-?}"
      d=$(shape "$n" rules-only-allchains)
      ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" decls-only)" > /dev/null
      ip netns exec "$PNS" strace -c -f -o "$WORK/strace.txt" iptables-nft-restore --noflush \
        < "$d/000.rules" > /dev/null
      sendto=$(awk '$NF=="sendto"{print $4}' "$WORK/strace.txt")
      row "$n" prof "rules-only-allchains strace" - 1 "sendto calls (one chain dump + one GETRULE dump per chain): ${sendto:-?}"
    fi
    if command -v perf > /dev/null; then
      d=$(shape "$n" rules-only)
      ip netns exec "$PNS" "$WORK/apply.sh" nft-noflush "$CAP" "$(shape "$n" decls-only)" > /dev/null
      ip netns exec "$PNS" perf record -q -o "$WORK/perf.data" iptables-nft-restore --noflush \
        < "$d/000.rules" > /dev/null 2>&1 || true
      top=$(perf report -i "$WORK/perf.data" --no-children --stdio --sort dso,sym 2>/dev/null |
            awk '/^ +[0-9.]+%/{printf "%s%s %s %s", (n++ ? ", " : ""), $1, $2, $NF} n==4{exit}' || true)
      row "$n" prof "rules-only perf top" - 1 "${top:-perf unavailable}"
    fi
    delns "$PNS"
  fi
done

echo "total study time: $(( $(date +%s) - STUDY_START )) s; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo
printf '%s\t%s\t%s\t%s\t%s\t%s\n' N phase strategy seconds restores note
cat "$ROWS"
if [ -n "$TSV" ]; then cp "$ROWS" "$TSV"; fi
