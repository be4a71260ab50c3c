//! `meshreg ctl`: what `istioctl proxy-status` and `istioctl proxy-config`
//! do for istiod, for a running meshreg. It reads the daemon's JSON debug
//! endpoints (shapes in [`crate::debug`]) over its HTTP port and prints
//! tables (default), JSON or YAML.
//!
//! # Exit codes
//!
//! - 0: done;
//! - 2: bad arguments (clap);
//! - 66 (`EX_NOINPUT`): the daemon does not know the proxy named;
//! - 69 (`EX_UNAVAILABLE`): the daemon cannot be reached;
//! - 70 (`EX_SOFTWARE`): the daemon answered something unexpected;
//! - 77 (`EX_NOPERM`): the daemon refused (`/debug/*` from another host
//!   without the right bearer token).
//!
//! Errors go to stderr, one line, saying what was asked of which address.

use std::io::Write;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand, ValueEnum};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use serde::Serialize;
use tabwriter::TabWriter;

use crate::debug;

/// Exit code: the daemon does not know the proxy.
pub const EXIT_UNKNOWN_PROXY: u8 = 66;
/// Exit code: the daemon cannot be reached.
pub const EXIT_UNREACHABLE: u8 = 69;
/// Exit code: the daemon answered something unexpected.
pub const EXIT_PROTOCOL: u8 = 70;
/// Exit code: the daemon refused the request.
pub const EXIT_FORBIDDEN: u8 = 77;

/// Where the daemon listens unless told otherwise (Istio's monitoring
/// port on loopback).
pub const DEFAULT_ADDR: &str = "127.0.0.1:15014";

/// How long one request to the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `meshreg ctl`'s arguments.
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// The daemon's HTTP address, `host:port` (default: `http.listen` of
    /// the config given as `meshreg --config FILE ctl …`, before `ctl`,
    /// else `127.0.0.1:15014`).
    #[arg(long, global = true, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub addr: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// A file holding the daemon's debug bearer token (`http.debug_token_file`),
    /// needed when the daemon is not on this host; `$MESHREG_DEBUG_TOKEN`
    /// works too.
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// What to show.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns, as istioctl prints them.
    Table,
    /// The daemon's JSON (for `proxy-config`: the resources as sent).
    Json,
    /// The same as YAML.
    Yaml,
}

/// `meshreg ctl` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Every connected proxy and, per type, whether it is SYNCED, STALE
    /// (sent, not acknowledged), NACKED or NOT SENT.
    ProxyStatus,
    /// What one proxy was sent.
    ProxyConfig {
        /// Which resources.
        #[command(subcommand)]
        what: ProxyConfig,
    },
    /// The merged registry: services with their declarations per source
    /// (`--endpoints`: every endpoint instead).
    Registry {
        /// List endpoints (source, cluster, network, locality, health).
        #[arg(long)]
        endpoints: bool,
    },
    /// Each source's status, objects and last error.
    Sources,
    /// The objects the sources refuse now, with file or object, document,
    /// field and reason.
    Rejected,
}

/// `proxy-config` resource kinds.
#[derive(Debug, Clone, Subcommand)]
pub enum ProxyConfig {
    /// Clusters (CDS): SERVICE FQDN, PORT, SUBSET, DIRECTION, TYPE.
    Clusters {
        /// The proxy's node id.
        proxy: String,
        /// Which clusters.
        #[command(flatten)]
        filter: ClusterFilter,
    },
    /// Endpoints (EDS): ENDPOINT, STATUS, OUTLIER CHECK, CLUSTER.
    Endpoints {
        /// The proxy's node id.
        proxy: String,
        /// Only this cluster's endpoints (its full name).
        #[arg(long)]
        cluster: Option<String>,
        /// Which clusters.
        #[command(flatten)]
        filter: ClusterFilter,
    },
    /// Listeners (LDS): the API listeners of a proxyless gRPC client.
    Listeners {
        /// The proxy's node id.
        proxy: String,
    },
    /// Routes (RDS): the route configurations of a proxyless gRPC client.
    Routes {
        /// The proxy's node id.
        proxy: String,
    },
}

/// istioctl's cluster filters (the same matching: substrings of the FQDN
/// and subset, the exact port and direction).
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterFilter {
    /// Only clusters whose service FQDN contains this.
    #[arg(long)]
    pub fqdn: Option<String>,
    /// Only clusters of this port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only clusters whose subset contains this.
    #[arg(long)]
    pub subset: Option<String>,
    /// Only clusters of this direction.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
}

