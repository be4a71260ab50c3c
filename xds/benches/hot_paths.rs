//! Micro-benchmarks of meshreg's hot paths, each at two sizes so the ratio
//! shows how the cost grows:
//!
//! - `registry_apply`: apply one service's update to a registry of 1,000
//!   and of 10,000 services (should not grow with the registry);
//! - `generate`: regenerate and encode the ClusterLoadAssignment of a
//!   changed service of 10 and of 1,000 endpoints;
//! - `generate_in_registry`: the same for a 10-endpoint service in a
//!   registry of 1,000 and of 10,000 services (should not grow);
//! - `delta_after_change`: build one proxy's delta response after one
//!   endpoint change, with 1,000 and 10,000 services.
//!
//! Run: `cargo bench -p meshreg-xds --bench hot_paths`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use meshreg_registry::test_util::{contribution, test_source};
use meshreg_registry::{Contribution, Update, Writer};
use meshreg_xds::{DeltaConnection, Generator, Snapshot};
use prost::Message;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn service(i: usize, endpoints: usize, stamp: u32) -> Contribution {
    let ips: Vec<String> = (0..endpoints)
        .map(|j| {
            let ip = (10u32 << 24) + (i as u32) * 1024 + j as u32 + 1;
            std::net::Ipv4Addr::from(ip).to_string()
        })
        .collect();
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let mut c = contribution(&format!("svc-{i}.bench.svc.cluster.local"), &ips);
    c.endpoints[0].weight = stamp;
    c
}

fn registry(services: usize, endpoints: usize) -> Writer {
    let (mut w, _r) = meshreg_registry::new([test_source()]);
    w.apply(meshreg_registry::test_util::reset(
        (0..services).map(|i| service(i, endpoints, 1)).collect(),
    ));
    w
}

fn upsert(c: Contribution) -> Update {
    Update::contribution(test_source(), c)
}

fn registry_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry_apply");
    for services in [1_000, 10_000] {
        let mut w = registry(services, 10);
        let mut stamp = 1;
        g.bench_function(format!("{services}_services"), |b| {
            b.iter(|| {
                stamp += 1;
                black_box(w.apply(upsert(service(7, 10, stamp))).change);
            })
        });
    }
    g.finish();
}

fn generate(c: &mut Criterion) {
    let mut g = c.benchmark_group("generate");
    for endpoints in [10, 1_000] {
        let mut w = registry(1, endpoints);
        let mut generator = Generator::new();
        generator.apply(w.view());
        let mut stamp = 1;
        g.bench_function(format!("{endpoints}_endpoints"), |b| {
            b.iter_batched(
                || {
                    stamp += 1;
                    w.apply(upsert(service(0, endpoints, stamp)));
                    w.view().clone()
                },
                |view| black_box(generator.apply(&view)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    let mut g = c.benchmark_group("generate_in_registry");
    for services in [1_000, 10_000] {
        let mut w = registry(services, 10);
        let mut generator = Generator::new();
        generator.apply(w.view());
        let mut stamp = 1;
        g.bench_function(format!("{services}_services"), |b| {
            b.iter_batched(
                || {
                    stamp += 1;
                    w.apply(upsert(service(7, 10, stamp)));
                    w.view().clone()
                },
                |view| black_box(generator.apply(&view)),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// A delta connection that has received and ACKed everything.
fn synced(snap: &Arc<Snapshot>) -> DeltaConnection {
    let mut conn = DeltaConnection::default();
    conn.handle_request(
        DeltaDiscoveryRequest {
            type_url: CDS.into(),
            ..Default::default()
        },
        snap,
    );
    let mut eds_names = Vec::new();
    while let Some(out) = conn.next_response(snap) {
        let r = DeltaDiscoveryResponse::decode(out.response.to_bytes()).unwrap();
        if r.type_url == CDS {
            eds_names.extend(r.resources.iter().map(|r| r.name.clone()));
        }
        conn.handle_request(
            DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce,
                ..Default::default()
            },
            snap,
        );
        if r.type_url == CDS && !eds_names.is_empty() {
            conn.handle_request(
                DeltaDiscoveryRequest {
                    type_url: EDS.into(),
                    resource_names_subscribe: std::mem::take(&mut eds_names),
                    ..Default::default()
                },
                snap,
            );
        }
    }
    conn
}

fn delta_after_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("delta_after_change");
    for services in [1_000, 10_000] {
        let mut w = registry(services, 10);
        let mut generator = Generator::new();
        generator.apply(w.view());
        let mut conn = synced(generator.snapshot());
        let mut stamp = 1;
        g.bench_function(format!("{services}_services"), |b| {
            b.iter_batched(
                || {
                    stamp += 1;
                    w.apply(upsert(service(7, 10, stamp)));
                    generator.apply(w.view());
                    generator.snapshot().clone()
                },
                |snap| {
                    let out = conn.next_response(&snap).expect("one change, one response");
                    assert_eq!(out.resources, 1);
                    black_box(out)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, registry_apply, generate, delta_after_change);
criterion_main!(benches);
