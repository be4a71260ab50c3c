//! Identity of a source of registry state.

use std::fmt;
use std::sync::Arc;

/// The kind of platform a source reads from.
///
/// The declaration order is the merge precedence: when two sources describe
/// the same hostname differently, the service shape of the earlier kind wins
/// (Kubernetes first, as in Istio, where a Kubernetes Service shadows a
/// ServiceEntry with the same host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SourceKind {
    /// A Kubernetes cluster.
    Kubernetes,
    /// A directory of Istio ServiceEntry/WorkloadEntry files.
    ServiceEntry,
    /// A Consul datacenter.
    Consul,
    /// DNS records.
    Dns,
    /// VM workloads registered through meshreg.
    Vm,
    /// Another meshreg federated through etcd.
    Federation,
}

impl SourceKind {
    /// A short lowercase name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Kubernetes => "kubernetes",
            SourceKind::ServiceEntry => "serviceentry",
            SourceKind::Consul => "consul",
            SourceKind::Dns => "dns",
            SourceKind::Vm => "vm",
            SourceKind::Federation => "federation",
        }
    }
}

/// One source of state: a platform kind plus the instance of it (a cluster
/// id, a datacenter, a directory). Each source's contribution can be
/// replaced or pruned on its own.
///
/// One pointer (8 bytes): every endpoint, declaration and key names its
/// source, and clones share one copy. Compares, orders and hashes by kind,
/// then name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(Arc<Named>);

#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Named {
    kind: SourceKind,
    name: Box<str>,
}

impl SourceId {
    /// A source of `kind` named `name` (e.g. a cluster id or a path).
    pub fn new(kind: SourceKind, name: impl AsRef<str>) -> Self {
        Self(Arc::new(Named {
            kind,
            name: Box::from(name.as_ref()),
        }))
    }

    /// The platform kind.
    pub fn kind(&self) -> SourceKind {
        self.0.kind
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl fmt::Debug for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceId")
            .field("kind", &self.0.kind)
            .field("name", &self.0.name)
            .finish()
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.kind.as_str(), self.0.name)
    }
}
