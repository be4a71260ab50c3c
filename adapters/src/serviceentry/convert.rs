//! Pure conversion: YAML text → validated Istio objects → registry
//! [`Contribution`]s. No I/O, no clock, no channels, so every rule here is
//! table-tested against the fixtures in `adapters/tests/fixtures/istio` (copies of `shared/fixtures`, origins in `ORIGINS.md` there).
//!
//! # Layout
//!
//! - [`parse_file`]: one file's text → its `ServiceEntry`/`WorkloadEntry`
//!   objects and Istio's warnings about them, or every [`DocError`] found
//!   (file, 0-based document index, field path, message).
//! - [`build`]: the objects of all files → one [`Contribution`] per
//!   hostname, plus the conflicts it settled.
//! - `yaml`: reading documents as `kubectl` does (go-yaml's flow scalars).
//! - `spec`: the YAML schema; `validate`: Istio's validation rules (CRD
//!   schema and webhook), each error naming the Istio rule it ports.
//!
//! # Istio semantics kept here
//!
//! - One registry service per entry in `hosts`; `addresses` become the
//!   service's cluster-independent VIPs (`addresses[""]`), a `/32` or
//!   `/128` written as a plain address as Istio does.
//! - `location` defaults to `MESH_EXTERNAL`, `resolution` to `NONE`;
//!   `DNS_ROUND_ROBIN` is [`Resolution::DnsRoundRobin`]. `DYNAMIC_DNS` is
//!   valid (Istio accepts it) but has no registry form: such an entry
//!   contributes nothing and is listed in [`Built::unsupported`].
//! - Each `ServiceEntry` host becomes a registry declaration (origin: the
//!   entry's name) with its inline endpoints as a shard of the same name;
//!   each `WorkloadEntry` becomes a registry workload. The registry does the
//!   joining and merging below, for every source.
//! - A `WorkloadEntry` joins every `ServiceEntry` of its namespace whose
//!   `workloadSelector.labels` are a subset of the entry's labels, where the
//!   labels are `spec.labels` merged with `metadata.labels` (metadata wins),
//!   as Istio's `ConvertWorkloadEntry` does. An entry whose address is a
//!   hostname or a unix socket joins only DNS-resolved ServiceEntries, and
//!   one without an address (reached through its network's gateway) yields
//!   no endpoint.
//! - A DNS-resolved ServiceEntry without endpoints or selector gets one
//!   endpoint per host whose address is the host name itself (Istio's
//!   `convertServiceEntryToInstances`), so the proxy resolves the host.
//! - TLS mode: the `security.istio.io/tlsMode` label decides when present
//!   (`istio` → [`TlsMode::Istio`]); without it a workload with a
//!   `serviceAccount` is [`TlsMode::Istio`], as in Istio's
//!   `getTLSModeFromWorkloadEntry`.
//! - Locality: `locality`, else the `istio-locality` label with `.` read as
//!   `/`.
//! - NOTE: the endpoint's service account is the plain name from the file,
//!   not a SPIFFE URI: the trust domain is not known here.
//! - NOTE: Istio keeps ServiceEntries with the same host apart per
//!   namespace; the registry keeps each declaration (with its namespace and
//!   `exportTo`) and merges them at read time: ordered by (namespace, name)
//!   (files have no creation time, which Istio would use), the first gives
//!   the shape, ports are the union by number, VIPs and endpoints the
//!   union; disagreements are typed conflicts there. Two objects of one
//!   kind with the same namespace and name (possible only across files)
//!   are reported in [`Converted::conflicts`]; the last is used (as
//!   `kubectl apply` and istiod's file source leave it).
//!
//! This module does not read files, log errors or talk to the registry;
//! `watch` does.

mod rule;
mod sidecar;
mod spec;
#[cfg(test)]
mod tests;
mod validate;
mod workload_group;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use meshreg_registry::{
    Address, Endpoint, EndpointShard, Health, Locality, Location, Object as RegistryObject, Port,
    Protocol, Resolution, Service, SourceId, TlsMode, Workload, shared_locality, shared_str,
};
use serde::Deserialize;
use serde_yaml_ng::Value;

