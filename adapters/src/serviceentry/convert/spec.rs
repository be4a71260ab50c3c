//! Istio's `ServiceEntry` and `WorkloadEntry` as written in YAML, and the
//! validation rules of Istio's webhook that matter to a registry.
//!
//! The structs follow `istio/api` `networking/v1alpha3/service_entry.proto`
//! and `workload_entry.proto` (v1 and v1beta1 are the same schema). Spec
//! structs use `deny_unknown_fields`, so a typo such as `resolutoin` is an
//! error naming the field instead of a silent default (as with a Kubernetes
//! API server's strict field validation). `null` is accepted wherever a
//! list, map or string may be empty, as Kubernetes does.
//!
//! Validation follows Istio's `ValidateServiceEntry` and
//! `ValidateWorkloadEntry`; each rule is noted where it is checked. Rules
//! that only restrict proxy behaviour (e.g. several hosts sharing a plain
//! TCP port) are not enforced: the registry can represent those entries.
//!
//! This module does not build registry types; `convert` does.

use std::collections::{BTreeMap, BTreeSet};
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
}

/// A whole document: `apiVersion` and `kind` were checked before.
#[derive(Debug, Deserialize)]
pub(super) struct Document<S> {
    #[serde(default, deserialize_with = "nullable")]
    pub(super) metadata: Metadata,
    pub(super) spec: Option<S>,
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
    /// 0 means unset.
    #[serde(default)]
    pub(super) target_port: u32,
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
}

impl ResolutionSpec {
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

/// One validation failure: a field path inside the document and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Issue {
    pub(super) path: String,
    pub(super) message: String,
}

fn issue(issues: &mut Vec<Issue>, path: impl Into<String>, message: impl Into<String>) {
    issues.push(Issue {
        path: path.into(),
        message: message.into(),
    });
}

/// Protocol names Istio accepts (`protocol.Parse` not `Unsupported`),
/// upper-cased. Empty means "sniff".
const PROTOCOLS: &[&str] = &[
    "",
    "HTTP",
    "HTTP2",
    "HTTP_PROXY",
    "GRPC",
    "GRPC-WEB",
    "HTTPS",
    "TLS",
    "TCP",
    "UDP",
    "MONGO",
    "REDIS",
    "MYSQL",
    "THRIFT",
];

