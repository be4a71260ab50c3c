//! Envoy's Client Status Discovery Service
//! (`envoy.service.status.v3.ClientStatusDiscoveryService`) on the xDS
//! port: what each connected proxy was sent and answered, for tools that
//! speak CSDS (istiod serves the same).
//!
//! Each request gets one `ClientStatusResponse` with a `ClientConfig` per
//! connected proxy whose node id matches the request's `node_matchers`
//! (every proxy when there are none), in node id order. Its
//! `generic_xds_configs` hold one entry per resource the proxy holds
//! (type URL, name, version, the resource unless
//! `exclude_resource_contents`) with:
//!
//! - `config_status`: the type's state, as istiod maps it: SYNCED, STALE
//!   (sent, not acknowledged), NOT_SENT, ERROR (the last response was
//!   rejected);
//! - `client_status`: ACKED, or NACKED with `error_state` (Envoy's last
//!   error and the rejected version) when the type's last response was
//!   rejected, or REQUESTED while the response is in flight.
//!
//! A matcher other than `node_id` (node metadata) matches nothing: meshreg
//! has no use for metadata matching yet. `FetchClientStatus` is unary;
//! `StreamClientStatus` answers each request on the stream. At most
//! [`MAX_PROXIES`] proxies per response, to bound its size.

use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
    client_config::GenericXdsConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, Timestamp};
use http_body::{Body, Frame};
use prost::Message;

use crate::grpc::{self, Code, RequestStream, Status};
use crate::proxy::Connected;
use crate::server::AdsService;
use crate::status::{SyncState, TypeSync};

/// The unary method.
pub(crate) const FETCH_PATH: &str =
    "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus";
/// The streaming method.
pub(crate) const STREAM_PATH: &str =
    "/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus";

/// Proxies per response at most.
pub(crate) const MAX_PROXIES: usize = 10_000;

/// Requests are small: node matchers.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Serves one CSDS call: `unary` answers one request and ends.
pub(crate) fn serve<B>(ads: AdsService, body: B, unary: bool) -> http::Response<grpc::ResponseBody>
where
    B: Body + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
    B::Data: Send,
{
    let (tx, resp) = grpc::streaming_response(1);
    tokio::spawn(async move {
        let mut requests = RequestStream::<B, ClientStatusRequest>::new(body, MAX_REQUEST_BYTES);
        let status = loop {
            match requests.message().await {
                Ok(Some(req)) => {
                    let reply = respond(&ads, &req).await;
                    let frame = grpc::message_frame(reply.encoded_len(), |buf| {
                        // Encoding into a buffer sized by encoded_len cannot fail.
                        let _ = reply.encode(buf);
                    });
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                    if unary {
                        break Status::new(Code::Ok, "");
                    }
                }
                Ok(None) if unary => {
                    break Status::new(Code::InvalidArgument, "no ClientStatusRequest sent");
                }
                Ok(None) => break Status::new(Code::Ok, ""),
                Err(status) => break status,
            }
        };
        let _ = tx.send(Ok(Frame::trailers(status.to_headers()))).await;
    });
    resp
}

/// The response to `req`.
pub(crate) async fn respond(ads: &AdsService, req: &ClientStatusRequest) -> ClientStatusResponse {
    let mut config = Vec::new();
    for c in ads
        .proxies()
        .into_iter()
        .filter(|c| matches(req, &c.proxy.id))
        .take(MAX_PROXIES)
    {
        config.push(client_config(ads, &c, req.exclude_resource_contents).await);
    }
    ClientStatusResponse { config }
}

fn matches(req: &ClientStatusRequest, id: &str) -> bool {
    req.node_matchers.is_empty()
        || req.node_matchers.iter().any(|m| {
            m.node_id
                .as_ref()
                .is_some_and(|matcher| string_matches(matcher, id))
        })
}

fn string_matches(m: &StringMatcher, s: &str) -> bool {
    let fold = |x: &str| {
        if m.ignore_case {
            x.to_ascii_lowercase()
        } else {
            x.to_string()
        }
    };
    let s = fold(s);
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(p)) => s == fold(p),
        Some(string_matcher::MatchPattern::Prefix(p)) => s.starts_with(&fold(p)),
        Some(string_matcher::MatchPattern::Suffix(p)) => s.ends_with(&fold(p)),
        Some(string_matcher::MatchPattern::Contains(p)) => s.contains(&fold(p)),
        // Regular expressions are not evaluated: they match nothing.
        _ => false,
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// istiod's mapping of a type's state to CSDS's.
fn config_status(s: &TypeSync) -> (ConfigStatus, ClientResourceStatus) {
    match s.state() {
        SyncState::Synced => (ConfigStatus::Synced, ClientResourceStatus::Acked),
        SyncState::Stale => (ConfigStatus::Stale, ClientResourceStatus::Requested),
        SyncState::NotSent => (ConfigStatus::NotSent, ClientResourceStatus::Requested),
        SyncState::Nacked => (ConfigStatus::Error, ClientResourceStatus::Nacked),
    }
}

