#!/usr/bin/env bash
# Checks that deploy/ is deployable as shipped, without a container runtime
# or a running systemd (scripts/test.sh runs it before the cargo tests):
#
# 1. deploy/Dockerfile and .dockerignore (static: no image is built): a
#    multi-stage build with `cargo build --release --locked`, a runtime
#    stage that copies only the binary from the build stage (no example
#    config baked in), a numeric non-root USER, an ENTRYPOINT; the context
#    keeps what the build needs and leaves target/, .venv/ and .git/ out.
# 2. deploy/meshreg.service: `systemd-analyze verify` prints nothing, and
#    `systemd-analyze security --offline=true` rates its exposure at most
#    MAX_EXPOSURE (1.1, "OK"); Type=notify, ExecReload sends SIGHUP.
# 3. deploy/kubernetes.yaml, against a real kube-apiserver with etcd (the
#    peers scripts/peers.sh builds, started on loopback as tests/e2e does):
#    every object is created, in file order, with `fieldValidation=Strict`
#    (an unknown, misspelled or duplicated field fails) and no API warning;
#    then a Pod made of the Deployment's pod template is created with
#    `dryRun=All` in the manifest's namespace, whose Pod Security admission
#    must enforce "restricted", and a privileged copy of it must be refused
#    (so the check cannot pass because admission is off).
#
#   scripts/check-deploy.sh
#
# Needs curl, openssl, systemd-analyze (Debian's systemd package), python3
# with PyYAML (python3-yaml), and etcd and kube-apiserver from
# scripts/peers.sh (found through $MESHREG_PEER_ETCD and
# $MESHREG_PEER_KUBE_APISERVER, else ${CARGO_TARGET_DIR:-target}/peers.env).
set -euo pipefail
cd "$(dirname "$0")/.."

# The highest exposure `systemd-analyze security` may give the unit (0.0
# to 10.0; deploy/meshreg.service scores 1.1 with systemd 252). Its
# --threshold takes the same figure times ten.
MAX_EXPOSURE=1.1

say() { printf -- '-- %s\n' "$*"; }
fail() {
  printf 'check-deploy: FAILED: %s\n' "$*" >&2
  exit 1
}

for tool in curl openssl systemd-analyze; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (scripts/test.sh installs it)"
done
python=""
for candidate in "${MESHREG_PYTHON:-}" python3 /usr/bin/python3; do
  if [ -n "$candidate" ] && "$candidate" -c 'import yaml' >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
[ -n "$python" ] || fail "no python3 with PyYAML (apt-get install python3-yaml; scripts/test.sh does)"

work="$(mktemp -d)"
pids=()
# The API server and etcd are killed outright: their data is thrown away,
# and a kube-apiserver told to stop can wait minutes for watchers to drain.
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# The helpers that read YAML and JSON; the HTTP is curl's.
cat >"$work/helper.py" <<'PY'
import fnmatch, json, os, re, subprocess, sys
import yaml

def die(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)

def cargo_version():
    text = open("Cargo.toml").read()
    m = re.search(r'^\[workspace\.package\]\s*$(.*?)^\[', text, re.S | re.M)
    v = re.search(r'^version\s*=\s*"([^"]+)"', m.group(1) if m else text, re.M)
    return v.group(1)

