//! Istio's admission rules for `ServiceEntry` and `WorkloadEntry`, re-expressed
//! in Rust, so that meshreg accepts exactly the objects `kubectl apply`
//! would get past an Istio cluster, and refuses the rest.
//!
//! Two layers reject an object in Istio, and both are ported:
//!
//! - the CRD schema of `istio/api` (`+kubebuilder` limits and CEL
//!   `XValidation` rules in `service_entry.proto` / `workload_entry.proto`),
//!   enforced by the Kubernetes API server; errors name the rule `CRD schema`;
//! - the validating webhook, `pkg/config/validation` in `istio/istio`
//!   (`ValidateServiceEntry`, `ValidateWorkloadEntry` and the helpers they
//!   call: `ValidateWildcardDomain`, `ValidateFQDN`, `ValidatePortName`,
//!   `ValidateProtocol`, `ValidatePort`, `ValidateIPSubnet`,
//!   `ValidateUnixAddress`, `validateExportTo`, `ValidateAlphaWorkloadSelector`,
//!   `labels.Instance.Validate`). Each error starts with the name of the Istio
//!   function whose rule it is.
//!
//! Istio's *warnings* (a partial wildcard host, a selector without labels, a
//! TCP port without addresses, …) never reject: they are returned apart and
//! only logged.
//!
//! Deliberately not ported:
//!
//! - Kubernetes' own `metadata` rules (name and label syntax): the API server,
//!   not Istio, enforces them, and meshreg only requires a name.
//! - `DYNAMIC_DNS` specifics: the webhook source available here predates it;
//!   `istio/api` documents it as "wildcard hosts, endpoints ignored,
//!   `MESH_EXTERNAL`" without a schema rule, so only the rules common to every
//!   resolution apply (the host, port, address, selector and `exportTo`
//!   rules, CIDRs only for `NONE`/`STATIC`, several hosts need HTTP or TLS
//!   ports). Endpoints are still schema-checked.
//! - Istio's IP auto-allocation: meshreg never allocates, so the TCP port
//!   without addresses warning is always given.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use super::spec::{
    ResolutionSpec, ServiceEntrySpec, UNIX_PREFIX, WorkloadEntrySpec, WorkloadSelector,
};

/// One finding: a field path inside the document and a message that starts
/// with the name of the Istio rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Issue {
    pub(super) path: String,
    pub(super) message: String,
}

/// What validation found: `errors` refuse the document, `warnings` do not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Findings {
    pub(super) errors: Vec<Issue>,
    pub(super) warnings: Vec<Issue>,
}

impl Findings {
    pub(super) fn error(
        &mut self,
        path: impl Into<String>,
        rule: &str,
        message: impl fmt::Display,
    ) {
        self.errors.push(Issue {
            path: path.into(),
            message: format!("{rule}: {message}"),
        });
    }

    fn warn(&mut self, path: impl Into<String>, rule: &str, message: impl fmt::Display) {
        self.warnings.push(Issue {
            path: path.into(),
            message: format!("{rule}: {message}"),
        });
    }
}

const SE: &str = "ValidateServiceEntry";
const WE: &str = "validateWorkloadEntry";
const CRD: &str = "CRD schema";
const EXPORT_TO: &str = "validateExportTo";
const SELECTOR: &str = "ValidateAlphaWorkloadSelector";
const LABELS: &str = "labels.Instance.Validate";
const PORT: &str = "ValidatePort";
const PORT_NAME: &str = "ValidatePortName";

