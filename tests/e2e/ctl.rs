//! Issue 11: `meshreg ctl` and the debug endpoints behind it, against a
//! running daemon with real Envoys over delta and SotW: proxy-status says
//! SYNCED and follows edits, shows a NACK with its error; proxy-config
//! prints what each Envoy's own admin API shows; registry, sources and the
//! push history; exit codes a script relies on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use meshreg::debug;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, http_get, repo, write_atomic};

/// Runs `meshreg ctl --addr <addr> <args>`: exit code, stdout, stderr.
async fn ctl(addr: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshreg"))
        .arg("ctl")
        .arg("--addr")
        .arg(addr.to_string())
        .args(args)
        .output()
        .await
        .expect("meshreg runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl <args> -o json`, decoded; panics on a non-zero exit.
async fn ctl_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, args: &[&str]) -> T {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (code, out, err) = ctl(addr, &all).await;
    assert_eq!(code, 0, "ctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
}

fn state<'a>(p: &'a debug::ProxyStatus, t: &str) -> &'a debug::TypeStatus {
    p.types.iter().find(|s| s.type_short == t).unwrap()
}

/// The proxies whose CDS and EDS are both SYNCED, by node id.
async fn synced(addr: SocketAddr) -> BTreeSet<String> {
    let list: Vec<debug::ProxyStatus> = ctl_json(addr, &["proxy-status"]).await;
    list.iter()
        .filter(|p| state(p, "cds").state == "SYNCED" && state(p, "eds").state == "SYNCED")
        .map(|p| p.proxy.clone())
        .collect()
}

/// The data rows of a table (header dropped), split on runs of spaces.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            l.split("   ")
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_and_proxy_config_match_what_envoy_holds() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let delta = Envoy::start(daemon.xds, Ads::Delta, "ctl-delta", &[]).await;
    let sotw = Envoy::start(daemon.xds, Ads::Sotw, "ctl-sotw", &[]).await;
    for envoy in [&delta, &sotw] {
        eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
            (envoy.endpoints().await.len() == 6).then_some(())
        })
        .await;
    }
    let both: BTreeSet<String> = ["ctl-delta".into(), "ctl-sotw".into()].into();
    eventually("both proxies SYNCED", Duration::from_secs(10), || async {
        (synced(daemon.http).await == both).then_some(())
    })
    .await;

    // The table, as istioctl prints it.
    let (code, table, _) = ctl(daemon.http, &["proxy-status"]).await;
    assert_eq!(code, 0);
    assert!(table.starts_with("NAME"), "{table}");
    let modes: BTreeSet<(String, String)> = rows(&table)
        .into_iter()
        .map(|r| (r[0].clone(), r[2].clone()))
        .collect();
    assert_eq!(
        modes,
        [
            ("ctl-delta".to_string(), "delta".to_string()),
            ("ctl-sotw".to_string(), "sotw".to_string())
        ]
        .into()
    );

    for (envoy, id) in [(&delta, "ctl-delta"), (&sotw, "ctl-sotw")] {
        // Clusters: the same set Envoy's /clusters shows.
        // As sent, in Envoy's JSON (proto field names, as its /config_dump).
        let sent: Vec<serde_json::Value> =
            ctl_json(daemon.http, &["proxy-config", "clusters", id]).await;
        let names: BTreeSet<String> = sent
            .iter()
            .map(|c| {
                assert_eq!(
                    c["@type"], "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                    "{c}"
                );
                assert_eq!(c["type"], "EDS", "{c}");
                assert!(
                    c["eds_cluster_config"]["eds_config"]["ads"].is_object(),
                    "{c}"
                );
                c["name"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(names, envoy.clusters().await, "{id}");
        let sent: Vec<serde_json::Value> =
            ctl_json(daemon.http, &["proxy-config", "endpoints", id]).await;
        assert_eq!(sent.len(), 4, "{sent:?}");
        assert!(
            sent.iter().all(|c| c["cluster_name"].is_string()),
            "{sent:?}"
        );
        let (code, table, _) = ctl(daemon.http, &["proxy-config", "clusters", id]).await;
        assert_eq!(code, 0);
        assert!(
            table.starts_with("SERVICE FQDN") && table.contains("DIRECTION"),
            "{table}"
        );
        let from_table: BTreeSet<String> = rows(&table)
            .into_iter()
            .map(|r| {
                assert_eq!(r[4], "EDS", "{table}");
                format!(
                    "{}|{}|{}|{}",
                    r[3],
                    r[1],
                    if r[2] == "-" { "" } else { &r[2] },
                    r[0]
                )
            })
            .collect();
        assert_eq!(from_table, names, "{table}");
        // Filters, as istioctl's.
        let (_, table, _) = ctl(
            daemon.http,
            &[
                "proxy-config",
                "clusters",
                id,
                "--fqdn",
                "reviews.default.svc.cluster.local",
            ],
        )
        .await;
        assert_eq!(rows(&table).len(), 1, "{table}");

        // Endpoints: the same (cluster, address) pairs as Envoy's.
        let (code, table, _) = ctl(daemon.http, &["proxy-config", "endpoints", id]).await;
        assert_eq!(code, 0);
        assert!(table.starts_with("ENDPOINT"), "{table}");
        let pairs: BTreeSet<(String, String)> = rows(&table)
            .into_iter()
            .map(|r| {
                assert_eq!(r[1], "HEALTHY", "{table}");
                (r[3].clone(), r[0].clone())
            })
            .collect();
        assert_eq!(pairs, envoy.endpoints().await, "{id}");
    }

    // An edit: both proxies accept a new EDS version and hold the new
    // endpoint.
    let before: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
    let path = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.16", "127.0.0.116"));
    eventually(
        "the new EDS version acked",
        Duration::from_secs(10),
        || async {
            let now: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
            let moved = now.iter().all(|p| {
                let old = before.iter().find(|b| b.proxy == p.proxy).unwrap();
                state(p, "eds").state == "SYNCED"
                    && state(p, "eds").acked_version != state(old, "eds").acked_version
            });
            (moved && now.len() == 2).then_some(())
        },
    )
    .await;
    for id in ["ctl-delta", "ctl-sotw"] {
        let (_, table, _) = ctl(
            daemon.http,
            &[
                "proxy-config",
                "endpoints",
                id,
                "--cluster",
                "outbound|9080||ratings.default.svc.cluster.local",
            ],
        )
        .await;
        assert!(table.contains("127.0.0.116:9080"), "{id}: {table}");
        assert!(!table.contains("127.0.0.16:"), "{id}: {table}");
    }

    // What a script relies on: an unknown proxy is 66 with its name; an
    // unreachable daemon is 69 with the address.
    let (code, _, err) = ctl(daemon.http, &["proxy-config", "clusters", "no-such-proxy"]).await;
    assert_eq!(code, 66, "{err}");
    assert!(err.contains("no-such-proxy"), "{err}");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, err) = ctl(dead, &["proxy-status"]).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains(&dead.to_string()), "{err}");
}

