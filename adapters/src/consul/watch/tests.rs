//! The adapter's loop without I/O: events in, updates and task changes out.

use super::*;
use meshreg_registry::SourceKind;

const HEALTH_SAMPLE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/hashicorp-consul/api-docs/GET_v1_health_service_my-service.json"
));

fn state() -> State {
    let source = SourceId::new(SourceKind::Consul, "dc1");
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let cx = Context {
        hostname: "{service}.service.consul".into(),
        datacenter: "dc1".into(),
        namespace: "default".into(),
        network: String::new(),
        warning_is_healthy: true,
        zone_node_meta: "zone".into(),
        source: source.clone(),
    };
    State::new(source, metrics, cx)
}

/// `n` instances (`i-0` … on nodes `n-0` …) of the documented sample.
fn instances(n: usize) -> Vec<HealthEntry> {
    let sample: Vec<HealthEntry> = serde_json::from_str(HEALTH_SAMPLE).unwrap();
    (0..n)
        .map(|i| {
            let mut e = sample[0].clone();
            e.node.node = format!("n-{i}");
            e.service.id = format!("i-{i}");
            e.service.address = format!("10.0.0.{}", i + 1);
            e
        })
        .collect()
}

fn catalog(names: &[&str]) -> Event {
    Event::Catalog(names.iter().map(|n| n.to_string()).collect())
}

fn health(name: &str, generation: u64, entries: Vec<HealthEntry>) -> Event {
    Event::Health {
        name: name.into(),
        generation,
        entries,
    }
}

fn failed(name: Option<(&str, u64)>) -> Event {
    Event::Failed {
        name: name.map(|(n, g)| (n.to_string(), g)),
        error: QueryError::Status {
            url: "http://agent/v1/catalog/services".into(),
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            body: "rpc error".into(),
        },
    }
}

#[test]
fn one_reset_once_the_catalog_and_every_service_answered() {
    let mut s = state();
    let a = s.on(catalog(&["redis", "web"]));
    assert!(a.update.is_none());
    assert_eq!(a.start, [("redis".to_string(), 1), ("web".to_string(), 2)]);
    assert!(s.on(health("redis", 1, instances(2))).update.is_none());
    let Some(Update::Reset { objects, .. }) = s.on(health("web", 2, instances(1))).update else {
        panic!("no reset once every service answered");
    };
    // Two declarations, three instance shards.
    assert_eq!(objects.len(), 5);
}

#[test]
fn a_health_flip_patches_one_instance_shard() {
    let mut s = state();
    s.on(catalog(&["redis"]));
    let mut entries = instances(3);
    s.on(health("redis", 1, entries.clone()));
    entries[1].checks[0].status = "critical".into();
    let Some(Update::Patch { apply, delete, .. }) = s.on(health("redis", 1, entries)).update else {
        panic!("no patch");
    };
    assert!(delete.is_empty());
    assert_eq!(apply.len(), 1);
    let Object::Endpoints(shard) = &apply[0] else {
        panic!("not a shard: {apply:?}")
    };
    assert_eq!(shard.name, "n-1/i-1");
    assert_eq!(
        shard.endpoints[0].health,
        meshreg_registry::Health::Unhealthy
    );
    // The same answer again: nothing to send.
    let mut same = instances(3);
    same[1].checks[0].status = "critical".into();
    assert!(s.on(health("redis", 1, same)).update.is_none());
}

#[test]
fn instances_and_services_that_leave_are_withdrawn() {
    let mut s = state();
    s.on(catalog(&["redis", "web"]));
    s.on(health("redis", 1, instances(2)));
    s.on(health("web", 2, instances(1)));
    let Some(Update::Patch { apply, delete, .. }) = s.on(health("redis", 1, instances(1))).update
    else {
        panic!("no patch");
    };
    assert!(apply.is_empty());
    assert_eq!(delete.len(), 1);
    let a = s.on(catalog(&["redis"]));
    assert_eq!(a.stop, ["web"]);
    let Some(Update::Patch { apply, delete, .. }) = a.update else {
        panic!("no patch");
    };
    assert!(apply.is_empty());
    // web's declaration and its one instance.
    assert_eq!(delete.len(), 2);
    // A late answer of the stopped task is ignored.
    assert!(s.on(health("web", 2, instances(1))).update.is_none());
    // Re-added, it gets a new task generation.
    assert_eq!(
        s.on(catalog(&["redis", "web"])).start,
        [("web".to_string(), 3)]
    );
}

