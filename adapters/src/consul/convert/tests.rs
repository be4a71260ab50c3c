//! Conversion tests on Consul's documented response samples
//! (`adapters/tests/fixtures/consul`, see `ORIGINS.md`) and on entries
//! built from them.

use super::*;
use meshreg_registry::{Protocol, SourceKind};

const HEALTH_SAMPLE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/consul/hashicorp-consul/api-docs/GET_v1_health_service_my-service.json"
));

fn cx() -> Context {
    Context {
        hostname: "{service}.service.consul".into(),
        datacenter: String::new(),
        namespace: "default".into(),
        network: "net-a".into(),
        warning_is_healthy: true,
        zone_node_meta: "zone".into(),
        source: SourceId::new(SourceKind::Consul, "dc1"),
    }
}

fn sample() -> Vec<HealthEntry> {
    serde_json::from_str(HEALTH_SAMPLE).expect("the documented sample parses")
}

fn split(objects: &[Object]) -> (&Service, Vec<&EndpointShard>) {
    let Object::Service { service, origin } = &objects[0] else {
        panic!("the first object is the declaration: {objects:?}")
    };
    assert_eq!(origin, "redis");
    let shards = objects[1..]
        .iter()
        .map(|o| match o {
            Object::Endpoints(s) => s,
            other => panic!("not a shard: {other:?}"),
        })
        .collect();
    (service, shards)
}

#[test]
fn the_documented_health_answer_becomes_a_service_and_one_shard_per_instance() {
    let (objects, errors) = service("redis", &sample(), &cx());
    assert!(errors.is_empty(), "{errors:?}");
    let (svc, shards) = split(&objects);
    assert_eq!(svc.hostname.as_str(), "redis.service.consul");
    assert_eq!(svc.namespace, "default");
    assert_eq!(svc.resolution, Resolution::Static);
    assert_eq!(svc.location, Location::MeshInternal);
    assert_eq!(
        svc.ports,
        vec![Port {
            name: "http".into(),
            number: 8000,
            protocol: Protocol::Http,
            target_port: None,
        }]
    );
    assert_eq!(shards.len(), 1);
    assert_eq!(shards[0].name, "foobar/redis");
    let e = &shards[0].endpoints[0];
    assert_eq!(e.address, Address::Ip("10.1.10.12".parse().unwrap()));
    assert_eq!(e.ports.get("http"), Some(&8000));
    assert!(e.listed_ports_only);
    // Weights.Passing, both checks passing.
    assert_eq!((e.health, e.weight), (Health::Healthy, 10));
    assert_eq!(&*e.cluster_id, "dc1");
    assert_eq!(e.locality.region, "dc1");
    assert_eq!(&*e.network, "net-a");
    assert_eq!(e.workload_name, "redis");
    // Service meta becomes labels; the plain tag `primary` gives none.
    assert_eq!(
        e.labels,
        BTreeMap::from([("redis_version".to_string(), "4.0".to_string())])
    );
}

#[test]
fn checks_decide_health_and_weight_as_consuls_xds_server_does() {
    let mut entry = sample().remove(0);
    let set = |entry: &mut HealthEntry, status: &str| {
        entry.checks[0].status = status.into();
    };
    set(&mut entry, "warning");
    assert_eq!(health_and_weight(&entry, true), (Health::Healthy, 1));
    assert_eq!(health_and_weight(&entry, false), (Health::Unhealthy, 1));
    set(&mut entry, "critical");
    assert_eq!(health_and_weight(&entry, true).0, Health::Unhealthy);
    // A node-level check counts too.
    set(&mut entry, "passing");
    entry.checks[1].status = "critical".into();
    assert_eq!(health_and_weight(&entry, true).0, Health::Unhealthy);
    entry.checks[1].status = "passing".into();
    // A warning weight of 0 takes the instance out; weights cap at 128.
    entry.service.weights = Some(Weights {
        passing: 1000,
        warning: 0,
    });
    assert_eq!(health_and_weight(&entry, true), (Health::Healthy, 128));
    set(&mut entry, "warning");
    assert_eq!(health_and_weight(&entry, true), (Health::Unhealthy, 1));
    // No weights: 1.
    entry.service.weights = None;
    set(&mut entry, "passing");
    assert_eq!(health_and_weight(&entry, true), (Health::Healthy, 1));
}

