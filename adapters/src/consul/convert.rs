//! Pure conversion of Consul's health API answers into registry objects.
//!
//! The input is one answer of `GET /v1/health/service/<name>`: every
//! instance of one service with its node and its checks
//! ([`HealthEntry`]). The output is one service declaration and one
//! endpoint shard per instance (named `<node>/<service id>`, so one
//! instance's change replaces one shard). The rules:
//!
//! - **Hostname:** the configured template with `{service}` and
//!   `{datacenter}` replaced (default `{service}.service.consul`, the name
//!   Consul's DNS and Istio's former Consul adapter give it).
//! - **Ports** (Istio's former adapter, `convertPort`): each distinct
//!   instance port is a service port whose protocol is the instance's
//!   `protocol` service meta (Istio's protocol names), `http` when absent.
//!   The lowest port of a protocol is named after the protocol (`http`, as
//!   Istio's former adapter names ports, so a ServiceEntry declaring the
//!   same host with a port `http` of that number merges with it), others
//!   `<protocol>-<number>`. An instance serves only its own port. Two
//!   instances giving one port two protocols: the first (by node, then id)
//!   wins.
//! - **Address:** the service address, else the node address; an
//!   instance whose address is not an IP, or whose port is 0, is left out
//!   ([`ConvertError`]).
//! - **Labels:** the service meta, then the tags: a `key|value` tag is the
//!   label `key: value` (Istio's former adapter; tags of another form are
//!   ignored there), and, as meshreg's extension, so is `key=value`. Other
//!   tags give no label. A DestinationRule subset selects instances by
//!   them.
//! - **Health and weight** (Consul's own xDS server,
//!   `calculateEndpointHealthAndWeight`): the weight is `Weights.Passing`
//!   (1 without weights); a critical check makes the instance unhealthy; a
//!   warning check sets the weight to `Weights.Warning` and keeps the
//!   instance healthy unless `warning_is_healthy` is off; a weight below 1
//!   makes it unhealthy (weight 1), and weights are capped at 128.
//! - **Where:** the datacenter is the cluster id and the locality region;
//!   the node meta key `zone_node_meta` (default `zone`) is the zone; the
//!   configured network is the network.
//! - **External:** a non-empty `external` service meta makes the service
//!   `MESH_EXTERNAL` (Istio's former adapter); it stays EDS-resolved.
//! - Instances of Consul's own proxies and gateways (a non-empty `Kind`,
//!   e.g. `connect-proxy`) are not services of the mesh and are skipped.
//!
//! This module does no I/O and logs nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use meshreg_registry::{
    Address, Endpoint, EndpointShard, Health, Hostname, Locality, Location, Object, Port,
    Resolution, Service, SourceId, TlsMode, shared_locality, shared_str,
};
use serde::Deserialize;

/// The service meta key naming a port's protocol (Istio's former adapter).
const PROTOCOL_META: &str = "protocol";
/// The service meta key marking a service outside the mesh.
const EXTERNAL_META: &str = "external";
/// Consul's xDS server caps endpoint weights here.
const MAX_WEIGHT: u32 = 128;

/// One element of `GET /v1/health/service/<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntry {
    pub(crate) node: NodeInfo,
    pub(crate) service: Instance,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) checks: Vec<Check>,
}

/// The node part of a [`HealthEntry`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NodeInfo {
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) datacenter: String,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) meta: BTreeMap<String, String>,
}

/// The service instance part of a [`HealthEntry`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Instance {
    #[serde(rename = "ID")]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) kind: String,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) tags: Vec<String>,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default, deserialize_with = "null_default")]
    pub(crate) meta: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) port: i64,
    #[serde(default)]
    pub(crate) weights: Option<Weights>,
}

/// An instance's load-balancing weights.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Weights {
    pub(crate) passing: i64,
    pub(crate) warning: i64,
}

/// One health check of an instance or of its node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Check {
    pub(crate) status: String,
}