/// `ValidateServiceEntry` (webhook) plus the `ServiceEntry` CRD schema.
/// `namespace` is the object's namespace (for `exportTo: [.]`).
pub(super) fn validate_service_entry(spec: &ServiceEntrySpec, namespace: &str) -> Findings {
    let mut f = Findings::default();
    let resolution = spec.resolution.unwrap_or(ResolutionSpec::None);

    crd_service_entry(spec, &mut f);

    if let Some(selector) = &spec.workload_selector {
        alpha_workload_selector(selector, &mut f);
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        f.error(
            "spec.workloadSelector",
            SE,
            "only one of workloadSelector or endpoints may be set",
        );
    }

    if spec.hosts.is_empty() {
        f.error("spec.hosts", SE, "a ServiceEntry needs at least one host");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if host == "*" {
            f.error(path, SE, "the host `*` is not allowed");
            continue;
        }
        if let Err(e) = wildcard_domain(host) {
            f.error(&path, "ValidateWildcardDomain", e);
        }
        if host.contains('*') && !host.starts_with("*.") {
            f.warn(
                path,
                "ValidatePartialWildCard",
                format!("partial wildcard {host:?}"),
            );
        }
    }

    let mut cidr = false;
    for (i, address) in spec.addresses.iter().enumerate() {
        cidr |= address.contains('/');
        if let Err(e) = ip_subnet(address) {
            f.error(format!("spec.addresses[{i}]"), "ValidateIPSubnet", e);
        }
    }
    if cidr && !matches!(resolution, ResolutionSpec::None | ResolutionSpec::Static) {
        f.error(
            "spec.addresses",
            SE,
            "CIDR addresses need resolution NONE or STATIC",
        );
    }

    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if !names.insert(port.name.as_str()) {
            f.error(
                format!("{path}.name"),
                SE,
                format!("port name {:?} is used twice", port.name),
            );
        }
        if !numbers.insert(port.number) {
            f.error(
                format!("{path}.number"),
                SE,
                format!("port {} is used twice", port.number),
            );
        }
        if let Some(target) = port.target_port
            && let Err(e) = valid_port(u64::from(target))
        {
            f.error(format!("{path}.targetPort"), PORT, e);
        }
        if spec.addresses.is_empty() && (port.protocol.is_empty() || port.protocol == "TCP") {
            f.warn(
                &path,
                SE,
                "a TCP (or unset) protocol port without addresses matches every IP on that port",
            );
        }
        if let Err(e) = port_name(&port.name) {
            f.error(format!("{path}.name"), PORT_NAME, e);
        }
        if !port.protocol.is_empty() && Protocol::parse(&port.protocol).is_none() {
            f.error(
                format!("{path}.protocol"),
                "ValidateProtocol",
                format!("unsupported protocol {:?}", port.protocol),
            );
        }
        if let Err(e) = valid_port(u64::from(port.number)) {
            f.error(format!("{path}.number"), PORT, e);
        }
    }

    match resolution {
        ResolutionSpec::None => {
            if !spec.endpoints.is_empty() {
                f.error("spec.endpoints", SE, "resolution NONE takes no endpoints");
            }
            if spec.workload_selector.is_some() {
                f.warn(
                    "spec.workloadSelector",
                    SE,
                    "a workloadSelector has no effect with resolution NONE",
                );
            }
        }
        ResolutionSpec::Static => {
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                workload_entry(ep, Some(&names), false, &path, &mut f);
            }
        }
        ResolutionSpec::Dns | ResolutionSpec::DnsRoundRobin => {
            let mode = if resolution == ResolutionSpec::Dns {
                "DNS"
            } else {
                "DNS_ROUND_ROBIN"
            };
            if spec.endpoints.is_empty() {
                for (i, host) in spec.hosts.iter().enumerate() {
                    if host != "*" && fqdn(host).is_err() {
                        f.error(
                            format!("spec.hosts[{i}]"),
                            SE,
                            format!(
                                "{host:?}: without endpoints, resolution {mode} needs FQDN hosts"
                            ),
                        );
                    }
                }
            }
            if resolution == ResolutionSpec::DnsRoundRobin && spec.endpoints.len() > 1 {
                f.error(
                    "spec.endpoints",
                    SE,
                    "resolution DNS_ROUND_ROBIN takes at most 1 endpoint",
                );
            }
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let path = format!("spec.endpoints[{i}]");
                crd_workload_entry(ep, &path, false, &mut f);
                if !is_ip(&ep.address) && fqdn(&ep.address).is_err() {
                    f.error(
                        format!("{path}.address"),
                        SE,
                        format!(
                            "endpoint address {:?} is neither an IP nor an FQDN",
                            ep.address
                        ),
                    );
                }
                labels(&ep.labels, &format!("{path}.labels"), &mut f);
                endpoint_ports(ep, Some(&names), &path, &mut f);
            }
            if !spec.addresses.is_empty()
                && spec.hosts.len() > 1
                && spec
                    .ports
                    .iter()
                    .any(|p| Protocol::parse(&p.protocol).is_some_and(Protocol::is_tcp))
            {
                f.warn(
                    "spec.hosts",
                    SE,
                    "several hosts with addresses and a TCP port cannot be told apart",
                );
            }
        }
        ResolutionSpec::DynamicDns => {
            // See the module docs: only the schema applies to endpoints.
            for (i, ep) in spec.endpoints.iter().enumerate() {
                crd_workload_entry(ep, &format!("spec.endpoints[{i}]"), true, &mut f);
            }
        }
    }

    // Plain TCP cannot tell several hosts apart (HTTP has Host, TLS has SNI),
    // unless the proxy forwards to the original destination (NONE).
    if resolution != ResolutionSpec::None
        && spec.hosts.len() > 1
        && let Some(i) = spec
            .ports
            .iter()
            .position(|p| !Protocol::parse(&p.protocol).is_some_and(|p| p.is_http() || p.is_tls()))
    {
        f.error(
            format!("spec.ports[{i}].protocol"),
            SE,
            "several hosts need HTTP or TLS ports",
        );
    }

    export_to(namespace, &spec.export_to, &mut f);
    f
}