/// Validates a ServiceEntry spec (Istio's `ValidateServiceEntry`).
pub(super) fn validate_service_entry(spec: &ServiceEntrySpec) -> Vec<Issue> {
    let mut out = Vec::new();
    let resolution = spec.resolution.unwrap_or(ResolutionSpec::None);

    if spec.hosts.is_empty() {
        issue(&mut out, "spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        if host == "*" {
            issue(&mut out, format!("spec.hosts[{i}]"), "`*` is not allowed");
        } else if let Err(e) = validate_dns_name(host, true) {
            issue(
                &mut out,
                format!("spec.hosts[{i}]"),
                format!("{host:?}: {e}"),
            );
        }
    }

    for (i, address) in spec.addresses.iter().enumerate() {
        match parse_ip_or_cidr(address) {
            Err(e) => issue(
                &mut out,
                format!("spec.addresses[{i}]"),
                format!("{address:?}: {e}"),
            ),
            // Istio: CIDR addresses only make sense when the proxy does not
            // resolve the hosts itself.
            Ok(true) if resolution.is_dns() => issue(
                &mut out,
                format!("spec.addresses[{i}]"),
                "CIDR addresses are allowed only for NONE/STATIC resolution",
            ),
            Ok(_) => {}
        }
    }

    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if port.name.is_empty() {
            issue(&mut out, format!("{path}.name"), "must not be empty");
        } else if !names.insert(port.name.as_str()) {
            issue(
                &mut out,
                format!("{path}.name"),
                format!("{:?} is already used by another port", port.name),
            );
        }
        if !(1..=65535).contains(&port.number) {
            issue(
                &mut out,
                format!("{path}.number"),
                format!("{} is not between 1 and 65535", port.number),
            );
        } else if !numbers.insert(port.number) {
            issue(
                &mut out,
                format!("{path}.number"),
                format!("{} is already used by another port", port.number),
            );
        }
        if port.target_port > 65535 {
            issue(
                &mut out,
                format!("{path}.targetPort"),
                format!("{} is not between 1 and 65535", port.target_port),
            );
        }
        if !PROTOCOLS.contains(&port.protocol.to_ascii_uppercase().as_str()) {
            issue(
                &mut out,
                format!("{path}.protocol"),
                format!("unsupported protocol {:?}", port.protocol),
            );
        }
    }

    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        issue(
            &mut out,
            "spec.workloadSelector",
            "only one of workloadSelector or endpoints can be set",
        );
    }
    if let Some(selector) = &spec.workload_selector {
        for (k, v) in &selector.labels {
            if k.is_empty() {
                issue(&mut out, "spec.workloadSelector.labels", "empty label key");
            }
            if v.contains('*') {
                issue(
                    &mut out,
                    format!("spec.workloadSelector.labels.{k}"),
                    "wildcard is not supported in selector",
                );
            }
        }
    }

    let mut unix_endpoint = false;
    match resolution {
        ResolutionSpec::None => {
            if !spec.endpoints.is_empty() {
                issue(
                    &mut out,
                    "spec.endpoints",
                    "no endpoints may be given for resolution NONE",
                );
            }
        }
        ResolutionSpec::Static => {
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                match address_kind(&ep.address) {
                    AddressKind::Ip(_) => {}
                    AddressKind::Unix(p) => {
                        unix_endpoint = true;
                        if !p.starts_with('/') {
                            issue(
                                &mut out,
                                format!("{path}.address"),
                                format!("{:?}: unix socket path must be absolute", ep.address),
                            );
                        }
                        if !ep.ports.is_empty() {
                            issue(
                                &mut out,
                                format!("{path}.ports"),
                                "a unix endpoint must not have ports",
                            );
                        }
                    }
                    AddressKind::Empty => issue(
                        &mut out,
                        format!("{path}.address"),
                        "must be set for resolution STATIC",
                    ),
                    AddressKind::Name => issue(
                        &mut out,
                        format!("{path}.address"),
                        format!(
                            "{:?} is not an IP address or unix socket, as resolution STATIC requires",
                            ep.address
                        ),
                    ),
                }
            }
            if unix_endpoint && spec.ports.len() != 1 {
                issue(
                    &mut out,
                    "spec.ports",
                    "exactly 1 service port is required with unix endpoints",
                );
            }
        }
        ResolutionSpec::Dns | ResolutionSpec::DnsRoundRobin => {
            if spec.endpoints.is_empty() && spec.workload_selector.is_none() {
                // The hosts themselves are resolved.
                for (i, host) in spec.hosts.iter().enumerate() {
                    if host.contains('*') {
                        issue(
                            &mut out,
                            format!("spec.hosts[{i}]"),
                            "hosts must be FQDNs (no wildcard) when resolution DNS has no endpoints",
                        );
                    }
                }
            }
            if resolution == ResolutionSpec::DnsRoundRobin && spec.endpoints.len() > 1 {
                issue(
                    &mut out,
                    "spec.endpoints",
                    "at most 1 endpoint is allowed for resolution DNS_ROUND_ROBIN",
                );
            }
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}].address");
                match address_kind(&ep.address) {
                    AddressKind::Ip(_) => {}
                    AddressKind::Empty => issue(&mut out, path, "must be set for resolution DNS"),
                    AddressKind::Unix(_) => issue(
                        &mut out,
                        path,
                        format!("{:?}: unix sockets need resolution STATIC", ep.address),
                    ),
                    AddressKind::Name => {
                        if let Err(e) = validate_dns_name(&ep.address, false) {
                            issue(
                                &mut out,
                                path,
                                format!("{:?} is not an IP address or FQDN: {e}", ep.address),
                            );
                        }
                    }
                }
            }
        }
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        validate_workload(ep, &path, &mut out);
        for name in ep.ports.keys() {
            if !names.contains(name.as_str()) {
                issue(
                    &mut out,
                    format!("{path}.ports.{name}"),
                    "no service port has this name",
                );
            }
        }
    }

    let mut seen = BTreeSet::new();
    for (i, e) in spec.export_to.iter().enumerate() {
        if e.is_empty() {
            issue(&mut out, format!("spec.exportTo[{i}]"), "must not be empty");
        } else if !seen.insert(e.as_str()) {
            issue(
                &mut out,
                format!("spec.exportTo[{i}]"),
                format!("{e:?} is duplicated"),
            );
        }
    }
    out
}