/// Consul writes `null` for empty lists and maps.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// What the conversion needs besides the answer.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// The hostname template (`{service}`, `{datacenter}`).
    pub(crate) hostname: String,
    /// The configured datacenter; empty: each node's own.
    pub(crate) datacenter: String,
    /// The registry namespace of the declarations.
    pub(crate) namespace: String,
    /// The endpoints' network.
    pub(crate) network: String,
    /// Whether a warning check keeps an instance healthy.
    pub(crate) warning_is_healthy: bool,
    /// The node meta key holding the zone.
    pub(crate) zone_node_meta: String,
    /// The source (endpoints are stamped with it).
    pub(crate) source: SourceId,
}

/// Why one instance gave no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConvertError {
    /// Neither the service nor the node address is an IP address.
    #[error("instance {instance} of {service}: address {address:?} is not an IP address")]
    Address {
        service: String,
        instance: String,
        address: String,
    },
    /// The service name cannot be part of a host name.
    #[error(
        "service {service:?}: the name is not a DNS label (letters, digits, - and _, at most 63); it is not served"
    )]
    Name { service: String },
    /// The port is 0 or out of range.
    #[error("instance {instance} of {service}: port {port} is out of range 1-65535")]
    Port {
        service: String,
        instance: String,
        port: i64,
    },
}

impl ConvertError {
    /// The `reason` label of `meshreg_source_errors_total`.
    pub(crate) fn reason(&self) -> &'static str {
        "invalid"
    }
}