use self::spec::{
    AddressKind, Document, LocationSpec, ResolutionSpec, ServiceEntrySpec, ServicePort,
    WorkloadEntrySpec, address_kind, normalize_address,
};
use self::validate::{Findings, validate_service_entry, validate_workload_entry};

/// The API group of the kinds this adapter reads.
const GROUP: &str = "networking.istio.io";
/// The versions of [`GROUP`] accepted (one schema).
const VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
/// The label that sets an endpoint's TLS mode.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The label carrying a locality when `locality` is not set.
const LOCALITY_LABEL: &str = "istio-locality";

/// Where an object was read: file and 0-based document index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Origin {
    pub(crate) file: Arc<str>,
    pub(crate) doc: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {})", self.file, self.doc)
    }
}

/// A validated `ServiceEntry`.
#[derive(Debug, Clone)]
pub(crate) struct ServiceEntry {
    origin: Origin,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    spec: ServiceEntrySpec,
}

/// A validated `WorkloadEntry`; `labels` already merges `spec.labels` with
/// `metadata.labels`.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadEntry {
    origin: Origin,
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    /// Healthy unless health checks are enabled and not passing.
    health: Health,
    spec: WorkloadEntrySpec,
}

/// A validated `DestinationRule`, already in the registry's form.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    origin: Origin,
    rule: meshreg_registry::DestinationRule,
}

/// A validated `Sidecar`, already in the registry's form.
#[derive(Debug, Clone)]
pub(crate) struct SidecarObject {
    origin: Origin,
    sidecar: meshreg_registry::Sidecar,
}

/// A validated `WorkloadGroup`, already in the registry's form.
#[derive(Debug, Clone)]
pub(crate) struct GroupObject {
    origin: Origin,
    group: meshreg_registry::WorkloadGroup,
}

/// One object read from a file.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    /// A `ServiceEntry`.
    ServiceEntry(ServiceEntry),
    /// A `WorkloadEntry`.
    WorkloadEntry(WorkloadEntry),
    /// A `DestinationRule`.
    DestinationRule(Box<Rule>),
    /// A `Sidecar`.
    Sidecar(Box<SidecarObject>),
    /// A `WorkloadGroup`.
    WorkloadGroup(Box<GroupObject>),
}

impl Object {
    /// Hashes of what a later content must keep for this object not to be
    /// a removal (held back by the file source): its identity and
    ///
    /// - for a `ServiceEntry`, each host, port number and inline endpoint
    ///   address, and its `workloadSelector` and `exportTo` as wholes (a
    ///   selector or an export list that changes may select or reach
    ///   fewer);
    /// - for a `WorkloadEntry`, its address and each label (a label lost or
    ///   changed may leave a selector; a label added cannot);
    /// - for a `DestinationRule`, its host, each subset with its labels,
    ///   and its `exportTo` and `workloadSelector` as a whole (a subset
    ///   lost is a cluster withdrawn);
    /// - for a `Sidecar`, each egress host (or none: every host) and its
    ///   `workloadSelector` (a host lost hides services from proxies).
    ///
    /// Appended to `out`; equal parts give equal hashes in every process
    /// run (a fixed hasher), so two contents compare by their shapes alone.
    pub(crate) fn shape(&self, out: &mut Vec<u64>) {
        let id = self.id();
        let hash = |part: (u8, &str)| {
            let mut h = std::hash::DefaultHasher::new();
            (id, part).hash(&mut h);
            h.finish()
        };
        out.push(hash((0, "")));
        match self {
            Object::ServiceEntry(se) => {
                out.extend(se.spec.hosts.iter().map(|h| hash((1, h))));
                out.extend(
                    se.spec
                        .ports
                        .iter()
                        .map(|p| hash((2, &p.number.to_string()))),
                );
                out.extend(se.spec.endpoints.iter().map(|e| hash((3, &e.address))));
                if let Some(selector) = &se.spec.workload_selector {
                    out.push(hash((4, &format!("{:?}", selector.labels))));
                }
                if !se.spec.export_to.is_empty() {
                    out.push(hash((5, &se.spec.export_to.join(","))));
                }
            }
            Object::WorkloadEntry(we) => {
                out.push(hash((6, &we.spec.address)));
                out.extend(
                    we.labels
                        .iter()
                        .map(|(k, v)| hash((7, &format!("{k}={v}")))),
                );
            }
            Object::DestinationRule(r) => {
                let rule = &r.rule;
                out.push(hash((8, rule.host.as_str())));
                out.extend(
                    rule.subsets
                        .iter()
                        .map(|s| hash((9, &format!("{}{:?}", s.name, s.labels)))),
                );
                out.push(hash((
                    10,
                    &format!("{:?}{:?}", rule.export_to, rule.workload_selector),
                )));
            }
            Object::Sidecar(sc) => {
                let sidecar = &sc.sidecar;
                match &sidecar.egress_hosts {
                    None => out.push(hash((11, ""))),
                    Some(hosts) => out.extend(hosts.iter().map(|h| hash((12, &format!("{h:?}"))))),
                }
                out.push(hash((13, &format!("{:?}", sidecar.workload_selector))));
            }
            Object::WorkloadGroup(_) => {}
        }
    }