/// A cluster's direction, as Istio names clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    /// `outbound|…`: to a service.
    Outbound,
    /// `inbound|…`: to the proxy's own workload.
    Inbound,
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The daemon cannot be reached.
    #[error("cannot reach meshreg at {addr} ({path}): {reason}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The endpoint asked.
        path: String,
        /// Why.
        reason: String,
    },
    /// The daemon does not know the proxy.
    #[error("meshreg at {addr} ({path}): {reason}")]
    UnknownProxy {
        /// The address asked.
        addr: String,
        /// The endpoint asked.
        path: String,
        /// Its answer.
        reason: String,
    },
    /// The daemon refused the request.
    #[error("meshreg at {addr} refused {path}: {reason}")]
    Forbidden {
        /// The address asked.
        addr: String,
        /// The endpoint asked.
        path: String,
        /// Its answer.
        reason: String,
    },
    /// Whoever reads the output went away (`ctl … | head`): not an error
    /// of ctl's; the command stops quietly.
    #[error("output closed")]
    OutputClosed,
    /// The token file cannot be read.
    #[error("reading the token file {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The daemon answered something unexpected.
    #[error("unexpected answer from meshreg at {addr} ({path}): {reason}")]
    Protocol {
        /// The address asked.
        addr: String,
        /// The endpoint asked.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Unreachable { .. } => EXIT_UNREACHABLE,
            CtlError::UnknownProxy { .. } => EXIT_UNKNOWN_PROXY,
            CtlError::Forbidden { .. } => EXIT_FORBIDDEN,
            CtlError::Token { .. } => EXIT_PROTOCOL,
            CtlError::OutputClosed => 0,
            CtlError::Protocol { .. } => EXIT_PROTOCOL,
        }
    }
}

/// Runs one `ctl` command, writing its output to `out`.
///
/// # Errors
///
/// [`CtlError`]: the daemon unreachable, the proxy unknown, or an answer
/// that is not what the daemon's endpoints return.
pub fn run(args: &CtlArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CtlError::Token {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?
                .trim()
                .to_string(),
        ),
        None => std::env::var("MESHREG_DEBUG_TOKEN").ok(),
    };
    let addr = args.addr.as_deref().unwrap_or(DEFAULT_ADDR);
    // `http://host:port` is what people paste.
    let addr = addr
        .strip_prefix("http://")
        .unwrap_or(addr)
        .trim_end_matches('/');
    let client = Client::new(addr, token);
    match &args.command {
        CtlCommand::ProxyStatus => {
            let list: Vec<debug::ProxyStatus> = client.get("/debug/syncz")?;
            emit(args.output, out, &list, |w| proxy_status_table(w, &list))
        }
        CtlCommand::ProxyConfig { what } => proxy_config(&client, args.output, what, out),
        CtlCommand::Registry { endpoints: false } => {
            let list: Vec<debug::Service> = client.get("/debug/registryz")?;
            emit(args.output, out, &list, |w| services_table(w, &list))
        }
        CtlCommand::Registry { endpoints: true } => {
            let list: Vec<debug::Endpoint> = client.get("/debug/endpointz")?;
            emit(args.output, out, &list, |w| {
                endpoints_registry_table(w, &list)
            })
        }
        CtlCommand::Sources => {
            let list: Vec<debug::SourceStatus> = client.get("/debug/sourcez")?;
            emit(args.output, out, &list, |w| sources_table(w, &list))
        }
        CtlCommand::Rejected => {
            let list: Vec<debug::Rejected> = client.get("/debug/rejected")?;
            emit(args.output, out, &list, |w| rejected_table(w, &list))
        }
    }
}

struct Client {
    agent: ureq::Agent,
    addr: String,
    token: Option<String>,
}