/// `ValidateWorkloadEntry` (webhook) plus the `WorkloadEntry` CRD schema.
pub(super) fn validate_workload_entry(spec: &WorkloadEntrySpec) -> Findings {
    let mut f = Findings::default();
    workload_entry(spec, None, true, "spec", &mut f);
    f
}

/// Istio's `validateWorkloadEntry`: a `WorkloadEntry` object
/// (`service_ports` `None`, hostnames allowed) or a STATIC ServiceEntry's
/// endpoint (the service's port names, IPs and sockets only).
fn workload_entry(
    we: &WorkloadEntrySpec,
    service_ports: Option<&BTreeSet<&str>>,
    allow_fqdn: bool,
    path: &str,
    f: &mut Findings,
) {
    crd_workload_entry(we, path, false, f);
    let address = we.address.as_str();
    let address_path = format!("{path}.address");
    if address.is_empty() {
        if we.network.is_empty() {
            f.error(address_path, WE, "an address (or a network) is required");
            return;
        }
        f.warn(
            &address_path,
            WE,
            format!("no address, reached through network {:?}", we.network),
        );
    }
    let unix = address.starts_with(UNIX_PREFIX);
    if let Some(socket) = address.strip_prefix(UNIX_PREFIX) {
        if let Err(e) = unix_address(socket) {
            f.error(&address_path, "ValidateUnixAddress", e);
        }
        if !we.ports.is_empty() {
            f.error(
                format!("{path}.ports"),
                WE,
                format!("unix endpoint {address} must not have ports"),
            );
        }
    } else if !address.is_empty() && !is_ip(address) {
        if !allow_fqdn {
            f.error(
                &address_path,
                WE,
                format!("endpoint address {address:?} is not an IP address (resolution STATIC)"),
            );
        } else if fqdn(address).is_err() {
            f.error(
                &address_path,
                WE,
                format!("endpoint address {address:?} is neither an IP nor an FQDN"),
            );
        }
    }
    endpoint_ports(we, service_ports, path, f);
    labels(&we.labels, &format!("{path}.labels"), f);
    if unix && service_ports.is_some_and(|p| p.len() != 1) {
        f.error(
            "spec.ports",
            WE,
            "unix endpoints need exactly 1 service port",
        );
    }
}