/// A long Unix socket path passes validation and Envoy rejects the
/// assignment (see `nacks.rs`): proxy-status shows the NACK and Envoy's
/// error, and the version the proxy still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_a_nack_and_its_error() {
    // Beside bookinfo, so that other assignments are accepted after the
    // rejection: the type stays NACKED while the rejected one is current.
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let entry = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: sock, namespace: default}}
spec:
  hosts: [sock.example.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: "unix:///tmp/{}.sock"}}
"#,
        "x".repeat(150)
    );
    std::fs::write(dir.path().join("sock.yaml"), entry).unwrap();
    let daemon = Daemon::start_with(dir.path(), "check_resources: false").await;
    let _delta = Envoy::start(daemon.xds, Ads::Delta, "nack-delta", &[]).await;
    let _sotw = Envoy::start(daemon.xds, Ads::Sotw, "nack-sotw", &[]).await;
    let list = eventually("both NACKs shown", Duration::from_secs(20), || async {
        let list: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
        (list.len() == 2
            && list
                .iter()
                .all(|p| state(p, "eds").state == "NACKED" && state(p, "eds").rejected == 1))
        .then_some(list)
    })
    .await;
    for p in &list {
        let eds = state(p, "eds");
        assert!(eds.nacks >= 1, "{p:?}");
        assert!(!eds.last_nack.as_deref().unwrap_or("").is_empty(), "{p:?}");
        assert_eq!(state(p, "cds").state, "SYNCED", "{p:?}");
    }
    // Another assignment changes and is accepted: still NACKED, since the
    // rejected one is still what the server has.
    let before: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
    let path = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.16", "127.0.0.116"));
    eventually(
        "the ratings change acked",
        Duration::from_secs(10),
        || async {
            let now: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
            now.iter()
                .all(|p| {
                    let old = before.iter().find(|b| b.proxy == p.proxy).unwrap();
                    state(p, "eds").acked_version != state(old, "eds").acked_version
                })
                .then_some(())
        },
    )
    .await;
    let now: Vec<debug::ProxyStatus> = ctl_json(daemon.http, &["proxy-status"]).await;
    for p in &now {
        assert_eq!(state(p, "eds").state, "NACKED", "{p:?}");
    }
    // The config dump names the rejected assignment.
    let dump: debug::ConfigDump = {
        let (_, body) = http_get(daemon.http, "/debug/config_dump?proxyID=nack-delta", "m")
            .await
            .unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let eds = dump.types.iter().find(|t| t.type_short == "eds").unwrap();
    assert_eq!(eds.rejected.len(), 1, "{eds:?}");
    assert_eq!(eds.rejected[0].name, "outbound|80||sock.example.test");
    assert_eq!(dump.mode, "delta");
    // CSDS says so too: that assignment NACKED with Envoy's error.
    use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
    use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let mut client = ClientStatusDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .unwrap();
    let resp = client
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.config.len(), 2);
    for config in &resp.config {
        let sock = config
            .generic_xds_configs
            .iter()
            .find(|g| {
                g.name == "outbound|80||sock.example.test"
                    && g.type_url.ends_with("ClusterLoadAssignment")
            })
            .unwrap_or_else(|| panic!("{config:?}"));
        assert_eq!(
            sock.client_status,
            ClientResourceStatus::Nacked as i32,
            "{sock:?}"
        );
        assert!(
            !sock.error_state.as_ref().unwrap().details.is_empty(),
            "{sock:?}"
        );
    }
    let (code, table, _) = ctl(daemon.http, &["proxy-status"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("NACKED") && table.contains("LAST NACKS"),
        "{table}"
    );
    assert!(table.contains("nack-delta eds rejected version"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_sources_and_push_history() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let sources: Vec<debug::SourceStatus> = eventually(
        "the file source synced",
        Duration::from_secs(10),
        || async {
            let list: Vec<debug::SourceStatus> = ctl_json(daemon.http, &["sources"]).await;
            list.iter().all(|s| s.state == "synced").then_some(list)
        },
    )
    .await;
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert!(sources[0].objects > 0, "{sources:?}");
    assert!(sources[0].last_sync.is_some(), "{sources:?}");
    assert!(sources[0].updates >= 1, "{sources:?}");
    assert_eq!(
        (sources[0].errors, sources[0].rejected),
        (0, 0),
        "{sources:?}"
    );
    let services: Vec<debug::Service> = ctl_json(daemon.http, &["registry"]).await;
    let reviews = services
        .iter()
        .find(|s| s.hostname == "reviews.default.svc.cluster.local")
        .expect("reviews");
    assert_eq!(reviews.resolution, "STATIC");
    assert_eq!(reviews.declarations.len(), 1, "{reviews:?}");
    assert_eq!(reviews.declarations[0].source, sources[0].source);
    let endpoints: Vec<debug::Endpoint> = ctl_json(daemon.http, &["registry", "--endpoints"]).await;
    assert_eq!(endpoints.len(), 6, "{endpoints:?}");
    assert!(
        endpoints.iter().all(|e| e.health == "HEALTHY"),
        "{endpoints:?}"
    );
    let (code, table, _) = ctl(daemon.http, &["sources"]).await;
    assert_eq!(code, 0);
    assert!(
        table.starts_with("SOURCE") && table.contains("synced"),
        "{table}"
    );
    let (code, yaml, _) = ctl(daemon.http, &["registry", "-o", "yaml"]).await;
    assert_eq!(code, 0);
    assert!(
        yaml.contains("hostname: reviews.default.svc.cluster.local"),
        "{yaml}"
    );

    // An endpoint edit is one push triggered by one endpoint change.
    let path = dir.path().join("ratings.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("127.0.0.16", "127.0.0.116"));
    let push = eventually("the edit's push", Duration::from_secs(10), || async {
        let (_, body) = http_get(daemon.http, "/debug/push_status", "meshreg")
            .await
            .ok()?;
        let pushes: Vec<debug::Push> = serde_json::from_str(&body).ok()?;
        pushes
            .into_iter()
            .rev()
            .find(|p| p.triggers.get("endpoint") == Some(&1))
    })
    .await;
    assert!(push.published, "{push:?}");
    assert_eq!(push.assignments_changed, 1, "{push:?}");
    assert_eq!(push.clusters_changed, 0, "{push:?}");
    assert!(push.since_event_ms.is_some(), "{push:?}");
    assert_eq!(
        daemon
            .metric("pilot_push_triggers", &["type=\"endpoint\""])
            .await,
        1.0
    );
}

/// Envoy's CSDS on the xDS port, asked by tonic's gRPC client: one
/// ClientConfig per proxy with every cluster it holds, SYNCED and ACKED,
/// the contents unless excluded; node matchers select proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csds_reports_what_each_proxy_holds() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::status::v3::{ClientStatusRequest, ConfigStatus};
    use envoy_types::pb::envoy::r#type::matcher::v3::{NodeMatcher, StringMatcher, string_matcher};
    use prost::Message;

    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "csds-delta", &[]).await;
    eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
        (envoy.endpoints().await.len() == 6).then_some(())
    })
    .await;
    eventually("SYNCED", Duration::from_secs(10), || async {
        (synced(daemon.http).await.len() == 1).then_some(())
    })
    .await;
    let mut client = ClientStatusDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .expect("CSDS connects");
    let resp = client
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .expect("FetchClientStatus")
        .into_inner();
    assert_eq!(resp.config.len(), 1, "{resp:?}");
    let config = &resp.config[0];
    assert_eq!(config.node.as_ref().unwrap().id, "csds-delta");
    let clusters: BTreeSet<String> = config
        .generic_xds_configs
        .iter()
        .filter(|g| g.type_url.ends_with("envoy.config.cluster.v3.Cluster"))
        .map(|g| {
            assert_eq!(g.config_status, ConfigStatus::Synced as i32, "{g:?}");
            let any = g.xds_config.as_ref().expect("contents");
            let cluster = Cluster::decode(any.value.as_slice()).unwrap();
            assert_eq!(cluster.name, g.name);
            g.name.clone()
        })
        .collect();
    assert_eq!(clusters, envoy.clusters().await);
    let assignments = config
        .generic_xds_configs
        .iter()
        .filter(|g| g.type_url.ends_with("ClusterLoadAssignment"))
        .count();
    assert_eq!(assignments, 4);

    // A second stream of the same node id holding one assignment (a gRPC
    // client opens one per target): each stream reports its own.
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .expect("ADS connects");
    let one = clusters.iter().next().unwrap().clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "csds-delta".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
        resource_names_subscribe: vec![one.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut second = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("delta stream")
        .into_inner();
    second.message().await.unwrap().expect("the assignment");
    let resp = client
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut held: Vec<usize> = resp
        .config
        .iter()
        .map(|c| {
            c.generic_xds_configs
                .iter()
                .filter(|g| g.type_url.ends_with("ClusterLoadAssignment"))
                .count()
        })
        .collect();
    held.sort();
    assert_eq!(held, [1, 4], "each stream's own assignments: {resp:?}");
    drop(tx);

    // Without contents; and a matcher that selects nobody.
    let resp = client
        .fetch_client_status(ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.config[0]
            .generic_xds_configs
            .iter()
            .all(|g| g.xds_config.is_none())
    );
    let nobody = |prefix: &str| ClientStatusRequest {
        node_matchers: vec![NodeMatcher {
            node_id: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Prefix(prefix.into())),
                ignore_case: false,
            }),
            node_metadatas: Vec::new(),
        }],
        ..Default::default()
    };
    let resp = client
        .fetch_client_status(nobody("sidecar~"))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.config.is_empty(), "{resp:?}");

    // The streaming method answers each request.
    let requests = tokio_stream::iter(vec![nobody("csds-"), nobody("other")]);
    let mut answers = client
        .stream_client_status(requests)
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.config.len(), 1);
    let second = answers.message().await.unwrap().unwrap();
    assert!(second.config.is_empty());
}

