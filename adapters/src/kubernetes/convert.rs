//! Pure conversion of Kubernetes objects into registry objects, following
//! istiod's Kubernetes registry (pilot's `serviceregistry/kube`):
//!
//! - a core `Service` becomes a service declaration of
//!   `<name>.<namespace>.svc.<domain>` (`ConvertService`): ClusterIP →
//!   client-side load balancing (EDS), headless (`clusterIP: None`) →
//!   passthrough, `ExternalName` → no declaration (istiod makes it an
//!   alias of the named host with no cluster of its own); the cluster IPs
//!   are the service's addresses in this cluster; labels, and the
//!   `networking.istio.io/exportTo` annotation;
//! - UDP and SCTP ports are left out (istiod builds no cluster for them);
//!   a port's protocol comes from `appProtocol`, else from the port name's
//!   prefix before `-` (`http-web` → HTTP), `grpc-web*` first, UDP from the
//!   port's protocol, and TCP for the well-known ports 25, 53, 3306 and
//!   27017 when nothing else says (`kube.ConvertProtocol`);
//! - a `discovery.k8s.io/v1` `EndpointSlice` becomes one endpoint shard of
//!   the service its `kubernetes.io/service-name` label names, named after
//!   the slice: an edit of one slice replaces that shard only. Each address
//!   of each endpoint is an endpoint, with the slice's ports by name (the
//!   resolved target ports), the labels and service account of the Pod it
//!   points to, a locality (the Pod's `istio-locality` label, else its
//!   Node's `topology.kubernetes.io/region`/`zone` and
//!   `topology.istio.io/subzone` labels, else the slice's zone), a network
//!   (the Pod's `topology.istio.io/network` label, else its Namespace's,
//!   else the cluster's), and a health from its conditions: ready (or unset) → healthy, serving while
//!   terminating → draining, otherwise unhealthy. FQDN slices are skipped
//!   (istiod reads IPv4 and IPv6 slices only).
//!
//! This module does no I/O and logs nothing: callers get typed
//! [`ConvertError`]s.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshreg_registry::{
    Address, Endpoint, EndpointShard, Health, Hostname, Locality, Location, Object, Port, Protocol,
    Resolution, Service, SourceId, TlsMode, Workload, shared_locality, shared_str,
};

/// The label naming an EndpointSlice's Service.
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Istio's annotation restricting where a Service is visible.
const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// Ports istiod treats as TCP when a port's name and `appProtocol` say
/// nothing (SMTP, DNS, MySQL, MongoDB: protocol sniffing would break them).
const WELL_KNOWN_TCP_PORTS: [i32; 4] = [25, 53, 3306, 27017];

/// The label giving a Pod's or Namespace's network (`topology.istio.io/network`).
const NETWORK_LABEL: &str = "topology.istio.io/network";

/// A Pod's locality override, `region.zone.subzone` (Istio's `istio-locality`).
const LOCALITY_LABEL: &str = "istio-locality";