/// The port map of an endpoint: declared by the service (when known), a
/// valid name, a valid number.
fn endpoint_ports(
    we: &WorkloadEntrySpec,
    service_ports: Option<&BTreeSet<&str>>,
    path: &str,
    f: &mut Findings,
) {
    for (name, port) in &we.ports {
        let port_path = format!("{path}.ports.{name}");
        if service_ports.is_some_and(|p| !p.contains(name.as_str())) {
            f.error(
                &port_path,
                WE,
                format!("endpoint port {name:?} is not a port of the ServiceEntry"),
            );
        }
        if let Err(e) = port_name(name) {
            f.error(&port_path, PORT_NAME, e);
        }
        if let Err(e) = valid_port(u64::from(*port)) {
            f.error(&port_path, PORT, e);
        }
    }
}

/// The `ServiceEntry` CRD limits (`+kubebuilder` markers) that the webhook
/// does not repeat.
fn crd_service_entry(spec: &ServiceEntrySpec, f: &mut Findings) {
    max_items(f, "spec.hosts", spec.hosts.len(), 256);
    max_items(f, "spec.addresses", spec.addresses.len(), 256);
    max_items(f, "spec.ports", spec.ports.len(), 256);
    max_items(f, "spec.endpoints", spec.endpoints.len(), 4096);
    for (i, a) in spec.addresses.iter().enumerate() {
        max_length(f, &format!("spec.addresses[{i}]"), a, 64);
    }
    for (i, p) in spec.ports.iter().enumerate() {
        max_length(f, &format!("spec.ports[{i}].name"), &p.name, 256);
        max_length(f, &format!("spec.ports[{i}].protocol"), &p.protocol, 256);
    }
}

/// The `WorkloadEntry` CRD schema (also the schema of a ServiceEntry's
/// endpoints): limits, and the CEL rules on addresses and ports. With
/// `full` false the webhook's stricter checks run too, so only the two CEL
/// rules stricter than the webhook's are kept: an abstract socket must not
/// end in `/`, and a port name must be shorter than 63 characters.
fn crd_workload_entry(we: &WorkloadEntrySpec, path: &str, full: bool, f: &mut Findings) {
    max_length(f, &format!("{path}.address"), &we.address, 256);
    max_length(f, &format!("{path}.network"), &we.network, 2048);
    max_length(f, &format!("{path}.locality"), &we.locality, 2048);
    max_length(
        f,
        &format!("{path}.serviceAccount"),
        &we.service_account,
        253,
    );
    max_items(f, &format!("{path}.ports"), we.ports.len(), 128);
    max_items(f, &format!("{path}.labels"), we.labels.len(), 256);
    if full && we.address.is_empty() && we.network.is_empty() {
        f.error(
            format!("{path}.address"),
            CRD,
            "an address or a network is required",
        );
    }
    if let Some(socket) = we.address.strip_prefix(UNIX_PREFIX) {
        if full && !(socket.starts_with('/') || socket.starts_with('@')) {
            f.error(
                format!("{path}.address"),
                CRD,
                "a unix address must be an absolute path or an abstract socket",
            );
        }
        // The webhook already refuses a path ending in `/`, not `@name/`.
        if we.address.ends_with('/') && (full || socket.starts_with('@')) {
            f.error(
                format!("{path}.address"),
                CRD,
                "a unix address must not be a directory",
            );
        }
        if full && !we.ports.is_empty() {
            f.error(
                format!("{path}.ports"),
                CRD,
                "a unix address must not have ports",
            );
        }
    }
    for (name, port) in &we.ports {
        // CEL: `size(key) < 63 && key.matches(<DNS-1123 label>)`; the
        // webhook's `ValidatePortName` allows 63.
        let crd_ok = name.len() < 63 && is_label_chars(name);
        if !crd_ok && (full || is_dns1123_label(name)) {
            f.error(
                format!("{path}.ports.{name}"),
                CRD,
                "port names must be DNS-1123 labels shorter than 63 characters",
            );
        }
        if full && !(1..=65535).contains(port) {
            f.error(
                format!("{path}.ports.{name}"),
                CRD,
                "ports must be between 1 and 65535",
            );
        }
    }
}