#[test]
fn key_value_tags_become_labels_a_subset_can_select() {
    let mut entry = sample().remove(0);
    entry.service.tags = vec![
        "version|v2".into(),
        "track=canary".into(),
        "primary".into(),
        "|novalue".into(),
    ];
    entry.service.meta = BTreeMap::from([("version".to_string(), "meta".to_string())]);
    assert_eq!(
        labels(&entry.service),
        BTreeMap::from([
            ("track".to_string(), "canary".to_string()),
            ("version".to_string(), "v2".to_string()),
        ])
    );
}

#[test]
fn instances_on_several_ports_each_serve_their_own() {
    let mut a = sample().remove(0);
    let mut b = a.clone();
    let mut c = a.clone();
    b.node.node = "n2".into();
    b.service.port = 9000;
    b.service.meta.insert("protocol".into(), "grpc".into());
    // Same port as `a` with another protocol: `a`'s wins.
    c.node.node = "n3".into();
    c.service.meta.insert("protocol".into(), "tcp".into());
    a.service.address = String::new(); // falls back to the node address
    let mut d = b.clone();
    d.node.node = "n4".into();
    d.service.port = 9100;
    let (objects, errors) = service("redis", &[d, c, b, a], &cx());
    assert!(errors.is_empty());
    let (svc, shards) = split(&objects);
    let names: Vec<_> = svc
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.number, p.protocol))
        .collect();
    assert_eq!(
        names,
        [
            ("http", 8000, Protocol::Http),
            ("grpc", 9000, Protocol::Grpc),
            ("grpc-9100", 9100, Protocol::Grpc),
        ]
    );
    let ports: Vec<_> = shards
        .iter()
        .map(|s| (s.name.as_str(), s.endpoints[0].ports.clone()))
        .collect();
    let one = |name: &str, port: u16| BTreeMap::from([(name.to_string(), port)]);
    assert_eq!(
        ports,
        [
            ("foobar/redis", one("http", 8000)),
            ("n2/redis", one("grpc", 9000)),
            ("n3/redis", one("http", 8000)),
            ("n4/redis", one("grpc-9100", 9100)),
        ]
    );
}

#[test]
fn bad_instances_are_errors_and_the_rest_still_serve() {
    let good = sample().remove(0);
    let mut no_ip = good.clone();
    no_ip.service.id = "dns-name".into();
    no_ip.service.address = "redis.internal".into();
    let mut no_port = good.clone();
    no_port.service.id = "no-port".into();
    no_port.service.port = 0;
    let (objects, errors) = service("redis", &[no_ip, good, no_port], &cx());
    assert_eq!(objects.len(), 2);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|e| e.reason() == "invalid"));
    assert!(
        errors[0].to_string().contains("redis.internal"),
        "{}",
        errors[0]
    );
    // Nothing usable: nothing at all (the service is withdrawn).
    let mut only_bad = sample().remove(0);
    only_bad.service.port = 70000;
    assert!(service("redis", &[only_bad], &cx()).0.is_empty());
}

#[test]
fn proxies_are_skipped_and_external_meta_and_templates_apply() {
    let mut proxy = sample().remove(0);
    proxy.service.kind = "connect-proxy".into();
    assert!(service("redis", &[proxy], &cx()).0.is_empty());

    let mut external = sample().remove(0);
    external
        .service
        .meta
        .insert("external".into(), "redis.example.com".into());
    external
        .node
        .meta
        .insert("zone".into(), "us-east-1a".into());
    let mut c = cx();
    c.hostname = "{service}.service.{datacenter}.consul".into();
    c.datacenter = "east".into();
    let (objects, _) = service("redis", &[external], &c);
    let (svc, shards) = split(&objects);
    assert_eq!(svc.hostname.as_str(), "redis.service.east.consul");
    assert_eq!(svc.location, Location::MeshExternal);
    let e = &shards[0].endpoints[0];
    assert_eq!(
        (&*e.cluster_id, e.locality.region.as_str()),
        ("east", "east")
    );
    assert_eq!(e.locality.zone, "us-east-1a");
}

#[test]
fn null_lists_and_maps_parse_as_empty() {
    let text = r#"[{"Node":{"Node":"n","Address":"10.0.0.1","Meta":null},
        "Service":{"ID":"a","Service":"a","Tags":null,"Meta":null,"Port":80,"Weights":null},
        "Checks":null}]"#;
    let entries: Vec<HealthEntry> = serde_json::from_str(text).unwrap();
    let (objects, errors) = service("a", &entries, &cx());
    assert!(errors.is_empty());
    assert_eq!(objects.len(), 2);
}
