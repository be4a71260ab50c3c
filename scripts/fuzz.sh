#!/usr/bin/env bash
# Fuzzes meshreg's parsers with libFuzzer, each target for a bounded time:
# the ServiceEntry/WorkloadEntry/DestinationRule/Sidecar YAML reader, the
# daemon config, and the delta and SotW request decoders with their state
# machines. scripts/test.sh (so CI) runs it for 10 s per target. The corpus
# starts from the Istio fixtures and the example configs, and grows in
# target/fuzz/corpus/ across runs.
#
# A crash stops the script with the input saved as
# fuzz/artifacts/<target>/crash-*: run it again with
#   target/fuzz/debug/<target> fuzz/artifacts/<target>/crash-…
# and keep it as a regular unit test of the code it broke.
#
# The targets are built with cargo (no cargo-fuzz needed) and
# scripts/fuzz-rustc, which instruments only meshreg's crates (see there
# why). `cargo fuzz run <target>` (cargo install cargo-fuzz) instruments
# every crate, for longer runs by hand.
#
#   scripts/fuzz.sh           # 10 s per target
#   scripts/fuzz.sh 600       # longer, by hand
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-${FUZZ_SECONDS:-10}}"
root="$PWD"
target_dir="${CARGO_TARGET_DIR:-$root/target}/fuzz"
corpus_root="$target_dir/corpus"
targets=(serviceentry_yaml config delta_requests sotw_requests)

seed() { # seed <target> <files...>
  local dir="$corpus_root/$1"; shift
  mkdir -p "$dir"
  for f in "$@"; do cp -n "$f" "$dir/" 2>/dev/null || true; done
}
mapfile -t istio < <(find adapters/tests/fixtures ../shared/fixtures examples -name '*.yaml' 2>/dev/null | grep -v meshreg.yaml)
seed serviceentry_yaml "${istio[@]}"
seed config examples/*/meshreg.yaml
mkdir -p "$corpus_root/delta_requests" "$corpus_root/sotw_requests"

# One build of every target. Dependencies at opt-level 1 as in the test
# build; `--cfg fuzzing` and the coverage passes come from the wrapper.
echo "building the fuzz targets"
(cd fuzz && RUSTC_WRAPPER="$root/scripts/fuzz-rustc" cargo build --bins --locked --quiet \
  --target-dir "$target_dir" \
  --config 'profile.dev.opt-level=1' \
  --config 'profile.dev.debug="line-tables-only"')

for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "fuzz/artifacts/$t"
  status=0
  "$target_dir/debug/$t" "$corpus_root/$t" \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
    -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 >"$target_dir/$t.log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|(panicked|deadly signal|out-of-memory|ERROR)' "$target_dir/$t.log" || true
  if [ "$status" -ne 0 ] || [ -n "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" ]; then
    tail -n 40 "$target_dir/$t.log" >&2
    echo "fuzz target $t found a failing input (exit $status): fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