def dockerfile():
    """Stages of deploy/Dockerfile: [(FROM line, [instruction lines])]."""
    lines, cur = [], ""
    for raw in open("deploy/Dockerfile"):
        s = raw.rstrip("\n")
        if not cur and (not s.strip() or s.lstrip().startswith("#")):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append((cur + s).strip())
        cur = ""
    stages = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    errors = []
    if len(stages) < 2:
        errors.append("not a multi-stage build (one FROM)")
        return errors
    build = " ".join(" ".join(body) for _, body in stages[:-1])
    if not re.search(r"cargo build\b[^&;]*--release", build) or "--locked" not in build:
        errors.append("no `cargo build --release --locked` in a build stage")
    final_from, final = stages[-1]
    if re.search(r"\brust:", final_from):
        errors.append(f"the runtime stage is the Rust toolchain image: {final_from}")
    for line in final:
        word = line.split()[0].upper()
        if word in ("COPY", "ADD") and "--from=" not in line:
            errors.append(f"the runtime stage copies from the build context: {line}")
        if word in ("COPY", "ADD") and re.search(r"examples|\.ya?ml", line):
            errors.append(f"the runtime stage bakes in a config: {line}")
    users = [l.split(None, 1)[1] for l in final if l.split()[0].upper() == "USER"]
    if not users:
        errors.append("no USER in the runtime stage (it would run as the image's default)")
    elif not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1]):
        errors.append(f"USER {users[-1]} is not a numeric non-root UID (runAsNonRoot cannot check a name)")
    if not any(l.split()[0].upper() == "ENTRYPOINT" for l in final):
        errors.append("no ENTRYPOINT in the runtime stage")
    return errors

def dockerignore():
    """Docker's rules, for the plain patterns used here: a pattern names a
    path from the context's root (`*` stays within one path element, `**`
    crosses them), and excluding a directory excludes what is in it."""
    patterns = []
    for raw in open(".dockerignore"):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("!"):
            return [f".dockerignore: negations are not checked here: {s}"]
        patterns.append(s.strip("/"))
    def rx(p):
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", p):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")
    rxs = [rx(p) for p in patterns]
    def excluded(path):
        parts = path.split("/")
        return any(r.match("/".join(parts[:i])) for r in rxs for i in range(1, len(parts) + 1))
    errors = []
    for path in ["target/release/meshreg", ".venv/bin/python", ".git/HEAD", "xds/target/debug/x"]:
        if not excluded(path):
            errors.append(f".dockerignore lets {path} into the build context")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True, check=True).stdout.split()
    ws = re.search(r"members\s*=\s*\[([^\]]*)\]", open("Cargo.toml").read())
    crates = re.findall(r'"([^"]+)"', ws.group(1)) if ws else []
    needed = ["Cargo.toml", "Cargo.lock", "LICENSE", "src/", "tests/", "examples/bookinfo/meshreg.yaml"] + [c + "/" for c in crates]
    for f in files:
        if any(f == n or (n.endswith("/") and f.startswith(n)) for n in needed) and excluded(f):
            errors.append(f".dockerignore leaves out {f}, which the build needs")
    return errors

def docs(path):
    """(raw text, object) of each document of a manifest, in order."""
    chunks = re.split(r"^---[ \t]*$", open(path).read(), flags=re.M)
    out = []
    for chunk in chunks:
        obj = yaml.safe_load(chunk)
        if obj is not None:
            out.append((chunk, obj))
    return out

def group_version_path(api_version):
    return "/api/v1" if api_version == "v1" else "/apis/" + api_version

def cmd_static():
    errors = dockerfile() + dockerignore()
    for e in errors:
        print("  " + e, file=sys.stderr)
    if errors:
        sys.exit(1)