impl Client {
    fn new(addr: &str, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        Client {
            agent,
            addr: addr.to_string(),
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// GETs `path` and decodes its JSON; a 404 is an unknown proxy.
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        let url = format!("http://{}{}", self.addr, path);
        let protocol = |reason: String| CtlError::Protocol {
            addr: self.addr.clone(),
            path: path.to_string(),
            reason,
        };
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let mut resp = request.call().map_err(|e| CtlError::Unreachable {
            addr: self.addr.clone(),
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| protocol(e.to_string()))?;
        match status {
            200 => serde_json::from_str(&body)
                .map_err(|e| protocol(format!("not meshreg's JSON ({e}): {}", first_line(&body)))),
            // Only meshreg's config dump says "unknown proxy", in JSON;
            // any other 404 is not meshreg (or not this version of it).
            404 if path.starts_with("/debug/config_dump") => match json_error(&body) {
                Some(reason) => Err(CtlError::UnknownProxy {
                    addr: self.addr.clone(),
                    path: path.to_string(),
                    reason,
                }),
                None => Err(protocol(format!("HTTP 404: {}", first_line(&body)))),
            },
            403 => Err(CtlError::Forbidden {
                addr: self.addr.clone(),
                path: path.to_string(),
                reason: json_error(&body).unwrap_or_else(|| first_line(&body)),
            }),
            code => Err(protocol(format!("HTTP {code}: {}", first_line(&body)))),
        }
    }

    fn config_dump(&self, proxy: &str) -> Result<debug::ConfigDump, CtlError> {
        let mut q = String::new();
        for b in proxy.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                q.push(b as char);
            } else {
                q.push_str(&format!("%{b:02X}"));
            }
        }
        self.get(&format!("/debug/config_dump?proxyID={q}"))
    }
}

/// The `error` of a JSON error body.
fn json_error(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("error")?
        .as_str()
        .map(str::to_string)
}

/// The first line of `body`, at most 200 characters, control characters
/// escaped: enough to recognise what answered.
fn first_line(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("");
    cell(&line.chars().take(200).collect::<String>()).into_owned()
}

/// `s` with control characters escaped (`\n`, `\u{1b}` …), so text a proxy
/// chose (its node id, its NACK message) cannot forge rows or drive the
/// terminal.
fn cell(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_debug().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Writes `value` as JSON or YAML, or the table `table` writes.
fn emit<T: Serialize>(
    output: Output,
    out: &mut dyn Write,
    value: &T,
    table: impl FnOnce(&mut TabWriter<Vec<u8>>) -> std::io::Result<()>,
) -> Result<(), CtlError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::BrokenPipe => CtlError::OutputClosed,
        _ => CtlError::Protocol {
            addr: String::new(),
            path: "<stdout>".into(),
            reason: e.to_string(),
        },
    };
    match output {
        Output::Json => {
            let text = serde_json::to_string_pretty(value).map_err(|e| io(e.into()))?;
            writeln!(out, "{text}").map_err(io)
        }
        Output::Yaml => {
            let text = serde_yaml_ng::to_string(value).map_err(|e| io(std::io::Error::other(e)))?;
            write!(out, "{text}").map_err(io)
        }
        Output::Table => {
            let mut tw = TabWriter::new(Vec::new()).padding(3);
            table(&mut tw).map_err(io)?;
            tw.flush().map_err(io)?;
            let bytes = tw
                .into_inner()
                .map_err(|e| io(std::io::Error::other(e.to_string())))?;
            out.write_all(&bytes).map_err(io)
        }
    }
}

fn proxy_status_table(
    w: &mut TabWriter<Vec<u8>>,
    list: &[debug::ProxyStatus],
) -> std::io::Result<()> {
    writeln!(
        w,
        "NAME\tNAMESPACE\tMODE\tCDS\tLDS\tEDS\tRDS\tVERSION\tNACKS\tCONNECTED"
    )?;
    let mut nacks = Vec::new();
    for p in list {
        let state = |t: &str| {
            p.types
                .iter()
                .find(|s| s.type_short == t)
                .map_or("NOT SENT", |s| s.state.as_str())
        };
        // The version the proxy accepted last, per type.
        let version: Vec<String> = p
            .types
            .iter()
            .filter_map(|s| Some(format!("{}={}", s.type_short, s.acked_version.as_ref()?)))
            .collect();
        let count: u64 = p.types.iter().map(|s| s.nacks).sum();
        writeln!(
            w,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            cell(&p.proxy),
            cell(dash(&p.namespace)),
            p.mode,
            state("cds"),
            state("lds"),
            state("eds"),
            state("rds"),
            dash(&version.join(",")),
            count,
            p.connected_since
        )?;
        for s in &p.types {
            if let Some(msg) = &s.last_nack {
                nacks.push(format!(
                    "{} {} rejected version {}: {}",
                    cell(&p.proxy),
                    s.type_short,
                    s.last_nack_version.as_deref().unwrap_or("?"),
                    cell(msg)
                ));
            }
        }
    }
    w.flush()?;
    if !nacks.is_empty() {
        writeln!(w, "\nLAST NACKS")?;
        for n in nacks {
            writeln!(w, "{n}")?;
        }
    }
    Ok(())
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// The parts of an Istio cluster name `direction|port|subset|fqdn`; a name
/// of another form is its own FQDN with no port, subset or direction.
fn name_parts(name: &str) -> (&str, &str, &str, &str) {
    let parts: Vec<&str> = name.splitn(4, '|').collect();
    match parts.as_slice() {
        [direction, port, subset, fqdn] => (fqdn, port, subset, direction),
        _ => (name, "", "", ""),
    }
}

impl ClusterFilter {
    fn matches(&self, name: &str) -> bool {
        let (fqdn, port, subset, direction) = name_parts(name);
        self.fqdn.as_deref().is_none_or(|f| fqdn.contains(f))
            && self.port.is_none_or(|p| port == p.to_string())
            && self.subset.as_deref().is_none_or(|s| subset.contains(s))
            && self.direction.is_none_or(|d| {
                direction
                    == match d {
                        Direction::Outbound => "outbound",
                        Direction::Inbound => "inbound",
                    }
            })
    }
}

/// The protobuf message inside a base64 `Any`.
fn decode<M: Message + Default>(any: &str) -> Option<M> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(any).ok()?;
    let any = Any::decode(bytes.as_slice()).ok()?;
    M::decode(any.value.as_slice()).ok()
}

