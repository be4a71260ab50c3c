//! The model of a connected proxy: its Envoy `Node`, parsed once per stream
//! with Istio's conventions, and the set of connected proxies.
//!
//! Istio names a sidecar `sidecar~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`
//! and puts what it knows in the node metadata (`NAMESPACE`, `LABELS`,
//! `CLUSTER_ID`, `NETWORK`, `ISTIO_VERSION`, `INSTANCE_IPS`,
//! `WORKLOAD_NAME`); the locality is the node's own. A node that follows
//! neither (a plain Envoy with any id) is a proxy of kind `Unknown` with
//! what the metadata gives. This is what namespace scoping, locality-aware
//! EDS and debug output read; today the debug output does.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use crate::status::{StreamSync, TypeDump, TypeSync};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

/// What kind of proxy a node is (the first field of Istio's node id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// `sidecar`.
    Sidecar,
    /// `router` (a gateway).
    Router,
    /// Anything else.
    Unknown,
}

/// A proxy, as its node describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// The node id, whole.
    pub id: String,
    /// Its kind.
    pub kind: ProxyKind,
    /// Its IP addresses (`INSTANCE_IPS`, else the id's IP field).
    pub ips: Vec<IpAddr>,
    /// Its workload (the id's pod name, else `WORKLOAD_NAME`).
    pub workload: String,
    /// Its namespace (`NAMESPACE`, else the id's; for a proxyless gRPC
    /// client with neither, `default`, so it is scoped and gets gRPC's
    /// clusters).
    pub namespace: String,
    /// Its labels (`LABELS`).
    pub labels: BTreeMap<String, String>,
    /// `CLUSTER_ID`.
    pub cluster_id: String,
    /// `NETWORK`.
    pub network: String,
    /// `ISTIO_VERSION`.
    pub istio_version: String,
    /// The node's locality: region, zone, sub-zone.
    pub locality: (String, String, String),
    /// `AUTO_REGISTER_GROUP`: the WorkloadGroup (of its namespace) a VM
    /// proxy registers through; empty for others.
    pub auto_register_group: String,
    /// Whether the namespace came from `NAMESPACE` (not from the node id):
    /// auto-registration needs it, as istiod reads `Metadata.Namespace`.
    pub namespace_in_metadata: bool,
    /// A proxyless gRPC client: node metadata `GENERATOR: grpc` (what
    /// istio-agent's gRPC bootstrap sets, and istiod picks its gRPC
    /// generator by), or a node `user_agent_name` starting with `gRPC`
    /// (what gRPC libraries send). It gets clusters gRPC accepts.
    pub proxyless: bool,
    /// Whether it takes LEDS (see `leds`): an Envoy (node `user_agent_name`
    /// `envoy`), unless its metadata says `LEDS: "false"`. Only delta
    /// streams serve it.
    pub leds: bool,
}

fn string(m: &Struct, key: &str) -> String {
    match m.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// Whether `key` says no: `false` as a boolean or, in any case, as a
/// string (Envoy's bootstrap YAML gives either).
fn opted_out(m: &Struct, key: &str) -> bool {
    match m.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::BoolValue(b)) => !b,
        Some(Kind::StringValue(s)) => s.eq_ignore_ascii_case("false"),
        _ => false,
    }
}

fn labels(m: &Struct) -> BTreeMap<String, String> {
    match m.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(s)) => s
            .fields
            .iter()
            .filter_map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

impl Proxy {
    /// Parses `node`. Never fails: what cannot be read stays empty.
    pub fn from_node(node: &Node) -> Proxy {
        let empty = Struct::default();
        let meta = node.metadata.as_ref().unwrap_or(&empty);
        let parts: Vec<&str> = node.id.split('~').collect();
        let (kind, id_ip, pod_ns) = if parts.len() == 4 {
            let kind = match parts[0] {
                "sidecar" => ProxyKind::Sidecar,
                "router" => ProxyKind::Router,
                _ => ProxyKind::Unknown,
            };
            (kind, parts[1].parse::<IpAddr>().ok(), parts[2])
        } else {
            (ProxyKind::Unknown, None, "")
        };
        let (pod, id_namespace) = pod_ns.rsplit_once('.').unwrap_or((pod_ns, ""));
        let mut ips: Vec<IpAddr> = string(meta, "INSTANCE_IPS")
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(id_ip);
        }
        let namespace_in_metadata = !string(meta, "NAMESPACE").is_empty();
        let proxyless =
            string(meta, "GENERATOR") == "grpc" || node.user_agent_name.starts_with("gRPC");
        let namespace = match string(meta, "NAMESPACE") {
            ns if !ns.is_empty() => ns,
            _ if id_namespace.is_empty() && proxyless => "default".to_string(),
            _ => id_namespace.to_string(),
        };
        let workload = match pod {
            "" => string(meta, "WORKLOAD_NAME"),
            pod => pod.to_string(),
        };
        let locality = node
            .locality
            .as_ref()
            .map(|l| (l.region.clone(), l.zone.clone(), l.sub_zone.clone()))
            .unwrap_or_default();
        Proxy {
            id: node.id.clone(),
            kind,
            ips,
            workload,
            namespace,
            labels: labels(meta),
            cluster_id: string(meta, "CLUSTER_ID"),
            network: string(meta, "NETWORK"),
            istio_version: string(meta, "ISTIO_VERSION"),
            locality,
            auto_register_group: string(meta, "AUTO_REGISTER_GROUP"),
            namespace_in_metadata,
            proxyless,
            leds: node.user_agent_name == "envoy" && !opted_out(meta, "LEDS"),
        }
    }
}