def cmd_split(manifest, work):
    """Writes obj-N.yaml for each document; prints the group versions to
    discover, and checks what the API server cannot: pinned image tag,
    resources, probes, the namespace's Pod Security label."""
    errors, gvs = [], []
    objs = docs(manifest)
    namespaces = {}
    for i, (raw, obj) in enumerate(objs):
        open(os.path.join(work, f"obj-{i}.yaml"), "w").write(raw)
        gv = obj.get("apiVersion", "")
        if gv not in gvs:
            gvs.append(gv)
        if obj.get("kind") == "Namespace":
            namespaces[obj["metadata"]["name"]] = obj["metadata"].get("labels") or {}
    deployments = [o for _, o in objs if o.get("kind") == "Deployment"]
    kinds = {o.get("kind") for _, o in objs}
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "PodDisruptionBudget"):
        if kind not in kinds:
            errors.append(f"no {kind}")
    if len(deployments) != 1:
        errors.append(f"{len(deployments)} Deployments, expected one")
    else:
        d = deployments[0]
        ns = d["metadata"].get("namespace")
        if namespaces.get(ns, {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            errors.append(f"namespace {ns} is not created here with pod-security.kubernetes.io/enforce: restricted")
        for c in d["spec"]["template"]["spec"].get("containers", []):
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                errors.append(f"container {c['name']}: image {image} is not pinned")
            elif tag and tag != cargo_version() and "@" not in image:
                errors.append(f"container {c['name']}: image tag {tag} is not Cargo.toml's version {cargo_version()}")
            res = c.get("resources", {})
            for where in ("requests", "limits"):
                if "memory" not in res.get(where, {}):
                    errors.append(f"container {c['name']}: no memory {where}")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
                get = (c.get(probe) or {}).get("httpGet") or {}
                port = ports.get(get.get("port"), get.get("port"))
                if get.get("path") != path or port != 15014:
                    errors.append(f"container {c['name']}: {probe} is not GET {path} on 15014")
    for e in errors:
        print("  deploy/kubernetes.yaml: " + e, file=sys.stderr)
    if errors:
        sys.exit(1)
    for gv in gvs:
        print(gv)

def cmd_plan(manifest, work):
    """One line per document: N, collection URL path, kind/name; from the
    API server's discovery documents (disc-<gv>.json)."""
    for i, (_, obj) in enumerate(docs(manifest)):
        gv, kind, meta = obj["apiVersion"], obj["kind"], obj.get("metadata", {})
        disc = json.load(open(os.path.join(work, "disc-" + gv.replace("/", "_") + ".json")))
        res = [r for r in disc.get("resources", []) if r.get("kind") == kind and "/" not in r["name"]]
        if not res:
            die(f"deploy/kubernetes.yaml: the API server serves no {kind} in {gv}")
        r, ns = res[0], meta.get("namespace")
        if r["namespaced"] and not ns:
            die(f"deploy/kubernetes.yaml: {kind} {meta.get('name')} has no metadata.namespace")
        if not r["namespaced"] and ns:
            die(f"deploy/kubernetes.yaml: {kind} {meta.get('name')} is cluster-scoped but names namespace {ns}")
        path = group_version_path(gv) + (f"/namespaces/{ns}" if ns else "") + "/" + r["name"]
        print(f"{i} {path} {kind}/{meta.get('name')}")

def cmd_pod(manifest, out, variant):
    """The Deployment's pod template as a Pod (as its ReplicaSet would make
    it); with `escalating`, a copy that "restricted" must refuse (it allows
    privilege escalation; "baseline" would admit it)."""
    d = [o for _, o in docs(manifest) if o.get("kind") == "Deployment"][0]
    t = d["spec"]["template"]
    spec = json.loads(json.dumps(t["spec"]))
    name = d["metadata"]["name"] + "-template-check"
    if variant == "escalating":
        spec["containers"][0].setdefault("securityContext", {})["allowPrivilegeEscalation"] = True
        name += "-escalating"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": d["metadata"]["namespace"],
                     "labels": t.get("metadata", {}).get("labels", {}),
                     "annotations": t.get("metadata", {}).get("annotations", {})},
        "spec": spec,
    }
    json.dump(pod, open(out, "w"))
    print(d["metadata"]["namespace"])

def cmd_message(path):
    """The `message` of an API status, or the body."""
    text = open(path).read()
    try:
        print(json.loads(text).get("message") or text)
    except ValueError:
        print(text)

def cmd_free_ports(n):
    import socket
    socks = [socket.socket() for _ in range(int(n))]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))

globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY
helper() { "$python" "$work/helper.py" "$@"; }

# --- 1. Dockerfile and .dockerignore ---------------------------------------
say "deploy/Dockerfile and .dockerignore (static)"
helper static || fail "deploy/Dockerfile or .dockerignore (above)"

