use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use meshreg_registry::test_util::{contribution, test_source};
use meshreg_registry::{Update, Writer, new};
use prost::Message;

use super::*;
use crate::cache::Generator;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const A: &str = "outbound|80||a.test";
const B: &str = "outbound|80||b.test";

fn setup(hosts: &[(&str, &[&str])]) -> (Writer, Generator) {
    let (mut w, _r) = new([test_source()]);
    w.apply(meshreg_registry::test_util::reset_of(
        test_source(),
        hosts.iter().map(|(h, ips)| contribution(h, ips)).collect(),
    ));
    let mut g = Generator::new();
    g.apply(w.view());
    (w, g)
}

fn set(w: &mut Writer, g: &mut Generator, host: &str, ips: &[&str]) {
    w.apply(Update::contribution(test_source(), contribution(host, ips)));
    g.apply(w.view());
}

fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn decode(o: Outgoing) -> DiscoveryResponse {
    DiscoveryResponse::decode(o.response.to_bytes()).unwrap()
}

fn synced(g: &Generator) -> SotwConnection {
    let mut c = SotwConnection::default();
    c.handle(req(CDS, &[], "", ""));
    let cds = decode(c.next_response(g.snapshot()).unwrap());
    c.handle(req(CDS, &[], &cds.version_info, &cds.nonce));
    c.handle(req(EDS, &[A, B], "", ""));
    let eds = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(eds.resources.len(), 2);
    c.handle(req(EDS, &[A, B], &eds.version_info, &eds.nonce));
    assert!(c.next_response(g.snapshot()).is_none());
    c
}

#[test]
fn cds_is_full_state_and_eds_only_what_changed() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    set(&mut w, &mut g, "a.test", &["10.0.0.3"]);
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(r.type_url, EDS, "endpoint change sends no CDS");
    assert_eq!(r.resources.len(), 1);
    c.handle(req(EDS, &[A, B], &r.version_info, &r.nonce));
    set(&mut w, &mut g, "c.test", &["10.0.0.4"]);
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(r.type_url, CDS);
    assert_eq!(r.resources.len(), 3, "CDS carries every cluster");
}

#[test]
fn nack_is_counted_even_when_pipelined() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    set(&mut w, &mut g, "a.test", &["10.0.0.3"]);
    let first = decode(c.next_response(g.snapshot()).unwrap());
    set(&mut w, &mut g, "b.test", &["10.0.0.4"]);
    let _second = decode(c.next_response(g.snapshot()).unwrap());
    let mut nack = req(EDS, &[A, B], "", &first.nonce);
    nack.error_detail = Some(Status {
        message: "nope".into(),
        ..Default::default()
    });
    assert!(matches!(c.handle(nack), Received::Nack { .. }));
}

#[test]
fn new_eds_names_are_answered_and_stale_nonces_ignored() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    set(&mut w, &mut g, "c.test", &["10.0.0.4"]);
    let cds = decode(c.next_response(g.snapshot()).unwrap());
    assert!(matches!(
        c.handle(req(EDS, &[A], "", "999")),
        Received::Ignored(_)
    ));
    c.handle(req(CDS, &[], &cds.version_info, &cds.nonce));
    // The new cluster's endpoints follow CDS once Envoy asks for them.
    let last_eds = c.types[1].last_nonce.clone();
    c.handle(req(EDS, &[A, B, "outbound|80||c.test"], "", &last_eds));
    let eds = decode(c.next_response(g.snapshot()).unwrap());
    let names: Vec<_> = eds
        .resources
        .iter()
        .map(|a| {
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                &a.value[..],
            )
            .unwrap()
            .cluster_name
        })
        .collect();
    assert_eq!(names, vec!["outbound|80||c.test".to_string()]);
}

/// Requests without a snapshot at hand (it only shares name allocations).
trait Handle {
    fn handle(&mut self, req: DiscoveryRequest) -> Received;
}

impl Handle for SotwConnection {
    fn handle(&mut self, req: DiscoveryRequest) -> Received {
        // The stream decodes Envoy's message into its own view of it.
        let req = SotwRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        self.handle_request(req, &Arc::new(Snapshot::default()))
    }
}

fn nack(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    let mut r = req(type_url, names, version, nonce);
    r.error_detail = Some(Status {
        code: 3,
        message: "rejected".into(),
        ..Default::default()
    });
    r
}

fn cla_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                &a.value[..],
            )
            .unwrap()
            .cluster_name
        })
        .collect()
}

/// Drains every response the connection has for `snap`, answering none.
fn drain(c: &mut SotwConnection, g: &Generator) -> Vec<DiscoveryResponse> {
    std::iter::from_fn(|| c.next_response(g.snapshot()).map(decode))
        .take(16)
        .collect()
}

