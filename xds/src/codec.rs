//! Response encoding: `DiscoveryResponse` and `DeltaDiscoveryResponse`
//! written from pre-encoded, shared resource bytes.
//!
//! A response is assembled as a list of chunks: small header fields
//! (version, type URL, nonce, the length prefix of each resource) and, for
//! each resource, a reference-counted [`Bytes`] that the cache encoded once.
//! Sending a response copies each chunk once into its gRPC frame; nothing
//! is re-encoded per proxy.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::encoding::{WireType, encode_key, encode_varint};

use crate::resource::{Resource, TypeUrl};

/// `n` in decimal, as a nonce or version (one allocation: formatted on
/// the stack; a response's nonce and version are shared with what the
/// stream records of it).
pub(crate) fn number(n: u64) -> Arc<str> {
    use std::io::Write;
    let mut buf = [0u8; 20];
    let mut w = &mut buf[..];
    let _ = write!(w, "{n}");
    let len = 20 - w.len();
    Arc::from(std::str::from_utf8(&buf[..len]).unwrap_or_default())
}

/// Responses up to this size go out as one copied buffer: one piece for
/// the socket, and too small for the copy to matter.
const COPY_BELOW: usize = 2048;

/// An encoded `DiscoveryResponse` or `DeltaDiscoveryResponse`.
#[derive(Debug, Clone, Default)]
pub struct EncodedResponse {
    chunks: Vec<Bytes>,
    len: usize,
}

impl EncodedResponse {
    /// The encoded size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The message as one gRPC DATA frame (length prefix and message).
    /// A small one is copied into one buffer (one piece to write); a
    /// larger one keeps its pieces, the shared resource bytes among them,
    /// so a stream's response in flight holds no copy of them.
    pub(crate) fn to_frame(&self) -> Frame<crate::grpc::Chunks> {
        if self.len <= COPY_BELOW {
            return crate::grpc::message_frame(self.len, |buf| {
                for c in &self.chunks {
                    buf.put_slice(c);
                }
            });
        }
        crate::grpc::message_frame_of(self.len, &self.chunks)
    }

    /// The message as one contiguous buffer (tests and tools).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len);
        for c in &self.chunks {
            out.put_slice(c);
        }
        out.freeze()
    }
}

/// Builds an [`EncodedResponse`], keeping header fields in one scratch
/// buffer between shared resource chunks.
struct Builder {
    out: EncodedResponse,
    scratch: BytesMut,
}

impl Builder {
    fn new() -> Self {
        Builder {
            out: EncodedResponse::default(),
            scratch: BytesMut::with_capacity(256),
        }
    }

    fn string(&mut self, tag: u32, value: &str) {
        if value.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, &mut self.scratch);
        encode_varint(value.len() as u64, &mut self.scratch);
        self.scratch.put_slice(value.as_bytes());
    }

    fn message(&mut self, tag: u32, encoded: &Bytes) {
        encode_key(tag, WireType::LengthDelimited, &mut self.scratch);
        encode_varint(encoded.len() as u64, &mut self.scratch);
        self.flush();
        self.out.len += encoded.len();
        self.out.chunks.push(encoded.clone());
    }

    /// Appends bytes that are already encoded fields.
    fn raw(&mut self, encoded: &Bytes) {
        self.flush();
        self.out.len += encoded.len();
        self.out.chunks.push(encoded.clone());
    }

    fn flush(&mut self) {
        if !self.scratch.is_empty() {
            self.out.len += self.scratch.len();
            self.out.chunks.push(self.scratch.split().freeze());
        }
    }

    fn finish(mut self) -> EncodedResponse {
        self.flush();
        self.out
    }
}

/// Encodes a `DeltaDiscoveryResponse` carrying `resources` and naming
/// `removed`.
pub(crate) fn delta_response<'a>(
    type_url: TypeUrl,
    system_version: &str,
    nonce: &str,
    resources: impl IntoIterator<Item = &'a Arc<Resource>>,
    removed: &[Arc<str>],
) -> EncodedResponse {
    let mut b = Builder::new();
    b.string(1, system_version);
    for r in resources {
        b.raw(&r.delta_field);
    }
    b.string(4, type_url.as_str());
    b.string(5, nonce);
    for name in removed {
        b.string(6, name);
    }
    b.finish()
}

/// Encodes a SotW `DiscoveryResponse` carrying `resources`.
/// The `resources` field entries (tag 2) of a SotW response carrying
/// `resources`, encoded once so that every proxy's full-state response can
/// share them.
pub(crate) fn sotw_resources_field<'a>(
    resources: impl IntoIterator<Item = &'a Arc<Resource>>,
) -> Bytes {
    let mut b = Builder::new();
    for r in resources {
        b.message(2, &r.any);
    }
    b.finish().to_bytes()
}

/// Encodes an empty response of a type this server does not serve
/// (`type_url` as the proxy asked): a `DeltaDiscoveryResponse` or a SotW
/// `DiscoveryResponse` with no resources (both carry `type_url` in field 4
/// and `nonce` in field 5).
pub(crate) fn empty_response(type_url: &str, nonce: &str) -> EncodedResponse {
    let mut b = Builder::new();
    b.string(4, type_url);
    b.string(5, nonce);
    b.finish()
}