/// A refused file is listed with its document, field and reason while it
/// is refused, and leaves the list once fixed; the rest keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_objects_are_listed_until_fixed() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    let bad = dir.path().join("bad.yaml");
    let entry = |port: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: bad, namespace: default}}\n\
             spec:\n  hosts: [bad.example.test]\n  resolution: STATIC\n\
             \x20 ports: [{{number: {port}, name: http, protocol: HTTP}}]\n\
             \x20 endpoints: [{{address: 127.0.0.40}}]\n"
        )
    };
    write_atomic(
        &bad,
        &format!(
            "{}---\n{}",
            entry("80")
                .replace("name: bad,", "name: good,")
                .replace("bad.example", "good.example"),
            entry("0")
        ),
    );
    let list: Vec<debug::Rejected> =
        eventually("the refusal listed", Duration::from_secs(10), || async {
            let list: Vec<debug::Rejected> = ctl_json(daemon.http, &["rejected"]).await;
            (!list.is_empty()).then_some(list)
        })
        .await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].object.ends_with("bad.yaml"), "{list:?}");
    let p = &list[0].problems[0];
    assert_eq!(p.document, Some(1), "{p:?}");
    assert_eq!(p.field, "spec.ports[0].number", "{p:?}");
    assert_eq!(p.reason, "invalid", "{p:?}");
    let (code, table, _) = ctl(daemon.http, &["rejected"]).await;
    assert_eq!(code, 0);
    assert!(table.contains("spec.ports[0].number"), "{table}");
    let sources: Vec<debug::SourceStatus> = ctl_json(daemon.http, &["sources"]).await;
    assert_eq!(sources[0].rejected, 1, "{sources:?}");
    assert!(sources[0].errors >= 1, "{sources:?}");
    // The fix empties the list.
    write_atomic(&bad, &entry("80"));
    eventually("the list empty", Duration::from_secs(10), || async {
        let list: Vec<debug::Rejected> = ctl_json(daemon.http, &["rejected"]).await;
        list.is_empty().then_some(())
    })
    .await;
    let services: Vec<debug::Service> = ctl_json(daemon.http, &["registry"]).await;
    assert!(services.iter().any(|s| s.hostname == "bad.example.test"));
    // A refused file that is deleted leaves the list too.
    let broken = dir.path().join("broken.yaml");
    write_atomic(&broken, "spec: [");
    eventually(
        "the broken file listed",
        Duration::from_secs(10),
        || async {
            let list: Vec<debug::Rejected> = ctl_json(daemon.http, &["rejected"]).await;
            (list.len() == 1).then_some(())
        },
    )
    .await;
    std::fs::remove_file(&broken).unwrap();
    eventually(
        "the deleted file gone from the list",
        Duration::from_secs(10),
        || async {
            let list: Vec<debug::Rejected> = ctl_json(daemon.http, &["rejected"]).await;
            list.is_empty().then_some(())
        },
    )
    .await;
}

