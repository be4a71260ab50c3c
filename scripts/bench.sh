#!/usr/bin/env bash
# Reproduces the tables of BENCHMARKS.md: builds the release binaries,
# then runs meshreg-load's profiles. Each run prints a Markdown table and
# writes its rows as JSON under target/bench/.
#
#   scripts/bench.sh                 # standard profile, delta and SotW
#   scripts/bench.sh large           # the large profiles too (minutes, GBs)
#   cargo bench -p meshreg-xds       # the criterion micro-benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p meshreg-load
out=target/bench
mkdir -p "$out"
load=target/release/meshreg-load
stamp=$(date +%Y%m%d-%H%M%S)

# Latency: push at once (debounce 0), one change a second.
"$load" run --profile standard --mode both --debounce-ms 0 --churn-rates 1 \
  --churn-seconds 10 --check --json "$out/standard-latency-$stamp.json"
# Churn: the default debounce (100 ms quiet, 150 ms max).
"$load" run --profile standard --mode both --churn-rates 10,100 \
  --churn-seconds 5 --check --json "$out/standard-churn-$stamp.json"

if [ "${1:-}" = large ]; then
  for p in large large-wide; do
    "$load" run --profile "$p" --mode delta --debounce-ms 0 --churn-rates 1 \
      --churn-seconds 5 --check --json "$out/$p-$stamp.json"
  done
fi
