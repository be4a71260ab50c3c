//! Encoded xDS resources: each resource version is encoded once, here, and
//! the bytes are shared (reference counted) by every response that carries
//! it, to every subscriber.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use xxhash_rust::xxh3::xxh3_64;

/// The resource types this server generates: the one table of them.
///
/// | type | follows a send of | SotW response carries | wildcard |
/// |------|-------------------|-----------------------|----------|
/// | CDS  | —                 | every subscribed resource (full state) | yes |
/// | EDS  | CDS               | changed resources only | yes |
/// | LDS  | —                 | every subscribed resource (full state) | no |
/// | RDS  | —                 | changed resources only | no |
/// | LEDS | —                 | (delta only)           | no |
///
/// LEDS (`LbEndpoint`, one resource per endpoint in `xdstp://` glob
/// collections) serves the endpoints of large clusters to delta Envoys
/// (see `leds`); such an Envoy's EDS subscription reads the snapshot's
/// [`TypeUrl::LedsClusterLoadAssignment`] table, whose large assignments
/// point to LEDS collections instead of listing endpoints. That table is
/// not a wire type: on the wire it is EDS.
///
/// The SotW column is the xDS protocol's rule (LDS and CDS responses are
/// the whole state). LDS and RDS are generated for proxyless gRPC clients
/// (istiod's `grpcgen`), which subscribe by name; a wildcard subscription
/// to them (an Envoy sidecar's LDS) gets none of them, since Envoy does not
/// take API listeners over LDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeUrl {
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    Cluster,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    ClusterLoadAssignment,
    /// Not a wire type: the ClusterLoadAssignments a LEDS-capable proxy
    /// gets (EDS on the wire; see the table above).
    LedsClusterLoadAssignment,
    /// `envoy.config.endpoint.v3.LbEndpoint` (LEDS): one endpoint of a
    /// large cluster, a member of a glob collection.
    LbEndpoint,
    /// `envoy.config.listener.v3.Listener` (LDS): API listeners for
    /// proxyless gRPC.
    Listener,
    /// `envoy.config.route.v3.RouteConfiguration` (RDS), for proxyless
    /// gRPC.
    RouteConfiguration,
}

impl TypeUrl {
    /// How many types there are (the length of per-type arrays).
    pub const COUNT: usize = 6;

    /// Every type, in the order a proxy must receive them (a type before
    /// the one that follows it, an assignment before its LEDS endpoints).
    /// Per-type arrays are indexed by `t as usize`: this is also the
    /// declaration order.
    pub const ALL: [TypeUrl; TypeUrl::COUNT] = [
        TypeUrl::Cluster,
        TypeUrl::ClusterLoadAssignment,
        TypeUrl::LedsClusterLoadAssignment,
        TypeUrl::LbEndpoint,
        TypeUrl::Listener,
        TypeUrl::RouteConfiguration,
    ];

    /// The types proxies ask for by type URL (all but the LEDS proxies'
    /// assignment table): what metrics and status list.
    pub const SERVED: [TypeUrl; 5] = [
        TypeUrl::Cluster,
        TypeUrl::ClusterLoadAssignment,
        TypeUrl::LbEndpoint,
        TypeUrl::Listener,
        TypeUrl::RouteConfiguration,
    ];

    /// The type on the wire: EDS for the LEDS assignment table, else the
    /// type itself.
    pub fn wire(self) -> TypeUrl {
        match self {
            TypeUrl::LedsClusterLoadAssignment => TypeUrl::ClusterLoadAssignment,
            t => t,
        }
    }

