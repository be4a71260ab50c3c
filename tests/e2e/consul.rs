//! The Consul source, against the fake agent (`fake_consul`, faults on
//! demand) and against a real Consul agent in `-dev` mode (built from its
//! Go module): instances reach a real Envoy and carry real traffic, a
//! critical check takes one out of the healthy set within one blocking
//! round, tags become labels, an agent outage keeps the last state and
//! marks the source stale, and a host declared by a ServiceEntry too is
//! one service.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::fake_consul::{FakeConsul, Instance};
use crate::support::{Ads, Daemon, Envoy, eventually, http_get};

/// A daemon reading the agent at `url`, with `extra` YAML lines added to
/// the consul source and `more` sources after it.
/// [`daemon`] with a ServiceEntry source reading `dir` too.
async fn daemon_with_files(url: &str, dir: &std::path::Path) -> Daemon {
    daemon(
        url,
        "",
        &format!(
            "- kind: serviceentry\n  dir: {}\n  rescan_interval: 1s\n",
            dir.display()
        ),
    )
    .await
}

async fn daemon(url: &str, extra: &str, more: &str) -> Daemon {
    Daemon::start_config(&format!(
        "xds: {{listen: 127.0.0.1:0}}\nhttp: {{listen: 127.0.0.1:0}}\n\
         debounce: {{after: 10ms, max: 50ms}}\nsources:\n\
         - kind: consul\n  address: {url}\n  wait: 30s\n{extra}{more}"
    ))
    .await
}

/// Envoy's hosts of `cluster` with their health flags, e.g.
/// `127.0.0.31:8080 healthy` or `… /failed_eds_health`.
async fn hosts(envoy: &Envoy, cluster: &str) -> BTreeSet<String> {
    envoy
        .admin("/clusters")
        .await
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{cluster}::")))
        .filter_map(|l| {
            let (host, flags) = l.split_once("::health_flags::")?;
            Some(format!("{host} {flags}"))
        })
        .collect()
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// `/ready`'s line for the source named `name`.
async fn ready_line(daemon: &Daemon, name: &str) -> String {
    http_get(daemon.http, "/ready", "meshreg")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("consul/{name}:")))
        .unwrap_or_default()
        .to_string()
}

async fn wait_state(daemon: &Daemon, name: &str, state: &str) {
    eventually(
        &format!("the source {state}"),
        Duration::from_secs(30),
        || async {
            ready_line(daemon, name)
                .await
                .contains(&format!(": {state}"))
                .then_some(())
        },
    )
    .await;
}