# --- 2. systemd unit --------------------------------------------------------
say "deploy/meshreg.service: systemd-analyze verify and security"
# `verify` refuses a unit whose ExecStart= binary does not exist, and
# meshreg is not installed here: check a copy of the unit whose
# /usr/local/bin/meshreg is a stub executable in the temporary directory
# (nothing else is changed). `verify` only warns, with exit status 0, about
# an unknown or misspelled setting, so any output at all fails the check.
mkdir -p "$work/systemd/bin"
printf '#!/bin/sh\nexit 0\n' >"$work/systemd/bin/meshreg"
chmod 0755 "$work/systemd/bin/meshreg"
sed "s#/usr/local/bin/meshreg#$work/systemd/bin/meshreg#g" deploy/meshreg.service >"$work/systemd/meshreg.service"
if ! systemd-analyze verify "$work/systemd/meshreg.service" >"$work/verify.txt" 2>&1 || [ -s "$work/verify.txt" ]; then
  sed "s#$work/systemd/#deploy/#g" "$work/verify.txt" >&2
  fail "systemd-analyze verify deploy/meshreg.service (above)"
fi
# shellcheck disable=SC2016 # $MAINPID is the unit's, not ours
for line in 'Type=notify' 'NotifyAccess=main' 'ExecReload=/bin/kill -HUP $MAINPID'; do
  grep -qxF "$line" deploy/meshreg.service || fail "deploy/meshreg.service has no '$line'"
done
# --offline: no systemd runs here as PID 1 to load the unit.
threshold="$(awk -v e="$MAX_EXPOSURE" 'BEGIN { printf "%d", e * 10 + 0.5 }')"
if ! systemd-analyze security --offline=true --threshold="$threshold" --no-pager \
    "$work/systemd/meshreg.service" >"$work/security.txt" 2>&1; then
  grep -E '✗|Overall|rror' "$work/security.txt" >&2 || cat "$work/security.txt" >&2
  fail "deploy/meshreg.service: systemd-analyze security rates its exposure above $MAX_EXPOSURE (above)"
fi
grep -o 'Overall exposure level.*' "$work/security.txt" | sed 's/ for [^:]*:/:/'

# --- 3. Kubernetes manifest against a real API server -----------------------
say "deploy/kubernetes.yaml against kube-apiserver (strict field validation, Pod Security restricted)"
peer_env() {
  local value="${!1:-}"
  if [ -z "$value" ] && [ -f "${CARGO_TARGET_DIR:-target}/peers.env" ]; then
    value="$(sed -n "s/^$1=//p" "${CARGO_TARGET_DIR:-target}/peers.env")"
  fi
  if [ -z "$value" ] || [ ! -x "$value" ]; then
    fail "$1 is not built: run scripts/peers.sh (scripts/test.sh does)"
  fi
  printf '%s' "$value"
}
etcd="$(peer_env MESHREG_PEER_ETCD)"
apiserver="$(peer_env MESHREG_PEER_KUBE_APISERVER)"

gvs="$(helper split deploy/kubernetes.yaml "$work")" || fail "deploy/kubernetes.yaml (above)"

# etcd and the API server on loopback, with the flags tests/e2e/peers.rs
# uses: a static admin token, a self-signed serving certificate, RBAC. The
# ServiceAccount admission plugin stays on here (the e2e tests turn it
# off): the dry-run Pod names the manifest's own ServiceAccount.
read -r client_port peer_port secure_port <<<"$(helper free-ports 3)"
token="check-deploy-$(openssl rand -hex 12)"
printf '%s,admin,admin,"system:masters"\n' "$token" >"$work/tokens.csv"
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
etcd_url="http://127.0.0.1:$client_port"
"$etcd" --data-dir="$work/etcd" --listen-client-urls="$etcd_url" --advertise-client-urls="$etcd_url" \
  --listen-peer-urls="http://127.0.0.1:$peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
  --initial-cluster="default=http://127.0.0.1:$peer_port" --log-level=warn >"$work/etcd.log" 2>&1 &