/// One connected stream's proxy.
#[derive(Debug, Clone)]
pub struct Connected {
    /// The proxy.
    pub proxy: Proxy,
    /// `delta` or `sotw`.
    pub mode: &'static str,
    /// The peer address, when known.
    pub peer: Option<SocketAddr>,
    /// When the stream first named its node.
    pub since: SystemTime,
    /// What it sees (`None`: unscoped, every service).
    pub scope: Option<crate::ScopeKey>,
    /// Per type (in [`TypeUrl::ALL`](crate::TypeUrl::ALL) order): what was
    /// sent and what the proxy answered, when listed.
    pub sync: Vec<TypeSync>,
    /// The stream's number on this server, when listed (several streams
    /// may share a node id: a gRPC client opens one per target).
    pub stream: u64,
}

/// Asks a stream for what its proxy holds.
pub(crate) type DumpRequests = mpsc::Sender<oneshot::Sender<Vec<TypeDump>>>;

#[derive(Debug)]
struct Entry {
    connected: Connected,
    sync: StreamSync,
    dumps: DumpRequests,
}

/// The connected proxies, by stream. Bounded by the open streams: an entry
/// leaves with its stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct Proxies {
    inner: Arc<Mutex<(u64, HashMap<u64, Entry>)>>,
}

/// Removes its stream's entry when dropped.
pub(crate) struct Registration {
    proxies: Proxies,
    key: u64,
}

impl Registration {
    /// Records the stream's scope now.
    pub(crate) fn set_scope(&self, scope: Option<crate::ScopeKey>) {
        let mut inner = self.proxies.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.1.get_mut(&self.key) {
            e.connected.scope = scope;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.proxies.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.remove(&self.key);
    }
}

impl Proxies {
    /// Records a stream's proxy, what it was sent and answered (`sync`)
    /// and where to ask what it holds (`dumps`), until the returned
    /// registration drops.
    pub(crate) fn register(
        &self,
        connected: Connected,
        sync: StreamSync,
        dumps: DumpRequests,
    ) -> Registration {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 += 1;
        let key = inner.0;
        inner.1.insert(
            key,
            Entry {
                connected,
                sync,
                dumps,
            },
        );
        Registration {
            proxies: self.clone(),
            key,
        }
    }

    /// Every connected proxy with its sync state, ordered by node id (and
    /// by connection, for streams of one id).
    pub(crate) fn list(&self) -> Vec<Connected> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(u64, Connected)> = inner
            .1
            .iter()
            .map(|(key, e)| {
                let mut c = e.connected.clone();
                c.sync = e.sync.get();
                c.stream = *key;
                (*key, c)
            })
            .collect();
        all.sort_by(|a, b| a.1.proxy.id.cmp(&b.1.proxy.id).then(a.0.cmp(&b.0)));
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// Where to ask stream `stream` what it holds.
    pub(crate) fn dump_channel_of(
        &self,
        stream: u64,
    ) -> Option<(DumpRequests, &'static str, Option<SocketAddr>)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = inner.1.get(&stream)?;
        Some((e.dumps.clone(), e.connected.mode, e.connected.peer))
    }

