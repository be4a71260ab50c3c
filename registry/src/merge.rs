//! Merge rules: many sources' contributions for one hostname become one
//! [`MergedService`].
//!
//! The rule is deterministic and independent of arrival order:
//!
//! 1. Contributions are ordered by [`SourceId`] (kind precedence first, see
//!    [`SourceKind`](crate::SourceKind), then name).
//! 2. The first contribution gives the service shape (namespace, resolution,
//!    location, labels, exportTo).
//! 3. Ports are the union by port number. When two sources declare the same
//!    number with a different name or protocol, the first wins and the
//!    disagreement is recorded in [`MergedService::conflicts`] (and logged by
//!    the store).
//! 4. Addresses (VIPs) are the union per cluster id.
//! 5. Endpoints are the union of every contribution's endpoints, in source
//!    order (Istio semantics: the same service in several clusters, plus the
//!    VMs that join it).

use std::collections::BTreeMap;

use crate::model::{Endpoint, Service};
use crate::source::SourceId;
use crate::update::Contribution;

/// The merged state of one hostname, as proxies should see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedService {
    /// The merged service shape.
    pub service: Service,
    /// Every endpoint from every contributing source.
    pub endpoints: Vec<Endpoint>,
    /// The sources that contributed, in precedence order.
    pub contributors: Vec<SourceId>,
    /// Disagreements between sources that the merge rule settled.
    pub conflicts: Vec<String>,
}

/// Merges the contributions for one hostname; `None` when there are none.
pub(crate) fn merge(contributions: &BTreeMap<SourceId, Contribution>) -> Option<MergedService> {
    let mut iter = contributions.iter();
    let (first_source, first) = iter.next()?;
    let mut merged = MergedService {
        service: first.service.clone(),
        endpoints: first.endpoints.clone(),
        contributors: vec![first_source.clone()],
        conflicts: Vec::new(),
    };
    for (source, c) in iter {
        merged.contributors.push(source.clone());
        for port in &c.service.ports {
            match merged.service.port(port.number) {
                None => merged.service.ports.push(port.clone()),
                Some(existing)
                    if existing.protocol != port.protocol || existing.name != port.name =>
                {
                    merged.conflicts.push(format!(
                        "port {}: {} declares {}/{:?}, {} declares {}/{:?}; keeping {}'s",
                        port.number,
                        first_source,
                        existing.name,
                        existing.protocol,
                        source,
                        port.name,
                        port.protocol,
                        first_source
                    ));
                }
                Some(_) => {}
            }
        }
        if c.service.resolution != merged.service.resolution {
            merged.conflicts.push(format!(
                "resolution: {first_source} says {:?}, {source} says {:?}; keeping {first_source}'s",
                merged.service.resolution, c.service.resolution
            ));
        }
        for (cluster, addrs) in &c.service.addresses {
            let entry = merged.service.addresses.entry(cluster.clone()).or_default();
            for a in addrs {
                if !entry.contains(a) {
                    entry.push(a.clone());
                }
            }
        }
        merged.endpoints.extend(c.endpoints.iter().cloned());
    }
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::source::SourceKind;
    use crate::test_util::{endpoint, service};

    fn contribution(source: &SourceId, ports: &[(u16, Protocol)], ip: &str) -> Contribution {
        let mut s = service("a.example.com", ports);
        s.source = source.clone();
        Contribution {
            service: s,
            endpoints: vec![endpoint(ip, source)],
        }
    }

    #[test]
    fn precedence_is_by_source_not_arrival() {
        let kube = SourceId::new(SourceKind::Kubernetes, "c1");
        let se = SourceId::new(SourceKind::ServiceEntry, "files");
        let mut a = BTreeMap::new();
        a.insert(
            se.clone(),
            contribution(&se, &[(80, Protocol::Tcp)], "10.0.0.2"),
        );
        a.insert(
            kube.clone(),
            contribution(&kube, &[(80, Protocol::Http)], "10.0.0.1"),
        );
        let m = merge(&a).unwrap();
        assert_eq!(m.contributors, vec![kube.clone(), se.clone()]);
        assert_eq!(m.service.ports[0].protocol, Protocol::Http);
        assert_eq!(m.service.source, kube);
        assert_eq!(m.conflicts.len(), 1, "{:?}", m.conflicts);
        assert_eq!(m.endpoints.len(), 2);
        assert_eq!(m.endpoints[0].address.to_string(), "10.0.0.1");
    }

    #[test]
    fn ports_are_unioned() {
        let c1 = SourceId::new(SourceKind::Kubernetes, "c1");
        let c2 = SourceId::new(SourceKind::Kubernetes, "c2");
        let mut a = BTreeMap::new();
        a.insert(
            c1.clone(),
            contribution(&c1, &[(80, Protocol::Http)], "10.0.0.1"),
        );
        a.insert(
            c2.clone(),
            contribution(
                &c2,
                &[(80, Protocol::Http), (443, Protocol::Tls)],
                "10.1.0.1",
            ),
        );
        let m = merge(&a).unwrap();
        let numbers: Vec<u16> = m.service.ports.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![80, 443]);
        assert!(m.conflicts.is_empty());
    }

    #[test]
    fn nothing_gives_none() {
        assert!(merge(&BTreeMap::new()).is_none());
    }
}
