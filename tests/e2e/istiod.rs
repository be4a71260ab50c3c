//! istiod as the reference for generated config: the same directory of
//! Istio YAML (the Istio fixtures, and every valid row of the validity
//! sweep) is read by a real istiod (`--configDir`) and by meshreg, each
//! serving its own real Envoy (CDS/EDS only), and the two Envoys' outbound
//! clusters and endpoints are compared field by field:
//!
//! - clusters: name, type, lb policy, common lb config (panic threshold,
//!   locality), connect timeout, circuit breakers, outlier detection, TLS,
//!   upstream protocol options, DNS lookup family, refresh rate and TTL (transport socket and socket matches);
//! - endpoints: address, port, health, locality, locality weight, weight,
//!   metadata (`istio` workload and `envoy.transport_socket_match`).
//!
//! Every difference is listed per case (the fixture file, or the sweep row,
//! that declares the host) in a report kept in the repository
//! (`tests/e2e/istiod-differences.txt`); the test fails on any difference
//! not named in [`KNOWN`], and when the report changes (set `MESHREG_BLESS=1` to rewrite it after
//! review). [`IGNORED`] names the clusters not compared, each with why: only
//! what is Istio's own or the harness's; [`KNOWN`] names the fields where
//! meshreg knowingly differs today, with the issue that closes the gap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::peers::{Istiod, KubeApiserver};
use crate::support::{Ads, Daemon, Envoy, copy_tree, eventually, http_get, repo};
use crate::sweep::{self, Expected};

/// A sidecar node istiod serves: four `~` parts with an IP no
/// WorkloadEntry uses, a namespace of its own (so no Sidecar or workload
/// selects it) and the metadata istiod reads (`INSTANCE_IPS` as a string).
const NODE: &str = r#"{id: "sidecar~192.0.2.10~probe.meshreg-e2e~meshreg-e2e.svc.cluster.local",
  cluster: probe.meshreg-e2e,
  metadata: {NAMESPACE: meshreg-e2e, CLUSTER_ID: Kubernetes, INSTANCE_IPS: "192.0.2.10",
             ISTIO_VERSION: "1.29.0", LABELS: {app: probe}}}"#;

/// [`NODE`]'s id.
const NODE_ID: &str = "sidecar~192.0.2.10~probe.meshreg-e2e~meshreg-e2e.svc.cluster.local";

/// [`SCOPED_NODE`]'s id.
const SCOPED_NODE_ID: &str =
    "sidecar~192.0.2.11~probe.meshreg-scoped~meshreg-scoped.svc.cluster.local";

/// A second sidecar node, in a namespace with a Sidecar of its own (the
/// `scoping/` cases), its clusters compared under the prefix
/// `[meshreg-scoped] `.
const SCOPED_NODE: &str = r#"{id: "sidecar~192.0.2.11~probe.meshreg-scoped~meshreg-scoped.svc.cluster.local",
  cluster: probe.meshreg-scoped,
  locality: {region: us-east, zone: us-east-1a},
  metadata: {NAMESPACE: meshreg-scoped, CLUSTER_ID: Kubernetes, INSTANCE_IPS: "192.0.2.11",
             ISTIO_VERSION: "1.29.0", LABELS: {app: probe}}}"#;

