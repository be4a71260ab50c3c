#!/usr/bin/env bash
# Builds the real programs meshreg's tests talk to, from their published Go
# modules, into a cache; prints where each binary is.
#
#   scripts/peers.sh                 # build what is missing, write the env file
#   scripts/peers.sh etcd istiod     # only these peers
#
# Each peer is a small wrapper module of ours under peers/<name>/ that
# requires the published module at a pinned version (go.mod, go.sum) and
# names its command with a `tool` directive, so what is built is the
# upstream main package itself; go-control-plane is a library, and its
# wrapper is our own small server (peers/go-control-plane/main.go). A binary is cached under
#   $MESHREG_PEERS_CACHE/<name>-<version>-<hash of the wrapper>/<name>
# (default ~/.cache/meshreg/peers), so a warm machine rebuilds nothing and
# an edited wrapper builds anew. The build is `go build -trimpath` with
# GOTOOLCHAIN=local and CGO_ENABLED=0.
#
# Output: one line per peer with its version, whether it was cached, and
# for a build its wall time and peak memory; and the file
# ${CARGO_TARGET_DIR:-target}/peers.env with lines MESHREG_PEER_<NAME>=<path>
# (and MESHREG_PEER_<NAME>_VERSION=<version>; MESHREG_PEER_ISTIO_CRDS is
# the istio module's CRDs), which scripts/test.sh
# exports for the tests. A peer that fails to build prints its first error
# lines and makes the script exit 1 after trying the others.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${MESHREG_PEERS_CACHE:-$HOME/.cache/meshreg/peers}"
envfile="${CARGO_TARGET_DIR:-target}/peers.env"
mkdir -p "$cache" "$(dirname "$envfile")"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly

# name | module whose version names the peer | extra -ldflags
peers() {
  cat <<'EOF'
etcd|go.etcd.io/etcd/server/v3|
kube-apiserver|k8s.io/kubernetes|-X k8s.io/component-base/version.gitVersion=@VERSION@ -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=@MINOR@
consul|github.com/hashicorp/consul|-X github.com/hashicorp/consul/version.GitCommit=module
istiod|istio.io/istio|
go-control-plane|github.com/envoyproxy/go-control-plane|
EOF
}

wanted=("$@")
for w in "${wanted[@]}"; do
  if ! peers | cut -d'|' -f1 | grep -qx -- "$w"; then
    echo "peers: unknown peer '$w'; the peers are: $(peers | cut -d'|' -f1 | tr '\n' ' ')" >&2
    exit 2
  fi
done
is_wanted() {
  [ ${#wanted[@]} -eq 0 ] && return 0
  local w
  for w in "${wanted[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

tmpenv="$(mktemp)"
trap 'rm -f "$tmpenv"' EXIT
failed=()
while IFS='|' read -r name module ldextra; do
  is_wanted "$name" || continue
  dir="peers/$name"
  version="$(awk -v m="$module" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$dir/go.mod")"
  [ -n "$version" ] || { echo "peers: $dir/go.mod does not require $module" >&2; exit 1; }
  hash="$(cat "$dir"/go.mod "$dir"/go.sum $(ls "$dir"/*.go 2>/dev/null) | sha256sum | cut -c1-12)"
  out="$cache/$name-$version-$hash/$name"
  if [ -x "$out" ]; then
    printf 'peer %-16s %-40s cached  %s\n' "$name" "$version" "$out"
  else
    minor="$(printf '%s' "$version" | cut -d. -f2)"
    ld="-s -w ${ldextra//@VERSION@/$version}"
    ld="${ld//@MINOR@/$minor}"
    log="$(mktemp)"
    mkdir -p "$(dirname "$out")"
    start=$(date +%s)
    # The wrapper names the upstream command with a `tool` line in go.mod;
    # a wrapper with a main of its own (go-control-plane) has none.
    pkg="$(awk '$1 == "tool" { print $2; exit }' "$dir/go.mod")"
    if (cd "$dir" && /usr/bin/time -f 'maxrss_kb=%M' -o "$log.time" \
          go build -trimpath -ldflags "$ld" -o "$out.partial" "${pkg:-.}") >"$log" 2>&1; then
      mv "$out.partial" "$out"
      secs=$(( $(date +%s) - start ))
      rss_mb=$(( $(sed -n 's/^maxrss_kb=//p' "$log.time") / 1024 ))
      printf 'peer %-16s %-40s built   in %ss, go build peak %s MB  %s\n' "$name" "$version" "$secs" "$rss_mb" "$out"
    else
      echo "peer $name $version: build failed; first lines:" >&2
      head -20 "$log" >&2
      failed+=("$name")
      rm -f "$log" "$log.time"
      continue
    fi
    rm -f "$log" "$log.time"
  fi
  var="MESHREG_PEER_$(printf '%s' "$name" | tr 'a-z-' 'A-Z_')"
  printf '%s=%s\n%s_VERSION=%s\n' "$var" "$out" "$var" "$version" >>"$tmpenv"
done < <(peers)

# The Istio CRDs of the pinned istio module, next to istiod, for the tests
# that apply them to the API server.
istiod="$(sed -n 's/^MESHREG_PEER_ISTIOD=//p' "$tmpenv")"
if [ -n "$istiod" ]; then
  crds="$(dirname "$istiod")/crd-all.gen.yaml"
  if [ ! -f "$crds" ]; then
    moddir="$(cd peers/istiod && go list -m -f '{{.Dir}}' istio.io/istio)"
    cp "$moddir/manifests/charts/base/files/crd-all.gen.yaml" "$crds.partial"
    chmod 644 "$crds.partial"
    mv "$crds.partial" "$crds"
  fi
  echo "MESHREG_PEER_ISTIO_CRDS=$crds" >>"$tmpenv"
fi

# Keep the lines of peers not rebuilt this time.
if [ -f "$envfile" ]; then
  grep -v -F -f <(cut -d= -f1 "$tmpenv" | sed 's/$/=/') "$envfile" >>"$tmpenv" || true
fi
sort -o "$envfile" "$tmpenv"

if [ ${#failed[@]} -gt 0 ]; then
  echo "peers: could not build: ${failed[*]}" >&2
  exit 1
fi
