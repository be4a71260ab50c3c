//! Locality load balancing: a `DestinationRule`'s `localityLbSetting`
//! (else the mesh default, enabled) applied as istiod applies it (pilot's
//! `loadbalancer.ApplyLocalityLoadBalancer` and the cluster builder's
//! `applyLocalityLoadBalancer`):
//!
//! - `distribute`: for a proxy whose locality matches a `from` pattern,
//!   each locality group's weight becomes its share of the `to` weight it
//!   matches (split by the endpoints' weights), and groups no `to` pattern
//!   matches are emptied;
//! - otherwise, when the cluster has outlier detection (failover needs it:
//!   Envoy never leaves a priority whose hosts are not ejected), priorities
//!   by proximity to the proxy: same region, zone and sub-zone 0, same
//!   zone 1, same region 2, else 3, or 4 for a region other than the
//!   `failover` target of the proxy's region; multiplied into the
//!   endpoints' own priorities and renumbered without gaps.
//!
//! - with failover on and `failoverPriority` set, instead (pilot's
//!   `applyFailoverPriorities`): each endpoint's priority is the number of
//!   leading `failoverPriority` labels on which it agrees with the proxy,
//!   counted down from the list's length (0 when all agree; an entry
//!   `label=value` compares with that value instead of the proxy's), each
//!   locality group split by it and the priorities renumbered without
//!   gaps; then, if `failover` is set too, the proximity priorities above
//!   on top. Labels are the workload's and the proxy's, with istiod's
//!   topology labels added from their locality, network and cluster
//!   (`topology.kubernetes.io/region`/`zone`, `topology.istio.io/subzone`,
//!   `topology.istio.io/network`, `topology.istio.io/cluster`). A proxy
//!   without any label is left unranked, as istiod leaves it. DNS clusters
//!   (endpoints inline in CDS) are not ranked by label.
//!
//! The cluster gets Envoy's locality-weighted balancing when `distribute`
//! is set, or failover is on with `failover` or `failoverPriority` set.
//! Only scoped proxies (those whose node names a namespace) have a
//! locality and labels here; the unscoped snapshot is locality-blind.

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::UInt32Value;
use std::collections::BTreeMap;

use meshreg_registry::{DestinationRule, Endpoint, Locality, LocalityLbSetting, TrafficPolicy};

use crate::cache::Place;

/// The topology labels istiod adds to workload and proxy labels (pilot's
/// `labelutil.AugmentLabels`), taken here from the locality, network and
/// cluster.
pub(crate) const TOPOLOGY_LABELS: [&str; 5] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
    "topology.istio.io/network",
    "topology.istio.io/cluster",
];

/// The value of label `name` for a workload or proxy with `labels`, in
/// `locality`, on `network`, in `cluster` (empty when it has none): the
/// topology labels are derived as istiod's `AugmentLabels` derives them
/// (the locality's and cluster's override a label of the same name; the
/// network's only fills a missing one).
pub(crate) fn label_value<'a>(
    labels: &'a BTreeMap<String, String>,
    locality: &'a Locality,
    network: &'a str,
    cluster: &'a str,
    name: &str,
) -> &'a str {
    let own = labels.get(name).map_or("", String::as_str);
    let derived = match name {
        "topology.kubernetes.io/region" => locality.region.as_str(),
        "topology.kubernetes.io/zone" => locality.zone.as_str(),
        "topology.istio.io/subzone" => locality.subzone.as_str(),
        "topology.istio.io/cluster" => cluster,
        "topology.istio.io/network" if own.is_empty() => network,
        _ => "",
    };
    if derived.is_empty() { own } else { derived }
}