fn proxy_config(
    client: &Client,
    output: Output,
    what: &ProxyConfig,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let (proxy, short) = match what {
        ProxyConfig::Clusters { proxy, .. } => (proxy, "cds"),
        ProxyConfig::Endpoints { proxy, .. } => (proxy, "eds"),
        ProxyConfig::Listeners { proxy } => (proxy, "lds"),
        ProxyConfig::Routes { proxy } => (proxy, "rds"),
    };
    let dump = client.config_dump(proxy)?;
    // A LEDS Envoy's endpoints are its members (see the README's LEDS).
    let members: Vec<debug::HeldResource> = dump
        .types
        .iter()
        .filter(|t| short == "eds" && t.type_short == "leds")
        .flat_map(|t| t.resources.iter().cloned())
        .collect();
    let mut resources: Vec<debug::HeldResource> = dump
        .types
        .into_iter()
        .filter(|t| t.type_short == short)
        .flat_map(|t| t.resources)
        .collect();
    match what {
        ProxyConfig::Clusters { filter, .. } => {
            resources.retain(|r| filter.matches(&r.name));
            let sent = as_sent(output, &resources)?;
            emit(output, out, &sent, |w| clusters_table(w, &resources))
        }
        ProxyConfig::Endpoints {
            cluster, filter, ..
        } => {
            resources.retain(|r| {
                filter.matches(&r.name) && cluster.as_deref().is_none_or(|c| c == r.name)
            });
            let sent = as_sent(output, &resources)?;
            emit(output, out, &sent, |w| {
                endpoints_table(w, &resources, &members)
            })
        }
        ProxyConfig::Listeners { .. } | ProxyConfig::Routes { .. } => {
            // Proxyless gRPC clients' API listeners and route
            // configurations (Envoys hold none from meshreg).
            let sent = as_sent(output, &resources)?;
            emit(output, out, &sent, |w| {
                writeln!(w, "NAME\tVERSION")?;
                for r in &resources {
                    writeln!(w, "{}\t{}", cell(&r.name), r.version)?;
                }
                Ok(())
            })
        }
    }
}