    /// Its identity: kind, namespace and name.
    pub(crate) fn id(&self) -> (&'static str, &str, &str) {
        match self {
            Object::ServiceEntry(se) => ("ServiceEntry", &se.namespace, &se.name),
            Object::WorkloadEntry(we) => ("WorkloadEntry", &we.namespace, &we.name),
            Object::DestinationRule(r) => ("DestinationRule", &r.rule.namespace, &r.rule.name),
            Object::Sidecar(s) => ("Sidecar", &s.sidecar.namespace, &s.sidecar.name),
            Object::WorkloadGroup(g) => ("WorkloadGroup", &g.group.namespace, &g.group.name),
        }
    }
}

/// Why a document was refused (the `reason` label of the error metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Not YAML, or a field of the wrong type.
    Parse,
    /// Well-formed, but breaks a validation rule.
    Invalid,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Parse => "parse",
            Reason::Invalid => "invalid",
        }
    }
}

/// A refused document: which file, which document, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DocError {
    pub(crate) file: Arc<str>,
    /// 0-based index of the document in the file.
    pub(crate) doc: usize,
    /// Field path inside the document, e.g. `spec.ports[0].number`; empty
    /// when the whole document is at fault.
    pub(crate) path: String,
    pub(crate) message: String,
    pub(crate) reason: Reason,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}: ", self.file, self.doc)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// What one file holds: its objects, and Istio's warnings about them
/// (which, as in Istio, do not refuse anything).
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    /// The `ServiceEntry`/`WorkloadEntry` objects, in document order.
    pub(crate) objects: Vec<Object>,
    /// Istio's validation warnings, with file, document and field.
    pub(crate) warnings: Vec<DocError>,
}

/// Parses one file: every document, in order. Other kinds and empty
/// documents are skipped. The YAML is read as `kubectl` reads it (see
/// `yaml`).
///
/// # Errors
///
/// Every refused document (parsing stops at the first YAML syntax error,
/// since what follows it cannot be trusted). The caller keeps the file's
/// previous state: a file is taken whole or not at all.
pub(crate) fn parse_file(
    file: &str,
    text: &str,
    default_namespace: &str,
) -> Result<Parsed, Vec<DocError>> {
    // A UTF-8 byte order mark (Windows editors write one) may start a YAML
    // stream (YAML 1.2, 5.2); the parser would read it as content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let file: Arc<str> = Arc::from(file);
    let origin = |doc| Origin {
        file: file.clone(),
        doc,
    };
    let mut parsed = Parsed {
        objects: Vec::new(),
        warnings: Vec::new(),
    };
    let mut errors = Vec::new();
    let loaded = yaml::load(text);
    let failed_doc = loaded.documents.len();
    for (doc, value) in loaded.documents.into_iter().enumerate() {
        for (prefix, value) in list_items(value) {
            match parse_document(value, &origin(doc), default_namespace) {
                Ok(Some((object, warnings))) => {
                    parsed.objects.push(object);
                    parsed.warnings.extend(warnings);
                }
                Ok(None) => {}
                Err(e) => errors.extend(e.into_iter().map(|mut e| {
                    e.path = format!("{prefix}{}", e.path);
                    e
                })),
            }
        }
    }
    if let Some(e) = loaded.error {
        errors.push(doc_error(
            &origin(failed_doc),
            "",
            e.to_string(),
            Reason::Parse,
        ));
    }
    if errors.is_empty() {
        // The objects are kept while the file serves them (see `watch`):
        // a one-object file would otherwise keep room for four (840 bytes
        // more per file, 8.4 MB for 10,000 files; heaptrack).
        parsed.objects.shrink_to_fit();
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// The objects of a document: the items of a `kind: List` (what `kubectl
/// get -o yaml` writes), each with its field path prefix, or the document
/// itself.
fn list_items(value: Value) -> Vec<(String, Value)> {
    if let Value::Mapping(map) = &value
        && map.get("kind").and_then(Value::as_str) == Some("List")
        && let Some(Value::Sequence(items)) = map.get("items")
    {
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("items[{i}]."), v.clone()))
            .collect();
    }
    vec![(String::new(), value)]
}