/// Validates a `WorkloadEntry` object's spec. An empty address is allowed:
/// it stands for a workload reached through its network's gateway and
/// yields no endpoint.
pub(super) fn validate_workload_entry(spec: &WorkloadEntrySpec) -> Vec<Issue> {
    let mut out = Vec::new();
    match address_kind(&spec.address) {
        AddressKind::Empty | AddressKind::Ip(_) => {}
        AddressKind::Unix(p) => {
            if !p.starts_with('/') {
                issue(
                    &mut out,
                    "spec.address",
                    format!("{:?}: unix socket path must be absolute", spec.address),
                );
            }
        }
        AddressKind::Name => {
            if let Err(e) = validate_dns_name(&spec.address, false) {
                issue(
                    &mut out,
                    "spec.address",
                    format!("{:?} is not an IP address or FQDN: {e}", spec.address),
                );
            }
        }
    }
    validate_workload(spec, "spec", &mut out);
    out
}

/// Rules shared by `WorkloadEntry` specs and inline endpoints.
fn validate_workload(spec: &WorkloadEntrySpec, path: &str, out: &mut Vec<Issue>) {
    for (name, port) in &spec.ports {
        if name.is_empty() {
            issue(out, format!("{path}.ports"), "empty port name");
        }
        if !(1..=65535).contains(port) {
            issue(
                out,
                format!("{path}.ports.{name}"),
                format!("{port} is not between 1 and 65535"),
            );
        }
    }
    if spec.labels.keys().any(String::is_empty) {
        issue(out, format!("{path}.labels"), "empty label key");
    }
    if !spec.locality.is_empty() {
        let parts: Vec<&str> = spec.locality.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            issue(
                out,
                format!("{path}.locality"),
                format!("{:?} is not of the form region/zone/subzone", spec.locality),
            );
        }
    }
}

/// A DNS name: dot-separated labels of letters, digits and `-` (not at
/// either end), each at most 63 bytes, at most 253 in all; an optional
/// trailing dot; with `wildcard`, an optional leading `*.`.
fn validate_dns_name(name: &str, wildcard: bool) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let rest = match name.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        Some(_) => return Err("wildcards are not allowed here".into()),
        None => name,
    };
    if rest.is_empty() {
        return Err("empty name".into());
    }
    if rest.len() > 253 {
        return Err("longer than 253 characters".into());
    }
    for label in rest.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must have 1 to 63 characters"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} must not start or end with '-'"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(format!("invalid character {c:?}"));
        }
    }
    Ok(())
}

/// `Ok(false)` for an IP address, `Ok(true)` for a CIDR range.
fn parse_ip_or_cidr(s: &str) -> Result<bool, String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(false);
    }
    let (ip, bits) = s
        .split_once('/')
        .ok_or_else(|| "not an IP address or CIDR range".to_string())?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| "not an IP address or CIDR range".to_string())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match bits.parse::<u8>() {
        Ok(b) if b <= max => Ok(true),
        _ => Err(format!("prefix length must be between 0 and {max}")),
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