/// For JSON and YAML output: the resources as Envoy's own JSON (the proto3
/// JSON mapping, with `@type`, as istioctl and Envoy's `/config_dump`
/// print them), decoded from the bytes the proxy was sent. A resource the
/// proxy holds in a version the server no longer has is left out, with a
/// note on stderr. Nothing for table output.
///
/// The mapping is `xds-api`'s (pbjson over the same Envoy protos):
/// `envoy-types`, which the server encodes with, has no JSON mapping.
fn as_sent(
    output: Output,
    resources: &[debug::HeldResource],
) -> Result<Vec<serde_json::Value>, CtlError> {
    use prost013::Message as _;
    if output == Output::Table {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        let Some(any) = &r.any else {
            eprintln!(
                "{}: the proxy holds version {}, which the server no longer has; left out",
                r.name, r.version
            );
            continue;
        };
        let bad = |reason: String| CtlError::Protocol {
            addr: String::new(),
            path: "/debug/config_dump".into(),
            reason: format!("{}: {reason}", r.name),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(any)
            .map_err(|e| bad(e.to_string()))?;
        let any = xds_api::pb::google::protobuf::Any::decode(bytes.as_slice())
            .map_err(|e| bad(e.to_string()))?;
        out.push(serde_json::to_value(&any).map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

fn clusters_table(w: &mut TabWriter<Vec<u8>>, list: &[debug::HeldResource]) -> std::io::Result<()> {
    writeln!(w, "SERVICE FQDN\tPORT\tSUBSET\tDIRECTION\tTYPE")?;
    for r in list {
        let (fqdn, port, subset, direction) = name_parts(&r.name);
        let kind = match r.any.as_deref().and_then(decode::<Cluster>) {
            Some(c) => match c.cluster_discovery_type {
                Some(cluster::ClusterDiscoveryType::Type(t)) => {
                    match cluster::DiscoveryType::try_from(t) {
                        Ok(cluster::DiscoveryType::Static) => "STATIC",
                        Ok(cluster::DiscoveryType::StrictDns) => "STRICT_DNS",
                        Ok(cluster::DiscoveryType::LogicalDns) => "LOGICAL_DNS",
                        Ok(cluster::DiscoveryType::Eds) => "EDS",
                        Ok(cluster::DiscoveryType::OriginalDst) => "ORIGINAL_DST",
                        Err(_) => "UNKNOWN",
                    }
                }
                _ => "STATIC",
            },
            // The proxy holds a version the server no longer has.
            None => "(older version)",
        };
        writeln!(
            w,
            "{fqdn}\t{}\t{}\t{}\t{kind}",
            dash(port),
            dash(subset),
            dash(direction)
        )?;
    }
    Ok(())
}

/// The endpoints of each assignment in `list`, those of its LEDS
/// collections from `members` (the LEDS resources the proxy holds).
fn endpoints_table(
    w: &mut TabWriter<Vec<u8>>,
    list: &[debug::HeldResource],
    members: &[debug::HeldResource],
) -> std::io::Result<()> {
    use envoy_types::pb::envoy::config::endpoint::v3::{LbEndpoint, locality_lb_endpoints};
    writeln!(w, "ENDPOINT\tSTATUS\tOUTLIER CHECK\tCLUSTER")?;
    for r in list {
        let Some(cla) = r.any.as_deref().and_then(decode::<ClusterLoadAssignment>) else {
            writeln!(w, "(older version)\t-\t-\t{}", r.name)?;
            continue;
        };
        let mut leds: Vec<LbEndpoint> = Vec::new();
        for l in &cla.endpoints {
            if let Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(c)) =
                &l.lb_config
            {
                let prefix = c.leds_collection_name.trim_end_matches('*');
                leds.extend(
                    members
                        .iter()
                        .filter(|m| m.name.starts_with(prefix))
                        .filter_map(|m| m.any.as_deref().and_then(decode::<LbEndpoint>)),
                );
            }
        }
        for ep in cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .chain(&leds)
        {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
                continue;
            };
            let address = e
                .address
                .as_ref()
                .and_then(|a| a.address.as_ref())
                .map(|a| {
                    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
                    match a {
                        address::Address::SocketAddress(s) => {
                            let port = match s.port_specifier {
                                Some(socket_address::PortSpecifier::PortValue(p)) => p,
                                _ => 0,
                            };
                            if s.address.contains(':') {
                                format!("[{}]:{port}", s.address)
                            } else {
                                format!("{}:{port}", s.address)
                            }
                        }
                        address::Address::Pipe(p) => format!("unix://{}", p.path),
                        _ => "?".to_string(),
                    }
                })
                .unwrap_or_default();
            let status = match HealthStatus::try_from(ep.health_status) {
                Ok(HealthStatus::Healthy) => "HEALTHY",
                Ok(HealthStatus::Unhealthy) => "UNHEALTHY",
                Ok(HealthStatus::Draining) => "DRAINING",
                Ok(HealthStatus::Timeout) => "TIMEOUT",
                Ok(HealthStatus::Degraded) => "DEGRADED",
                // Envoy treats an unset status as healthy.
                _ => "HEALTHY",
            };
            // Outlier detection happens in the proxy: the control plane
            // does not see its verdicts (istioctl reads them from Envoy).
            writeln!(w, "{address}\t{status}\t-\t{}", r.name)?;
        }
    }
    Ok(())
}

fn services_table(w: &mut TabWriter<Vec<u8>>, list: &[debug::Service]) -> std::io::Result<()> {
    writeln!(
        w,
        "SERVICE\tRESOLUTION\tPORTS\tDECLARED BY\tENDPOINTS\tDESTINATION RULES"
    )?;
    for s in list {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.number, p.protocol))
            .collect();
        let declared: Vec<String> = s
            .declarations
            .iter()
            .map(|d| {
                format!(
                    "{} ({}, {})",
                    cell(&d.source),
                    cell(&d.namespace),
                    cell(&d.origin)
                )
            })
            .collect();
        writeln!(
            w,
            "{}\t{}\t{}\t{}\t{}\t{}",
            s.hostname,
            s.resolution,
            dash(&ports.join(",")),
            dash(&declared.join("; ")),
            s.endpoints,
            dash(&s.destination_rules.join(","))
        )?;
    }
    Ok(())
}

