//! A `DestinationRule`'s `tls` as the cluster's upstream TLS transport
//! socket, following istiod's `buildUpstreamClusterTLSContext` (pilot's
//! `cluster_tls.go`) with one deliberate difference: istiod hands the
//! certificate files of `SIMPLE` and `MUTUAL` to the sidecar's istio-agent
//! over SDS (`file-cert:` / `file-root:` resources), while meshreg serves
//! any Envoy and names the files in the config (`filename` data sources),
//! which Envoy reads itself (and re-reads when they are replaced by a
//! rename, as its file watcher does for `filename` sources).
//!
//! - `DISABLE`: no transport socket.
//! - `SIMPLE`: TLS 1.2–1.3; `caCertificates` verifies the server, matching
//!   `subjectAltNames` (each as a DNS and a URI name, which Istio's untyped
//!   matcher covers); without a CA, or with `insecureSkipVerify`, the
//!   server is not verified (istiod's rule). `sni` as given; without one,
//!   the cluster's HTTP options set `auto_sni` (and `auto_san_validation`
//!   when no SAN is given and verification is on), as istiod does.
//! - `MUTUAL`: the same, plus `clientCertificate` and `privateKey`.
//! - `SIMPLE` or `MUTUAL` with a `credentialName`: no TLS, as istiod
//!   builds it for a sidecar (the secret needs SDS, which only gateways
//!   get); the rule's source warns.
//! - `ISTIO_MUTUAL`: exactly istiod's socket: the `default` and `ROOTCA`
//!   secrets over SDS from the proxy's `sds-grpc` cluster (what
//!   istio-agent serves an Istio sidecar), SNI the cluster name, ALPN
//!   `istio-peer-exchange`, `istio`. meshreg issues no certificates: a
//!   proxy without istio-agent has no `sds-grpc` cluster and rejects the
//!   cluster (the NACK is logged and counted; its other clusters apply).
//!
//! An HTTP/2 cluster advertises `h2` over ALPN (`SIMPLE`, `MUTUAL`).

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ConfigSource, DataSource, GrpcService, TransportSocket, api_config_source,
    config_source, data_source, grpc_service, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    TlsCertificate, TlsParameters, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher::SanType, tls_parameters::TlsProtocol,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::Any;
use meshreg_registry::{ClientTls, TlsSetting};
use prost::Message;

use crate::policy::HttpOptions;

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const UPSTREAM_TLS: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The cluster istio-agent's SDS server is reached through in an Istio
/// sidecar's bootstrap.
const SDS_CLUSTER: &str = "sds-grpc";

/// Sets `c`'s transport socket (a cluster named `name`) from `tls`;
/// `http` collects the auto SNI options.
pub(crate) fn apply(c: &mut Cluster, tls: &ClientTls, http: &mut HttpOptions) {
    let context = match tls.mode {
        TlsSetting::Disable => return,
        // istiod's rule for sidecars: a secret by name needs SDS, which
        // only gateways get; the cluster originates no TLS.
        TlsSetting::Simple | TlsSetting::Mutual if !tls.credential_name.is_empty() => return,
        TlsSetting::Simple | TlsSetting::Mutual => {
            let verify = !tls.ca_certificates.is_empty() && !tls.insecure_skip_verify;
            if tls.sni.is_empty() {
                http.auto_sni = true;
                http.auto_san_validation = tls.subject_alt_names.is_empty() && verify;
            }
            let mut common = common_context();
            if tls.mode == TlsSetting::Mutual {
                common.tls_certificates = vec![TlsCertificate {
                    certificate_chain: Some(file(&tls.client_certificate)),
                    private_key: Some(file(&tls.private_key)),
                    ..Default::default()
                }];
            }
            let mut validation = CertificateValidationContext::default();
            if verify {
                validation.trusted_ca = Some(file(&tls.ca_certificates));
                validation.match_typed_subject_alt_names = san_matchers(&tls.subject_alt_names);
            }
            common.validation_context_type =
                Some(common_tls_context::ValidationContextType::ValidationContext(validation));
            if http.http2 {
                common.alpn_protocols = vec!["h2".into()];
            }
            UpstreamTlsContext {
                common_tls_context: Some(common),
                sni: tls.sni.clone(),
                ..Default::default()
            }
        }
        TlsSetting::IstioMutual => {
            let mut common = common_context();
            common.tls_certificate_sds_secret_configs = vec![sds("default")];
            common.validation_context_type = Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: san_matchers(&tls.subject_alt_names),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                ),
            );
            common.alpn_protocols = vec!["istio-peer-exchange".into(), "istio".into()];
            UpstreamTlsContext {
                common_tls_context: Some(common),
                sni: if tls.sni.is_empty() {
                    c.name.clone()
                } else {
                    tls.sni.clone()
                },
                ..Default::default()
            }
        }
    };
    c.transport_socket = Some(TransportSocket {
        name: TLS_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: format!("type.googleapis.com/{UPSTREAM_TLS}"),
            value: context.encode_to_vec(),
        })),
    });
}