async fn client_config(ads: &AdsService, c: &Connected, exclude: bool) -> ClientConfig {
    let dump = ads.config_dump_of(c).await;
    let mut generic = Vec::new();
    for s in &c.sync {
        let (config_status, client_status) = config_status(s);
        let error_state = s
            .nacked
            .as_ref()
            .filter(|_| s.state() == SyncState::Nacked)
            .map(|n| UpdateFailureState {
                failed_configuration: None,
                last_update_attempt: Some(timestamp(n.response.at)),
                details: n.message.clone(),
                version_info: n.response.version.to_string(),
            });
        let held = dump
            .as_ref()
            .and_then(|d| d.types.iter().find(|t| t.type_url == s.type_url));
        let rejected = held.map(|t| t.rejected.as_slice()).unwrap_or_default();
        // A resource the proxy rejected (and that is still current) is
        // NACKED with the error, whatever the type's state.
        let failure = |version: &str| UpdateFailureState {
            failed_configuration: None,
            last_update_attempt: s.nacked.as_ref().map(|n| timestamp(n.response.at)),
            details: s
                .nacked
                .as_ref()
                .map(|n| n.message.clone())
                .unwrap_or_default(),
            version_info: version.to_string(),
        };
        for r in held.map(|t| t.resources.as_slice()).unwrap_or_default() {
            let bad = rejected.iter().find(|(name, _)| *name == r.name);
            generic.push(GenericXdsConfig {
                type_url: s.type_url.as_str().to_string(),
                name: r.name.to_string(),
                version_info: r.version.to_string(),
                xds_config: r
                    .resource
                    .as_ref()
                    .filter(|_| !exclude)
                    .and_then(|res| Any::decode(res.any.clone()).ok()),
                last_updated: s.acked.as_ref().map(|a| timestamp(a.at)),
                config_status: match bad {
                    Some(_) => ConfigStatus::Error as i32,
                    None => config_status as i32,
                },
                client_status: match bad {
                    Some(_) => ClientResourceStatus::Nacked as i32,
                    None => client_status as i32,
                },
                error_state: match bad {
                    Some((_, v)) => Some(failure(v)),
                    None => error_state.clone(),
                },
                is_static_resource: false,
            });
        }
        // Rejected before the proxy ever held a version.
        for (name, version) in rejected {
            if held.is_some_and(|t| t.resources.iter().any(|r| r.name == *name)) {
                continue;
            }
            generic.push(GenericXdsConfig {
                type_url: s.type_url.as_str().to_string(),
                name: name.to_string(),
                config_status: ConfigStatus::Error as i32,
                client_status: ClientResourceStatus::Nacked as i32,
                error_state: Some(failure(version)),
                ..Default::default()
            });
        }
    }
    ClientConfig {
        node: Some(Node {
            id: c.proxy.id.clone(),
            ..Default::default()
        }),
        generic_xds_configs: generic,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3::NodeMatcher;

    fn req(m: Option<string_matcher::MatchPattern>) -> ClientStatusRequest {
        ClientStatusRequest {
            node_matchers: m
                .map(|p| NodeMatcher {
                    node_id: Some(StringMatcher {
                        match_pattern: Some(p),
                        ignore_case: false,
                    }),
                    node_metadatas: Vec::new(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn node_matchers_select_by_node_id() {
        use string_matcher::MatchPattern::*;
        assert!(matches(&req(None), "anything"));
        assert!(matches(&req(Some(Exact("a".into()))), "a"));
        assert!(!matches(&req(Some(Exact("a".into()))), "ab"));
        assert!(matches(&req(Some(Prefix("sidecar~".into()))), "sidecar~1"));
        assert!(matches(&req(Some(Suffix(".ns".into()))), "pod.ns"));
        assert!(matches(&req(Some(Contains("x".into()))), "axb"));
        let mut r = req(Some(Exact("ABC".into())));
        r.node_matchers[0].node_id.as_mut().unwrap().ignore_case = true;
        assert!(matches(&r, "abc"));
    }

    #[test]
    fn states_map_as_istiod_maps_them() {
        let t = crate::TypeUrl::Cluster;
        let sync = crate::status::StreamSync::default();
        let get = || sync.get()[t as usize].clone();
        assert_eq!(
            config_status(&get()),
            (ConfigStatus::NotSent, ClientResourceStatus::Requested)
        );
        sync.sent(t, "1".into(), "v".into());
        assert_eq!(config_status(&get()).0, ConfigStatus::Stale);
        sync.answered(t, "1", None);
        assert_eq!(
            config_status(&get()),
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        );
        sync.sent(t, "2".into(), "w".into());
        sync.answered(t, "2", Some("bad"));
        assert_eq!(
            config_status(&get()),
            (ConfigStatus::Error, ClientResourceStatus::Nacked)
        );
    }
}