fn endpoints_registry_table(
    w: &mut TabWriter<Vec<u8>>,
    list: &[debug::Endpoint],
) -> std::io::Result<()> {
    writeln!(
        w,
        "SERVICE\tENDPOINT\tHEALTH\tSOURCE\tCLUSTER\tNETWORK\tLOCALITY"
    )?;
    for e in list {
        let ports: Vec<String> = e.ports.values().map(u16::to_string).collect();
        let endpoint = if ports.is_empty() {
            e.address.clone()
        } else {
            format!("{}:{}", e.address, ports.join(","))
        };
        writeln!(
            w,
            "{}\t{endpoint}\t{}\t{}\t{}\t{}\t{}",
            e.hostname,
            e.health,
            e.source,
            dash(&e.cluster),
            dash(&e.network),
            dash(&e.locality)
        )?;
    }
    Ok(())
}

fn sources_table(w: &mut TabWriter<Vec<u8>>, list: &[debug::SourceStatus]) -> std::io::Result<()> {
    writeln!(
        w,
        "SOURCE\tSTATE\tOBJECTS\tLAST SYNC\tERRORS\tREJECTED\tLAST ERROR"
    )?;
    for s in list {
        let state = match &s.stale_since {
            Some(since) => format!("{} since {since}", s.state),
            None => s.state.clone(),
        };
        writeln!(
            w,
            "{}\t{state}\t{}\t{}\t{}\t{}\t{}",
            cell(&s.source),
            s.objects,
            dash(s.last_sync.as_deref().unwrap_or("")),
            s.errors,
            s.rejected,
            cell(dash(s.last_error.as_deref().unwrap_or("")))
        )?;
    }
    Ok(())
}

fn rejected_table(w: &mut TabWriter<Vec<u8>>, list: &[debug::Rejected]) -> std::io::Result<()> {
    writeln!(w, "SOURCE\tOBJECT\tDOCUMENT\tFIELD\tREASON\tMESSAGE")?;
    for r in list {
        for p in &r.problems {
            let doc = p.document.map(|d| d.to_string()).unwrap_or_default();
            writeln!(
                w,
                "{}\t{}\t{}\t{}\t{}\t{}",
                cell(&r.source),
                cell(&r.object),
                dash(&doc),
                cell(dash(&p.field)),
                p.reason,
                cell(&p.message)
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_cluster_names_split_into_columns() {
        assert_eq!(
            name_parts("outbound|9080|v1|reviews.default.svc.cluster.local"),
            (
                "reviews.default.svc.cluster.local",
                "9080",
                "v1",
                "outbound"
            )
        );
        assert_eq!(
            name_parts("BlackHoleCluster"),
            ("BlackHoleCluster", "", "", "")
        );
        let f = ClusterFilter {
            fqdn: Some("reviews".into()),
            subset: Some("v1".into()),
            direction: Some(Direction::Outbound),
            ..Default::default()
        };
        assert!(f.matches("outbound|9080|v1|reviews.default.svc.cluster.local"));
        assert!(!f.matches("outbound|9080|v2|reviews.default.svc.cluster.local"));
        assert!(!f.matches("outbound|9080||ratings.default.svc.cluster.local"));
        assert!(!f.matches("inbound|9080|v1|reviews.default.svc.cluster.local"));
        assert_eq!(cell("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        let p = ClusterFilter {
            port: Some(9080),
            ..Default::default()
        };
        assert!(p.matches("outbound|9080||a"));
        assert!(!p.matches("outbound|908||a"));
    }

    #[test]
    fn an_unreachable_daemon_is_exit_69() {
        // A port nothing listens on: bind, then drop.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let args = CtlArgs {
            addr: Some(addr.to_string()),
            token_file: None,
            output: Output::Table,
            command: CtlCommand::Sources,
        };
        let err = run(&args, &mut Vec::new()).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_UNREACHABLE, "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