fn max_items(f: &mut Findings, path: &str, len: usize, max: usize) {
    if len > max {
        f.error(path, CRD, format!("at most {max} items, not {len}"));
    }
}

fn max_length(f: &mut Findings, path: &str, s: &str, max: usize) {
    if s.len() > max {
        f.error(
            path,
            CRD,
            format!("at most {max} characters, not {}", s.len()),
        );
    }
}

/// Istio's `ValidateAlphaWorkloadSelector`: no empty key, no `*` anywhere;
/// an empty selector is only a warning (it selects the whole namespace).
fn alpha_workload_selector(selector: &WorkloadSelector, f: &mut Findings) {
    for (k, v) in &selector.labels {
        if k.is_empty() {
            f.error(
                "spec.workloadSelector.labels",
                SELECTOR,
                format!("empty key in selector \"{k}={v}\""),
            );
        }
        if k.contains('*') || v.contains('*') {
            f.error(
                format!("spec.workloadSelector.labels.{k}"),
                SELECTOR,
                format!("wildcards are not supported in selector \"{k}={v}\""),
            );
        }
    }
    if selector.labels.is_empty() {
        f.warn(
            "spec.workloadSelector",
            SELECTOR,
            "a workload selector without labels selects every workload of the namespace",
        );
    }
}

/// Istio's `validateExportTo` for a ServiceEntry: `.` (this namespace), `*`,
/// `~` (nobody) or a namespace name (DNS-1123 label); no duplicates (`.` and
/// the own namespace are one); `*` and `~` only alone.
fn export_to(namespace: &str, export_to: &[String], f: &mut Findings) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (i, e) in export_to.iter().enumerate() {
        let path = format!("spec.exportTo[{i}]");
        let key = if e == "." { namespace } else { e.as_str() };
        if seen.contains(key) {
            if key == e {
                f.error(path, EXPORT_TO, format!("{e:?} is listed twice"));
            } else {
                f.error(
                    path,
                    EXPORT_TO,
                    format!("`.` and the own namespace {namespace:?} are both listed"),
                );
            }
        } else if e == "~" || matches!(key, "." | "*") || is_dns1123_label(key) {
            seen.insert(key);
        } else {
            f.error(
                path,
                "visibility.Instance.Validate",
                format!("{e:?} is not `.`, `*`, `~` or a namespace name (DNS-1123 label)"),
            );
        }
    }
    if seen.contains("*") && export_to.len() > 1 {
        f.error(
            "spec.exportTo",
            EXPORT_TO,
            "`*` (public) cannot be combined with other values",
        );
    }
    if seen.contains("~") && export_to.len() > 1 {
        f.error(
            "spec.exportTo",
            EXPORT_TO,
            "`~` (nobody) cannot be combined with other values",
        );
    }
}

/// Istio's `labels.Instance.Validate`: keys are Kubernetes qualified names
/// (optional DNS prefix of at most 253 characters, `/`, name of at most 63),
/// values empty or a qualified name (Istio checks no value length).
pub(super) fn labels(labels: &BTreeMap<String, String>, path: &str, f: &mut Findings) {
    for (k, v) in labels {
        if let Err(e) = label_key(k) {
            f.error(path, LABELS, e);
        }
        if !v.is_empty() && !is_qualified_name_chars(v) {
            f.error(
                format!("{path}.{k}"),
                LABELS,
                format!("invalid label value {v:?}"),
            );
        }
    }
}

