//! Istio's `ServiceEntry` and `WorkloadEntry` as written in YAML.
//!
//! The structs follow `istio/api` `networking/v1alpha3/service_entry.proto`
//! and `workload_entry.proto` (v1 and v1beta1 are the same schema). Spec
//! structs use `deny_unknown_fields`, so a typo such as `resolutoin` is an
//! error naming the field instead of a silent default (as with a Kubernetes
//! API server's strict field validation). `null` is accepted wherever a
//! list, map or string may be empty, as Kubernetes does.
//!
//! Istio's validation rules are in `validate`; this module does not build
//! registry types (`convert` does).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer};

/// The `metadata` of an object (only the fields the registry uses).
#[derive(Debug, Default, Deserialize)]
pub(super) struct Metadata {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) namespace: String,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) annotations: BTreeMap<String, String>,
    /// The object's `status` (read by kinds that use it: a WorkloadEntry's
    /// health conditions); any shape is accepted, as the API server keeps
    /// it apart from the spec.
    #[serde(skip)]
    pub(super) status: Option<serde_yaml_ng::Value>,
}

/// A whole document: `apiVersion` and `kind` were checked before.
#[derive(Debug, Deserialize)]
pub(super) struct Document<S> {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) metadata: Metadata,
    pub(super) spec: Option<S>,
    #[serde(default)]
    pub(super) status: Option<serde_yaml_ng::Value>,
}

/// `ServiceEntry.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ServiceEntrySpec {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) addresses: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) ports: Vec<ServicePort>,
    #[serde(default)]
    pub(super) location: Option<LocationSpec>,
    #[serde(default)]
    pub(super) resolution: Option<ResolutionSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) endpoints: Vec<WorkloadEntrySpec>,
    #[serde(default)]
    pub(super) workload_selector: Option<WorkloadSelector>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) export_to: Vec<String>,
    /// Checked for type, then ignored: the registry model has no SAN list.
    #[serde(default, rename = "subjectAltNames", deserialize_with = "nullable")]
    _subject_alt_names: Vec<String>,
}

/// `ServiceEntry.spec.ports[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ServicePort {
    /// Wider than `u16` so an out-of-range number gets Istio's message.
    #[serde(default)]
    pub(super) number: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) protocol: String,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) name: String,
    /// `None` when absent. Present, it must be 1..=65535 (the CRD's CEL
    /// rule `0 < self && self <= 65535` applies to an explicit 0 too).
    #[serde(default)]
    pub(super) target_port: Option<u32>,
}

/// `ServiceEntry.spec.location`; unset means `MESH_EXTERNAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum LocationSpec {
    MeshExternal,
    MeshInternal,
}

/// `ServiceEntry.spec.resolution`; unset means `NONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum ResolutionSpec {
    None,
    Static,
    Dns,
    DnsRoundRobin,
    /// The proxy resolves the name of each request (Host header or SNI)
    /// behind a wildcard host; meshreg validates such entries but cannot
    /// serve them (it has no dynamic forward proxy cluster).
    DynamicDns,
}

impl ResolutionSpec {
    /// `DNS` or `DNS_ROUND_ROBIN`: the proxy resolves endpoint names.
    pub(super) fn is_dns(self) -> bool {
        matches!(self, ResolutionSpec::Dns | ResolutionSpec::DnsRoundRobin)
    }
}

/// `ServiceEntry.spec.workloadSelector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) labels: BTreeMap<String, String>,
}

/// `WorkloadEntry.spec`, also the type of `ServiceEntry.spec.endpoints[]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct WorkloadEntrySpec {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) ports: BTreeMap<String, u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) network: String,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) locality: String,
    #[serde(default)]
    pub(super) weight: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub(super) service_account: String,
}

/// Istio's prefix for Unix domain socket addresses.
pub(super) const UNIX_PREFIX: &str = "unix://";

/// The kind of address an endpoint has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AddressKind {
    Empty,
    Ip(IpAddr),
    Unix(String),
    Name,
}

pub(super) fn address_kind(address: &str) -> AddressKind {
    if address.is_empty() {
        AddressKind::Empty
    } else if let Some(path) = address.strip_prefix(UNIX_PREFIX) {
        AddressKind::Unix(path.to_string())
    } else if let Ok(ip) = address.parse() {
        AddressKind::Ip(ip)
    } else {
        AddressKind::Name
    }
}

/// Istio writes a full-length prefix (`/32`, `/128`) as a plain address.
pub(super) fn normalize_address(s: &str) -> String {
    if let Some((ip, bits)) = s.split_once('/')
        && let Ok(addr) = ip.parse::<IpAddr>()
        && bits == if addr.is_ipv4() { "32" } else { "128" }
    {
        return addr.to_string();
    }
    s.to_string()
}

/// Deserializes `null` as the type's default (Kubernetes treats an empty
/// field and a null one alike).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