fn doc_error(origin: &Origin, path: &str, message: String, reason: Reason) -> DocError {
    DocError {
        file: origin.file.clone(),
        doc: origin.doc,
        path: path.to_string(),
        message,
        reason,
    }
}

fn parse_document(
    mut value: Value,
    origin: &Origin,
    default_namespace: &str,
) -> Result<Option<(Object, Vec<DocError>)>, Vec<DocError>> {
    let one = |path: &str, message: &str, reason| {
        vec![doc_error(origin, path, message.to_string(), reason)]
    };
    let Value::Mapping(map) = &value else {
        if value.is_null() {
            // Empty or comment-only document.
            return Ok(None);
        }
        return Err(one("", "document is not a mapping", Reason::Parse));
    };
    let field = |name: &str| match map.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(one(name, "must be a string", Reason::Parse)),
        None => Err(one(name, "missing", Reason::Invalid)),
    };
    let api_version = field("apiVersion")?;
    let kind = field("kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    if group != GROUP
        || !matches!(
            kind.as_str(),
            "ServiceEntry" | "WorkloadEntry" | "DestinationRule" | "Sidecar" | "WorkloadGroup"
        )
    {
        tracing::debug!(%origin, %api_version, %kind, "skipping a kind this adapter does not read");
        return Ok(None);
    }
    if !VERSIONS.contains(&version) {
        return Err(one(
            "apiVersion",
            &format!(
                "unsupported version {api_version:?} (expected {GROUP}/v1, v1beta1 or v1alpha3)"
            ),
            Reason::Invalid,
        ));
    }
    // YAML merge keys (`<<: *anchor`) as Kubernetes tooling expands them.
    if let Err(e) = value.apply_merge() {
        return Err(one("", &e.to_string(), Reason::Parse));
    }
    if kind == "DestinationRule" {
        return policy_document(
            value,
            origin,
            default_namespace,
            rule::validate_and_convert,
            |rule| {
                Object::DestinationRule(Box::new(Rule {
                    origin: origin.clone(),
                    rule,
                }))
            },
        );
    }
    if kind == "WorkloadGroup" {
        return policy_document(
            value,
            origin,
            default_namespace,
            workload_group::validate_and_convert,
            |group| {
                Object::WorkloadGroup(Box::new(GroupObject {
                    origin: origin.clone(),
                    group,
                }))
            },
        );
    }
    if kind == "Sidecar" {
        return policy_document(
            value,
            origin,
            default_namespace,
            sidecar::validate_and_convert,
            |sidecar| {
                Object::Sidecar(Box::new(SidecarObject {
                    origin: origin.clone(),
                    sidecar,
                }))
            },
        );
    }
    if kind == "ServiceEntry" {
        let (meta, spec) = typed::<ServiceEntrySpec>(value, origin)?;
        let namespace = namespace_or(meta.namespace, default_namespace);
        let warnings = check(origin, validate_service_entry(&spec, &namespace))?;
        let object = Object::ServiceEntry(ServiceEntry {
            origin: origin.clone(),
            name: meta.name,
            namespace,
            labels: meta.labels,
            spec,
        });
        Ok(Some((object, warnings)))
    } else {
        let (meta, spec) = typed::<WorkloadEntrySpec>(value, origin)?;
        let warnings = check(origin, validate_workload_entry(&spec))?;
        let health = workload_entry_health(&meta);
        // Istio's ConvertWorkloadEntry: metadata labels win over spec ones.
        let mut labels = spec.labels.clone();
        labels.extend(meta.labels);
        let object = Object::WorkloadEntry(WorkloadEntry {
            origin: origin.clone(),
            name: meta.name,
            namespace: namespace_or(meta.namespace, default_namespace),
            labels,
            health,
            spec,
        });
        Ok(Some((object, warnings)))
    }
}

