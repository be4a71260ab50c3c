//! `WorkloadGroup`: its YAML schema, Istio's validation
//! (`ValidateWorkloadGroup` and `validateReadinessProbe` in
//! `pkg/config/validation`), and the registry's form.
//!
//! As in Istio, the template is not validated as a WorkloadEntry (its
//! address is filled in by registration, so it may be absent); only what
//! the registry cannot hold is refused (a port outside 1..65535). The
//! template's `address` is accepted and not kept: a registered workload's
//! address is its own.

use std::collections::BTreeMap;
use std::time::Duration;

use meshreg_registry::{GroupTemplate, HealthCheck, Locality, ReadinessProbe, WorkloadGroup};
use serde::Deserialize;

use super::validate::{Findings, labels, valid_port};

const RULE: &str = "ValidateWorkloadGroup";
const PROBE: &str = "validateReadinessProbe";

/// `WorkloadGroup.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WorkloadGroupSpec {
    #[serde(default)]
    metadata: Option<GroupMetadataSpec>,
    #[serde(default)]
    template: Option<TemplateSpec>,
    #[serde(default)]
    probe: Option<ProbeSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GroupMetadataSpec {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateSpec {
    #[serde(default)]
    #[allow(dead_code)] // accepted, not kept (see the module docs)
    address: Option<String>,
    #[serde(default)]
    ports: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    locality: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    service_account: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProbeSpec {
    #[serde(default)]
    initial_delay_seconds: Option<i64>,
    #[serde(default)]
    timeout_seconds: Option<i64>,
    #[serde(default)]
    period_seconds: Option<i64>,
    #[serde(default)]
    success_threshold: Option<i64>,
    #[serde(default)]
    failure_threshold: Option<i64>,
    #[serde(default)]
    http_get: Option<HttpGetSpec>,
    #[serde(default)]
    tcp_socket: Option<TcpSocketSpec>,
    #[serde(default)]
    exec: Option<ExecSpec>,
    #[serde(default)]
    grpc: Option<GrpcSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpGetSpec {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    port: Option<u64>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    http_headers: Option<Vec<HeaderSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct HeaderSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TcpSocketSpec {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ExecSpec {
    #[serde(default)]
    command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GrpcSpec {
    #[serde(default)]
    port: Option<u64>,
    #[serde(default)]
    service: Option<String>,
}

/// Whether `name` is an HTTP header field name (RFC 7230 `token`), what
/// Istio's `ValidateProbeHeaderName` asks.
fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// A port of the probe: checked with Istio's `ValidatePort`, 0 when not.
fn probe_port(port: Option<u64>, path: &str, f: &mut Findings) -> u16 {
    let port = port.unwrap_or(0);
    match valid_port(port) {
        Ok(()) => u16::try_from(port).unwrap_or(0),
        Err(e) => {
            f.error(path, PROBE, e);
            0
        }
    }
}

/// A duration in seconds, `default` for 0 (the agent's reading of an
/// unset field).
fn seconds(v: Option<i64>, default: Duration) -> Duration {
    match v.unwrap_or(0) {
        s if s > 0 => Duration::from_secs(s.unsigned_abs()),
        _ => default,
    }
}

fn probe(p: &ProbeSpec, f: &mut Findings) -> Option<ReadinessProbe> {
    let base = "spec.probe";
    for (field, v) in [
        ("periodSeconds", p.period_seconds),
        ("initialDelaySeconds", p.initial_delay_seconds),
        ("timeoutSeconds", p.timeout_seconds),
        ("successThreshold", p.success_threshold),
        ("failureThreshold", p.failure_threshold),
    ] {
        if v.unwrap_or(0) < 0 {
            f.error(
                format!("{base}.{field}"),
                PROBE,
                format!("{field} must be non-negative"),
            );
        }
    }
    let set = [
        p.http_get.is_some(),
        p.tcp_socket.is_some(),
        p.exec.is_some(),
        p.grpc.is_some(),
    ];
    if set.iter().filter(|s| **s).count() > 1 {
        f.error(
            base,
            PROBE,
            "only one of httpGet, tcpSocket, exec and grpc may be set",
        );
    }
    let check = if let Some(h) = &p.http_get {
        let path = format!("{base}.httpGet");
        let port = probe_port(h.port, &format!("{path}.port"), f);
        let https = match h.scheme.as_deref().unwrap_or("") {
            "" | "HTTP" => false,
            "HTTPS" => true,
            other => {
                f.error(
                    format!("{path}.scheme"),
                    PROBE,
                    format!("httpGet.scheme must be one of \"HTTPS\", \"HTTP\" (not {other:?})"),
                );
                false
            }
        };
        let mut headers = Vec::new();
        for (i, header) in h.http_headers.iter().flatten().enumerate() {
            let name = header.name.clone().unwrap_or_default();
            if !header_name(&name) {
                f.error(
                    format!("{path}.httpHeaders[{i}].name"),
                    "ValidateProbeHeaderName",
                    format!("invalid header name {name:?}"),
                );
            }
            headers.push((name, header.value.clone().unwrap_or_default()));
        }
        HealthCheck::HttpGet {
            path: h.path.clone().unwrap_or_default(),
            port,
            host: h.host.clone().unwrap_or_default(),
            https,
            headers,
        }
    } else if let Some(t) = &p.tcp_socket {
        HealthCheck::TcpSocket {
            host: t.host.clone().unwrap_or_default(),
            port: probe_port(t.port, &format!("{base}.tcpSocket.port"), f),
        }
    } else if let Some(e) = &p.exec {
        let command = e.command.clone().unwrap_or_default();
        if command.is_empty() {
            f.error(
                format!("{base}.exec.command"),
                PROBE,
                "exec.command is required",
            );
        }
        HealthCheck::Exec { command }
    } else if let Some(g) = &p.grpc {
        HealthCheck::Grpc {
            port: probe_port(g.port, &format!("{base}.grpc.port"), f),
            service: g.service.clone().unwrap_or_default(),
        }
    } else {
        f.error(
            base,
            PROBE,
            "a probe needs a health check method: httpGet, tcpSocket, exec or grpc",
        );
        return None;
    };
    let defaults = ReadinessProbe::default();
    let count = |v: Option<i64>, default: u32| match v.unwrap_or(0) {
        n if n > 0 => u32::try_from(n).unwrap_or(u32::MAX),
        _ => default,
    };
    Some(ReadinessProbe {
        initial_delay: seconds(p.initial_delay_seconds, Duration::ZERO),
        timeout: seconds(p.timeout_seconds, defaults.timeout),
        period: seconds(p.period_seconds, defaults.period),
        success_threshold: count(p.success_threshold, defaults.success_threshold),
        failure_threshold: count(p.failure_threshold, defaults.failure_threshold),
        check,
    })
}

/// Validates `spec` (Istio's `ValidateWorkloadGroup`) and converts it.
/// `None` when it has errors.
pub(crate) fn validate_and_convert(
    spec: &WorkloadGroupSpec,
    name: &str,
    namespace: &str,
) -> (Option<WorkloadGroup>, Findings) {
    let mut f = Findings::default();
    let meta = spec.metadata.clone().unwrap_or_default();
    let meta_labels = meta.labels.unwrap_or_default();
    labels(&meta_labels, "spec.metadata.labels", &mut f);
    let Some(t) = &spec.template else {
        f.error("spec.template", RULE, "template is required");
        return (None, f);
    };
    let mut ports = BTreeMap::new();
    for (port_name, number) in t.ports.iter().flatten() {
        match valid_port(*number) {
            Ok(()) => {
                ports.insert(port_name.clone(), u16::try_from(*number).unwrap_or(0));
            }
            Err(e) => f.error(format!("spec.template.ports.{port_name}"), RULE, e),
        }
    }
    let template_labels = t.labels.clone().unwrap_or_default();
    labels(&template_labels, "spec.template.labels", &mut f);
    let probe = spec.probe.as_ref().and_then(|p| probe(p, &mut f));
    if !f.errors.is_empty() {
        return (None, f);
    }
    let group = WorkloadGroup {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: meta_labels,
        annotations: meta.annotations.unwrap_or_default(),
        template: GroupTemplate {
            labels: template_labels,
            ports,
            network: t.network.clone().unwrap_or_default(),
            locality: Locality::parse(t.locality.as_deref().unwrap_or_default()),
            weight: t.weight.unwrap_or(0),
            service_account: t.service_account.clone().unwrap_or_default(),
        },
        probe,
    };
    (Some(group), f)
}