    /// The full type URL.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            TypeUrl::ClusterLoadAssignment => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            TypeUrl::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            TypeUrl::RouteConfiguration => {
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
            }
            TypeUrl::LbEndpoint => "type.googleapis.com/envoy.config.endpoint.v3.LbEndpoint",
            TypeUrl::LedsClusterLoadAssignment => TypeUrl::ClusterLoadAssignment.as_str(),
        }
    }

    /// Istio's short name for the type (metric label): `cds`, `eds`,
    /// `lds`, `rds` or `leds` (the LEDS assignment table is `eds`).
    pub fn short(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "cds",
            TypeUrl::ClusterLoadAssignment | TypeUrl::LedsClusterLoadAssignment => "eds",
            TypeUrl::Listener => "lds",
            TypeUrl::RouteConfiguration => "rds",
            TypeUrl::LbEndpoint => "leds",
        }
    }

    /// The type whose resources of the same name must follow a send of
    /// this one: Envoy warms a new or changed cluster until its
    /// ClusterLoadAssignment arrives. (A gRPC client does not warm a
    /// listener: its RouteConfiguration, named otherwise, is sent when
    /// subscribed and when it changes.)
    pub fn follower(self) -> Option<TypeUrl> {
        match self {
            TypeUrl::Cluster => Some(TypeUrl::ClusterLoadAssignment),
            _ => None,
        }
    }

    /// Whether a SotW response carries every subscribed resource (LDS and
    /// CDS, by the xDS protocol) rather than only the changed ones.
    pub fn full_state_in_sotw(self) -> bool {
        matches!(self, TypeUrl::Cluster | TypeUrl::Listener)
    }

    /// Whether a wildcard subscription receives resources of this type
    /// (see the table above).
    pub fn wildcard(self) -> bool {
        matches!(self, TypeUrl::Cluster | TypeUrl::ClusterLoadAssignment)
    }

    /// Parses a full type URL; `None` for types this server does not serve.
    pub fn parse(s: &str) -> Option<Self> {
        TypeUrl::SERVED.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TypeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// One version of one resource, encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Resource {
    /// The resource name (cluster name).
    pub name: Arc<str>,
    /// The version: a hash of the encoded resource, so equal content gives
    /// equal versions on every replica.
    pub version: Arc<str>,
    /// The resource wrapped in `google.protobuf.Any`, encoded (an element
    /// of a SotW `DiscoveryResponse.resources`): a slice of `delta`, so the
    /// bytes are held once.
    pub any: Bytes,
    /// The `discovery.v3.Resource` (name, version, Any), encoded (an element
    /// of a `DeltaDiscoveryResponse.resources`): a slice of `delta_field`.
    pub delta: Bytes,
    /// `delta` as field 2 of a `DeltaDiscoveryResponse` (key and length
    /// first), so a response is its resources' shared bytes back to back,
    /// one piece each, written to the socket without a copy.
    pub delta_field: Bytes,
}

impl Resource {
    /// Encodes `message` of type `type_url` named `name`.
    ///
    /// NOTE: the version hashes the encoded bytes. prost encodes map fields
    /// in hash-map order, so a generator must not emit map fields with more
    /// than one entry or the same content could get different versions.
    pub fn encode(type_url: TypeUrl, name: impl Into<Arc<str>>, message: &impl Message) -> Self {
        let name = name.into();
        let value = message.encode_to_vec();
        let version: Arc<str> = format!("{:016x}", xxh3_64(&value)).into();
        // google.protobuf.Any { type_url = 1; value = 2 }, framed by hand so
        // the value is copied once rather than moved through structs, and
        // written once: inside the delta form, which `any` is a slice of.
        let type_url = type_url.as_str().as_bytes();
        let any_len = field_len(1, type_url.len()) + field_len(2, value.len());
        // discovery.v3.Resource { version = 1; resource = 2; name = 3 }
        let delta_len =
            field_len(1, version.len()) + field_len(2, any_len) + field_len(3, name.len());
        // ... itself as DeltaDiscoveryResponse.resources (field 2).
        let mut delta = BytesMut::with_capacity(field_len(2, delta_len));
        encode_key(2, WireType::LengthDelimited, &mut delta);
        encode_varint(delta_len as u64, &mut delta);
        let delta_at = delta.len();
        put_field(&mut delta, 1, version.as_bytes());
        encode_key(2, WireType::LengthDelimited, &mut delta);
        encode_varint(any_len as u64, &mut delta);
        let any_at = delta.len();
        put_field(&mut delta, 1, type_url);
        put_field(&mut delta, 2, &value);
        let any_end = delta.len();
        put_field(&mut delta, 3, name.as_bytes());
        let delta_field = delta.freeze();
        let any = delta_field.slice(any_at..any_end);
        let delta = delta_field.slice(delta_at..);
        Resource {
            name,
            version,
            any,
            delta,
            delta_field,
        }
    }

    /// Bytes of the encoded message, for size accounting.
    pub fn encoded_len(&self) -> usize {
        self.any.len()
    }
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("bytes", &self.any.len())
            .finish()
    }
}

/// The encoded size of a length-delimited field of `len` bytes (none when
/// empty, as [`put_field`] writes it).
fn field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

/// Appends a length-delimited field.
fn put_field(buf: &mut BytesMut, tag: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3 as discovery;
    use envoy_types::pb::google::protobuf::Any;

    #[test]
    fn hand_framed_bytes_equal_what_prost_encodes() {
        let cla = ClusterLoadAssignment {
            cluster_name: "outbound|80||a.test".into(),
            ..Default::default()
        };
        let r = Resource::encode(TypeUrl::ClusterLoadAssignment, "outbound|80||a.test", &cla);
        let any = Any {
            type_url: TypeUrl::ClusterLoadAssignment.as_str().into(),
            value: cla.encode_to_vec(),
        };
        assert_eq!(r.any, any.encode_to_vec());
        let delta = discovery::Resource {
            name: "outbound|80||a.test".into(),
            version: r.version.to_string(),
            resource: Some(any),
            ..Default::default()
        };
        assert_eq!(r.delta, delta.encode_to_vec());
        // The Any is held once: a slice of the delta form.
        let (d, a) = (r.delta.as_ptr() as usize, r.any.as_ptr() as usize);
        assert!(a > d && a + r.any.len() < d + r.delta.len());
    }
}