    /// Where to ask the newest stream of `node_id` what it holds.
    pub(crate) fn dump_channel(
        &self,
        node_id: &str,
    ) -> Option<(DumpRequests, &'static str, Option<SocketAddr>)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .1
            .iter()
            .filter(|(_, e)| e.connected.proxy.id == node_id)
            .max_by_key(|(key, _)| **key)
            .map(|(_, e)| (e.dumps.clone(), e.connected.mode, e.connected.peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::google::protobuf::Value;

    /// A protobuf string value.
    fn s(v: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    #[test]
    fn an_istio_sidecar_node_is_parsed() {
        let node = Node {
            id: "sidecar~10.1.2.3~reviews-v1-abc.bookinfo~bookinfo.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: [
                    ("CLUSTER_ID".to_string(), s("cluster-1")),
                    ("NETWORK".to_string(), s("net-1")),
                    ("ISTIO_VERSION".to_string(), s("1.28.0")),
                    (
                        "LABELS".to_string(),
                        Value {
                            kind: Some(Kind::StructValue(Struct {
                                fields: [("app".to_string(), s("reviews"))].into(),
                            })),
                        },
                    ),
                ]
                .into(),
            }),
            locality: Some(Locality {
                region: "us-east1".into(),
                zone: "us-east1-b".into(),
                sub_zone: String::new(),
            }),
            ..Default::default()
        };
        let p = Proxy::from_node(&node);
        assert_eq!(p.kind, ProxyKind::Sidecar);
        assert_eq!(p.ips, ["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            (p.workload.as_str(), p.namespace.as_str()),
            ("reviews-v1-abc", "bookinfo")
        );
        assert_eq!(
            (p.cluster_id.as_str(), p.network.as_str()),
            ("cluster-1", "net-1")
        );
        assert_eq!(p.labels.get("app").map(String::as_str), Some("reviews"));
        assert_eq!(p.locality.0, "us-east1");
    }

    #[test]
    fn a_plain_node_and_metadata_overrides() {
        let plain = Proxy::from_node(&Node {
            id: "front-envoy".into(),
            ..Default::default()
        });
        assert_eq!(plain.kind, ProxyKind::Unknown);
        assert!(plain.namespace.is_empty() && plain.ips.is_empty());
        let overridden = Proxy::from_node(&Node {
            id: "sidecar~10.0.0.1~vm-1.default~default.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: [
                    ("NAMESPACE".to_string(), s("vms")),
                    ("INSTANCE_IPS".to_string(), s("10.0.0.9, fd00::9")),
                ]
                .into(),
            }),
            ..Default::default()
        });
        assert_eq!(overridden.namespace, "vms");
        assert_eq!(overridden.ips.len(), 2);
    }

    #[test]
    fn an_envoy_takes_leds_unless_it_says_no() {
        let envoy = |leds: Option<Kind>| {
            Proxy::from_node(&Node {
                id: "e".into(),
                user_agent_name: "envoy".into(),
                metadata: leds.map(|k| Struct {
                    fields: [("LEDS".to_string(), Value { kind: Some(k) })].into(),
                }),
                ..Default::default()
            })
            .leds
        };
        assert!(envoy(None));
        assert!(!envoy(Some(Kind::BoolValue(false))));
        assert!(!envoy(Some(Kind::StringValue("FALSE".into()))));
        assert!(envoy(Some(Kind::StringValue("true".into()))));
    }

    #[test]
    fn a_grpc_client_without_a_namespace_is_in_default() {
        let grpc = Proxy::from_node(&Node {
            id: "client-1".into(),
            user_agent_name: "gRPC Python".into(),
            ..Default::default()
        });
        assert!(grpc.proxyless);
        assert_eq!(
            grpc.namespace, "default",
            "as its scope and proxy-status show it"
        );
        let named = Proxy::from_node(&Node {
            id: "sidecar~10.0.0.1~client.shop~shop.svc.cluster.local".into(),
            user_agent_name: "gRPC Go".into(),
            ..Default::default()
        });
        assert_eq!(named.namespace, "shop");
    }

    #[test]
    fn registrations_leave_with_their_stream() {
        let proxies = Proxies::default();
        let connected = |id: &str| Connected {
            scope: None,
            sync: Vec::new(),
            proxy: Proxy::from_node(&Node {
                id: id.into(),
                ..Default::default()
            }),
            mode: "delta",
            peer: None,
            since: SystemTime::now(),
            stream: 0,
        };
        let (tx, _rx) = mpsc::channel(1);
        let a = proxies.register(connected("b"), StreamSync::default(), tx.clone());
        let b = proxies.register(connected("a"), StreamSync::default(), tx);
        let ids: Vec<String> = proxies.list().into_iter().map(|c| c.proxy.id).collect();
        assert_eq!(ids, ["a", "b"]);
        drop(a);
        assert_eq!(proxies.list().len(), 1);
        drop(b);
        assert!(proxies.list().is_empty());
    }
}