/// Scoping cases (under scoping/), for both nodes: one host declared in
/// two namespaces, entries exported to one namespace or to their own only,
/// a DestinationRule of the client's namespace, and a Sidecar for
/// `meshreg-scoped` importing its own namespace, `scope-b` and `scope-x`.
const SCOPING_CASES: &[(&str, &str)] = &[
    (
        "inventory",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: inventory, namespace: scope-a}\n\
         spec:\n  hosts: [inventory.scoping.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.98.0.1}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: inventory, namespace: scope-b}\n\
         spec:\n  hosts: [inventory.scoping.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.98.0.2}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: inventory, namespace: meshreg-scoped}\n\
         spec:\n  host: inventory.scoping.test\n\
         \x20 trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: inventory-probe, namespace: meshreg-scoped}\n\
         spec:\n  host: inventory.scoping.test\n  workloadSelector: {matchLabels: {app: probe}}\n\
         \x20 trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: inventory-others, namespace: meshreg-e2e}\n\
         spec:\n  host: inventory.scoping.test\n  workloadSelector: {matchLabels: {app: other}}\n\
         \x20 trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}\n",
    ),
    (
        "exports",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: private, namespace: scope-x}\n\
         spec:\n  hosts: [private.scoping.test]\n  exportTo: [.]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 endpoints: [{address: 10.98.0.3}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: shared, namespace: scope-x}\n\
         spec:\n  hosts: [shared.scoping.test]\n  exportTo: [meshreg-scoped]\n  location: MESH_INTERNAL\n\
         \x20 resolution: DNS\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 endpoints: [{address: shared.scoping.test}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: other, namespace: scope-y}\n\
         spec:\n  hosts: [other.scoping.test]\n  location: MESH_INTERNAL\n  resolution: STATIC\n\
         \x20 ports: [{number: 8080, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.98.0.4}]\n",
    ),
    (
        "locality",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: nearby, namespace: scope-b}\n\
         spec:\n  hosts: [nearby.scoping.test, spread.scoping.test]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 endpoints:\n\
         \x20 - {address: 10.97.0.1, locality: us-east/us-east-1a}\n\
         \x20 - {address: 10.97.0.2, locality: us-east/us-east-1b}\n\
         \x20 - {address: 10.97.0.3, locality: eu-west/eu-west-1a}\n\
         \x20 - {address: 10.97.0.4, locality: ap-south/ap-south-1a}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: nearby, namespace: scope-b}\n\
         spec:\n  host: nearby.scoping.test\n  trafficPolicy:\n\
         \x20   outlierDetection: {consecutive5xxErrors: 3}\n\
         \x20   loadBalancer: {localityLbSetting: {failover: [{from: us-east, to: ap-south}]}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: spread, namespace: scope-b}\n\
         spec:\n  host: spread.scoping.test\n  trafficPolicy:\n\
         \x20   loadBalancer:\n\
         \x20     localityLbSetting:\n\
         \x20       distribute: [{from: us-east/us-east-1a/*, to: {us-east/*: 70, eu-west/*: 30}}]\n",
    ),
    (
        "ranked",
        // failoverPriority: the first label that differs from the proxy's
        // ranks (region from the locality, `tier=a` a fixed value).
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: ranked, namespace: scope-b}\n\
         spec:\n  hosts: [ranked.scoping.test]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 endpoints:\n\
         \x20 - {address: 10.96.0.1, locality: us-east/us-east-1a, labels: {app: probe, tier: a}}\n\
         \x20 - {address: 10.96.0.2, locality: us-east/us-east-1b, labels: {app: probe, tier: b}}\n\
         \x20 - {address: 10.96.0.3, locality: us-east/us-east-1a, labels: {app: other}}\n\
         \x20 - {address: 10.96.0.4, locality: eu-west/eu-west-1a, labels: {app: probe, tier: a}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: ranked, namespace: scope-b}\n\
         spec:\n  host: ranked.scoping.test\n  trafficPolicy:\n\
         \x20   outlierDetection: {consecutive5xxErrors: 3}\n\
         \x20   loadBalancer:\n\
         \x20     localityLbSetting:\n\
         \x20       failoverPriority: [topology.kubernetes.io/region, app, tier=a]\n",
    ),
    (
        "sidecar",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n\
         metadata: {name: default, namespace: meshreg-scoped}\n\
         spec:\n  egress:\n  - hosts: [\"./*\", \"scope-b/*\", \"scope-x/*\"]\n",
    ),
];

/// Clusters left out of the comparison: (cluster name, why). Only what is
/// Istio's own or the harness's, never a meshreg difference.
const IGNORED: &[(&str, &str)] = &[
    (
        "outbound|27018||mymongodb.somedomain",
        "the fixture's DestinationRule and ServiceEntry name no namespace: istiod's --configDir \
         keeps them in namespace \"\", where pilot's destinationRule finds no service namespace and \
         applies no rule, while meshreg reads a missing namespace as `default` (as kubectl does) \
         and applies the rule's MUTUAL TLS, whose certificate files (/etc/certs/...) exist on \
         neither machine, so that Envoy rejects the cluster",
    ),
    (
        "outbound|443||kubernetes.default.svc.cluster.local",
        "istiod's Kubernetes registry serves the test API server's own Service \
     (istiod cannot start without a Kubernetes client; it arrives when that \
     registry syncs, so it is not compared)",
    ),
];

/// Fields where meshreg knowingly differs today, each with why and what
/// closes the gap; reported, not failed on.
const KNOWN: &[(&str, &str)] = &[];

const REPORT: &str = "tests/e2e/istiod-differences.txt";

/// One outbound cluster as Envoy holds it, reduced to the compared fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    fields: BTreeMap<&'static str, String>,
    endpoints: BTreeSet<String>,
}

fn json(v: &Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

/// `addr:port` health=… weight=… locality=… locality_weight=… priority=… metadata=….
fn endpoints(cla: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for locality in cla["endpoints"].as_array().into_iter().flatten() {
        let loc = json(&locality["locality"]).replace("{}", "-");
        let loc_weight = json(&locality["load_balancing_weight"]);
        let priority = locality["priority"].as_u64().unwrap_or(0);
        for e in locality["lb_endpoints"].as_array().into_iter().flatten() {
            let addr = sweep::address(&e["endpoint"]["address"]);
            out.insert(format!(
                "{addr} health={} weight={} locality={loc} locality_weight={loc_weight} priority={priority} metadata={}",
                e["health_status"].as_str().unwrap_or("UNKNOWN"),
                e["load_balancing_weight"].as_u64().unwrap_or(1),
                // istiod always sets the field, empty or not.
                json(&e["metadata"]).replace("{}", "-"),
            ));
        }
    }
    out
}

/// Envoy's outbound clusters, from its config dump.
fn clusters(dump: &Value) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut assignments = BTreeMap::new();
    for config in dump["configs"].as_array().into_iter().flatten() {
        for c in config["dynamic_active_clusters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let c = &c["cluster"];
            let name = c["name"].as_str().unwrap_or_default();
            if !name.starts_with("outbound|") {
                continue;
            }
            let tls = json(&c["transport_socket"]) + " " + &json(&c["transport_socket_matches"]);
            let fields = BTreeMap::from([
                ("type", c["type"].as_str().unwrap_or("EDS").to_string()),
                (
                    "lb_policy",
                    c["lb_policy"].as_str().unwrap_or("ROUND_ROBIN").to_string(),
                ),
                ("circuit_breakers", json(&c["circuit_breakers"])),
                ("outlier_detection", json(&c["outlier_detection"])),
                ("common_lb_config", json(&c["common_lb_config"])),
                ("connect_timeout", json(&c["connect_timeout"])),
                (
                    "protocol_options",
                    json(&c["typed_extension_protocol_options"]),
                ),
                ("dns_lookup_family", json(&c["dns_lookup_family"])),
                ("dns_refresh_rate", json(&c["dns_refresh_rate"])),
                ("respect_dns_ttl", json(&c["respect_dns_ttl"])),
                ("tls", tls),
                (
                    "lb_config",
                    [
                        "ring_hash_lb_config",
                        "maglev_lb_config",
                        "round_robin_lb_config",
                        "least_request_lb_config",
                    ]
                    .iter()
                    .map(|k| json(&c[*k]))
                    .collect::<Vec<_>>()
                    .join(" "),
                ),
                (
                    "upstream_connection_options",
                    json(&c["upstream_connection_options"]),
                ),
            ]);
            out.insert(
                name.to_string(),
                Seen {
                    fields,
                    endpoints: endpoints(&c["load_assignment"]),
                },
            );
        }
        for e in config["dynamic_endpoint_configs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let cla = &e["endpoint_config"];
            let name = cla["cluster_name"].as_str().unwrap_or_default().to_string();
            assignments.insert(name, endpoints(cla));
        }
    }
    for (name, seen) in out.iter_mut() {
        if seen.fields["type"] == "EDS" {
            seen.endpoints = assignments.remove(name).unwrap_or_default();
        }
    }
    out
}

/// Envoy's clusters once they have settled: no cluster warming, and two
/// dumps 300 ms apart equal. With `meshreg` (the daemon and the node id it
/// knows the Envoy by), also: meshreg has had an answer (ACK or NACK) to
/// the last CDS and EDS response it sent that node, so a quiet moment
/// before meshreg has sent everything cannot pass for the end state. An
/// admin request that fails counts as not settled.
async fn settled(
    envoy: &Envoy,
    meshreg: Option<(&Daemon, &str)>,
    what: &str,
) -> BTreeMap<String, Seen> {
    let last: Mutex<Option<BTreeMap<String, Seen>>> = Mutex::new(None);
    eventually(what, Duration::from_secs(90), || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some((daemon, node)) = meshreg
            && !answered(daemon, node).await
        {
            return None;
        }
        let (status, body) = http_get(envoy.admin, "/config_dump?include_eds", "admin")
            .await
            .ok()?;
        let dump: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
        let now = clusters(&dump);
        let (status, warming) = http_get(
            envoy.admin,
            "/config_dump?resource=dynamic_warming_clusters",
            "admin",
        )
        .await
        .ok()?;
        let warming = if status == 200 {
            warming.matches("\"name\"").count()
        } else {
            return None;
        };
        let mut last = last.lock().unwrap();
        let done = !now.is_empty() && warming == 0 && last.as_ref() == Some(&now);
        *last = Some(now.clone());
        done.then_some(now)
    })
    .await
}

/// `node`'s entry in meshreg's `/debug/syncz` (`Value::Null` if absent).
async fn syncz_entry(daemon: &Daemon, node: &str) -> Value {
    let body = http_get(daemon.http, "/debug/syncz", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let all: Value = serde_json::from_str(&body).unwrap_or_default();
    all.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["proxy"] == node)
        .cloned()
        .unwrap_or_default()
}

/// Whether meshreg sent `node` CDS and EDS and had an answer to the last
/// response of each (`SYNCED` or `NACKED`, not `STALE` or `NOT SENT`).
async fn answered(daemon: &Daemon, node: &str) -> bool {
    let entry = syncz_entry(daemon, node).await;
    let states: Vec<&str> = entry["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["state"].as_str())
        // Types never sent to this Envoy (the gRPC listeners and routes).
        .filter(|s| *s != "NOT SENT")
        .collect();
    states.len() >= 2 && states.iter().all(|s| *s == "SYNCED" || *s == "NACKED")
}

/// What meshreg says of `node` (its sync state and how many clusters it
/// holds by meshreg's account), and the tails of the daemon's and Envoy's
/// logs: attached to a failed comparison so that it can be told apart
/// from a comparison made too early.
async fn meshreg_side(daemon: &Daemon, envoy: &Envoy, node: &str) -> String {
    let dump = http_get(
        daemon.http,
        &format!("/debug/config_dump?proxyID={node}"),
        "meshreg",
    )
    .await
    .map(|(_, b)| b)
    .unwrap_or_default();
    let dump: Value = serde_json::from_str(&dump).unwrap_or_default();
    let held: Vec<String> = dump["types"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            format!(
                "{} holds {}",
                t["type"].as_str().unwrap_or_default(),
                t["resources"].as_array().map_or(0, Vec::len)
            )
        })
        .collect();
    let tail = |log: String, n: usize| {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    format!(
        "meshreg's account of {node}: {}\n  {}\nmeshreg's log (tail):\n{}\nEnvoy's log (tail):\n{}",
        syncz_entry(daemon, node).await,
        held.join(", "),
        tail(daemon.log(), 60),
        tail(envoy.log(), 30),
    )
}

/// The case of each host: the files (relative paths) naming it.
fn cases(root: &Path, hosts: &BTreeSet<String>) -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string();
                files.push((
                    rel,
                    std::fs::read_to_string(entry.path()).unwrap_or_default(),
                ));
            }
        }
    }
    files.sort();
    let named = |text: &str, host: &str| {
        text.match_indices(host).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + host.len()..].chars().next();
            let edge = |c: Option<char>| {
                c.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            };
            edge(before) && edge(after)
        })
    };
    hosts
        .iter()
        .map(|h| {
            let mut named_in: Vec<String> = files
                .iter()
                .filter(|(_, text)| named(text, h))
                .map(|(f, _)| f.clone())
                .collect();
            if named_in.is_empty() {
                named_in.push("(no file: not from the YAML)".into());
            }
            (h.clone(), named_in)
        })
        .collect()
}

/// A STATIC ServiceEntry `host` on `ports` with two endpoints labelled
/// `version: v1` and `v2`, and a DestinationRule for it with `spec` (the
/// rule's `spec` body after `host:`).
macro_rules! rule_case {
    ($host:literal, $ports:literal, $spec:literal) => {
        concat!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n",
            "metadata: {name: ",
            $host,
            ", namespace: rules}\n",
            "spec:\n  hosts: [",
            $host,
            "]\n  location: MESH_INTERNAL\n  resolution: STATIC\n",
            "  ports: ",
            $ports,
            "\n",
            "  endpoints:\n  - {address: 10.99.0.1, labels: {version: v1}}\n",
            "  - {address: 10.99.0.2, labels: {version: v2}}\n",
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n",
            "metadata: {name: ",
            $host,
            ", namespace: rules}\n",
            "spec:\n  host: ",
            $host,
            "\n",
            $spec
        )
    };
}

/// The DestinationRule cases fed to both (one file each, under rules/).
const RULE_CASES: &[(&str, &str)] = &[
    (
        "rules-lb",
        rule_case!(
            "rules-lb.test",
            "[{number: 8080, name: http, protocol: HTTP}]",
            "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy: {loadBalancer: {simple: RANDOM}}\n"
        ),
    ),
    (
        "rules-pool",
        rule_case!(
            "rules-pool.test",
            "[{number: 8080, name: http, protocol: HTTP}]",
            "  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 10, connectTimeout: 2s}\n      http: {http1MaxPendingRequests: 5, http2MaxRequests: 20, maxRequestsPerConnection: 3, maxRetries: 4, idleTimeout: 30s}\n    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 10s, baseEjectionTime: 1m, maxEjectionPercent: 50}\n"
        ),
    ),
    (
        "rules-hash",
        rule_case!(
            "rules-hash.test",
            "[{number: 8080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]",
            "  trafficPolicy:\n    loadBalancer: {consistentHash: {ringHash: {minimumRingSize: 2048}, httpHeaderName: x-user}}\n    portLevelSettings:\n    - port: {number: 9090}\n      loadBalancer: {consistentHash: {maglev: {tableSize: 65537}, useSourceIp: true}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n"
        ),
    ),
    (
        "rules-keepalive",
        rule_case!(
            "rules-keepalive.test",
            "[{number: 8080, name: http, protocol: HTTP}]",
            "  trafficPolicy:\n    connectionPool:\n      tcp: {tcpKeepalive: {probes: 3, time: 60s, interval: 10s}}\n      http: {h2UpgradePolicy: UPGRADE}\n"
        ),
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_and_meshreg_agree_on_the_fixtures_and_the_sweep() {
    // The same directory for both: the Istio fixtures, and the sweep's
    // valid rows under sweep/ (istiod refuses a whole directory when one
    // document is invalid, so the invalid rows stay out).
    let dir = copy_tree(&repo().join("adapters/tests/fixtures/istio"));
    let rows_dir = dir.path().join("sweep");
    std::fs::create_dir(&rows_dir).unwrap();
    let mut rows = BTreeMap::new();
    for row in sweep::rows() {
        if matches!(sweep::expect(&row), Expected::Invalid(_)) {
            continue;
        }
        std::fs::write(rows_dir.join(format!("{}.yaml", row.host())), row.yaml()).unwrap();
        rows.insert(row.host(), format!("{row:?}"));
    }

    // DestinationRule cases: subsets, load balancers, connection pools,
    // outlier detection, port-level and subset-level settings.
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    for (name, text) in RULE_CASES {
        std::fs::write(rules_dir.join(format!("{name}.yaml")), text).unwrap();
    }

    let scoping_dir = dir.path().join("scoping");
    std::fs::create_dir(&scoping_dir).unwrap();
    for (name, text) in SCOPING_CASES {
        std::fs::write(scoping_dir.join(format!("{name}.yaml")), text).unwrap();
    }

    let fixtures = {
        let mut n = 0;
        let mut dirs = vec![dir.path().to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path() == rows_dir {
                    continue;
                } else if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else {
                    n += 1;
                }
            }
        }
        n
    };
    let kube = KubeApiserver::start().await;
    let istiod = Istiod::start(dir.path(), &kube).await;
    let daemon = Daemon::start(dir.path()).await;
    daemon.ready().await;
    eprintln!("reference: istiod {} with {}", istiod.version, kube.version);
    let by_istiod = Envoy::start_node(istiod.xds, Ads::Sotw, NODE, &[]).await;
    let by_meshreg = Envoy::start_node(daemon.xds, Ads::Sotw, NODE, &[]).await;
    let scoped_by_istiod = Envoy::start_node(istiod.xds, Ads::Sotw, SCOPED_NODE, &[]).await;
    let scoped_by_meshreg = Envoy::start_node(daemon.xds, Ads::Delta, SCOPED_NODE, &[]).await;
    let mut reference = settled(&by_istiod, None, "istiod's Envoy settled").await;
    let mut ours = settled(
        &by_meshreg,
        Some((&daemon, NODE_ID)),
        "meshreg's Envoy settled",
    )
    .await;
    // The scoped node's clusters, compared under a prefix of their own.
    let scoped = |m: BTreeMap<String, Seen>| {
        m.into_iter()
            .map(|(k, v)| (format!("[meshreg-scoped] {k}"), v))
            .collect::<Vec<_>>()
    };
    let scoped_reference = settled(&scoped_by_istiod, None, "istiod's scoped Envoy settled").await;
    let scoped_ours = settled(
        &scoped_by_meshreg,
        Some((&daemon, SCOPED_NODE_ID)),
        "meshreg's scoped Envoy settled",
    )
    .await;
    assert!(
        scoped_reference
            .keys()
            .any(|k| k.ends_with("|inventory.scoping.test"))
            && scoped_reference.len() < 10,
        "the Sidecar limits istiod's scoped proxy: {:?}",
        scoped_reference.keys()
    );
    // The rule whose workload selector selects the scoped probe wins over
    // its namespace's other rule (maxConnections 3, not 7).
    assert!(
        scoped_reference["outbound|8080||inventory.scoping.test"].fields["circuit_breakers"]
            .contains("\"max_connections\":3,"),
        "{:?}",
        scoped_reference["outbound|8080||inventory.scoping.test"]
    );
    // Locality failover and distribution, relative to the scoped probe's
    // locality (us-east/us-east-1a): istiod orders and weighs them.
    let nearby = &scoped_reference["outbound|8080||nearby.scoping.test"].endpoints;
    assert!(
        nearby
            .iter()
            .any(|e| e.starts_with("10.97.0.3:8080") && e.contains("priority=3"))
            && nearby
                .iter()
                .any(|e| e.starts_with("10.97.0.4:8080") && e.contains("priority=2")),
        "{nearby:?}"
    );
    let spread = &scoped_reference["outbound|8080||spread.scoping.test"].endpoints;
    assert!(
        spread
            .iter()
            .any(|e| e.starts_with("10.97.0.3:8080") && e.contains("locality_weight=30")),
        "{spread:?}"
    );
    // failoverPriority ranks by the first differing label: istiod's
    // priorities 0 to 3, which meshreg's must equal (compared below).
    let ranked = &scoped_reference["outbound|8080||ranked.scoping.test"].endpoints;
    for (ip, priority) in [
        ("10.96.0.1", 0),
        ("10.96.0.2", 1),
        ("10.96.0.3", 2),
        ("10.96.0.4", 3),
    ] {
        assert!(
            ranked.iter().any(|e| e.starts_with(&format!("{ip}:8080"))
                && e.contains(&format!("priority={priority}"))),
            "{ip} at priority {priority}: {ranked:?}"
        );
    }
    reference.extend(scoped(scoped_reference));
    ours.extend(scoped(scoped_ours));
    assert!(
        reference.len() > 50,
        "istiod served only {} outbound clusters; its log:\n{}",
        reference.len(),
        istiod.log()
    );

    let (reference, ours) = {
        let keep = |(name, _): &(&String, &Seen)| IGNORED.iter().all(|(n, _)| n != name);
        let strip = |m: &BTreeMap<String, Seen>| -> BTreeMap<String, Seen> {
            m.iter()
                .filter(keep)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        (strip(&reference), strip(&ours))
    };

    // Every difference, per cluster.
    let mut diffs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let names: BTreeSet<&String> = reference.keys().chain(ours.keys()).collect();
    for name in &names {
        let d = diffs.entry((*name).clone()).or_default();
        match (reference.get(*name), ours.get(*name)) {
            (Some(_), None) => d.push("only istiod has it".into()),
            (None, Some(_)) => d.push("only meshreg has it".into()),
            (Some(a), Some(b)) => {
                for (field, value) in &a.fields {
                    if b.fields[field] != *value {
                        d.push(format!(
                            "{field}: istiod {value}; meshreg {}",
                            b.fields[field]
                        ));
                    }
                }
                for e in a.endpoints.difference(&b.endpoints) {
                    d.push(format!("endpoint only istiod sends: {e}"));
                }
                for e in b.endpoints.difference(&a.endpoints) {
                    d.push(format!("endpoint only meshreg sends: {e}"));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    diffs.retain(|_, d| !d.is_empty());

    // The report, per case.
    let host = |name: &str| name.rsplit('|').next().unwrap_or_default().to_string();
    let hosts: BTreeSet<String> = diffs.keys().map(|n| host(n)).collect();
    let files = cases(dir.path(), &hosts);
    let mut per_case: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for (name, d) in &diffs {
        let h = host(name);
        let case = match rows.get(&h) {
            Some(row) => format!("sweep {row}"),
            None => files[&h].join(", "),
        };
        for line in d {
            let known = KNOWN
                .iter()
                .any(|(field, _)| line.starts_with(&format!("{field}:")));
            if known {
                continue;
            }
            unexplained.push(format!("{name}: {line}"));
            per_case
                .entry(case.clone())
                .or_default()
                .push(format!("  {name}: {line}"));
        }
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# CDS/EDS of the same Istio YAML: a real istiod against meshreg, each to a real Envoy\n\
         # (written by tests/e2e/istiod.rs; MESHREG_BLESS=1 rewrites it).\n\
         # Compared per outbound cluster: type, lb policy, common lb config, connect timeout, circuit breakers,\n\
         # outlier detection, TLS, upstream protocol options, lb config, upstream connection options,\n\
         # DNS lookup family, refresh rate and TTL;\n\
         # per endpoint: address, port, health, weight, locality, locality weight, priority, metadata.\n\
         # Input: {fixtures} fixture files and {} sweep rows; {} clusters from istiod, {} from meshreg.\n\
         # {} clusters differ (known differences included).\n",
        rows.len(),
        reference.len(),
        ours.len(),
        diffs.len(),
    );
    for (name, why) in IGNORED {
        let _ = writeln!(report, "# Not compared: {name}: {why}.");
    }
    for (field, why) in KNOWN {
        let clusters = diffs
            .values()
            .filter(|d| d.iter().any(|l| l.starts_with(&format!("{field}:"))))
            .count();
        let _ = writeln!(
            report,
            "# Known difference, {clusters} clusters: {field}: {why}."
        );
    }
    for (case, lines) in &per_case {
        let _ = writeln!(report, "{case}\n{}", lines.join("\n"));
    }
    let path = repo().join(REPORT);
    if std::env::var_os("MESHREG_BLESS").is_some() {
        std::fs::write(&path, &report).unwrap();
    }
    let kept = std::fs::read_to_string(&path).unwrap_or_default();
    if !unexplained.is_empty() {
        panic!(
            "{} differences from istiod:\n{}\n\nfull report:\n{report}\n{}\n{}",
            unexplained.len(),
            unexplained.join("\n"),
            meshreg_side(&daemon, &by_meshreg, NODE_ID).await,
            meshreg_side(&daemon, &scoped_by_meshreg, SCOPED_NODE_ID).await,
        );
    }
    assert_eq!(
        kept, report,
        "the differences from istiod changed; review, then rewrite {REPORT} with MESHREG_BLESS=1"
    );
}
