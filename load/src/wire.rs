//! What a simulated proxy decodes: lightweight views of the xDS response
//! messages that keep only the fields a proxy acts on (names, versions,
//! cluster type, endpoint weights). prost skips every other field, so the
//! fleet spends its CPU on the protocol, not on decoding whole resources.
//! Requests use Envoy's own message types.

use std::marker::PhantomData;

use bytes::{Buf, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use xxhash_rust::xxh3::Xxh3;

/// `DeltaDiscoveryResponse`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DeltaResponse {
    #[prost(message, repeated, tag = "2")]
    pub(crate) resources: Vec<DeltaResource>,
    #[prost(string, tag = "4")]
    pub(crate) type_url: String,
    #[prost(string, tag = "5")]
    pub(crate) nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub(crate) removed_resources: Vec<String>,
}

/// `discovery.v3.Resource`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct DeltaResource {
    #[prost(string, tag = "1")]
    pub(crate) version: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) resource: Option<Any>,
    #[prost(string, tag = "3")]
    pub(crate) name: String,
}

/// `DiscoveryResponse`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct SotwResponse {
    #[prost(string, tag = "1")]
    pub(crate) version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub(crate) resources: Vec<Any>,
    #[prost(string, tag = "4")]
    pub(crate) type_url: String,
    #[prost(string, tag = "5")]
    pub(crate) nonce: String,
}

/// `google.protobuf.Any` with the value left as shared bytes.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Any {
    #[prost(string, tag = "1")]
    pub(crate) type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    pub(crate) value: Bytes,
}

/// `Cluster`: name, discovery type and EDS service name.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Cluster {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
    /// The `type` member of the `cluster_discovery_type` oneof.
    #[prost(int32, optional, tag = "2")]
    pub(crate) discovery_type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    pub(crate) eds_cluster_config: Option<EdsClusterConfig>,
}

/// `Cluster.DiscoveryType.EDS`.
pub(crate) const DISCOVERY_TYPE_EDS: i32 = 3;

/// `Cluster.EdsClusterConfig`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct EdsClusterConfig {
    #[prost(string, tag = "2")]
    pub(crate) service_name: String,
}

impl Cluster {
    /// The EDS resource name this cluster needs, if it is an EDS cluster.
    pub(crate) fn eds_name(&self) -> Option<&str> {
        (self.discovery_type == Some(DISCOVERY_TYPE_EDS)).then_some(
            match &self.eds_cluster_config {
                Some(c) if !c.service_name.is_empty() => c.service_name.as_str(),
                _ => self.name.as_str(),
            },
        )
    }
}

/// `ClusterLoadAssignment`: name and per-endpoint weights.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ClusterLoadAssignment {
    #[prost(string, tag = "1")]
    pub(crate) cluster_name: String,
    #[prost(message, repeated, tag = "2")]
    pub(crate) endpoints: Vec<LocalityLbEndpoints>,
}

/// `LocalityLbEndpoints`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct LocalityLbEndpoints {
    #[prost(message, repeated, tag = "2")]
    pub(crate) lb_endpoints: Vec<LbEndpoint>,
    /// The `leds_cluster_locality_config` member of the `lb_config` oneof.
    #[prost(message, optional, tag = "8")]
    pub(crate) leds: Option<LedsConfig>,
}

/// `LedsClusterLocalityConfig`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct LedsConfig {
    #[prost(string, tag = "2")]
    pub(crate) collection: String,
}

/// `LbEndpoint`, lite.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct LbEndpoint {
    #[prost(message, optional, tag = "4")]
    pub(crate) load_balancing_weight: Option<UInt32Value>,
}

/// `google.protobuf.UInt32Value`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct UInt32Value {
    #[prost(uint32, tag = "1")]
    pub(crate) value: u32,
}

impl ClusterLoadAssignment {
    /// The LEDS collections its localities name (none when it lists its
    /// endpoints).
    pub(crate) fn collections(&self) -> impl Iterator<Item = &str> {
        self.endpoints
            .iter()
            .filter_map(|l| l.leds.as_ref().map(|c| c.collection.as_str()))
    }

    /// The largest endpoint weight: the driver stamps each change's
    /// sequence number there.
    pub(crate) fn stamp(&self) -> u32 {
        self.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter_map(|e| e.load_balancing_weight.as_ref().map(|w| w.value))
            .max()
            .unwrap_or(0)
    }
}

/// The digest term of one resource: the same function meshreg's cache uses
/// for a type's SotW version, so a proxy's view can be compared with the
/// server's in O(1).
pub(crate) fn digest_term(name: &str, version: &str) -> u64 {
    let mut h = Xxh3::new();
    h.update(name.as_bytes());
    h.update(&[0]);
    h.update(version.as_bytes());
    h.digest()
}

/// A codec that encodes requests with prost and decodes responses into the
/// lite types, reporting each response's size on the wire.
#[derive(Debug)]
pub(crate) struct LiteCodec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for LiteCodec<Req, Resp> {
    fn default() -> Self {
        LiteCodec(PhantomData)
    }
}

impl<Req, Resp> Codec for LiteCodec<Req, Resp>
where
    Req: Message + Send + 'static,
    Resp: Message + Default + Send + 'static,
{
    type Encode = Req;
    type Decode = (usize, Resp);
    type Encoder = LiteEncoder<Req>;
    type Decoder = LiteDecoder<Resp>;

    fn encoder(&mut self) -> Self::Encoder {
        LiteEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        LiteDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub(crate) struct LiteEncoder<Req>(PhantomData<fn() -> Req>);

impl<Req: Message> Encoder for LiteEncoder<Req> {
    type Item = Req;
    type Error = Status;

    fn encode(&mut self, item: Req, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[derive(Debug)]
pub(crate) struct LiteDecoder<Resp>(PhantomData<fn() -> Resp>);

impl<Resp: Message + Default> Decoder for LiteDecoder<Resp> {
    type Item = (usize, Resp);
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let len = src.remaining();
        let msg = Resp::decode(src).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Some((len, msg)))
    }
}

/// A SotW `DiscoveryRequest` whose `resource_names` were encoded once: Envoy
/// repeats every subscribed name in every ACK, and re-encoding thousands of
/// names per ACK would make the fleet, not the server, the bottleneck.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct SotwRequest {
    /// Every field but the names.
    pub(crate) head: envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
    /// Field 3 (`resource_names`), encoded.
    pub(crate) names: Bytes,
}

/// Encodes `names` as `DiscoveryRequest.resource_names` entries.
pub(crate) fn encode_names(names: &[String]) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    for n in names {
        prost::encoding::string::encode(3, n, &mut buf);
    }
    buf.freeze()
}

impl Message for SotwRequest {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        self.head.encode_raw(buf);
        buf.put_slice(&self.names);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only ever encoded by the fleet.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.head.encoded_len() + self.names.len()
    }

    fn clear(&mut self) {
        *self = SotwRequest::default();
    }
}
