#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, golden, API and kernel tests.
# Kernel tests need root; they create their own network namespaces and remove them.
set -euo pipefail
cd "$(dirname "$0")/.."

hack/install-deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo test"
cargo test --all-features 2>&1 | tee /tmp/svcproxy-test.log
leftover=$(ip netns list 2>/dev/null | awk '/^svp-/{print $1}')
if [ -n "$leftover" ]; then
  echo "tests left network namespaces behind: $leftover" >&2
  exit 1
fi
# One closing line over every test binary (the last cargo line is the doc-test run).
grep -E '^test result:' /tmp/svcproxy-test.log \
  | awk '{p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}'