/// Encodes a SotW `DiscoveryResponse` whose resources are `field`, as
/// [`sotw_resources_field`] built it.
pub(crate) fn sotw_response_with(
    type_url: TypeUrl,
    version_info: &str,
    nonce: &str,
    field: &Bytes,
) -> EncodedResponse {
    let mut b = Builder::new();
    b.string(1, version_info);
    b.raw(field);
    b.string(4, type_url.as_str());
    b.string(5, nonce);
    b.finish()
}

pub(crate) fn sotw_response<'a>(
    type_url: TypeUrl,
    version_info: &str,
    nonce: &str,
    resources: impl IntoIterator<Item = &'a Arc<Resource>>,
) -> EncodedResponse {
    let mut b = Builder::new();
    b.string(1, version_info);
    for r in resources {
        b.message(2, &r.any);
    }
    b.string(4, type_url.as_str());
    b.string(5, nonce);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse,
    };
    use prost::Message;

    fn cluster(name: &str) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            ..Default::default()
        };
        Arc::new(Resource::encode(TypeUrl::Cluster, name, &c))
    }

    #[test]
    fn delta_response_decodes_as_envoy_would() {
        let rs = [cluster("a"), cluster("b")];
        let removed = [Arc::from("gone")];
        let enc = delta_response(TypeUrl::Cluster, "7", "n1", &rs, &removed);
        let bytes = enc.to_bytes();
        assert_eq!(bytes.len(), enc.len());
        let msg = DeltaDiscoveryResponse::decode(bytes).unwrap();
        assert_eq!(msg.system_version_info, "7");
        assert_eq!(msg.type_url, TypeUrl::Cluster.as_str());
        assert_eq!(msg.nonce, "n1");
        assert_eq!(msg.removed_resources, vec!["gone".to_string()]);
        assert_eq!(msg.resources.len(), 2);
        assert_eq!(msg.resources[1].name, "b");
        assert_eq!(msg.resources[1].version, &*rs[1].version);
        let any = msg.resources[0].resource.as_ref().unwrap();
        assert_eq!(Cluster::decode(&any.value[..]).unwrap().name, "a");
    }

    #[test]
    fn sotw_response_decodes_as_envoy_would() {
        let rs = [cluster("a")];
        let msg =
            DiscoveryResponse::decode(sotw_response(TypeUrl::Cluster, "v", "n", &rs).to_bytes())
                .unwrap();
        assert_eq!(msg.version_info, "v");
        assert_eq!(msg.nonce, "n");
        assert_eq!(msg.resources.len(), 1);
        assert_eq!(msg.resources[0].type_url, TypeUrl::Cluster.as_str());
    }

    #[test]
    fn a_shared_resources_field_gives_the_same_message() {
        let rs = [cluster("a"), cluster("b")];
        let field = sotw_resources_field(&rs);
        let shared = sotw_response_with(TypeUrl::Cluster, "v", "n", &field);
        let direct = sotw_response(TypeUrl::Cluster, "v", "n", &rs);
        assert_eq!(shared.to_bytes(), direct.to_bytes());
    }

    #[test]
    fn a_large_frame_keeps_the_shared_bytes_and_reads_as_one_message() {
        use bytes::Buf;
        let rs: Vec<_> = (0..20)
            .map(|i| cluster(&format!("c{i:03}-{}", "x".repeat(200))))
            .collect();
        let enc = delta_response(TypeUrl::Cluster, "7", "n1", &rs, &[]);
        assert!(enc.len() > COPY_BELOW);
        let mut frame = enc.to_frame().into_data().expect("a data frame");
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = frame.chunks_vectored(&mut slices);
        assert!(
            slices[..n]
                .iter()
                .any(|s| s.as_ptr() == rs[3].delta_field.as_ptr()),
            "the resource's bytes are not copied"
        );
        // Read through the `Buf` as the socket write does, in odd steps.
        let mut read = Vec::new();
        while frame.has_remaining() {
            let step = frame.chunk().len().min(7);
            read.extend_from_slice(&frame.chunk()[..step]);
            frame.advance(step);
        }
        assert_eq!(read[0], 0, "not compressed");
        assert_eq!(
            u32::from_be_bytes(read[1..5].try_into().unwrap()) as usize,
            enc.len()
        );
        assert_eq!(&read[5..], &enc.to_bytes()[..]);
        // A small one is one piece.
        let small = delta_response(TypeUrl::Cluster, "7", "n1", &rs[..1], &[]);
        let frame = small.to_frame().into_data().expect("a data frame");
        assert_eq!(frame.chunk().len(), 5 + small.len());
    }

    #[test]
    fn resources_are_shared_not_copied() {
        let rs = [cluster("a")];
        let enc = delta_response(TypeUrl::Cluster, "", "n", &rs, &[]);
        assert!(
            enc.chunks
                .iter()
                .any(|c| c.as_ptr() == rs[0].delta_field.as_ptr())
        );
    }
}