/// What a Pod gives the endpoints that point to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodInfo {
    /// Its labels (what subsets and selectors match).
    pub(crate) labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName`.
    pub(crate) service_account: String,
    /// `spec.nodeName`.
    pub(crate) node: String,
    /// `status.podIP`, once it has one.
    pub(crate) ip: Option<IpAddr>,
    /// Whether its `Ready` condition is true.
    pub(crate) ready: bool,
    /// Whether it is deleted (`deletionTimestamp` set) or finished (phase
    /// `Succeeded` or `Failed`): istiod's `shouldPodBeInEndpoints` leaves
    /// such a Pod out.
    pub(crate) gone: bool,
}

/// What a Pod contributes, kept instead of the whole Pod.
pub(crate) fn pod_info(pod: &Pod) -> PodInfo {
    let spec = pod.spec.as_ref();
    PodInfo {
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ip: pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ready: pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        gone: pod.metadata.deletion_timestamp.is_some()
            || pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed"),
    }
}

/// A Pod as a workload, which a ServiceEntry's `workloadSelector` of its
/// namespace selects (from any source), as istiod's ServiceEntry
/// controller selects Pods; `None` until it has an IP, and once it is
/// deleted or finished (istiod's `shouldPodBeInEndpoints`).
pub(crate) fn workload(
    namespace: &str,
    name: &str,
    pod: &PodInfo,
    cluster: &Cluster,
    lookup: &impl Lookup,
) -> Option<Object> {
    if pod.gone {
        return None;
    }
    let ip = pod.ip?;
    Some(Object::Workload(Workload {
        namespace: namespace.to_string(),
        name: name.to_string(),
        address: Some(Address::Ip(ip)),
        ports: BTreeMap::new(),
        labels: pod.labels.clone(),
        locality: locality(Some(pod), &pod.node, None, lookup),
        cluster_id: cluster.id.clone(),
        network: network(Some(pod), cluster, lookup),
        health: if pod.ready {
            Health::Healthy
        } else {
            Health::Unhealthy
        },
        weight: 0,
        service_account: pod.service_account.clone(),
        tls_mode: TlsMode::Disabled,
    }))
}

/// istiod's locality of a workload: the Pod's `istio-locality` label
/// (`region.zone.subzone`), else its Node's topology labels, else `zone`
/// (the slice's).
fn locality(
    pod: Option<&PodInfo>,
    node: &str,
    zone: Option<&str>,
    lookup: &impl Lookup,
) -> Locality {
    match (
        pod.and_then(|p| p.labels.get(LOCALITY_LABEL)),
        lookup.node(node),
    ) {
        (Some(label), _) => Locality::parse(&label.replace('.', "/")),
        (None, Some(locality)) => locality.clone(),
        (None, None) => Locality {
            zone: zone.unwrap_or_default().to_string(),
            ..Locality::default()
        },
    }
}

/// istiod's network of a workload (its kube controller's `Network`): the
/// Pod's network label, else the system namespace's (`istio-system`, the
/// one namespace whose label istiod reads), else the cluster's.
fn network(pod: Option<&PodInfo>, cluster: &Cluster, lookup: &impl Lookup) -> String {
    pod.and_then(|p| p.labels.get(NETWORK_LABEL).cloned())
        .filter(|n| !n.is_empty())
        .or_else(|| {
            Some(lookup.namespace_network(SYSTEM_NAMESPACE).to_string()).filter(|n| !n.is_empty())
        })
        .unwrap_or_else(|| cluster.network.clone())
}

/// The namespace whose network label is the cluster's default network.
pub(crate) const SYSTEM_NAMESPACE: &str = meshreg_registry::ROOT_NAMESPACE;

/// A Node's locality from its labels: `topology.kubernetes.io/region`,
/// `topology.kubernetes.io/zone`, `topology.istio.io/subzone` (istiod's
/// `getNodeLocality`).
pub(crate) fn node_locality(node: &Node) -> Locality {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    Locality {
        region: get("topology.kubernetes.io/region"),
        zone: get("topology.kubernetes.io/zone"),
        subzone: get("topology.istio.io/subzone"),
    }
}

/// A Namespace's network label (empty when none).
pub(crate) fn namespace_network(ns: &Namespace) -> String {
    ns.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(NETWORK_LABEL))
        .cloned()
        .unwrap_or_default()
}

/// What an EndpointSlice's endpoints are joined with.
pub(crate) trait Lookup {
    /// The Pod `namespace/name`, if known.
    fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo>;
    /// The locality of Node `name`, if known.
    fn node(&self, name: &str) -> Option<&Locality>;
    /// The network label of Namespace `name` (empty when none or unknown).
    fn namespace_network(&self, name: &str) -> &str;
}

/// Nothing known (tests of the slice alone).
#[cfg(test)]
pub(crate) struct Nothing;

#[cfg(test)]
impl Lookup for Nothing {
    fn pod(&self, _: &str, _: &str) -> Option<&PodInfo> {
        None
    }
    fn node(&self, _: &str) -> Option<&Locality> {
        None
    }
    fn namespace_network(&self, _: &str) -> &str {
        ""
    }
}

/// What a cluster contributes to every object it converts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cluster {
    /// The cluster id endpoints and VIPs carry.
    pub(crate) id: String,
    /// The network its endpoints are on (empty: the default network).
    pub(crate) network: String,
    /// The DNS domain of its Services (`cluster.local`).
    pub(crate) domain: String,
}

/// Why an object cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConvertError {
    /// `metadata.name` or `metadata.namespace` is missing.
    #[error("{kind} without metadata.{field}")]
    Unnamed {
        kind: &'static str,
        field: &'static str,
    },
    /// A port number outside 1–65535.
    #[error("{kind} {namespace}/{name}: {field} {value} is not a port number (1-65535)")]
    BadPort {
        kind: &'static str,
        namespace: String,
        name: String,
        field: &'static str,
        value: i32,
    },
}

/// `(namespace, name)` of an object's metadata.
pub(crate) fn identity(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(String, String), ConvertError> {
    let name = meta.name.clone().ok_or(ConvertError::Unnamed {
        kind,
        field: "name",
    })?;
    let namespace = meta.namespace.clone().ok_or(ConvertError::Unnamed {
        kind,
        field: "namespace",
    })?;
    Ok((namespace, name))
}

/// `<name>.<namespace>.svc.<domain>`.
pub(crate) fn hostname(name: &str, namespace: &str, domain: &str) -> Hostname {
    format!("{name}.{namespace}.svc.{domain}").into()
}

/// A port's protocol as istiod's `kube.ConvertProtocol` decides it.
pub(crate) fn protocol(port: &ServicePort) -> Protocol {
    if port.protocol.as_deref() == Some("UDP") {
        return Protocol::Udp;
    }
    let name = match port.app_protocol.as_deref() {
        Some("kubernetes.io/h2c") => return Protocol::Http2,
        Some("kubernetes.io/ws") => return Protocol::Http,
        Some("kubernetes.io/wss") => return Protocol::Https,
        Some(app) => app,
        None => port.name.as_deref().unwrap_or_default(),
    };
    if name.len() >= "grpc-web".len() && name[.."grpc-web".len()].eq_ignore_ascii_case("grpc-web") {
        return Protocol::Grpc;
    }
    let prefix = name.split('-').next().unwrap_or_default();
    match Protocol::parse(prefix) {
        Protocol::Unspecified if WELL_KNOWN_TCP_PORTS.contains(&port.port) => Protocol::Tcp,
        p => p,
    }
}

/// The declaration of a Service, or `None` for an `ExternalName` Service
/// (istiod's alias: no cluster of its own).
pub(crate) fn service(
    svc: &KubeService,
    cluster: &Cluster,
    source: &SourceId,
) -> Result<Option<Object>, ConvertError> {
    let (namespace, name) = identity("Service", &svc.metadata)?;
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName")
        && spec.external_name.as_deref().is_some_and(|n| !n.is_empty())
    {
        return Ok(None);
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut ports = Vec::new();
    // istiod builds no outbound cluster for UDP (or SCTP) ports, and a
    // DNS Service's port 53 over UDP and TCP would otherwise be one number
    // declared twice: only the other protocols are ports here.
    for p in spec
        .ports
        .iter()
        .flatten()
        .filter(|p| !matches!(p.protocol.as_deref(), Some("UDP" | "SCTP")))
    {
        let number = u16::try_from(p.port)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ConvertError::BadPort {
                kind: "Service",
                namespace: namespace.clone(),
                name: name.clone(),
                field: "port",
                value: p.port,
            })?;
        ports.push(Port {
            name: p.name.clone().unwrap_or_default(),
            number,
            protocol: protocol(p),
            // Endpoints carry the resolved target port (the slice's port of
            // the same name).
            target_port: None,
        });
    }
    let mut addresses = BTreeMap::new();
    if !headless {
        let ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.clone(),
            (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
            _ => Vec::new(),
        };
        if !ips.is_empty() {
            addresses.insert(cluster.id.clone(), ips);
        }
    }
    let export_to = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Object::Service {
        origin: name.clone(),
        service: Service {
            hostname: hostname(&name, &namespace, &cluster.domain),
            namespace,
            ports,
            resolution: if headless {
                Resolution::None
            } else {
                Resolution::Static
            },
            location: Location::MeshInternal,
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            export_to,
            addresses,
            workload_selector: None,
            source: source.clone(),
        },
    }))
}

/// The shard of an EndpointSlice; `None` for a slice that names no Service
/// or holds FQDN addresses.
pub(crate) fn shard(
    slice: &EndpointSlice,
    cluster: &Cluster,
    source: &SourceId,
    lookup: &impl Lookup,
) -> Result<Option<Object>, ConvertError> {
    let (namespace, name) = identity("EndpointSlice", &slice.metadata)?;
    let Some(service) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
    else {
        return Ok(None);
    };
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    let mut ports = BTreeMap::new();
    for p in slice.ports.iter().flatten() {
        let Some(port) = p.port else { continue };
        let number =
            u16::try_from(port)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ConvertError::BadPort {
                    kind: "EndpointSlice",
                    namespace: namespace.clone(),
                    name: name.clone(),
                    field: "ports[].port",
                    value: port,
                })?;
        ports.insert(p.name.clone().unwrap_or_default(), number);
    }
    let mut endpoints = Vec::new();
    let cluster_id = shared_str(&cluster.id);
    for e in slice.endpoints.iter().flatten() {
        let conditions = e.conditions.clone().unwrap_or_default();
        // Kubernetes: a nil `ready` means ready.
        let health = if conditions.ready.unwrap_or(true) {
            Health::Healthy
        } else if conditions.serving.unwrap_or(false) && conditions.terminating.unwrap_or(false) {
            Health::Draining
        } else {
            Health::Unhealthy
        };
        let workload_name = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone())
            .unwrap_or_default();
        let pod = lookup.pod(&namespace, &workload_name);
        let node = e
            .node_name
            .as_deref()
            .or(pod.map(|p| p.node.as_str()))
            .unwrap_or_default();
        let locality = shared_locality(locality(pod, node, e.zone.as_deref(), lookup));
        let network = shared_str(&network(pod, cluster, lookup));
        let service_account = shared_str(pod.map_or("", |p| &p.service_account));
        for a in &e.addresses {
            // An address the API server accepted but that is not an IP
            // literal is skipped, as istiod cannot use it either.
            let Ok(ip) = a.parse::<IpAddr>() else {
                continue;
            };
            endpoints.push(Endpoint {
                ports: ports.clone(),
                labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                locality: locality.clone(),
                cluster_id: cluster_id.clone(),
                network: network.clone(),
                health,
                service_account: service_account.clone(),
                workload_name: workload_name.clone(),
                // Only the service ports the slice names (istiod's rule).
                listed_ports_only: true,
                ..Endpoint::new(Address::Ip(ip), source.clone())
            });
        }
    }
    Ok(Some(Object::Endpoints(EndpointShard {
        hostname: hostname(service, &namespace, &cluster.domain),
        name,
        endpoints,
    })))
}

#[cfg(test)]
mod tests;