/// The first non-loopback IPv4 address of this host (the address a
/// datagram to a public address would leave from; nothing is sent).
fn host_address() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.250:9")
        .or_else(|_| s.connect("8.8.8.8:53"))
        .unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback(),
        "this test needs a non-loopback address on the host"
    );
    ip
}

/// `/debug/*` answers loopback peers; from the host's other address it is
/// refused (403, counted), unless the request carries the bearer token
/// from `http.debug_token_file`; `/metrics` stays open. `ctl` sends the
/// token from `--token-file` and exits 77 when refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_endpoints_need_loopback_or_the_token() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let tokens = tempfile::tempdir().unwrap();
    let token = tokens.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let text = Daemon::config_text(&[dir.path()], "").replace(
        "http: {listen: 127.0.0.1:0}",
        &format!(
            "http: {{listen: 0.0.0.0:0, debug_token_file: {}}}",
            token.display()
        ),
    );
    let daemon = Daemon::start_config(&text).await;
    let local = SocketAddr::new("127.0.0.1".parse().unwrap(), daemon.http.port());
    let remote = SocketAddr::new(host_address(), daemon.http.port());
    eventually("ready", Duration::from_secs(10), || async {
        (http_get(local, "/ready", "meshreg").await.ok()?.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(local, "/debug/sourcez", "m").await.unwrap().0, 200);
    assert_eq!(
        http_get(remote, "/debug/sourcez", "m").await.unwrap().0,
        403
    );
    assert_eq!(http_get(remote, "/debug", "m").await.unwrap().0, 403);
    assert_eq!(http_get(remote, "/metrics", "m").await.unwrap().0, 200);
    assert_eq!(
        daemon.metric("meshreg_http_debug_refused_total", &[]).await,
        2.0
    );
    let (code, _, err) = ctl(remote, &["sources"]).await;
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("refused"), "{err}");
    let token_arg = token.to_str().unwrap();
    let (code, out, err) = ctl(remote, &["sources", "--token-file", token_arg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("synced"), "{out}");
    let wrong = tokens.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let (code, _, _) = ctl(
        remote,
        &["sources", "--token-file", wrong.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 77);
}
