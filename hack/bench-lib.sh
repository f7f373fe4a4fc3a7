# Shared by the scale benchmarks (hack/scale-bench*.sh); sourced, not run. Expects TIMEOUT
# (seconds per step) to be set.

now_ms() { date +%s%3N; }

# Waits until the log has N "synced rules" lines; prints the elapsed_ms of the Nth one.
wait_sync() {
  local log=$1 n=$2 deadline=$(( $(date +%s) + TIMEOUT ))
  while [ "$(grep -c 'synced rules' "$log" || true)" -lt "$n" ]; do
    if grep -q "sync failed" "$log"; then echo "sync failed:" >&2; tail -5 "$log" >&2; return 1; fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timeout" >&2; return 1; }
    sleep 0.01
  done
  grep 'synced rules' "$log" | sed -n "${n}p" | sed -E 's/.*elapsed_ms=([0-9.]+).*/\1/'
}
