//! `Sidecar`: its YAML schema, Istio's validation of its egress part
//! (`ValidateSidecar`), and the registry's form.
//!
//! meshreg reads what decides which services a proxy sees: the workload
//! selector and the egress listeners' `hosts` (their union: meshreg
//! generates no listeners, so a listener's port and bind do not narrow
//! anything). `ingress`, `outboundTrafficPolicy` and the listeners' ports
//! are accepted and dropped, as the API server prunes fields of a
//! structural schema.

use std::collections::BTreeMap;

use meshreg_registry::{EgressHost, EgressNamespace, Sidecar};
use serde::Deserialize;

use super::validate::{Findings, Issue};

/// `Sidecar.spec`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SidecarSpec {
    #[serde(default)]
    workload_selector: Option<SelectorSpec>,
    #[serde(default)]
    egress: Option<Vec<EgressSpec>>,
    #[serde(default)]
    ingress: Option<Vec<serde_yaml_ng::Value>>,
    #[serde(default)]
    outbound_traffic_policy: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    inbound_connection_pool: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SelectorSpec {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EgressSpec {
    #[serde(default)]
    port: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    hosts: Option<Vec<String>>,
}

fn error(f: &mut Findings, path: String, message: String) {
    f.errors.push(Issue {
        path,
        message: format!("ValidateSidecar: {message}"),
    });
}

/// Whether `s` is a DNS label (RFC 1123: lowercase letters, digits and
/// `-`, not at either end, at most 63).
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Istio's `validateNamespaceSlashWildcardHostname` for a sidecar: the
/// namespace part is `*`, `.`, `~` or a namespace name; the host part `*`,
/// `*.suffix` or a name whose labels are DNS labels (case-insensitive).
fn egress_host(h: &str) -> Result<(&str, &str), String> {
    let Some((ns, host)) = h.split_once('/') else {
        return Err(format!("{h:?}: host must be of the form namespace/dnsName"));
    };
    if !(ns == "*" || ns == "." || ns == "~" || dns_label(ns)) {
        return Err(format!("{h:?}: invalid namespace value {ns:?}"));
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = host == "*"
        || (!name.is_empty()
            && name.len() <= 255
            && name.split('.').all(|l| dns_label(&l.to_ascii_lowercase())));
    if !ok {
        return Err(format!("{h:?}: {host:?} is not *, *.domain or a DNS name"));
    }
    Ok((ns, host))
}

/// Validates `spec` (Istio's `ValidateSidecar`, egress part) and converts
/// it. `None` when it has errors.
pub(crate) fn validate_and_convert(
    spec: &SidecarSpec,
    name: &str,
    namespace: &str,
) -> (Option<Sidecar>, Findings) {
    let mut f = Findings::default();
    let selector = spec
        .workload_selector
        .as_ref()
        .map(|w| w.labels.clone().unwrap_or_default());
    if selector.as_ref().is_some_and(BTreeMap::is_empty) {
        error(
            &mut f,
            "spec.workloadSelector.labels".into(),
            "workloadSelector cannot have empty labels".into(),
        );
    }
    let egress = spec.egress.as_deref().unwrap_or_default();
    if egress.is_empty()
        && spec.ingress.as_deref().unwrap_or_default().is_empty()
        && spec.outbound_traffic_policy.is_none()
        && spec.inbound_connection_pool.is_none()
    {
        error(
            &mut f,
            "spec".into(),
            "sidecar: empty configuration provided".into(),
        );
    } else if egress.is_empty() {
        f.warnings.push(Issue {
            path: "spec.egress".into(),
            message: "ValidateSidecar: sidecar: missing egress (every service is imported)".into(),
        });
    }
    let mut hosts = Vec::new();
    let mut catch_all = false;
    for (i, e) in egress.iter().enumerate() {
        if e.port.is_none() {
            if catch_all {
                error(
                    &mut f,
                    format!("spec.egress[{i}].port"),
                    "egress can have only one listener with empty port".into(),
                );
            } else if i != egress.len() - 1 {
                error(
                    &mut f,
                    format!("spec.egress[{i}].port"),
                    "the egress listener with empty port should be the last listener in the list"
                        .into(),
                );
            } else {
                catch_all = true;
            }
        }
        let list = e.hosts.as_deref().unwrap_or_default();
        if list.is_empty() {
            error(
                &mut f,
                format!("spec.egress[{i}].hosts"),
                "egress listener must contain at least one host".into(),
            );
        }
        for (j, h) in list.iter().enumerate() {
            match egress_host(h) {
                Err(why) => error(&mut f, format!("spec.egress[{i}].hosts[{j}]"), why),
                // `~` imports nothing.
                Ok(("~", _)) => {}
                Ok((ns, host)) => hosts.push(EgressHost {
                    namespace: match ns {
                        "*" => EgressNamespace::Any,
                        "." => EgressNamespace::Own,
                        other => EgressNamespace::Named(other.to_string()),
                    },
                    host: host.to_ascii_lowercase(),
                }),
            }
        }
    }
    if !f.errors.is_empty() {
        return (None, f);
    }
    let sidecar = Sidecar {
        name: name.to_string(),
        namespace: namespace.to_string(),
        workload_selector: selector,
        egress_hosts: (!egress.is_empty()).then_some(hosts),
    };
    (Some(sidecar), f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SidecarSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn egress_hosts_keep_the_own_namespace_and_drop_tilde() {
        let (s, f) = validate_and_convert(
            &spec(
                "egress:\n- hosts: [\"./*\", \"istio-system/*\", \"~/*\", \"*/API.example.com\"]\n",
            ),
            "default",
            "a",
        );
        assert!(f.errors.is_empty() && f.warnings.is_empty(), "{f:?}");
        let s = s.unwrap();
        let hosts = s.egress_hosts.as_ref().unwrap();
        assert_eq!(hosts.len(), 3);
        assert!(s.imports("x.a.svc.cluster.local", "a", "a"));
        assert!(s.imports("istiod.istio-system.svc.cluster.local", "istio-system", "a"));
        assert!(!s.imports("x.b.svc.cluster.local", "b", "a"));
        assert!(s.imports("api.example.com", "b", "a"));
    }

    #[test]
    fn invalid_sidecars_are_refused_with_the_path() {
        for (yaml, path) in [
            (
                "egress:\n- hosts: [\"reviews\"]\n",
                "spec.egress[0].hosts[0]",
            ),
            (
                "egress:\n- hosts: [\"Bad_NS/*\"]\n",
                "spec.egress[0].hosts[0]",
            ),
            ("egress:\n- hosts: []\n", "spec.egress[0].hosts"),
            (
                "egress:\n- hosts: [\"./*\"]\n- hosts: [\"*/*\"]\n",
                "spec.egress[0].port",
            ),
            (
                "workloadSelector: {labels: {}}\negress:\n- hosts: [\"./*\"]\n",
                "spec.workloadSelector.labels",
            ),
        ] {
            let (s, f) = validate_and_convert(&spec(yaml), "s", "a");
            assert!(s.is_none(), "{yaml}");
            assert_eq!(f.errors[0].path, path, "{yaml}: {f:?}");
        }
    }

    #[test]
    fn no_egress_imports_everything_with_a_warning() {
        let (s, f) = validate_and_convert(&spec("{}"), "s", "a");
        assert!(s.is_none(), "an empty Sidecar is refused, as by Istio");
        assert_eq!(f.errors[0].path, "spec");
        let (s, f) = validate_and_convert(
            &spec("outboundTrafficPolicy: {mode: REGISTRY_ONLY}"),
            "s",
            "a",
        );
        assert_eq!(f.warnings.len(), 1);
        assert!(s.unwrap().imports("anything.example.com", "b", "a"));
    }
}
