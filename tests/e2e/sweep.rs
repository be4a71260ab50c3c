//! The validity sweep of issue 8: every combination that matters of
//! resolution × location × endpoints × workloadSelector (and one host in
//! several entries) is fed to one daemon, with a real Envoy over delta and
//! one over SotW. No row may be NACKed, and each row's cluster has the type
//! and endpoint set that istiod's conversion and cluster builder give for
//! it. The rule each expectation follows is written beside it in
//! [`expect`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Ads, Daemon, Envoy, eventually};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    Static,
    Dns,
    DnsRoundRobin,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// No `endpoints`.
    Absent,
    OneIp,
    TwoIps,
    /// One IP with a port map (`http: 8080`).
    IpWithPortMap,
    OneName,
    TwoNames,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selector {
    Absent,
    MatchesNone,
    MatchesOne,
    MatchesTwo,
}

#[derive(Debug, Clone)]
pub(crate) struct Row {
    id: usize,
    resolution: Resolution,
    external: bool,
    endpoints: Endpoints,
    selector: Selector,
    /// A second entry (another name) declares the same host with one more
    /// endpoint of the same kind.
    twice: bool,
}

/// What istiod does with a row.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expected {
    /// Refused by validation (`ValidateServiceEntry`): no cluster.
    Invalid(&'static str),
    /// No cluster (pilot's cluster builder drops DNS clusters without
    /// endpoints).
    NoCluster,
    /// A cluster of this Envoy type with these endpoints (`addr:port` or
    /// `unix:path`, sorted).
    Cluster(&'static str, Vec<String>),
}

impl Row {
    pub(crate) fn host(&self) -> String {
        format!("r{}.sweep.test", self.id)
    }

    fn cluster(&self) -> String {
        format!("outbound|80||{}", self.host())
    }

    /// The inline endpoints of entry `n` (0 or 1) as (YAML, expected
    /// address).
    fn inline(&self, n: usize) -> Vec<(String, String)> {
        // The second entry's addresses sort first, so a rule that keeps
        // "the first entry's" endpoint differs from "the lowest address".
        let ip = |k: usize| format!("127.0.{}.{}", self.id % 200 + 1, 10 * (1 - n) + k + 1);
        let name = |k: usize| format!("e{}-{}.r{}.sweep.test", n, k, self.id);
        match self.endpoints {
            Endpoints::Absent => vec![],
            Endpoints::OneIp => vec![(format!("{{address: {}}}", ip(0)), format!("{}:80", ip(0)))],
            Endpoints::TwoIps => (0..2)
                .map(|k| (format!("{{address: {}}}", ip(k)), format!("{}:80", ip(k))))
                .collect(),
            Endpoints::IpWithPortMap => vec![(
                format!("{{address: {}, ports: {{http: 8080}}}}", ip(0)),
                format!("{}:8080", ip(0)),
            )],
            Endpoints::OneName => vec![(
                format!("{{address: {}}}", name(0)),
                format!("{}:80", name(0)),
            )],
            Endpoints::TwoNames => (0..2)
                .map(|k| {
                    (
                        format!("{{address: {}}}", name(k)),
                        format!("{}:80", name(k)),
                    )
                })
                .collect(),
            Endpoints::Unix => {
                let path = format!("/tmp/r{}-{}.sock", self.id, n);
                vec![(
                    format!("{{address: \"unix://{path}\"}}"),
                    format!("unix:{path}"),
                )]
            }
        }
    }

    /// The WorkloadEntries the row's selector matches: (name, address).
    fn selected(&self) -> Vec<(String, String)> {
        let count = match self.selector {
            Selector::Absent | Selector::MatchesNone => 0,
            Selector::MatchesOne => 1,
            Selector::MatchesTwo => 2,
        };
        (0..count)
            .map(|k| {
                (
                    format!("r{}-we{}", self.id, k),
                    format!("127.1.{}.{}", self.id % 200 + 1, k + 1),
                )
            })
            .collect()
    }

    pub(crate) fn yaml(&self) -> String {
        let resolution = match self.resolution {
            Resolution::Static => "STATIC",
            Resolution::Dns => "DNS",
            Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
            Resolution::None => "NONE",
        };
        let location = if self.external {
            "MESH_EXTERNAL"
        } else {
            "MESH_INTERNAL"
        };
        let mut out = String::new();
        for n in 0..(1 + usize::from(self.twice)) {
            let _ = write!(
                out,
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {{name: r{id}-{n}, namespace: sweep}}\nspec:\n  hosts: [{host}]\n  \
                 location: {location}\n  resolution: {resolution}\n  \
                 ports: [{{number: 80, name: http, protocol: HTTP}}]\n",
                id = self.id,
                host = self.host(),
            );
            let inline = self.inline(n);
            if !inline.is_empty() {
                out.push_str("  endpoints:\n");
                for (e, _) in &inline {
                    let _ = writeln!(out, "  - {e}");
                }
            }
            if self.selector != Selector::Absent {
                let _ = writeln!(out, "  workloadSelector: {{labels: {{row: r{}}}}}", self.id);
            }
            out.push_str("---\n");
        }
        for (name, address) in self.selected() {
            let _ = write!(
                out,
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
                 metadata: {{name: {name}, namespace: sweep, labels: {{row: r{id}}}}}\n\
                 spec: {{address: {address}}}\n---\n",
                id = self.id
            );
        }
        // A WorkloadEntry with other labels is never selected.
        let _ = write!(
            out,
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
             metadata: {{name: r{id}-other, namespace: sweep, labels: {{row: other}}}}\n\
             spec: {{address: 127.2.0.{last}}}\n",
            id = self.id,
            last = self.id % 250 + 1
        );
        out
    }
}

/// What istiod generates for `row`, each rule with its source.
pub(crate) fn expect(row: &Row) -> Expected {
    use Endpoints as E;
    use Resolution as R;
    let has_inline = row.endpoints != E::Absent;
    let names = matches!(row.endpoints, E::OneName | E::TwoNames);
    // ValidateServiceEntry:
    if has_inline && row.selector != Selector::Absent {
        return Expected::Invalid("only one of WorkloadSelector or Endpoints is allowed");
    }
    if row.resolution == R::None && has_inline {
        return Expected::Invalid("no endpoints should be provided for resolution type none");
    }
    if row.resolution == R::Static && names {
        return Expected::Invalid("STATIC endpoints must be IP addresses or Unix sockets");
    }
    let inline_count = (0..1 + usize::from(row.twice))
        .map(|n| row.inline(n).len())
        .max()
        .unwrap_or(0);
    if row.resolution == R::DnsRoundRobin && inline_count > 1 {
        return Expected::Invalid("DNS_ROUND_ROBIN allows at most one endpoint");
    }
    if matches!(row.resolution, R::Dns | R::DnsRoundRobin) && row.endpoints == E::Unix {
        return Expected::Invalid("DNS endpoints must be host names or IPs");
    }
    // The endpoints, in the registry's canonical (sorted) order: inline
    // endpoints of every entry for the host, or the selected
    // WorkloadEntries; a DNS entry with neither resolves its host name
    // (convertServiceEntryToInstances).
    // DNS_ROUND_ROBIN: only the first entry's (mergeServiceInstances).
    let entries = match row.resolution {
        R::DnsRoundRobin => 1,
        _ => 1 + usize::from(row.twice),
    };
    let mut endpoints: Vec<String> = (0..entries)
        .flat_map(|n| row.inline(n).into_iter().map(|(_, a)| a))
        .chain(row.selected().into_iter().map(|(_, a)| format!("{a}:80")))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    match row.resolution {
        // convertResolution: ClientSideLB → EDS.
        R::Static => Expected::Cluster("EDS", endpoints),
        // Passthrough → ORIGINAL_DST, no endpoints in the cluster.
        R::None => Expected::Cluster("ORIGINAL_DST", vec![]),
        R::Dns | R::DnsRoundRobin => {
            if row.endpoints == E::Absent && row.selector == Selector::Absent {
                endpoints = vec![format!("{}:80", row.host())];
            }
            if endpoints.is_empty() {
                // buildCluster: "cluster without endpoints" → nil.
                return Expected::NoCluster;
            }
            if row.resolution == R::Dns {
                Expected::Cluster("STRICT_DNS", endpoints)
            } else {
                // mergeServiceInstances keeps the first instance per port;
                // LOGICAL_DNS takes exactly one.
                endpoints.truncate(1);
                Expected::Cluster("LOGICAL_DNS", endpoints)
            }
        }
    }
}

pub(crate) fn rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for resolution in [
        Resolution::Static,
        Resolution::Dns,
        Resolution::DnsRoundRobin,
        Resolution::None,
    ] {
        for external in [false, true] {
            for endpoints in [
                Endpoints::Absent,
                Endpoints::OneIp,
                Endpoints::TwoIps,
                Endpoints::IpWithPortMap,
                Endpoints::OneName,
                Endpoints::TwoNames,
                Endpoints::Unix,
            ] {
                for selector in [
                    Selector::Absent,
                    Selector::MatchesNone,
                    Selector::MatchesOne,
                    Selector::MatchesTwo,
                ] {
                    for twice in [false, true] {
                        // A second entry matters only with inline
                        // endpoints to merge, and without a selector.
                        if twice && (endpoints == Endpoints::Absent || selector != Selector::Absent)
                        {
                            continue;
                        }
                        rows.push(Row {
                            id: rows.len(),
                            resolution,
                            external,
                            endpoints,
                            selector,
                            twice,
                        });
                    }
                }
            }
        }
    }
    rows
}