#[test]
fn a_failure_is_reported_once_and_the_next_answer_resends_the_state() {
    let mut s = state();
    s.on(catalog(&["redis"]));
    s.on(health("redis", 1, instances(2)));
    assert!(matches!(
        s.on(failed(None)).update,
        Some(Update::Stale { .. })
    ));
    assert!(s.on(failed(Some(("redis", 1)))).update.is_none());
    // The catalog answers, redis's query still fails: still stale.
    assert!(s.on(catalog(&["redis"])).update.is_none());
    let Some(Update::Reset { objects, .. }) = s.on(health("redis", 1, instances(2))).update else {
        panic!("no reset once every query answers");
    };
    assert_eq!(objects.len(), 3);
}

#[test]
fn a_service_that_fails_before_sync_does_not_hold_the_sync_back() {
    let mut s = state();
    s.on(catalog(&["redis", "web"]));
    s.on(health("redis", 1, instances(1)));
    assert!(matches!(
        s.on(failed(Some(("web", 2)))).update,
        Some(Update::Stale { .. })
    ));
    // web answers later: the state (now complete) is sent.
    let Some(Update::Reset { objects, .. }) = s.on(health("web", 2, instances(1))).update else {
        panic!("no reset");
    };
    assert_eq!(objects.len(), 4);
}

#[test]
fn indexes_follow_consuls_rules() {
    assert_eq!(next_index(0, 7), 7);
    assert_eq!(next_index(7, 7), 7);
    assert_eq!(next_index(7, 9), 9);
    // Backwards: read afresh.
    assert_eq!(next_index(9, 3), 0);
    // Zero is never blocked on.
    assert_eq!(next_index(0, 0), 1);
}

#[tokio::test(start_paused = true)]
async fn the_limiter_allows_a_burst_of_two_then_one_per_interval() {
    let start = Instant::now();
    let mut l = Limiter::new();
    l.take().await;
    l.take().await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    l.take().await;
    assert_eq!(start.elapsed(), LIMIT_INTERVAL);
    l.take().await;
    assert_eq!(start.elapsed(), LIMIT_INTERVAL * 2);
}

#[test]
fn backoff_doubles_with_jitter_up_to_its_cap() {
    let mut b = Backoff::new();
    let first = b.next();
    assert!(
        first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
        "{first:?}"
    );
    for _ in 0..20 {
        assert!(b.next() <= BACKOFF_MAX);
    }
    assert!(b.next() >= BACKOFF_MAX / 2);
    b.reset();
    assert!(b.next() <= BACKOFF_MIN);
}

#[test]
fn configuration_errors_are_refused() {
    let ok = Config::new("http://127.0.0.1:8500");
    assert!(validate(&ok).is_ok());
    for (config, field) in [
        (Config::new("127.0.0.1:8500"), "address"),
        (Config::new("https://127.0.0.1:8501"), "address"),
        (
            Config {
                hostname: "consul.local".into(),
                ..ok.clone()
            },
            "hostname",
        ),
        (
            Config {
                wait: Duration::from_secs(601),
                ..ok.clone()
            },
            "wait",
        ),
        (
            Config {
                max_concurrent_queries: 0,
                ..ok.clone()
            },
            "max_concurrent_queries",
        ),
    ] {
        match validate(&config) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{config:?}: {other:?}"),
        }
    }
}

#[test]
fn the_token_is_read_from_a_file_or_the_environment_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "s3cr3t\n").unwrap();
    assert_eq!(
        read_token(&Token::File(path)).unwrap().as_deref(),
        Some("s3cr3t")
    );
    let missing = read_token(&Token::File(dir.path().join("nope"))).unwrap_err();
    assert!(missing.contains("nope"), "{missing}");
    let unset = read_token(&Token::Env("MESHREG_TEST_UNSET_TOKEN_VAR".into())).unwrap_err();
    assert!(unset.contains("MESHREG_TEST_UNSET_TOKEN_VAR"), "{unset}");
    let client = Client::new("http://127.0.0.1:8500", "", Some("s3cr3t".into()));
    assert!(!format!("{client:?}").contains("s3cr3t"));
}