/// Deserializes the document with field paths in errors, and checks the
/// parts every object needs (`metadata.name`, `spec`).
/// A DestinationRule or Sidecar document: its spec validated and
/// converted by `convert` (spec, name, namespace), then wrapped by `wrap`;
/// `None` when validation refused it (the findings are the errors).
fn policy_document<S, T>(
    value: Value,
    origin: &Origin,
    default_namespace: &str,
    convert: fn(&S, &str, &str) -> (Option<T>, Findings),
    wrap: impl FnOnce(T) -> Object,
) -> Result<Option<(Object, Vec<DocError>)>, Vec<DocError>>
where
    S: for<'de> Deserialize<'de>,
{
    let (meta, spec) = typed::<S>(value, origin)?;
    let namespace = namespace_or(meta.namespace, default_namespace);
    let (converted, findings) = convert(&spec, &meta.name, &namespace);
    let warnings = check(origin, findings)?;
    Ok(converted.map(|c| (wrap(c), warnings)))
}

fn typed<S>(value: Value, origin: &Origin) -> Result<(spec::Metadata, S), Vec<DocError>>
where
    S: for<'de> Deserialize<'de>,
{
    let doc: Document<S> = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![doc_error(
            origin,
            &path,
            e.into_inner().to_string(),
            Reason::Parse,
        )]
    })?;
    let mut errors = Vec::new();
    if doc.metadata.name.is_empty() {
        errors.push(doc_error(
            origin,
            "metadata.name",
            "must be set".into(),
            Reason::Invalid,
        ));
    }
    match doc.spec {
        Some(spec) if errors.is_empty() => {
            let mut meta = doc.metadata;
            meta.status = doc.status;
            Ok((meta, spec))
        }
        Some(_) => Err(errors),
        None => {
            errors.push(doc_error(
                origin,
                "spec",
                "must be set".into(),
                Reason::Invalid,
            ));
            Err(errors)
        }
    }
}

/// The document's errors, or else its warnings, as [`DocError`]s.
fn check(origin: &Origin, findings: Findings) -> Result<Vec<DocError>, Vec<DocError>> {
    let to_doc = |issues: Vec<validate::Issue>| {
        issues
            .into_iter()
            .map(|i| doc_error(origin, &i.path, i.message, Reason::Invalid))
            .collect()
    };
    if findings.errors.is_empty() {
        Ok(to_doc(findings.warnings))
    } else {
        Err(to_doc(findings.errors))
    }
}

fn namespace_or(namespace: String, default: &str) -> String {
    if namespace.is_empty() {
        default.to_string()
    } else {
        namespace
    }
}

/// What [`objects`] made of all objects.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Converted {
    /// The registry objects: per ServiceEntry host a declaration (origin =
    /// the entry's name) and, for inline endpoints, a shard of the same
    /// name; per WorkloadEntry a workload. Sorted by key.
    pub(crate) objects: Vec<RegistryObject>,
    /// Objects declared twice (same kind, namespace and name in two
    /// places): the last, by file and document, is used.
    pub(crate) conflicts: Vec<String>,
    /// Valid entries meshreg cannot serve (`DYNAMIC_DNS`), in a stable order.
    pub(crate) unsupported: Vec<String>,
}