/// `addr:port` or `unix:path` of an `Address` in Envoy's JSON.
pub(crate) fn address(a: &Value) -> String {
    if let Some(s) = a.get("socket_address") {
        format!(
            "{}:{}",
            s["address"].as_str().unwrap_or_default(),
            s["port_value"].as_u64().unwrap_or_default()
        )
    } else {
        format!("unix:{}", a["pipe"]["path"].as_str().unwrap_or_default())
    }
}

/// The endpoints of a `ClusterLoadAssignment` in Envoy's JSON, sorted.
fn cla_endpoints(cla: &Value) -> Vec<String> {
    let mut out: Vec<String> = cla["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["lb_endpoints"].as_array().into_iter().flatten())
        .map(|e| address(&e["endpoint"]["address"]))
        .collect();
    out.sort();
    out
}

/// Every dynamic cluster Envoy has: name → (type, endpoints), endpoints
/// from the inline assignment or, for EDS, from its ClusterLoadAssignment.
async fn observed(envoy: &Envoy) -> BTreeMap<String, (String, Vec<String>)> {
    let dump: Value =
        serde_json::from_str(&envoy.admin("/config_dump?include_eds").await).unwrap_or_default();
    let mut clusters = BTreeMap::new();
    let mut assignments = BTreeMap::new();
    for config in dump["configs"].as_array().into_iter().flatten() {
        for c in config["dynamic_active_clusters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let c = &c["cluster"];
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let kind = c["type"].as_str().unwrap_or("EDS").to_string();
            clusters.insert(name, (kind, cla_endpoints(&c["load_assignment"])));
        }
        for e in config["dynamic_endpoint_configs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let cla = &e["endpoint_config"];
            let name = cla["cluster_name"].as_str().unwrap_or_default().to_string();
            assignments.insert(name, cla_endpoints(cla));
        }
    }
    for (name, (kind, endpoints)) in clusters.iter_mut() {
        if kind == "EDS" {
            *endpoints = assignments.get(name).cloned().unwrap_or_default();
        }
    }
    clusters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_cluster_is_accepted_and_matches_istio() {
    let rows = rows();
    let dir = tempfile::tempdir().unwrap();
    for row in &rows {
        std::fs::write(dir.path().join(format!("r{}.yaml", row.id)), row.yaml()).unwrap();
    }
    let expected: BTreeMap<String, Expected> =
        rows.iter().map(|r| (r.cluster(), expect(r))).collect();
    let wanted = expected
        .values()
        .filter(|e| matches!(e, Expected::Cluster(..)))
        .count();
    let daemon = Daemon::start(dir.path()).await;
    let delta = Envoy::start(daemon.xds, Ads::Delta, "sweep-delta", &[]).await;
    let sotw = Envoy::start(daemon.xds, Ads::Sotw, "sweep-sotw", &[]).await;
    for envoy in [&delta, &sotw] {
        let seen = eventually(
            "every expected cluster in Envoy",
            Duration::from_secs(60),
            || async {
                let seen = observed(envoy).await;
                let eds_done = seen
                    .iter()
                    .filter(|(n, _)| {
                        matches!(expected.get(*n), Some(Expected::Cluster("EDS", e)) if !e.is_empty())
                    })
                    .all(|(_, (_, eps))| !eps.is_empty());
                (seen.len() >= wanted && eds_done).then_some(seen)
            },
        )
        .await;
        let mut wrong = Vec::new();
        for row in &rows {
            let got = seen.get(&row.cluster());
            let ok = match (expect(row), got) {
                (Expected::Invalid(_) | Expected::NoCluster, None) => true,
                (Expected::Cluster(kind, eps), Some((k, e))) => kind == k && eps == *e,
                _ => false,
            };
            if !ok {
                wrong.push(format!(
                    "row {row:?}\n  expected {:?}\n  got {got:?}",
                    expect(row)
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} rows differ from istiod:\n{}",
            wrong.len(),
            rows.len(),
            wrong.join("\n")
        );
        assert_eq!(seen.len(), wanted, "no other clusters");
    }
    assert_eq!(daemon.metric("pilot_total_xds_rejects", &[]).await, 0.0);
    assert_eq!(
        daemon
            .metric("meshreg_xds_invalid_resources_total", &[])
            .await,
        0.0
    );
    let invalid = expected
        .values()
        .filter(|e| matches!(e, Expected::Invalid(_)))
        .count();
    let report = format!(
        "validity sweep: {} rows ({wanted} clusters, {invalid} refused by validation, {} without a cluster), 0 NACKs over delta and SotW\n",
        rows.len(),
        rows.len() - wanted - invalid
    );
    print!("{report}");
    // The test runner hides a passing test's output: scripts/test.sh prints
    // this file, so CI shows the row count.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::support::repo().join("target"));
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("validity-sweep.txt"), report);
}