/// istiod's `defaultUpstreamCommonTLSContext`: TLS 1.2 to 1.3.
fn common_context() -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn file(path: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    }
}

/// Each SAN as an exact DNS and URI name (Istio's untyped exact matchers
/// match either).
fn san_matchers(sans: &[String]) -> Vec<SubjectAltNameMatcher> {
    sans.iter()
        .flat_map(|san| {
            [SanType::Dns, SanType::Uri].map(|t| SubjectAltNameMatcher {
                san_type: t as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(san.clone())),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect()
}

/// istiod's `ConstructSdsSecretConfig`: `name` over SDS from `sds-grpc`.
fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(ConfigSource {
            resource_api_version: 2, // V3
            config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(
                ApiConfigSource {
                    api_type: api_config_source::ApiType::Grpc as i32,
                    set_node_on_first_message_only: true,
                    transport_api_version: 2, // V3
                    grpc_services: vec![GrpcService {
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: SDS_CLUSTER.into(),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(mode: TlsSetting) -> ClientTls {
        ClientTls {
            mode,
            client_certificate: "/certs/client.pem".into(),
            private_key: "/certs/client.key".into(),
            ca_certificates: "/certs/ca.pem".into(),
            sni: String::new(),
            subject_alt_names: vec!["backend.example.com".into()],
            insecure_skip_verify: false,
            credential_name: String::new(),
        }
    }

    fn context(c: &Cluster) -> UpstreamTlsContext {
        match &c.transport_socket.as_ref().unwrap().config_type {
            Some(transport_socket::ConfigType::TypedConfig(any)) => {
                UpstreamTlsContext::decode(any.value.as_slice()).unwrap()
            }
            None => panic!("no config"),
        }
    }

    #[test]
    fn mutual_names_the_files_and_checks_the_server() {
        let mut c = Cluster::default();
        let mut http = HttpOptions::default();
        apply(&mut c, &tls(TlsSetting::Mutual), &mut http);
        let ctx = context(&c);
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(common.tls_certificates.len(), 1);
        let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
            common.validation_context_type
        else {
            panic!("a validation context");
        };
        assert_eq!(v.trusted_ca, Some(file("/certs/ca.pem")));
        assert_eq!(v.match_typed_subject_alt_names.len(), 2);
        assert!(http.auto_sni && !http.auto_san_validation, "SANs are given");
    }

    #[test]
    fn simple_without_a_ca_does_not_verify_and_disable_sends_nothing() {
        let mut c = Cluster::default();
        let mut http = HttpOptions::default();
        let t = ClientTls {
            ca_certificates: String::new(),
            sni: "api.example.com".into(),
            ..tls(TlsSetting::Simple)
        };
        apply(&mut c, &t, &mut http);
        let ctx = context(&c);
        assert_eq!(ctx.sni, "api.example.com");
        let common = ctx.common_tls_context.unwrap();
        assert!(common.tls_certificates.is_empty());
        assert_eq!(
            common.validation_context_type,
            Some(
                common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext::default()
                )
            )
        );
        assert!(!http.auto_sni);
        let mut c = Cluster::default();
        apply(
            &mut c,
            &tls(TlsSetting::Disable),
            &mut HttpOptions::default(),
        );
        assert!(c.transport_socket.is_none());
        // A secret by name, as istiod treats it for a sidecar: no TLS.
        let named = ClientTls {
            credential_name: "backend-certs".into(),
            ..tls(TlsSetting::Mutual)
        };
        apply(&mut c, &named, &mut HttpOptions::default());
        assert!(c.transport_socket.is_none());
    }

    #[test]
    fn istio_mutual_is_istiod_s_sds_socket() {
        let mut c = Cluster {
            name: "outbound|80||a.test".into(),
            ..Default::default()
        };
        apply(
            &mut c,
            &tls(TlsSetting::IstioMutual),
            &mut HttpOptions::default(),
        );
        let ctx = context(&c);
        assert_eq!(ctx.sni, "outbound|80||a.test");
        let common = ctx.common_tls_context.unwrap();
        assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
        assert_eq!(common.alpn_protocols, ["istio-peer-exchange", "istio"]);
    }
}