pids+=("$!")
"$apiserver" --etcd-servers="$etcd_url" --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
  --secure-port="$secure_port" --cert-dir="$work/certs" --token-auth-file="$work/tokens.csv" \
  --authorization-mode=RBAC --service-account-issuer=https://kubernetes.default.svc \
  --service-account-key-file="$work/sa.key" --service-account-signing-key-file="$work/sa.key" \
  --service-cluster-ip-range=10.96.0.0/16 >"$work/kube-apiserver.log" 2>&1 &
pids+=("$!")
api="https://127.0.0.1:$secure_port"
kcurl() { curl -sS -k -H "Authorization: Bearer $token" "$@"; }

start=$(date +%s)
until [ "$(kcurl -o /dev/null -w '%{http_code}' "$api/readyz" 2>/dev/null)" = 200 ]; do
  if [ $(( $(date +%s) - start )) -ge 90 ]; then
    tail -n 30 "$work/kube-apiserver.log" >&2
    fail "kube-apiserver not ready after 90 s (its last lines above)"
  fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$work/etcd.log" "$work/kube-apiserver.log" >&2; fail "etcd or kube-apiserver exited (above)"; }
  done
  sleep 0.5
done
echo "kube-apiserver $("$apiserver" --version | awk '{print $2}') ready in $(( $(date +%s) - start ))s"

for gv in $gvs; do
  path="/apis/$gv"
  [ "$gv" = v1 ] && path=/api/v1
  kcurl -f -o "$work/disc-${gv//\//_}.json" "$api$path" || fail "discovery of $gv"
done
plan="$(helper plan deploy/kubernetes.yaml "$work")" || fail "deploy/kubernetes.yaml (above)"

# Creates $2 (a file) at collection $1 with query $3; fails on anything but
# 201 or on any API warning (deprecations, Pod Security "would violate").
create() {
  local url="$1" file="$2" query="$3" what="$4" ctype="$5" code
  code="$(kcurl -o "$work/response" -D "$work/headers" -w '%{http_code}' -X POST \
    -H "Content-Type: $ctype" --data-binary "@$file" "$api$url?$query")" || fail "$what: curl failed"
  if [ "$code" != 201 ]; then
    fail "$what: HTTP $code: $(helper message "$work/response")"
  fi
  if grep -i '^warning:' "$work/headers" >&2; then
    fail "$what: the API server warned (above)"
  fi
}
while read -r n url what; do
  # The document as written (YAML): the server's strict decoder also
  # refuses a duplicated field, which a YAML-to-JSON conversion would hide.
  create "$url" "$work/obj-$n.yaml" "fieldValidation=Strict" "create $what" application/yaml
  echo "created $what"
done <<<"$plan"

ns="$(helper pod deploy/kubernetes.yaml "$work/pod.json" restricted)"
create "/api/v1/namespaces/$ns/pods" "$work/pod.json" "dryRun=All&fieldValidation=Strict" \
  "dry-run Pod of the Deployment's template in namespace $ns (Pod Security restricted)" application/json
echo "a Pod of the Deployment's template is admitted under Pod Security \"restricted\" (dry run)"

# The same Pod allowing privilege escalation must be refused: the check
# above means something only while the namespace enforces "restricted".
helper pod deploy/kubernetes.yaml "$work/pod-escalating.json" escalating >/dev/null
code="$(kcurl -o "$work/response" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
  --data-binary "@$work/pod-escalating.json" "$api/api/v1/namespaces/$ns/pods?dryRun=All")"
message="$(helper message "$work/response")"
if [ "$code" != 403 ] || ! grep -q 'violates PodSecurity "restricted' <<<"$message"; then
  fail "a Pod allowing privilege escalation in namespace $ns was not refused by Pod Security \"restricted\" (HTTP $code: $message)"
fi
echo "a copy allowing privilege escalation is refused: $message"
say "deploy/ ok"