/// The label priority of each endpoint for a proxy whose failover priority
/// label values are `proxy`, when `policy` ranks by `failoverPriority`
/// (failover on, no `distribute`); `None` otherwise.
pub(crate) fn failover_ranks<'a>(
    policy: &'a TrafficPolicy,
    proxy: &'a [(String, String)],
) -> Option<impl Fn(&Endpoint) -> u32 + 'a> {
    let (s, failover) = setting(policy)?;
    if !failover || !s.distribute.is_empty() || s.failover_priority.is_empty() {
        return None;
    }
    let entries: Vec<(String, Option<String>)> = s
        .failover_priority
        .iter()
        .map(|e| match e.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (e.clone(), None),
        })
        .collect();
    Some(move |ep: &Endpoint| {
        let n = entries.len() as u32;
        for (j, (name, fixed)) in entries.iter().enumerate() {
            let want = fixed.as_deref().unwrap_or_else(|| {
                proxy
                    .iter()
                    .find(|(k, _)| k == name)
                    .map_or("", |(_, v)| v.as_str())
            });
            let have = label_value(&ep.labels, &ep.locality, &ep.network, &ep.cluster_id, name);
            if want != have {
                return n - j as u32;
            }
        }
        0
    })
}

/// The locality setting for a cluster with `policy`, and whether failover
/// is on; `None` when locality load balancing is disabled (istiod's
/// `GetLocalityLbSetting`: the rule's setting, else the mesh's default,
/// which is enabled).
pub(crate) fn setting(policy: &TrafficPolicy) -> Option<(LocalityLbSetting, bool)> {
    let setting = policy.locality_lb.clone().unwrap_or_default();
    if setting.enabled == Some(false) {
        return None;
    }
    let failover = policy.outlier_detection.is_some();
    Some((setting, failover))
}

/// Whether a cluster with `policy` (merged) has endpoints that depend on
/// the proxy's locality: the exact test [`may_depend_on_proxy`] stands in
/// for.
#[cfg(test)]
fn depends_on_proxy(policy: &TrafficPolicy) -> bool {
    setting(policy).is_some_and(|(s, failover)| !s.distribute.is_empty() || failover)
}

/// Whether some cluster of `rule` may depend on the proxy's locality,
/// read from its policies at every level without merging them (a cheap
/// test per scope and host; it may say yes for a rule whose merged policy
/// turns out locality-blind, which only costs that host its sharing with
/// the unscoped snapshot).
pub(crate) fn may_depend_on_proxy(rule: &DestinationRule) -> bool {
    let levels = rule.traffic_policy.iter().chain(
        rule.subsets
            .iter()
            .filter_map(|s| s.traffic_policy.as_ref()),
    );
    levels
        .flat_map(|p| std::iter::once(p).chain(p.port_level_settings.iter().map(|(_, l)| l)))
        .any(|p| {
            p.outlier_detection.is_some()
                || p.locality_lb
                    .as_ref()
                    .is_some_and(|l| !l.distribute.is_empty())
        })
}

/// Envoy's locality-weighted balancing on `c`, when istiod sets it.
pub(crate) fn apply_cluster(c: &mut Cluster, policy: &TrafficPolicy) {
    let Some((s, failover)) = setting(policy) else {
        return;
    };
    let weighted = !s.distribute.is_empty()
        || (failover && (!s.failover.is_empty() || !s.failover_priority.is_empty()));
    if weighted {
        let common = c.common_lb_config.get_or_insert_with(Default::default);
        common.locality_config_specifier = Some(
            cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                cluster::common_lb_config::LocalityWeightedLbConfig {},
            ),
        );
    }
}

/// Applies `policy`'s locality setting to `cla` for a proxy at `place`
/// (with `failoverPriority`, `cla` comes ranked from
/// [`failover_ranks`]: its priorities are renumbered here).
pub(crate) fn apply_assignment(
    cla: &mut ClusterLoadAssignment,
    place: &Place,
    policy: &TrafficPolicy,
) {
    let Some((s, failover)) = setting(policy) else {
        return;
    };
    let proxy = &place.0;
    if !s.distribute.is_empty() {
        distribute(cla, proxy, &s);
    } else if failover && !s.failover_priority.is_empty() {
        renumber(cla);
        if !s.failover.is_empty() {
            prioritize(cla, proxy, &s);
        }
    } else if failover {
        prioritize(cla, proxy, &s);
    }
}