/// meshreg's `/debug/registry`.
async fn registry(daemon: &Daemon) -> String {
    http_get(daemon.http, "/debug/registry", "meshreg")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Waits until `cluster` holds the two instances at `ips` on `port`,
/// healthy, and traffic for `host` reaches both (`bodies`).
async fn both_serve(
    envoy: &Envoy,
    cluster: &str,
    ips: [&str; 2],
    port: u16,
    host: &str,
    bodies: [&str; 2],
) {
    let want = set(&ips.map(|ip| format!("{ip}:{port} healthy")));
    eventually(
        "both instances healthy in Envoy",
        Duration::from_secs(30),
        || async { (hosts(envoy, cluster).await == want).then_some(()) },
    )
    .await;
    traffic_reaches(envoy, host, &bodies).await;
}

/// Sends requests through Envoy until every body in `want` was seen.
async fn traffic_reaches(envoy: &Envoy, host: &str, want: &[&str]) {
    let listener = envoy.listener().await;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    eventually(
        &format!("traffic reaching {want:?}"),
        Duration::from_secs(20),
        || async {
            if let Ok((200, body)) = http_get(listener, "/", host).await {
                seen.lock().unwrap().insert(body);
            }
            let seen = seen.lock().unwrap();
            want.iter().all(|w| seen.contains(*w)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_instances_reach_envoy_and_follow_their_checks() {
    let port = crate::support::backend("127.0.0.31", "one").await;
    crate::support::backend_at("127.0.0.32", port, "two").await;
    let consul = FakeConsul::start().await;
    for (id, node, address, tag) in [
        ("web-1", "node-1", "127.0.0.31", "version|v1"),
        ("web-2", "node-2", "127.0.0.32", "version=v2"),
    ] {
        consul.register(&Instance {
            service: "web",
            id,
            node,
            address,
            port,
            tags: vec![tag, "primary"],
        });
    }
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cr3t-token\n").unwrap();
    let daemon = daemon(
        &consul.url(),
        &format!("  token_file: {}\n", token.path().display()),
        "",
    )
    .await;
    let cluster = format!("outbound|{port}||web.service.consul");
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "consul-e2e", &[("web", &cluster)]).await;
    let two = format!("127.0.0.32:{port}");
    both_serve(
        &envoy,
        &cluster,
        ["127.0.0.31", "127.0.0.32"],
        port,
        "web",
        ["one", "two"],
    )
    .await;

    // Tags and the node's zone are on the endpoints.
    let registry = registry(&daemon).await;
    for line in [
        format!(
            "127.0.0.31 {{\"http\": {port}}} Healthy cluster=dc1 locality=dc1/zone-a workload=web-1 weight=1 labels=version=v1"
        ),
        format!(
            "127.0.0.32 {{\"http\": {port}}} Healthy cluster=dc1 locality=dc1/zone-a workload=web-2 weight=1 labels=version=v2"
        ),
    ] {
        assert!(registry.contains(&line), "{line}\n{registry}");
    }

    // A critical check takes the instance out of the healthy set within
    // one blocking round; traffic goes to the other one only.
    consul.set_check("web", "web-2", "critical");
    eventually(
        "web-2 unhealthy in Envoy",
        Duration::from_secs(10),
        || async {
            hosts(&envoy, &cluster)
                .await
                .contains(&format!("{two} /failed_eds_health"))
                .then_some(())
        },
    )
    .await;
    let listener = envoy.listener().await;
    for _ in 0..10 {
        let (status, body) = http_get(listener, "/", "web").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "one"));
    }
    consul.set_check("web", "web-2", "passing");
    consul.deregister("web", "web-1");
    eventually(
        "web-1 gone, web-2 healthy",
        Duration::from_secs(10),
        || async {
            (hosts(&envoy, &cluster).await == set(&[format!("{two} healthy")])).then_some(())
        },
    )
    .await;

    // The token went as a header on every request, never in a URL.
    let requests = consul.requests();
    assert!(requests.len() >= 4, "{requests:?}");
    for (url, token) in &requests {
        assert_eq!(token.as_deref(), Some("s3cr3t-token"), "{url}");
        assert!(!url.contains("s3cr3t"), "{url}");
    }
    assert!(!daemon.log().contains("s3cr3t"), "{}", daemon.log());
    // Blocking queries: after the first reads, each asks with an index.
    assert!(
        requests
            .iter()
            .filter(|(u, _)| u.starts_with("/v1/health/service/web"))
            .skip(1)
            .all(|(u, _)| u.contains("index=") && u.contains("wait=30000ms")),
        "{requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outage_keeps_the_last_state_and_faults_lose_nothing() {
    let mut consul = FakeConsul::start().await;
    let instance = |id: &'static str, address: &'static str| Instance {
        service: "db",
        id,
        node: id,
        address,
        port: 5432,
        tags: vec![],
    };
    consul.register(&instance("db-1", "10.9.0.1"));
    let daemon = daemon(&consul.url(), "  datacenter: dc1\n", "").await;
    let name = format!("dc1@{}", consul.url());
    let cluster = "outbound|5432||db.service.consul";
    let envoy = Envoy::start(daemon.xds, Ads::Sotw, "consul-faults", &[]).await;
    let expect = |ips: &[&str]| -> BTreeSet<String> {
        ips.iter().map(|ip| format!("{ip}:5432 healthy")).collect()
    };
    let wait_hosts = |ips: &'static [&'static str]| {
        let envoy = &envoy;
        let want = expect(ips);
        async move {
            eventually(
                &format!("hosts {ips:?}"),
                Duration::from_secs(30),
                || async { (hosts(envoy, cluster).await == want).then_some(()) },
            )
            .await
        }
    };
    wait_hosts(&["10.9.0.1"]).await;
    wait_state(&daemon, &name, "synced").await;

    // Errors answered by the agent: retried with backoff, nothing lost.
    consul.fail(3);
    consul.register(&instance("db-2", "10.9.0.2"));
    wait_hosts(&["10.9.0.1", "10.9.0.2"]).await;
    // Every 500 was answered, and the source recovered from them.
    eventually(
        "the source recovered from the 500s",
        Duration::from_secs(30),
        || async {
            (consul.failing() == 0 && daemon.log().contains("Consul agent answers again"))
                .then_some(())
        },
    )
    .await;
    wait_state(&daemon, &name, "synced").await;

    // The agent stops: the source is stale, Envoy keeps what it had.
    consul.stop();
    wait_state(&daemon, &name, "stale").await;
    assert_eq!(
        hosts(&envoy, cluster).await,
        expect(&["10.9.0.1", "10.9.0.2"])
    );
    // It comes back with a change made meanwhile.
    consul.deregister("db", "db-1");
    consul.register(&instance("db-3", "10.9.0.3"));
    consul.restart();
    wait_hosts(&["10.9.0.2", "10.9.0.3"]).await;
    wait_state(&daemon, &name, "synced").await;
    let log = daemon.log();
    assert_eq!(
        log.matches("Consul agent query failed").count(),
        2,
        "one warning per outage (the 500s, the stop):\n{log}"
    );
    let errors = daemon.metrics().await;
    for reason in ["status", "unreachable"] {
        assert!(
            crate::support::metric_value(
                &errors,
                "meshreg_source_errors_total",
                &[&format!("reason=\"{reason}\"")]
            ) >= 1.0,
            "{reason}:\n{errors}"
        );
    }

    // Indexes going backwards (a snapshot restore): read afresh.
    consul.rewind_indexes();
    consul.register(&instance("db-4", "10.9.0.4"));
    wait_hosts(&["10.9.0.2", "10.9.0.3", "10.9.0.4"]).await;
}

/// A DestinationRule (from a file source) splits a Consul service by the
/// labels its tags give: `version|v1` and `version=v2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_selects_consul_instances_by_tag() {
    let consul = FakeConsul::start().await;
    for (id, address, tag) in [
        ("cart-1", "10.7.0.1", "version|v1"),
        ("cart-2", "10.7.0.2", "version=v2"),
    ] {
        consul.register(&Instance {
            service: "cart",
            id,
            node: id,
            address,
            port: 8080,
            tags: vec![tag],
        });
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cart.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: cart, namespace: default}\n\
         spec:\n  host: cart.service.consul\n  subsets:\n\
         \x20 - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n",
    )
    .unwrap();
    let daemon = daemon_with_files(&consul.url(), dir.path()).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "consul-subsets", &[]).await;
    let want = [
        (
            "outbound|8080|v1|cart.service.consul",
            "10.7.0.1:8080 healthy",
        ),
        (
            "outbound|8080|v2|cart.service.consul",
            "10.7.0.2:8080 healthy",
        ),
    ];
    eventually(
        "one instance per subset",
        Duration::from_secs(20),
        || async {
            let mut ok = true;
            for (cluster, host) in want {
                ok &= hosts(&envoy, cluster).await == set(&[host.to_string()]);
            }
            ok.then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_from_consul_and_a_service_entry_is_one_service() {
    let consul = FakeConsul::start().await;
    consul.register(&Instance {
        service: "payments",
        id: "payments-1",
        node: "node-1",
        address: "10.8.0.1",
        port: 8080,
        tags: vec![],
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("payments.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {name: payments, namespace: default}\n\
         spec:\n  hosts: [payments.service.consul]\n  location: MESH_INTERNAL\n\
         \x20 resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n\
         \x20 endpoints: [{address: 10.8.0.9}]\n",
    )
    .unwrap();
    let daemon = daemon_with_files(&consul.url(), dir.path()).await;
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "consul-merge", &[]).await;
    let cluster = "outbound|8080||payments.service.consul";
    eventually(
        "endpoints of both sources",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, cluster).await
                == set(&[
                    "10.8.0.1:8080 healthy".into(),
                    "10.8.0.9:8080 healthy".into(),
                ]))
            .then_some(())
        },
    )
    .await;
    // The ServiceEntry declares the shape (ServiceEntry before Consul).
    let registry = registry(&daemon).await;
    let declared: Vec<&str> = registry
        .lines()
        .filter(|l| l.trim_start().starts_with("declared by"))
        .collect();
    assert!(declared[0].contains("serviceentry/"), "{registry}");
    assert!(declared[1].contains("consul/"), "{registry}");
}