fn label_key(k: &str) -> Result<(), String> {
    let invalid = || format!("invalid label key {k:?}");
    let name = match k.split_once('/') {
        None => k,
        Some((prefix, name)) => {
            if prefix.is_empty() || !prefix.split('.').all(is_label_chars) {
                return Err(invalid());
            }
            if prefix.len() > 253 {
                return Err(format!("invalid label key {k:?} (prefix too long)"));
            }
            name
        }
    };
    if name.is_empty() || !is_qualified_name_chars(name) {
        return Err(invalid());
    }
    if name.len() > 63 {
        return Err(format!("invalid label key {k:?} (name too long)"));
    }
    Ok(())
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, without a length limit.
fn is_qualified_name_chars(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?`, without a length limit. Istio's
/// labels accept upper case.
fn is_label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// Istio's `labels.IsDNS1123Label`.
pub(super) fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_label_chars(s)
}

/// Istio's `labels.IsWildcardDNS1123Label`: a label, `*`, or a label
/// behind `*` or `*-` (`*foo`, `*-foo`).
fn is_wildcard_dns1123_label(s: &str) -> bool {
    s.len() <= 63
        && (s == "*"
            || is_label_chars(s)
            || s.strip_prefix("*-").is_some_and(is_label_chars)
            || s.strip_prefix('*').is_some_and(is_label_chars))
}

/// Istio's `ValidatePortName`: a DNS-1123 label.
pub(super) fn port_name(name: &str) -> Result<(), String> {
    if is_dns1123_label(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?} (must be a DNS-1123 label)"
        ))
    }
}

/// Istio's `ValidatePort`.
pub(super) fn valid_port(port: u64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("port number {port} is not in 1..65535"))
    }
}

/// The checks `ValidateFQDN` and `ValidateWildcardDomain` share.
fn domain_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!(
            "domain name {name:?} is longer than 255 characters"
        ));
    }
    if name.is_empty() {
        return Err("empty domain name".into());
    }
    Ok(())
}

/// Istio's `ValidateDNS1123Labels`: dot-separated DNS-1123 labels, a
/// top-level label that is not a number (as Go's `strconv.Atoi` reads one),
/// and an optional trailing dot.
fn dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts[parts.len() - 1];
    if tld.parse::<i64>().is_ok() {
        return Err(format!(
            "domain name {domain:?} has an all-numeric top-level label {tld:?}"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        if i == parts.len() - 1 && label.is_empty() {
            break;
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} has an invalid label {label:?}"
            ));
        }
    }
    Ok(())
}

/// Istio's `ValidateFQDN`.
fn fqdn(name: &str) -> Result<(), String> {
    domain_preconditions(name)?;
    dns1123_labels(name)
}

/// Istio's `ValidateWildcardDomain`: like an FQDN, but the first label may be
/// a wildcard label (and a single label may be all-numeric).
fn wildcard_domain(domain: &str) -> Result<(), String> {
    domain_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    if !is_wildcard_dns1123_label(first) {
        return Err(format!(
            "domain name {domain:?} has an invalid label {first:?}"
        ));
    }
    rest.map_or(Ok(()), dns1123_labels)
}

/// Istio's `ValidateIPSubnet`: with one `/` a CIDR prefix (Go's
/// `netip.ParsePrefix`), otherwise an address (`netip.ParseAddr`).
fn ip_subnet(s: &str) -> Result<(), String> {
    if s.matches('/').count() == 1 {
        let (ip, bits) = s.split_once('/').unwrap_or_default();
        let max = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => 32,
            Ok(IpAddr::V6(_)) => 128,
            Err(_) => return Err(format!("{s} is not a valid CIDR block")),
        };
        // Go: decimal, no sign, no leading zero except "0" itself.
        let canonical = !bits.is_empty()
            && bits.bytes().all(|b| b.is_ascii_digit())
            && (bits == "0" || !bits.starts_with('0'));
        match bits.parse::<u32>() {
            Ok(b) if canonical && b <= max => Ok(()),
            _ => Err(format!("{s} is not a valid CIDR block")),
        }
    } else if is_ip_with_zone(s) {
        Ok(())
    } else {
        Err(format!("{s} is not a valid IP"))
    }
}

/// An IP address as Go's `netip.ParseAddr` reads it (an IPv6 zone allowed).
fn is_ip_with_zone(s: &str) -> bool {
    match s.split_once('%') {
        Some((ip, zone)) => !zone.is_empty() && ip.parse::<Ipv6Addr>().is_ok(),
        None => s.parse::<IpAddr>().is_ok(),
    }
}

/// An endpoint address that is an IP (no zone).
fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

/// Istio's `ValidateUnixAddress` (the part after `unix://`): not empty; an
/// abstract socket (`@name`), or an absolute path that is not a directory.
fn unix_address(socket: &str) -> Result<(), String> {
    if socket.is_empty() {
        return Err("a unix address must not be empty".into());
    }
    if socket.starts_with('@') {
        return Ok(());
    }
    if !socket.starts_with('/') || socket.ends_with('/') {
        return Err(format!("{socket} is not an absolute path to a file"));
    }
    Ok(())
}

/// Istio's `protocol.Instance`: the protocols `protocol.Parse` knows (case
/// insensitive); anything else is `Unsupported`, which the webhook refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Tcp,
    Udp,
    Grpc,
    GrpcWeb,
    Http,
    HttpProxy,
    Http2,
    Https,
    Tls,
    Mongo,
    Redis,
    Mysql,
}

impl Protocol {
    /// `protocol.Parse`, `None` for `Unsupported` (and for the empty string,
    /// which means "sniff" and is allowed where it is read).
    pub(super) fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "grpc" => Protocol::Grpc,
            "grpc-web" => Protocol::GrpcWeb,
            "http" => Protocol::Http,
            "http_proxy" => Protocol::HttpProxy,
            "http2" => Protocol::Http2,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "mongo" => Protocol::Mongo,
            "redis" => Protocol::Redis,
            "mysql" => Protocol::Mysql,
            _ => return None,
        })
    }

    fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http
                | Protocol::Http2
                | Protocol::HttpProxy
                | Protocol::Grpc
                | Protocol::GrpcWeb
        )
    }

    fn is_tls(self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    fn is_tcp(self) -> bool {
        matches!(
            self,
            Protocol::Tcp
                | Protocol::Https
                | Protocol::Tls
                | Protocol::Mongo
                | Protocol::Redis
                | Protocol::Mysql
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_follow_istio() {
        assert!(wildcard_domain("*-foo.example.com").is_ok());
        assert!(wildcard_domain("*x").is_ok());
        assert!(wildcard_domain("*.").is_ok());
        assert!(wildcard_domain("123").is_ok());
        assert!(wildcard_domain("foo.123").is_err());
        assert!(wildcard_domain("foo*.example.com").is_err());
        assert!(wildcard_domain("Foo.Example.COM").is_ok());
        assert!(fqdn("123").is_err());
        assert!(fqdn("istio.io.").is_ok());
        assert!(fqdn("*.istio.io").is_err());
        assert!(ip_subnet("1.2.3.4/08").is_err());
        assert!(ip_subnet("1.2.3.4/0").is_ok());
        assert!(ip_subnet("001:db8::").is_ok());
        assert!(ip_subnet("fe80::1%eth0").is_ok());
        assert!(ip_subnet("01.2.3.4").is_err());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("a/b/c").is_err());
        assert!(label_key("-a").is_err());
        assert!(label_key(&"a".repeat(64)).is_err());
        assert!(unix_address("@abstract").is_ok());
        assert!(unix_address("relative").is_err());
        assert!(unix_address("/dir/").is_err());
        assert_eq!(Protocol::parse("THRIFT"), None);
        assert_eq!(Protocol::parse("grpc-WEB"), Some(Protocol::GrpcWeb));
    }
}