/// Priorities from 0 without gaps, in the same order.
fn renumber(cla: &mut ClusterLoadAssignment) {
    let mut used: Vec<u32> = cla.endpoints.iter().map(|g| g.priority).collect();
    used.sort_unstable();
    used.dedup();
    for group in &mut cla.endpoints {
        group.priority = used.binary_search(&group.priority).unwrap_or(0) as u32;
    }
}

/// Istio's `LocalityMatch`: `pattern` is `region[/zone[/subzone]]`, each
/// part `*` or exact; a missing zone or sub-zone matches any.
fn matches(loc: Option<&core::Locality>, pattern: &str) -> bool {
    let mut parts = pattern.splitn(3, '/');
    let (region, zone, sub) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let get = |f: fn(&core::Locality) -> &str| loc.map(f).unwrap_or_default();
    let part = |rule: &str, value: &str, optional: bool| {
        rule == "*" || (optional && rule.is_empty()) || rule == value
    };
    part(region, get(|l| &l.region), false)
        && part(zone, get(|l| &l.zone), true)
        && part(sub, get(|l| &l.sub_zone), true)
}

fn core_locality(l: &Locality) -> core::Locality {
    core::Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        sub_zone: l.subzone.clone(),
    }
}

/// Istio's `applyLocalityWeights`.
fn distribute(cla: &mut ClusterLoadAssignment, proxy: &Locality, s: &LocalityLbSetting) {
    let me = core_locality(proxy);
    let Some(rule) = s.distribute.iter().find(|d| matches(Some(&me), &d.from)) else {
        return;
    };
    let mut unmatched: Vec<bool> = vec![true; cla.endpoints.len()];
    for (pattern, weight) in &rule.to {
        let mut picked: Vec<(usize, u32)> = Vec::new();
        for (i, group) in cla.endpoints.iter().enumerate() {
            if unmatched[i] && matches(group.locality.as_ref(), pattern) {
                unmatched[i] = false;
                picked.push((
                    i,
                    group.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                ));
            }
        }
        let total: u64 = picked.iter().map(|(_, w)| u64::from(*w)).sum();
        for (i, original) in picked {
            let share = (u64::from(original) * u64::from(*weight)) as f64 / total as f64;
            if share > 0.0 {
                cla.endpoints[i].load_balancing_weight = Some(UInt32Value {
                    value: share.ceil() as u32,
                });
            }
        }
    }
    for (group, unmatched) in cla.endpoints.iter_mut().zip(unmatched) {
        if unmatched {
            group.lb_endpoints.clear();
        }
    }
}

/// Istio's `LbPriority`.
fn proximity(proxy: &core::Locality, ep: Option<&core::Locality>) -> u32 {
    let get = |f: fn(&core::Locality) -> &str| ep.map(f).unwrap_or_default();
    if proxy.region != get(|l| &l.region) {
        3
    } else if proxy.zone != get(|l| &l.zone) {
        2
    } else if proxy.sub_zone != get(|l| &l.sub_zone) {
        1
    } else {
        0
    }
}