#[test]
fn cds_nack_is_not_answered_with_the_same_clusters() {
    // Issue 8: a rejected CDS response was re-sent at once, forever.
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    let accepted = c.types[0].last_nonce.clone();
    set(&mut w, &mut g, "c.test", &["10.0.0.3"]);
    let cds = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(cds.type_url, CDS);
    // The endpoints forced after the (later rejected) CDS response.
    let eds = drain(&mut c, &g);
    assert!(eds.iter().all(|r| r.type_url == EDS), "{eds:?}");
    assert!(matches!(
        c.handle(nack(CDS, &[], &accepted, &cds.nonce)),
        Received::Nack { first: true, .. }
    ));
    assert!(
        drain(&mut c, &g).is_empty(),
        "nothing is re-sent after a NACK without a change"
    );
    // The proxy repeats its NACK: counted, logged once, still nothing sent.
    assert!(matches!(
        c.handle(nack(CDS, &[], &accepted, &cds.nonce)),
        Received::Nack { first: false, .. }
    ));
    assert!(drain(&mut c, &g).is_empty());
    // A change after the NACK is sent once, with every subscribed
    // assignment after it (the proxy kept its old clusters).
    set(&mut w, &mut g, "d.test", &["10.0.0.4"]);
    let out = drain(&mut c, &g);
    assert_eq!(out[0].type_url, CDS);
    assert_eq!(out[0].resources.len(), 4);
    let sent: Vec<String> = out[1..].iter().flat_map(cla_names).collect();
    assert_eq!(sent, vec![A.to_string(), B.to_string()]);
    c.handle(req(CDS, &[], &out[0].version_info, &out[0].nonce));
    assert!(drain(&mut c, &g).is_empty());
}

#[test]
fn eds_nack_is_not_answered_and_a_later_change_is_sent_once() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    set(&mut w, &mut g, "a.test", &["10.0.0.3"]);
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert!(matches!(
        c.handle(nack(EDS, &[A, B], "", &r.nonce)),
        Received::Nack { first: true, .. }
    ));
    assert!(drain(&mut c, &g).is_empty());
    // An unrelated change sends only that assignment.
    set(&mut w, &mut g, "b.test", &["10.0.0.4"]);
    let out = drain(&mut c, &g);
    assert_eq!(out.len(), 1);
    assert_eq!(cla_names(&out[0]), vec![B.to_string()]);
    c.handle(req(EDS, &[A, B], &out[0].version_info, &out[0].nonce));
    // A change of the rejected one is sent once.
    set(&mut w, &mut g, "a.test", &["10.0.0.5"]);
    let out = drain(&mut c, &g);
    assert_eq!(out.len(), 1);
    assert_eq!(cla_names(&out[0]), vec![A.to_string()]);
}

#[test]
fn a_nack_naming_an_unknown_response_is_counted_not_acted_on() {
    let (_w, g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    assert!(matches!(
        c.handle(nack(CDS, &[], "", "12345")),
        Received::Nack { first: false, .. }
    ));
    assert!(drain(&mut c, &g).is_empty());
}

#[test]
fn a_rejected_eds_batch_is_probed_one_assignment_at_a_time_once() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    set(&mut w, &mut g, "a.test", &["10.0.0.3"]);
    set(&mut w, &mut g, "b.test", &["10.0.0.4"]);
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(cla_names(&r), vec![A.to_string(), B.to_string()]);
    c.handle(nack(EDS, &[A, B], "", &r.nonce));
    let a = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(cla_names(&a), vec![A.to_string()]);
    c.handle(req(EDS, &[A, B], &a.version_info, &a.nonce));
    let b = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(cla_names(&b), vec![B.to_string()]);
    c.handle(nack(EDS, &[A, B], &a.version_info, &b.nonce));
    assert!(drain(&mut c, &g).is_empty(), "B is known bad");
    set(&mut w, &mut g, "a.test", &["10.0.0.5"]);
    let out = drain(&mut c, &g);
    assert_eq!(out.len(), 1);
    assert_eq!(cla_names(&out[0]), vec![A.to_string()]);
}

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

#[test]
fn named_cds_is_sent_only_when_a_named_cluster_changes() {
    // Issue 14: a gRPC client subscribes to clusters by name over SotW.
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = SotwConnection::default();
    c.handle(req(CDS, &[A], "", ""));
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!(r.resources.len(), 1);
    c.handle(req(CDS, &[A], &r.version_info, &r.nonce));
    // Another cluster appears: the mesh's cluster set changed, this
    // proxy's did not.
    set(&mut w, &mut g, "c.test", &["10.0.0.3"]);
    assert!(c.next_response(g.snapshot()).is_none());
    // Its own cluster goes: the full (now empty) set is sent.
    w.apply(Update::withdraw(test_source(), "default", "a.test".into()));
    g.apply(w.view());
    let r = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!((r.type_url.as_str(), r.resources.len()), (CDS, 0));
}

