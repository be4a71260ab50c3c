//! LDS and RDS for proxyless gRPC clients, as istiod's gRPC generator
//! (`pilot/pkg/networking/grpcgen`, `lds.go` and `rds.go`) builds them.
//!
//! A gRPC client dialling `xds:///<target>:<port>` asks for the Listener
//! named `<target>:<port>`, then the RouteConfiguration that listener
//! names, then the clusters and endpoints the routes lead to. For each port
//! of each service this module makes:
//!
//! - a Listener named `<host>:<port>` holding an API listener: an
//!   `HttpConnectionManager` with the router filter and RDS over ADS for
//!   the route configuration `outbound|<port>||<host>` (istiod names it as
//!   the cluster: `clusterKey(host, port)`), and the service's first
//!   address as its socket address (0.0.0.0 without one);
//! - the same Listener under the short names istiod expands for a client
//!   of the service's namespace, when the host is a Kubernetes name in the
//!   cluster's DNS domain (`<name>.<namespace>.svc.<domain>`, the domain
//!   `cluster.local` unless configured): `<name>:<port>`,
//!   `<name>.<namespace>:<port>` and `<name>.<namespace>.svc:<port>`
//!   (istiod's `tryFindFQDN`, which expands them with the client's DNS
//!   domain `<its namespace>.svc.<domain>` only). When another service's
//!   own host is one of those short names, its listener wins (`cache`
//!   keeps the short form underneath, for when that service goes);
//! - the RouteConfiguration `outbound|<port>||<host>`, with one virtual
//!   host whose domains are every name above (with and without the port)
//!   and the service's addresses, and one route (prefix `/`) to the
//!   cluster `outbound|<port>||<host>`.
//!
//! Nothing here holds a protobuf map field, so encoding (and so the
//! versions) does not depend on hash-map order.
//!
//! This module only builds messages; `cache` decides when.

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address,
    config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType,
};
use envoy_types::pb::google::protobuf::Any;
use meshreg_registry::{MergedService, Port};
use prost::{Message, Name};

use crate::cds::cluster_name;

/// What a gRPC client's names are expanded with: its namespace and the
/// cluster's DNS domain (`cluster.local`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) domain: &'a str,
}

/// The listener names a client may ask for to reach `port` of `host`: the
/// full name first (see the module docs).
pub(crate) fn listener_names(host: &str, port: u16, client: Client<'_>) -> Vec<String> {
    host_forms(host, client)
        .into_iter()
        .map(|h| format!("{h}:{port}"))
        .collect()
}

/// `host`, then, if it is a Kubernetes service name of the client's
/// namespace in the cluster's domain (`<name>.<namespace>.svc.<domain>`),
/// its short forms.
fn host_forms(host: &str, client: Client<'_>) -> Vec<String> {
    let mut forms = vec![host.to_string()];
    let mut labels = host.splitn(4, '.');
    if let (Some(name), Some(ns), Some("svc"), Some(domain)) =
        (labels.next(), labels.next(), labels.next(), labels.next())
        && !name.is_empty()
        && ns == client.namespace
        && domain == client.domain
    {
        forms.push(name.to_string());
        forms.push(format!("{name}.{ns}"));
        forms.push(format!("{name}.{ns}.svc"));
    }
    forms
}

/// The API listener named `name` for `port` of `svc` (see the module docs).
pub(crate) fn listener(name: &str, svc: &MergedService, port: &Port) -> Listener {
    let route_config_name = cluster_name(port.number, "", svc.service.hostname.as_str());
    let hcm = HttpConnectionManager {
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(ConfigType::TypedConfig(any(&Router::default()))),
            ..Default::default()
        }],
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ConfigSource {
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
            route_config_name,
        })),
        ..Default::default()
    };
    let vip = first_address(svc).unwrap_or("0.0.0.0");
    Listener {
        name: name.to_string(),
        address: Some(envoy_types::pb::envoy::config::core::v3::Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: vip.to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(port.number))),
                ..Default::default()
            })),
        }),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&hcm)),
        }),
        ..Default::default()
    }
}

/// The RouteConfiguration named `outbound|<port>||<host>` for a client of
/// namespace `client` (see the module docs).
pub(crate) fn route_configuration(
    svc: &MergedService,
    port: &Port,
    client: Client<'_>,
) -> RouteConfiguration {
    let host = svc.service.hostname.as_str();
    let name = cluster_name(port.number, "", host);
    let mut domains = Vec::new();
    let addresses = svc.service.addresses.values().flatten().map(String::as_str);
    for form in host_forms(host, client)
        .iter()
        .map(String::as_str)
        .chain(addresses.filter(|a| !a.contains('/')))
    {
        let with_port = format!("{form}:{}", port.number);
        for d in [form.to_string(), with_port] {
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
    }
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: format!("{host}:{}", port.number),
            domains,
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The service's first address that is an IP (not a CIDR range), the
/// cluster-independent ones first.
fn first_address(svc: &MergedService) -> Option<&str> {
    svc.service
        .addresses
        .values()
        .flatten()
        .map(String::as_str)
        .find(|a| !a.contains('/'))
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_get_istios_short_forms() {
        assert_eq!(
            listener_names("reviews.default.svc.cluster.local", 9080, client("default")),
            [
                "reviews.default.svc.cluster.local:9080",
                "reviews:9080",
                "reviews.default:9080",
                "reviews.default.svc:9080"
            ]
        );
        // Another namespace's client: the full name only (istiod expands
        // short names with the client's namespace).
        assert_eq!(
            listener_names("reviews.default.svc.cluster.local", 9080, client("other")),
            ["reviews.default.svc.cluster.local:9080"]
        );
        assert_eq!(
            listener_names("api.example.com", 443, client("default")),
            ["api.example.com:443"]
        );
        assert_eq!(listener_names("a.b.svc", 80, client("b")), ["a.b.svc:80"]);
        // Another domain than the cluster's: istiod never expands to it.
        assert_eq!(
            listener_names("echo.grpc.svc.zz", 50051, client("grpc")),
            ["echo.grpc.svc.zz:50051"]
        );
    }

    fn client(namespace: &str) -> Client<'_> {
        Client {
            namespace,
            domain: "cluster.local",
        }
    }
}