/// Turns the objects of all files into registry objects. The registry joins
/// WorkloadEntries to the entries that select them and merges same-host
/// entries (see `meshreg_registry`'s merge rule); nothing here depends on
/// other objects but duplicate names. The result depends only on the set of
/// objects, not their order.
pub(crate) fn objects<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    source: &SourceId,
) -> Converted {
    let mut ses = Vec::new();
    let mut wes = Vec::new();
    let mut rules = Vec::new();
    let mut sidecars = Vec::new();
    let mut groups = Vec::new();
    for object in objects {
        match object {
            Object::ServiceEntry(se) => ses.push(se),
            Object::WorkloadEntry(we) => wes.push(we),
            Object::DestinationRule(r) => rules.push(r),
            Object::Sidecar(s) => sidecars.push(s),
            Object::WorkloadGroup(g) => groups.push(g),
        }
    }
    groups.sort_by(|a, b| {
        (&a.group.namespace, &a.group.name, &a.origin).cmp(&(
            &b.group.namespace,
            &b.group.name,
            &b.origin,
        ))
    });
    sidecars.sort_by(|a, b| {
        (&a.sidecar.namespace, &a.sidecar.name, &a.origin).cmp(&(
            &b.sidecar.namespace,
            &b.sidecar.name,
            &b.origin,
        ))
    });
    rules.sort_by(|a, b| {
        (&a.rule.namespace, &a.rule.name, &a.origin).cmp(&(
            &b.rule.namespace,
            &b.rule.name,
            &b.origin,
        ))
    });
    ses.sort_by(|a, b| (&a.namespace, &a.name, &a.origin).cmp(&(&b.namespace, &b.name, &b.origin)));
    wes.sort_by(|a, b| (&a.namespace, &a.name, &a.origin).cmp(&(&b.namespace, &b.name, &b.origin)));
    let mut conflicts = Vec::new();
    let keep_se = last_of_each(
        ses.iter().map(|se| (&se.namespace, &se.name, &se.origin)),
        "ServiceEntry",
        &mut conflicts,
    );
    let keep_we = last_of_each(
        wes.iter().map(|we| (&we.namespace, &we.name, &we.origin)),
        "WorkloadEntry",
        &mut conflicts,
    );
    let keep_rule = last_of_each(
        rules
            .iter()
            .map(|r| (&r.rule.namespace, &r.rule.name, &r.origin)),
        "DestinationRule",
        &mut conflicts,
    );
    let keep_sidecar = last_of_each(
        sidecars
            .iter()
            .map(|s| (&s.sidecar.namespace, &s.sidecar.name, &s.origin)),
        "Sidecar",
        &mut conflicts,
    );
    let keep_group = last_of_each(
        groups
            .iter()
            .map(|g| (&g.group.namespace, &g.group.name, &g.origin)),
        "WorkloadGroup",
        &mut conflicts,
    );

    let mut unsupported = Vec::new();
    let mut out = Vec::new();
    for (se, _) in ses.iter().zip(&keep_se).filter(|(_, k)| **k) {
        let resolution = se.spec.resolution.unwrap_or(ResolutionSpec::None);
        let Some(registry_resolution) = to_resolution(resolution) else {
            unsupported.push(format!(
                "ServiceEntry {}/{} ({}): resolution DYNAMIC_DNS needs a dynamic forward proxy, which meshreg does not generate; its hosts {:?} are not served",
                se.namespace, se.name, se.origin, se.spec.hosts
            ));
            continue;
        };
        let inline: Vec<Endpoint> = if se.spec.workload_selector.is_none() {
            se.spec
                .endpoints
                .iter()
                .filter_map(|ep| to_endpoint(ep, &ep.labels, "", source))
                .collect()
        } else {
            Vec::new()
        };
        let mut inline = Some(inline);
        let last = se.spec.hosts.len().saturating_sub(1);
        for (h, host) in se.spec.hosts.iter().enumerate() {
            // Istio's convertServiceEntryToInstances: a DNS entry with
            // neither endpoints nor selector resolves its host name.
            let mine = if h == last {
                inline.take().unwrap_or_default()
            } else {
                inline.clone().unwrap_or_default()
            };
            let endpoints = if mine.is_empty()
                && se.spec.endpoints.is_empty()
                && se.spec.workload_selector.is_none()
                && resolution.is_dns()
            {
                vec![host_endpoint(host, source)]
            } else {
                mine
            };
            // The shard is named after its declaring object, namespace
            // included: the same name in two namespaces is two objects.
            let origin = format!("{}/{}", se.namespace, se.name);
            out.push(RegistryObject::Service {
                origin: origin.clone(),
                service: to_service(se, host, registry_resolution, source),
            });
            if !endpoints.is_empty() {
                out.push(RegistryObject::Endpoints(EndpointShard {
                    hostname: host.as_str().into(),
                    name: origin,
                    endpoints,
                }));
            }
        }
    }
    for (we, _) in wes.iter().zip(&keep_we).filter(|(_, k)| **k) {
        out.push(RegistryObject::Workload(to_workload(we, source)));
    }
    for (r, _) in rules.iter().zip(&keep_rule).filter(|(_, k)| **k) {
        out.push(RegistryObject::DestinationRule(Box::new(r.rule.clone())));
    }
    for (s, _) in sidecars.iter().zip(&keep_sidecar).filter(|(_, k)| **k) {
        out.push(RegistryObject::Sidecar(Box::new(s.sidecar.clone())));
    }
    for (g, _) in groups.iter().zip(&keep_group).filter(|(_, k)| **k) {
        out.push(RegistryObject::WorkloadGroup(Box::new(g.group.clone())));
    }
    out.sort_by_key(RegistryObject::key);
    out.dedup_by(|a, b| a.key() == b.key());
    Converted {
        objects: out,
        conflicts,
        unsupported,
    }
}

