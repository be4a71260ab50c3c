#!/usr/bin/env bash
# Fuzzes meshreg's parsers with cargo-fuzz (libFuzzer), each target for a
# bounded time: the ServiceEntry/WorkloadEntry/DestinationRule/Sidecar YAML
# reader, the daemon config, and the delta and SotW request decoders with
# their state machines. The corpus starts from the Istio fixtures and the
# example configs. A crash stops the script with the input saved under
# fuzz/artifacts/<target>/: reproduce it with
#   cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# and keep it as a regular unit test of the code it broke.
#
#   scripts/fuzz.sh           # 10 s per target (what CI runs)
#   scripts/fuzz.sh 600       # longer, by hand
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-${FUZZ_SECONDS:-10}}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (cargo install)"
  cargo install cargo-fuzz --locked --quiet
fi
# libFuzzer's instrumentation needs unstable flags: a nightly toolchain
# where there is one, else the stable compiler with RUSTC_BOOTSTRAP=1.
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
corpus_root="$target_dir/corpus"

seed() { # seed <target> <files...>
  local dir="$corpus_root/$1"; shift
  mkdir -p "$dir"
  for f in "$@"; do cp -n "$f" "$dir/" 2>/dev/null || true; done
}
mapfile -t istio < <(find adapters/tests/fixtures ../shared/fixtures examples -name '*.yaml' 2>/dev/null | grep -v meshreg.yaml)
seed serviceentry_yaml "${istio[@]}"
seed config examples/*/meshreg.yaml
mkdir -p "$corpus_root/delta_requests" "$corpus_root/sotw_requests"

# One build of every target (they share the instrumented dependencies).
cargo "${toolchain[@]}" fuzz build --sanitizer none --target-dir "$target_dir"
for t in serviceentry_yaml config delta_requests sotw_requests; do
  echo "== fuzz $t for ${secs}s"
  cargo "${toolchain[@]}" fuzz run --sanitizer none --target-dir "$target_dir" "$t" "$corpus_root/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|.*(panicked|deadly signal|crash|timeout|out-of-memory))' || true
  # cargo fuzz exits non-zero on a finding; the pipe above hides it.
  if [ -n "$(ls -A "fuzz/artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz target $t found a failing input: fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
