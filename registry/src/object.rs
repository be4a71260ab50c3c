//! The objects a source tells the registry about, each with its key.
//!
//! A source never sends a pre-merged picture: it sends **service
//! declarations**, **endpoint shards** and **workloads**, each keyed within
//! the source, and the registry diffs, joins and merges them once for every
//! source (see `store` and `merge`). Keys are unique within one source; the
//! same key from two sources names two objects.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{
    Address, Endpoint, Health, Hostname, Locality, Service, TlsMode, shared_locality, shared_str,
};

/// A set of endpoints one source knows for one hostname: one EndpointSlice,
/// one Consul service's instances, one DNS answer, one ServiceEntry's
/// inline endpoints. A shard may add endpoints to a host that another
/// source declares (Istio's `EndpointShards`, keyed by hostname and shard).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointShard {
    /// The host the endpoints serve.
    pub hostname: Hostname,
    /// The shard's name within its source and host (e.g. the slice's or the
    /// ServiceEntry's name).
    pub name: String,
    /// The endpoints, any order (the registry sorts them).
    pub endpoints: Vec<Endpoint>,
}

/// A workload instance that services select by label: a Pod, a
/// WorkloadEntry, a registered VM. It joins every service declaration of its
/// namespace, from any source, whose workload selector its labels match
/// (Istio's rule for ServiceEntry `workloadSelector`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// The namespace; only declarations of the same namespace select it.
    pub namespace: String,
    /// The workload's name (becomes the endpoints' workload name).
    pub name: String,
    /// Where it is reached; `None` for a workload reached only through its
    /// network's gateway (Istio gives it no endpoint). A host name or a
    /// Unix socket joins only DNS-resolved services (Istio's
    /// `DNSServiceEntryOnly`).
    pub address: Option<Address>,
    /// Its port per service port name.
    pub ports: BTreeMap<String, u16>,
    /// Its labels (what selectors match, and subsets later).
    pub labels: BTreeMap<String, String>,
    /// Where it runs.
    pub locality: Locality,
    /// The cluster it runs in.
    pub cluster_id: String,
    /// The network its address is reachable on.
    pub network: String,
    /// Health as its platform reports it.
    pub health: Health,
    /// Load-balancing weight; 0 means unset.
    pub weight: u32,
    /// Its identity.
    pub service_account: String,
    /// Whether it accepts Istio mTLS.
    pub tls_mode: TlsMode,
}

/// One object from a source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Object {
    /// A service declaration: the shape of `service.hostname` as the
    /// platform object `origin` (e.g. the ServiceEntry's name) declares it in
    /// `service.namespace`.
    Service {
        /// The declaring object's name within its namespace and source.
        origin: String,
        /// The declared shape (the writer stamps `service.source`).
        service: Service,
    },
    /// An endpoint shard.
    Endpoints(EndpointShard),
    /// A workload.
    Workload(Workload),
    /// A `DestinationRule` (traffic policy and subsets of a host).
    DestinationRule(Box<crate::policy::DestinationRule>),
    /// A `Sidecar` (which services the proxies it selects see).
    Sidecar(Box<crate::policy::Sidecar>),
    /// A `WorkloadGroup` (the template of workloads registered from it).
    WorkloadGroup(Box<crate::group::WorkloadGroup>),
}

/// The key of an [`Object`] within its source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ObjectKey {
    /// A service declaration: (namespace, hostname, declaring object).
    Service {
        /// The namespace.
        namespace: String,
        /// The hostname.
        hostname: Hostname,
        /// The declaring object's name.
        origin: String,
    },
    /// An endpoint shard: (hostname, shard).
    Endpoints {
        /// The hostname.
        hostname: Hostname,
        /// The shard's name.
        shard: String,
    },
    /// A workload: (namespace, name).
    Workload {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// A destination rule: (namespace, name, host).
    DestinationRule {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
        /// The host it applies to.
        hostname: Hostname,
    },
    /// A Sidecar: (namespace, name).
    Sidecar {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
    /// A WorkloadGroup: (namespace, name).
    WorkloadGroup {
        /// The namespace.
        namespace: String,
        /// The name.
        name: String,
    },
}

impl Object {
    /// The object's key within its source.
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Service { origin, service } => ObjectKey::Service {
                namespace: service.namespace.clone(),
                hostname: service.hostname.clone(),
                origin: origin.clone(),
            },
            Object::Endpoints(s) => ObjectKey::Endpoints {
                hostname: s.hostname.clone(),
                shard: s.name.clone(),
            },
            Object::Workload(w) => ObjectKey::Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
            },
            Object::DestinationRule(r) => ObjectKey::DestinationRule {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                hostname: r.host.clone(),
            },
            Object::Sidecar(s) => ObjectKey::Sidecar {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            },
            Object::WorkloadGroup(g) => ObjectKey::WorkloadGroup {
                namespace: g.namespace.clone(),
                name: g.name.clone(),
            },
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectKey::Service {
                namespace,
                hostname,
                origin,
            } => write!(f, "service {hostname} in {namespace} (from {origin})"),
            ObjectKey::Endpoints { hostname, shard } => {
                write!(f, "endpoints of {hostname} (shard {shard})")
            }
            ObjectKey::Workload { namespace, name } => write!(f, "workload {namespace}/{name}"),
            ObjectKey::DestinationRule {
                namespace,
                name,
                hostname,
            } => write!(f, "destination rule {namespace}/{name} for {hostname}"),
            ObjectKey::Sidecar { namespace, name } => write!(f, "sidecar {namespace}/{name}"),
            ObjectKey::WorkloadGroup { namespace, name } => {
                write!(f, "workload group {namespace}/{name}")
            }
        }
    }
}

// === impl Workload ===

impl Workload {
    /// Whether a declaration of `namespace` with `selector` selects this
    /// workload: same namespace, and every selector label present with the
    /// same value (an empty selector selects nothing, as a missing one).
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        !selector.is_empty()
            && self.namespace == namespace
            && selector
                .iter()
                .all(|(k, v)| self.labels.get(k).is_some_and(|l| l == v))
    }

    /// Whether it can serve a service of this resolution: a name or a
    /// socket only behind DNS resolution.
    pub(crate) fn joins(&self, dns: bool) -> bool {
        match &self.address {
            None => false,
            Some(Address::Ip(_)) => true,
            Some(Address::Dns(_) | Address::Unix(_)) => dns,
        }
    }

    /// The endpoint this workload gives a service (the writer stamps the
    /// source).
    pub(crate) fn endpoint(&self, source: &crate::SourceId) -> Option<Endpoint> {
        let mut ep = Endpoint::new(self.address.clone()?, source.clone());
        ep.ports = self.ports.clone();
        ep.labels = self.labels.clone();
        ep.locality = shared_locality(self.locality.clone());
        ep.cluster_id = shared_str(&self.cluster_id);
        ep.network = shared_str(&self.network);
        ep.health = self.health;
        ep.weight = self.weight;
        ep.service_account = shared_str(&self.service_account);
        ep.tls_mode = self.tls_mode;
        ep.workload_name = self.name.clone();
        Some(ep)
    }
}