/// Marks the last of each run of equal (namespace, name) in a sorted list
/// (the last document wins, as with `kubectl apply` and istiod's file
/// source); records the others as conflicts.
fn last_of_each<'a>(
    items: impl Iterator<Item = (&'a String, &'a String, &'a Origin)>,
    kind: &str,
    conflicts: &mut Vec<String>,
) -> Vec<bool> {
    let mut keep: Vec<bool> = Vec::new();
    let mut last: Option<(&String, &String, &Origin)> = None;
    for (ns, name, origin) in items {
        if let Some((lns, lname, lorigin)) = last
            && (lns, lname) == (ns, name)
        {
            conflicts.push(format!(
                "{kind} {ns}/{name} is declared in {lorigin} and in {origin}; the last is used"
            ));
            if let Some(previous) = keep.last_mut() {
                *previous = false;
            }
        }
        last = Some((ns, name, origin));
        keep.push(true);
    }
    keep
}

fn to_workload(we: &WorkloadEntry, source: &SourceId) -> Workload {
    let ep = to_endpoint(&we.spec, &we.labels, &we.name, source);
    Workload {
        namespace: we.namespace.clone(),
        name: we.name.clone(),
        address: ep.as_ref().map(|e| e.address.clone()),
        ports: ep.as_ref().map(|e| e.ports.clone()).unwrap_or_default(),
        labels: we.labels.clone(),
        locality: ep
            .as_ref()
            .map(|e| (*e.locality).clone())
            .unwrap_or_default(),
        cluster_id: String::new(),
        network: we.spec.network.clone(),
        health: we.health,
        weight: we.spec.weight,
        service_account: we.spec.service_account.clone(),
        tls_mode: ep.map(|e| e.tls_mode).unwrap_or_default(),
    }
}

/// Istio's annotation that puts a WorkloadEntry's health in its status.
pub(crate) const HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";

/// A WorkloadEntry's health, as istiod's ServiceEntry controller reads it
/// (`isHealthy`): with [`HEALTH_CHECKS_ENABLED`] true (Go's
/// `strconv.ParseBool`), healthy only while `status.conditions` has
/// `type: Healthy` with `status: "True"` (unhealthy when it is missing, so
/// a new entry waits for its first passing probe); without it, healthy.
fn workload_entry_health(meta: &spec::Metadata) -> Health {
    let enabled = matches!(
        meta.annotations
            .get(HEALTH_CHECKS_ENABLED)
            .map(String::as_str),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    );
    if !enabled {
        return Health::Healthy;
    }
    let healthy = meta
        .status
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Healthy"))
        .and_then(|c| c.get("status").and_then(Value::as_str))
        == Some("True");
    if healthy {
        Health::Healthy
    } else {
        Health::Unhealthy
    }
}

