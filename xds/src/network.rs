//! Multi-network split horizon, as istiod's `EndpointsByNetworkFilter`
//! does it for sidecars: a proxy on network N reaches endpoints of N (and
//! of networks without a known gateway) directly; endpoints of a network
//! M with east-west gateways are replaced by those gateways (their address
//! and port, with Istio mTLS), one per gateway and locality, weighted by
//! the weights of the endpoints they stand for, split evenly between the
//! gateways of M. As istiod (`GetLBWeightScaleFactor`), every weight is
//! first multiplied by the least common multiple of the networks' gateway
//! counts, so the split keeps local and remote endpoints in proportion. An endpoint of M without Istio mTLS cannot cross (the
//! gateway routes by SNI) and is left out. Without any gateway configured,
//! nothing changes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use meshreg_registry::{Address, Endpoint, Health, Locality, Port, SourceId, TlsMode};

/// One east-west gateway of a network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkGateway {
    /// Its address, as the other networks reach it.
    pub address: IpAddr,
    /// Its port (Istio's default is 15443).
    pub port: u16,
}

/// The gateways of each network, by network name.
pub type NetworkGateways = BTreeMap<String, Vec<NetworkGateway>>;

/// Whether `endpoints` seen from `network` need the split: some endpoint
/// is on another network that has gateways.
pub(crate) fn needs_split(
    endpoints: &[Endpoint],
    network: &str,
    gateways: &NetworkGateways,
) -> bool {
    // Called per host and scope at every generation: without gateways
    // (one network, the usual case) no endpoint is looked at.
    !gateways.is_empty()
        && endpoints.iter().any(|e| {
            *e.network != *network && gateways.get(&*e.network).is_some_and(|g| !g.is_empty())
        })
}

/// `endpoints` as a proxy on `network` gets them (see the module docs);
/// gateway endpoints serve every port of `ports` on the gateway's port.
pub(crate) fn split(
    endpoints: &[Endpoint],
    network: &str,
    gateways: &NetworkGateways,
    ports: &[Port],
    source: &SourceId,
) -> Vec<Endpoint> {
    let scale = gateways
        .values()
        .map(Vec::len)
        .filter(|n| *n > 0)
        .fold(1_u32, |acc, n| lcm(acc, u32::try_from(n).unwrap_or(1)));
    let mut out = Vec::new();
    // (locality, network, gateway) → weight.
    let mut through: BTreeMap<(Arc<Locality>, Arc<str>, NetworkGateway), u32> = BTreeMap::new();
    for e in endpoints {
        let weight = if e.weight == 0 { 1 } else { e.weight }.saturating_mul(scale);
        let gws = gateways.get(&*e.network).filter(|g| !g.is_empty());
        let Some(gws) = gws.filter(|_| *e.network != *network) else {
            let mut e = e.clone();
            e.weight = weight;
            out.push(e);
            continue;
        };
        if e.tls_mode != TlsMode::Istio || matches!(e.health, Health::Unhealthy | Health::Draining)
        {
            continue;
        }
        let n = u32::try_from(gws.len()).unwrap_or(u32::MAX);
        for gw in gws {
            let w = through
                .entry((e.locality.clone(), e.network.clone(), gw.clone()))
                .or_default();
            *w = w.saturating_add((weight / n).max(1));
        }
    }
    for ((locality, net, gw), weight) in through {
        let mut ep = Endpoint::new(Address::Ip(gw.address), source.clone());
        ep.ports = ports.iter().map(|p| (p.name.clone(), gw.port)).collect();
        ep.locality = locality;
        ep.network = net;
        ep.weight = weight;
        ep.tls_mode = TlsMode::Istio;
        out.push(ep);
    }
    out
}

/// The least common multiple of `a` and `b` (both at least 1), capped.
fn lcm(a: u32, b: u32) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    (a / gcd(a, b).max(1)).saturating_mul(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshreg_registry::{Protocol, SourceKind};

    fn ep(ip: &str, network: &str, zone: &str, istio: bool) -> Endpoint {
        let mut e = Endpoint::new(
            Address::Ip(ip.parse().unwrap()),
            SourceId::new(SourceKind::Kubernetes, "c"),
        );
        e.network = network.into();
        Arc::make_mut(&mut e.locality).zone = zone.into();
        e.tls_mode = if istio {
            TlsMode::Istio
        } else {
            TlsMode::Disabled
        };
        e
    }

    #[test]
    fn remote_endpoints_become_their_network_s_gateways_weighted_by_count() {
        let gateways: NetworkGateways = [(
            "east".to_string(),
            vec![NetworkGateway {
                address: "192.0.2.1".parse().unwrap(),
                port: 15443,
            }],
        )]
        .into();
        let ports = [Port {
            name: "http".into(),
            number: 9080,
            protocol: Protocol::Http,
            target_port: None,
        }];
        let source = SourceId::new(SourceKind::Kubernetes, "c");
        let endpoints = [
            ep("10.0.0.1", "west", "a", true),
            ep("10.1.0.1", "east", "a", true),
            ep("10.1.0.2", "east", "a", true),
            ep("10.1.0.3", "east", "b", true),
            // Without mTLS it cannot cross.
            ep("10.1.0.4", "east", "a", false),
            // A network without a gateway is reached directly.
            ep("10.2.0.1", "south", "a", false),
        ];
        assert!(needs_split(&endpoints, "west", &gateways));
        let got = split(&endpoints, "west", &gateways, &ports, &source);
        let summary: Vec<(String, String, u32, Option<u16>)> = got
            .iter()
            .map(|e| {
                (
                    format!("{:?}", e.address),
                    e.locality.zone.clone(),
                    e.weight,
                    e.ports.get("http").copied(),
                )
            })
            .collect();
        assert_eq!(summary.len(), 4, "{summary:?}");
        assert!(summary[0].0.contains("10.0.0.1"));
        assert!(summary[1].0.contains("10.2.0.1"));
        assert!(summary[2].0.contains("192.0.2.1") && summary[2].1 == "a" && summary[2].2 == 2);
        assert!(summary[3].0.contains("192.0.2.1") && summary[3].1 == "b" && summary[3].2 == 1);
        assert_eq!(summary[2].3, Some(15443));
        // Seen from east, nothing is split.
        assert!(!needs_split(&endpoints[1..4], "east", &gateways));

        // Two gateways: every weight is doubled first, so one local and
        // one remote endpoint keep half the traffic each.
        let two: NetworkGateways = [(
            "east".to_string(),
            ["192.0.2.1", "192.0.2.2"]
                .iter()
                .map(|a| NetworkGateway {
                    address: a.parse().unwrap(),
                    port: 15443,
                })
                .collect(),
        )]
        .into();
        let got = split(&endpoints[..2], "west", &two, &ports, &source);
        let weights: Vec<u32> = got.iter().map(|e| e.weight).collect();
        assert_eq!(weights, [2, 1, 1]);
    }
}