#[test]
fn grpc_listeners_and_routes_by_name_and_a_nack_of_one() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    // Listeners and routes are generated in gRPC clients' scopes only.
    let grpc = crate::ScopeRequest {
        proxyless: true,
        ..crate::ScopeRequest::namespace("default")
    };
    let sub = g.scopes().subscribe(&grpc).unwrap().unwrap();
    g.apply(w.view());
    let snap = || sub.snapshots.borrow().clone();
    assert_eq!(g.snapshot().len(TypeUrl::Listener), 0, "not for Envoys");
    let mut c = SotwConnection::default();
    c.handle(req(LDS, &["a.test:80"], "", ""));
    let lds = decode(c.next_response(&snap()).unwrap());
    assert_eq!(lds.type_url, LDS);
    assert_eq!(lds.resources.len(), 1);
    c.handle(req(LDS, &["a.test:80"], &lds.version_info, &lds.nonce));
    c.handle(req(RDS, &[A], "", ""));
    let rds = decode(c.next_response(&snap()).unwrap());
    assert_eq!((rds.type_url.as_str(), rds.resources.len()), (RDS, 1));
    // The client rejects the route configuration: counted, not re-sent.
    let mut nack = req(RDS, &[A], "", &rds.nonce);
    nack.error_detail = Some(Status {
        message: "bad route".into(),
        ..Default::default()
    });
    assert!(matches!(
        c.handle(nack),
        Received::Nack {
            known: true,
            first: true,
            ..
        }
    ));
    assert!(c.next_response(&snap()).is_none());
    // An endpoint change touches neither listeners nor routes.
    set(&mut w, &mut g, "a.test", &["10.0.0.9"]);
    assert!(c.next_response(&snap()).is_none());

    // A wildcard LDS subscription (an Envoy sidecar's) gets the empty set,
    // once.
    let mut envoy = SotwConnection::default();
    envoy.handle(req(LDS, &[], "", ""));
    let r = decode(envoy.next_response(&snap()).unwrap());
    assert_eq!((r.type_url.as_str(), r.resources.len()), (LDS, 0));
    envoy.handle(req(LDS, &[], &r.version_info, &r.nonce));
    assert!(envoy.next_response(&snap()).is_none());
}

#[test]
fn an_eds_name_dropped_from_the_subscription_is_not_sent_again() {
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let mut c = synced(&g);
    let last = c.types[1].last_nonce.clone();
    // SotW unsubscribes by naming the rest.
    assert!(matches!(
        c.handle(req(EDS, &[A], "", &last)),
        Received::Subscription
    ));
    set(&mut w, &mut g, "b.test", &["10.0.0.9"]);
    assert!(
        drain(&mut c, &g).is_empty(),
        "b.test is no longer subscribed"
    );
    set(&mut w, &mut g, "a.test", &["10.0.0.8"]);
    let out = drain(&mut c, &g);
    assert_eq!(out.len(), 1);
    assert_eq!(cla_names(&out[0]), [A]);
    // Subscribed again: sent at once, whatever the proxy held before.
    c.handle(req(EDS, &[A, B], "", &out[0].nonce));
    let out = drain(&mut c, &g);
    assert_eq!(out.iter().flat_map(cla_names).collect::<Vec<_>>(), [B]);
}

#[test]
fn a_large_eds_response_goes_in_chunks_each_resource_once() {
    // 60 services of 40 endpoints: far more than one chunk's bytes.
    let ips: Vec<String> = (0..40).map(|i| format!("10.1.0.{i}")).collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let hosts: Vec<String> = (0..60).map(|i| format!("h{i}.test")).collect();
    let spec: Vec<(&str, &[&str])> = hosts.iter().map(|h| (h.as_str(), &ips[..])).collect();
    let (_w, g) = setup(&spec);
    let mut c = SotwConnection::default();
    c.handle(req(CDS, &[], "", ""));
    let cds = decode(c.next_response(g.snapshot()).unwrap());
    c.handle(req(CDS, &[], &cds.version_info, &cds.nonce));
    let names: Vec<String> = hosts.iter().map(|h| format!("outbound|80||{h}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    c.handle(req(EDS, &names, "", ""));
    let out = drain(&mut c, &g);
    assert!(
        out.len() > 1,
        "one response of {} bytes",
        out[0].encoded_len()
    );
    let mut sent: Vec<String> = out.iter().flat_map(cla_names).collect();
    let nonces: std::collections::BTreeSet<&str> = out.iter().map(|r| r.nonce.as_str()).collect();
    assert_eq!(nonces.len(), out.len(), "a nonce per chunk");
    sent.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(sent, want);
}

#[test]
fn a_reconnecting_proxy_gets_the_whole_state_again() {
    // SotW has no initial versions: a new stream starts from nothing, even
    // if the proxy repeats the version it had.
    let (mut w, mut g) = setup(&[("a.test", &["10.0.0.1"]), ("b.test", &["10.0.0.2"])]);
    let c = synced(&g);
    let cds_version = c.types[0].sent_digest.map(|d| format!("{d:016x}")).unwrap();
    drop(c);
    set(&mut w, &mut g, "a.test", &["10.0.0.3"]);
    let mut c = SotwConnection::default();
    c.handle(req(CDS, &[], &cds_version, ""));
    let cds = decode(c.next_response(g.snapshot()).unwrap());
    assert_eq!((cds.type_url.as_str(), cds.resources.len()), (CDS, 2));
    c.handle(req(CDS, &[], &cds.version_info, &cds.nonce));
    c.handle(req(EDS, &[A, B], "", ""));
    let out = drain(&mut c, &g);
    let mut sent: Vec<String> = out.iter().flat_map(cla_names).collect();
    sent.sort();
    assert_eq!(sent, [A, B]);
}
