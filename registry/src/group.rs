//! Istio's `WorkloadGroup` in the registry's terms: the template VM
//! workloads are registered from, and the readiness probe that decides
//! their health.
//!
//! The registry stores groups as keyed objects of their source, beside
//! Sidecars and rules, and lists them in the [`View`](crate::View) for
//! what registers workloads from them (VM auto-registration) and for the
//! operator's inspection. A group contributes no endpoint by itself: the
//! WorkloadEntries made from it do. Its change therefore touches no host.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::Locality;

/// A `WorkloadGroup` (`networking.istio.io`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadGroup {
    /// Its name.
    pub name: String,
    /// Its namespace (the namespace of the workloads registered from it).
    pub namespace: String,
    /// `spec.metadata.labels`: labels every registered WorkloadEntry gets
    /// as metadata labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.metadata.annotations`: annotations every registered
    /// WorkloadEntry gets.
    pub annotations: BTreeMap<String, String>,
    /// `spec.template`: what every registered WorkloadEntry starts from.
    pub template: GroupTemplate,
    /// `spec.probe`: how the workloads' readiness is checked; `None`: they
    /// are healthy as soon as registered.
    pub probe: Option<ReadinessProbe>,
}

/// The WorkloadEntry template of a group (its address is the registering
/// workload's own, so a template address is not kept).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GroupTemplate {
    /// Labels of the workloads.
    pub labels: BTreeMap<String, String>,
    /// Service port name → the workload's port.
    pub ports: BTreeMap<String, u16>,
    /// The network (empty: the source's).
    pub network: String,
    /// The locality.
    pub locality: Locality,
    /// Load-balancing weight (0: unset, Envoy's 1).
    pub weight: u32,
    /// The service account (empty: `default`, as Istio).
    pub service_account: String,
}

/// Istio's `ReadinessProbe`, with its defaults applied (timeout 1 s,
/// period 10 s, success threshold 1, failure threshold 3, as the proto
/// documents and the agent applies for a zero value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadinessProbe {
    /// Wait after the workload starts before the first check.
    pub initial_delay: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Time between checks.
    pub period: Duration,
    /// Consecutive successes that make an unhealthy workload healthy.
    pub success_threshold: u32,
    /// Consecutive failures that make a healthy workload unhealthy.
    pub failure_threshold: u32,
    /// What a check does.
    pub check: HealthCheck,
}

/// One way to check a workload (the probe's `health_check_method`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HealthCheck {
    /// An HTTP GET; healthy on a 2xx or 3xx answer.
    HttpGet {
        /// The request path.
        path: String,
        /// The workload's port.
        port: u16,
        /// The host to connect to (empty: the workload's address).
        host: String,
        /// `true` for HTTPS.
        https: bool,
        /// Request headers (name, value), in order.
        headers: Vec<(String, String)>,
    },
    /// A TCP connection that opens.
    TcpSocket {
        /// The host to connect to (empty: the workload's address).
        host: String,
        /// The port.
        port: u16,
    },
    /// A gRPC health check (`grpc.health.v1.Health/Check`).
    Grpc {
        /// The port.
        port: u16,
        /// The service name asked for (empty: the server as a whole).
        service: String,
    },
    /// A command run on the workload's host; exit status 0 is healthy.
    Exec {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

impl Default for ReadinessProbe {
    fn default() -> Self {
        ReadinessProbe {
            initial_delay: Duration::ZERO,
            timeout: Duration::from_secs(1),
            period: Duration::from_secs(10),
            success_threshold: 1,
            failure_threshold: 3,
            check: HealthCheck::TcpSocket {
                host: String::new(),
                port: 0,
            },
        }
    }
}

impl std::fmt::Display for HealthCheck {
    /// A short form for logs and debug pages: `httpGet https://:8080/ready`,
    /// `tcpSocket :8080`, `grpc :9090 (svc)`, `exec [cmd ...]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthCheck::HttpGet {
                path,
                port,
                host,
                https,
                ..
            } => {
                let scheme = if *https { "https" } else { "http" };
                write!(f, "httpGet {scheme}://{host}:{port}{path}")
            }
            HealthCheck::TcpSocket { host, port } => write!(f, "tcpSocket {host}:{port}"),
            HealthCheck::Grpc { port, service } if service.is_empty() => {
                write!(f, "grpc :{port}")
            }
            HealthCheck::Grpc { port, service } => write!(f, "grpc :{port} ({service})"),
            HealthCheck::Exec { command } => write!(f, "exec {command:?}"),
        }
    }
}