/// The same source against a real Consul agent (`consul agent -dev`,
/// built from its Go module): services registered through the agent's API
/// with TTL checks reach Envoy, a failed check takes an instance out, a
/// deregistered one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_consul_agent_feeds_envoy() {
    let consul = crate::peers::Consul::start().await;
    eprintln!("consul {}", consul.version);
    let port = crate::support::backend("127.0.0.41", "real-one").await;
    crate::support::backend_at("127.0.0.42", port, "real-two").await;
    for (id, address, tag) in [
        ("api-1", "127.0.0.41", "version|v1"),
        ("api-2", "127.0.0.42", "version|v2"),
    ] {
        consul
            .put(
                "/v1/agent/service/register",
                &serde_json::json!({
                    "ID": id, "Name": "api", "Tags": [tag], "Address": address, "Port": port,
                    "Meta": {"protocol": "http"},
                    "Check": {"CheckID": format!("{id}-ttl"), "TTL": "10m", "Status": "passing"},
                })
                .to_string(),
            )
            .await;
    }
    let daemon = daemon(&consul.url(), "", "").await;
    let cluster = format!("outbound|{port}||api.service.consul");
    let envoy = Envoy::start(daemon.xds, Ads::Delta, "real-consul", &[("api", &cluster)]).await;
    let two = format!("127.0.0.42:{port}");
    both_serve(
        &envoy,
        &cluster,
        ["127.0.0.41", "127.0.0.42"],
        port,
        "api",
        ["real-one", "real-two"],
    )
    .await;
    let registry = registry(&daemon).await;
    assert!(
        registry.contains(&format!(
            "127.0.0.42 {{\"http\": {port}}} Healthy cluster=dc1 locality=dc1 workload=api-2 weight=1 labels=protocol=http,version=v2"
        )),
        "{registry}"
    );

    consul.put("/v1/agent/check/fail/api-2-ttl", "").await;
    eventually(
        "api-2 unhealthy in Envoy",
        Duration::from_secs(20),
        || async {
            hosts(&envoy, &cluster)
                .await
                .contains(&format!("{two} /failed_eds_health"))
                .then_some(())
        },
    )
    .await;
    consul.put("/v1/agent/check/pass/api-2-ttl", "").await;
    consul.put("/v1/agent/service/deregister/api-1", "").await;
    eventually(
        "api-1 gone, api-2 healthy",
        Duration::from_secs(20),
        || async {
            (hosts(&envoy, &cluster).await == set(&[format!("{two} healthy")])).then_some(())
        },
    )
    .await;
    // Consul's own `consul` service is there too, on its server port.
    let clusters = envoy.clusters().await;
    assert!(
        clusters
            .iter()
            .any(|c| c.ends_with("||consul.service.consul")),
        "{clusters:?}"
    );
}
