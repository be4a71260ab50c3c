//! Issue 14, item 5: a proxy that asks over ADS for a type meshreg does not
//! serve it gets an empty response at once, so it does not wait for its
//! init-fetch timeout, and meshreg says so once per stream at info. An
//! Envoy sidecar's wildcard LDS (meshreg serves listeners to gRPC clients
//! by name only) gets the empty set the same way.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::StreamExt;

use crate::support::{Ads, Daemon, Envoy, copy_dir, eventually, repo};

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[tokio::test]
async fn types_not_served_are_answered_empty_at_once() {
    let dir = copy_dir(&repo().join("examples/bookinfo/config"));
    let daemon = Daemon::start(dir.path()).await;
    for ads in [Ads::Delta, Ads::Sotw] {
        // With a 60 s init-fetch timeout, Envoy stays INITIALIZING for a
        // minute unless its LDS request is answered.
        let envoy = Envoy::start_dynamic(
            daemon.xds,
            ads,
            &format!("{{id: \"lds-{ads:?}\", cluster: e2e}}"),
            &[],
            "  lds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 60s}",
        )
        .await;
        eventually("Envoy LIVE", Duration::from_secs(20), || async {
            envoy
                .admin("/server_info")
                .await
                .contains("\"state\": \"LIVE\"")
                .then_some(())
        })
        .await;
        // It got its clusters too.
        eventually("bookinfo in Envoy", Duration::from_secs(20), || async {
            (envoy.endpoints().await.len() == 6).then_some(())
        })
        .await;
    }

    // A type meshreg does not generate at all (SDS), over both protocols:
    // an empty response of that type, logged once per stream.
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", daemon.xds))
        .await
        .unwrap();
    let node = Some(Node {
        id: "sds-asker".into(),
        ..Default::default()
    });
    let ask = DiscoveryRequest {
        node: node.clone(),
        type_url: SECRET.into(),
        resource_names: vec!["default".into()],
        ..Default::default()
    };
    let sotw = client
        .stream_aggregated_resources(
            futures::stream::iter(vec![ask]).chain(futures::stream::pending()),
        )
        .await
        .unwrap();
    let answer = first(sotw.into_inner()).await;
    assert_eq!(
        (answer.type_url.as_str(), answer.resources.len()),
        (SECRET, 0)
    );
    let ask = DeltaDiscoveryRequest {
        node,
        type_url: SECRET.into(),
        resource_names_subscribe: vec!["default".into()],
        ..Default::default()
    };
    let delta = client
        .delta_aggregated_resources(
            futures::stream::iter(vec![ask]).chain(futures::stream::pending()),
        )
        .await
        .unwrap();
    let answer = first(delta.into_inner()).await;
    assert_eq!(
        (answer.type_url.as_str(), answer.resources.len()),
        (SECRET, 0)
    );
    let said = || {
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("does not serve") && l.contains("tls.v3.Secret"))
            .count()
    };
    eventually("the log line", Duration::from_secs(5), || async {
        (said() == 2).then_some(())
    })
    .await;
}

/// The first response of `answers`, within 5 s.
async fn first<T>(mut answers: tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("a response")
}