/// The registry's form of a resolution; `None` for `DYNAMIC_DNS`, which it
/// has no form for.
fn to_resolution(resolution: ResolutionSpec) -> Option<Resolution> {
    Some(match resolution {
        ResolutionSpec::None => Resolution::None,
        ResolutionSpec::Static => Resolution::Static,
        ResolutionSpec::Dns => Resolution::Dns,
        ResolutionSpec::DnsRoundRobin => Resolution::DnsRoundRobin,
        ResolutionSpec::DynamicDns => return None,
    })
}

fn to_service(se: &ServiceEntry, host: &str, resolution: Resolution, source: &SourceId) -> Service {
    let mut addresses = BTreeMap::new();
    if !se.spec.addresses.is_empty() {
        let mut list: Vec<String> = Vec::with_capacity(se.spec.addresses.len());
        for a in se.spec.addresses.iter().map(|a| normalize_address(a)) {
            if !list.contains(&a) {
                list.push(a);
            }
        }
        addresses.insert(String::new(), list);
    }
    Service {
        hostname: host.into(),
        namespace: se.namespace.clone(),
        ports: se.spec.ports.iter().map(to_port).collect(),
        resolution,
        location: match se.spec.location.unwrap_or(LocationSpec::MeshExternal) {
            LocationSpec::MeshExternal => Location::MeshExternal,
            LocationSpec::MeshInternal => Location::MeshInternal,
        },
        labels: se.labels.clone(),
        export_to: se.spec.export_to.clone(),
        addresses,
        workload_selector: se.spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        source: source.clone(),
    }
}

fn to_port(port: &ServicePort) -> Port {
    let protocol = if port.protocol.eq_ignore_ascii_case("HTTP_PROXY") {
        Protocol::Http
    } else {
        Protocol::parse(&port.protocol)
    };
    Port {
        name: port.name.clone(),
        // Validation keeps numbers in 1..=65535.
        number: u16::try_from(port.number).unwrap_or_default(),
        protocol,
        target_port: port.target_port.and_then(|p| u16::try_from(p).ok()),
    }
}

fn to_endpoint(
    spec: &WorkloadEntrySpec,
    labels: &BTreeMap<String, String>,
    workload_name: &str,
    source: &SourceId,
) -> Option<Endpoint> {
    let (address, ports) = match address_kind(&spec.address) {
        AddressKind::Empty => return None,
        AddressKind::Ip(ip) => (Address::Ip(ip), endpoint_ports(spec)),
        // A socket has no port.
        AddressKind::Unix(path) => (Address::Unix(path), BTreeMap::new()),
        AddressKind::Name => (Address::Dns(spec.address.clone()), endpoint_ports(spec)),
    };
    let locality = if !spec.locality.is_empty() {
        Locality::parse(&spec.locality)
    } else if let Some(l) = labels.get(LOCALITY_LABEL) {
        Locality::parse(&l.replace('.', "/"))
    } else {
        Locality::default()
    };
    let tls_mode = match labels.get(TLS_MODE_LABEL) {
        Some(mode) if mode == "istio" => TlsMode::Istio,
        Some(_) => TlsMode::Disabled,
        None if !spec.service_account.is_empty() => TlsMode::Istio,
        None => TlsMode::Disabled,
    };
    Some(Endpoint {
        address,
        ports,
        labels: labels.clone(),
        locality: shared_locality(locality),
        cluster_id: shared_str(""),
        network: shared_str(&spec.network),
        health: Health::Healthy,
        weight: spec.weight,
        priority: 0,
        service_account: shared_str(&spec.service_account),
        tls_mode,
        workload_name: workload_name.to_string(),
        listed_ports_only: false,
        source: source.clone(),
    })
}

fn endpoint_ports(spec: &WorkloadEntrySpec) -> BTreeMap<String, u16> {
    spec.ports
        .iter()
        .filter_map(|(name, port)| Some((name.clone(), u16::try_from(*port).ok()?)))
        .collect()
}

/// The endpoint of a DNS ServiceEntry without endpoints: the host itself.
fn host_endpoint(host: &str, source: &SourceId) -> Endpoint {
    Endpoint::new(Address::Dns(host.to_string()), source.clone())
}