/// Whether `name` can be a DNS label (Consul's DNS interface needs it).
fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The hostname of service `name` in `datacenter`, lowercased (DNS names
/// are case-insensitive; `Web` and `web` are one host).
pub(crate) fn hostname(template: &str, name: &str, datacenter: &str) -> Hostname {
    Hostname::from(
        template
            .replace("{service}", name)
            .replace("{datacenter}", datacenter)
            .to_ascii_lowercase(),
    )
}

/// The registry objects of service `name`: its declaration (origin
/// `name`) and one shard per instance, or nothing when no instance is
/// usable. Instances that cannot be converted are returned as errors.
pub(crate) fn service(
    name: &str,
    entries: &[HealthEntry],
    cx: &Context,
) -> (Vec<Object>, Vec<ConvertError>) {
    let mut errors = Vec::new();
    if !is_label(name) {
        return (
            Vec::new(),
            vec![ConvertError::Name {
                service: name.to_string(),
            }],
        );
    }
    let mut sorted: Vec<&HealthEntry> = entries
        .iter()
        .filter(|e| e.service.kind.is_empty())
        .collect();
    sorted.sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
    let mut ports: Vec<Port> = Vec::new();
    let mut shards = Vec::new();
    let mut datacenter = cx.datacenter.clone();
    for entry in sorted {
        let e = match endpoint(name, entry, cx) {
            Ok(e) => e,
            Err(err) => {
                errors.push(err);
                continue;
            }
        };
        if datacenter.is_empty() {
            datacenter.clone_from(&entry.node.datacenter);
        }
        let (number, protocol) = e.1;
        crate::ports::add(&mut ports, number, protocol);
        shards.push((
            format!("{}/{}", entry.node.node, entry.service.id),
            (e.0, number),
        ));
    }
    if shards.is_empty() {
        return (Vec::new(), errors);
    }
    crate::ports::finish(&mut ports);
    let host = hostname(&cx.hostname, name, &datacenter);
    let external = entries.iter().any(|e| {
        e.service
            .meta
            .get(EXTERNAL_META)
            .is_some_and(|v| !v.is_empty())
    });
    let mut objects = Vec::with_capacity(shards.len() + 1);
    for (shard, (mut endpoint, number)) in shards {
        // An instance serves only its own port: the service port with its
        // number (whose protocol the first instance gave).
        if let Some(name) = crate::ports::name_of(&ports, number) {
            endpoint.ports.insert(name, number);
        }
        objects.push(Object::Endpoints(EndpointShard {
            hostname: host.clone(),
            name: shard,
            endpoints: vec![endpoint],
        }));
    }
    objects.insert(
        0,
        Object::Service {
            origin: name.to_string(),
            service: Service {
                hostname: host,
                namespace: cx.namespace.clone(),
                ports,
                resolution: Resolution::Static,
                location: if external {
                    Location::MeshExternal
                } else {
                    Location::MeshInternal
                },
                labels: BTreeMap::new(),
                export_to: Vec::new(),
                addresses: BTreeMap::new(),
                workload_selector: None,
                source: cx.source.clone(),
            },
        },
    );
    (objects, errors)
}

/// One instance's endpoint, and its port number and protocol name.
fn endpoint<'e>(
    service: &str,
    entry: &'e HealthEntry,
    cx: &Context,
) -> Result<(Endpoint, (u16, &'e str)), ConvertError> {
    let instance = &entry.service;
    let raw = if instance.address.is_empty() {
        &entry.node.address
    } else {
        &instance.address
    };
    let ip: IpAddr = raw.parse().map_err(|_| ConvertError::Address {
        service: service.to_string(),
        instance: instance.id.clone(),
        address: raw.clone(),
    })?;
    let port = u16::try_from(instance.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConvertError::Port {
            service: service.to_string(),
            instance: instance.id.clone(),
            port: instance.port,
        })?;
    let protocol = instance
        .meta
        .get(PROTOCOL_META)
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .unwrap_or("http");
    let (health, weight) = health_and_weight(entry, cx.warning_is_healthy);
    let datacenter = if cx.datacenter.is_empty() {
        entry.node.datacenter.clone()
    } else {
        cx.datacenter.clone()
    };
    // Its port is named once the service's ports are known.
    let mut e = Endpoint::new(Address::Ip(ip), cx.source.clone());
    e.listed_ports_only = true;
    e.labels = labels(instance);
    e.locality = shared_locality(Locality {
        region: datacenter.clone(),
        zone: entry
            .node
            .meta
            .get(&cx.zone_node_meta)
            .cloned()
            .unwrap_or_default(),
        subzone: String::new(),
    });
    e.cluster_id = shared_str(&datacenter);
    e.network = shared_str(&cx.network);
    e.health = health;
    e.weight = weight;
    e.tls_mode = TlsMode::Disabled;
    e.workload_name.clone_from(&instance.id);
    Ok((e, (port, protocol)))
}

/// Service meta, then `key|value` and `key=value` tags.
pub(crate) fn labels(instance: &Instance) -> BTreeMap<String, String> {
    let mut labels = instance.meta.clone();
    for tag in &instance.tags {
        if let Some((k, v)) = tag.split_once('|').or_else(|| tag.split_once('='))
            && !k.is_empty()
        {
            labels.insert(k.to_string(), v.to_string());
        }
    }
    labels
}

/// Consul's xDS rule (`calculateEndpointHealthAndWeight`), with warning
/// kept healthy unless `warning_is_healthy` is off.
pub(crate) fn health_and_weight(entry: &HealthEntry, warning_is_healthy: bool) -> (Health, u32) {
    let weights = entry.service.weights;
    let mut weight = weights.map_or(1, |w| w.passing);
    let mut health = Health::Healthy;
    for check in &entry.checks {
        match check.status.as_str() {
            "critical" => health = Health::Unhealthy,
            "warning" => {
                if !warning_is_healthy {
                    health = Health::Unhealthy;
                }
                if let Some(w) = weights {
                    weight = w.warning;
                }
            }
            "passing" => {}
            // `maintenance` and anything unknown: not passing.
            _ => health = Health::Unhealthy,
        }
    }
    if weight < 1 {
        return (Health::Unhealthy, 1);
    }
    let weight = u32::try_from(weight).unwrap_or(MAX_WEIGHT).min(MAX_WEIGHT);
    (health, weight)
}

#[cfg(test)]
mod tests;