/// Istio's `applyLocalityFailover`.
fn prioritize(cla: &mut ClusterLoadAssignment, proxy: &Locality, s: &LocalityLbSetting) {
    let me = core_locality(proxy);
    for group in &mut cla.endpoints {
        let mut p = proximity(&me, group.locality.as_ref());
        if p == 3
            && let Some(f) = s.failover.iter().find(|f| f.from == me.region)
            && group.locality.as_ref().is_none_or(|l| l.region != f.to)
        {
            p = 4;
        }
        group.priority = group.priority * 5 + p;
    }
    renumber(cla);
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints;
    use meshreg_registry::{LocalityDistribute, LocalityFailover, OutlierDetection};

    fn cla(localities: &[&str]) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            endpoints: localities
                .iter()
                .map(|l| LocalityLbEndpoints {
                    locality: Some(core_locality(&Locality::parse(l))),
                    lb_endpoints: vec![Default::default()],
                    load_balancing_weight: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn place(l: &str) -> Place {
        (Locality::parse(l), None)
    }

    fn failover_policy(failover: Vec<LocalityFailover>) -> TrafficPolicy {
        TrafficPolicy {
            outlier_detection: Some(OutlierDetection::default()),
            locality_lb: Some(LocalityLbSetting {
                failover,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn failover_orders_localities_by_proximity_without_gaps() {
        let mut c = cla(&["us/a/1", "us/a/2", "us/b/1", "eu/c/1", "ap/d/1"]);
        apply_assignment(&mut c, &place("us/a/1"), &failover_policy(vec![]));
        let p: Vec<u32> = c.endpoints.iter().map(|g| g.priority).collect();
        assert_eq!(p, [0, 1, 2, 3, 3]);
        // Failing over from us to eu: other regions come after eu.
        let mut c = cla(&["us/a/1", "eu/c/1", "ap/d/1"]);
        let policy = failover_policy(vec![LocalityFailover {
            from: "us".into(),
            to: "eu".into(),
        }]);
        apply_assignment(&mut c, &place("us/a/1"), &policy);
        let p: Vec<u32> = c.endpoints.iter().map(|g| g.priority).collect();
        assert_eq!(p, [0, 1, 2]);
        let mut cluster = Cluster::default();
        apply_cluster(&mut cluster, &policy);
        assert!(cluster.common_lb_config.is_some());
    }

    #[test]
    fn without_outlier_detection_or_when_disabled_nothing_changes() {
        let mut c = cla(&["us/a/1", "eu/c/1"]);
        let policy = TrafficPolicy::default();
        assert!(!depends_on_proxy(&policy));
        apply_assignment(&mut c, &place("us/a/1"), &policy);
        assert!(c.endpoints.iter().all(|g| g.priority == 0));
        let disabled = TrafficPolicy {
            locality_lb: Some(LocalityLbSetting {
                enabled: Some(false),
                ..Default::default()
            }),
            ..failover_policy(vec![])
        };
        assert!(!depends_on_proxy(&disabled));
        let mut cluster = Cluster::default();
        apply_cluster(&mut cluster, &failover_policy(vec![]));
        assert!(
            cluster.common_lb_config.is_none(),
            "default failover: no weighted config"
        );
    }

    #[test]
    fn distribute_splits_weights_and_empties_the_rest() {
        let mut c = cla(&["us/a/1", "us/a/2", "us/b/1", "eu/c/1"]);
        let policy = TrafficPolicy {
            locality_lb: Some(LocalityLbSetting {
                distribute: vec![LocalityDistribute {
                    from: "us/a/*".into(),
                    to: vec![("us/a/*".into(), 80), ("us/b/*".into(), 20)],
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(depends_on_proxy(&policy));
        apply_assignment(&mut c, &place("us/a/1"), &policy);
        let w: Vec<u32> = c
            .endpoints
            .iter()
            .map(|g| g.load_balancing_weight.as_ref().unwrap().value)
            .collect();
        assert_eq!(w, [40, 40, 20, 1]);
        assert!(c.endpoints[3].lb_endpoints.is_empty(), "eu is not a target");
    }

    fn endpoint(ip: &str, labels: &[(&str, &str)], locality: &str) -> Endpoint {
        let mut ep =
            meshreg_registry::test_util::endpoint(ip, &meshreg_registry::test_util::test_source());
        ep.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ep.locality = Locality::parse(locality).into();
        ep
    }

    fn priority_policy(priorities: &[&str], failover: Vec<LocalityFailover>) -> TrafficPolicy {
        TrafficPolicy {
            outlier_detection: Some(OutlierDetection::default()),
            locality_lb: Some(LocalityLbSetting {
                failover_priority: priorities.iter().map(|p| p.to_string()).collect(),
                failover,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Istio's `applyFailoverPriorityPerLocality`: the first label that
    /// differs from the proxy's decides (n - index), topology labels come
    /// from the locality, and `label=value` compares with that value.
    #[test]
    fn failover_priority_ranks_by_the_first_differing_label() {
        let policy = priority_policy(&["topology.istio.io/network", "app", "version=v2"], vec![]);
        let proxy = vec![
            ("app".to_string(), "web".to_string()),
            ("topology.istio.io/network".to_string(), "n1".to_string()),
        ];
        let rank = failover_ranks(&policy, &proxy).expect("ranked");
        let mut same = endpoint("10.0.0.1", &[("app", "web"), ("version", "v2")], "us/a/1");
        same.network = "n1".into();
        assert_eq!(rank(&same), 0);
        let mut v1 = same.clone();
        v1.labels.insert("version".into(), "v1".into());
        assert_eq!(rank(&v1), 1);
        let mut other_app = same.clone();
        other_app.labels.insert("app".into(), "db".into());
        assert_eq!(rank(&other_app), 2);
        let other_network = endpoint("10.0.0.4", &[("app", "web"), ("version", "v2")], "us/a/1");
        assert_eq!(rank(&other_network), 3);
        // A network label of the workload's own stands when it has no
        // network; the locality's labels override the workload's.
        let labelled = endpoint(
            "10.0.0.5",
            &[
                ("app", "web"),
                ("version", "v2"),
                ("topology.istio.io/network", "n1"),
            ],
            "us/a/1",
        );
        assert_eq!(rank(&labelled), 0);
        let l = Locality::parse("eu/b/2");
        let own = [(
            "topology.kubernetes.io/region".to_string(),
            "us".to_string(),
        )]
        .into_iter()
        .collect();
        assert_eq!(
            label_value(&own, &l, "", "", "topology.kubernetes.io/region"),
            "eu"
        );
        // Not ranked without outlier detection, or with distribute.
        let mut no_outlier = policy.clone();
        no_outlier.outlier_detection = None;
        assert!(failover_ranks(&no_outlier, &proxy).is_none());
    }

    /// A locality group split by label priority is renumbered without
    /// gaps; with `failover` too, proximity applies on top (priority × 5 +
    /// proximity, renumbered), as in pilot's `ApplyLocalityLoadBalancer`.
    #[test]
    fn ranked_groups_are_renumbered_and_failover_applies_on_top() {
        let mut c = cla(&["us/a/1", "us/a/1", "eu/c/1"]);
        c.endpoints[0].priority = 0;
        c.endpoints[1].priority = 2;
        c.endpoints[2].priority = 2;
        let policy = priority_policy(&["app"], vec![]);
        apply_assignment(&mut c, &place("us/a/1"), &policy);
        let p: Vec<u32> = c.endpoints.iter().map(|g| g.priority).collect();
        assert_eq!(p, [0, 1, 1]);
        let mut c = cla(&["us/a/1", "us/a/1", "eu/c/1"]);
        c.endpoints[1].priority = 1;
        c.endpoints[2].priority = 1;
        let policy = priority_policy(
            &["app"],
            vec![LocalityFailover {
                from: "us".into(),
                to: "eu".into(),
            }],
        );
        apply_assignment(&mut c, &place("us/a/1"), &policy);
        let p: Vec<u32> = c.endpoints.iter().map(|g| g.priority).collect();
        // (0, same zone) 0; (1, same zone) 5; (1, eu: failover target) 8.
        assert_eq!(p, [0, 1, 2]);
        let mut cluster = Cluster::default();
        apply_cluster(&mut cluster, &priority_policy(&["app"], vec![]));
        assert!(cluster.common_lb_config.is_some());
    }
}
