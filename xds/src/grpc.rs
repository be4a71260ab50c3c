//! The little of gRPC the ADS streams need, over hyper's HTTP/2: framing of
//! length-prefixed messages, status codes and trailers.
//!
//! Why not tonic's server: tonic keeps one receive buffer per stream that
//! grows to the largest request seen (Envoy's first EDS subscription names
//! every cluster: tens of KB) and never shrinks, and one send buffer that
//! grows to the largest response. At thousands of proxies those retained
//! buffers were most of the daemon's memory. Here a request buffer is
//! released once a large message is decoded, and each response goes out as
//! one frame that is freed when written.

use std::convert::Infallible;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// The response body of an ADS stream: frames sent by the stream's task.
pub type ResponseBody = StreamBody<ReceiverStream<Result<Frame<Chunks>, Infallible>>>;

/// The bytes of a response frame as the pieces it was assembled from, so
/// a large response's resources (encoded once, shared with the snapshot)
/// go to the socket without a copy per stream (hyper hands them to
/// `writev`). Measured with heaptrack (BENCHMARKS.md, issue 13): copying
/// every response into one contiguous frame held 23 KB per connection at
/// the peak of a sync.
#[derive(Debug, Default)]
pub struct Chunks {
    /// The piece being written: empty only when nothing remains.
    head: Bytes,
    /// The pieces after it (none for a one-piece frame: no allocation).
    tail: std::collections::VecDeque<Bytes>,
    remaining: usize,
}

impl Chunks {
    /// Appends `b` (empty pieces are dropped).
    pub(crate) fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.remaining += b.len();
        if self.head.is_empty() {
            self.head = b;
        } else {
            self.tail.push_back(b);
        }
    }
}

impl From<Bytes> for Chunks {
    fn from(b: Bytes) -> Self {
        let mut c = Chunks::default();
        c.push(b);
        c
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.head
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && !self.head.is_empty() {
            if cnt < self.head.len() {
                self.head.advance(cnt);
                self.remaining -= cnt;
                return;
            }
            cnt -= self.head.len();
            self.remaining -= self.head.len();
            self.head = self.tail.pop_front().unwrap_or_default();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let parts = std::iter::once(&self.head)
            .chain(&self.tail)
            .filter(|p| !p.is_empty());
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(parts) {
            *slot = std::io::IoSlice::new(part);
            n += 1;
        }
        n
    }
}

const HEADER_LEN: usize = 5;

/// On a stream that keeps large buffers ([`RequestStream::keep_large`]),
/// a receive buffer that held a message at least this large is kept for
/// the next one; smaller ones are let go once empty. A SotW proxy repeats
/// its whole subscription in every ACK (70 KB for 1,000 names), and
/// allocating that anew per ACK cost the server 10–20% more CPU per
/// change over SotW (1,000 proxies, two alternating runs each). A delta
/// proxy's large requests are its first ones and are followed by small
/// ACKs: keeping them cost a reconnect storm of 1,000 proxies 53 MB at its
/// peak (heaptrack), every stream holding its first request's buffer
/// until its first response was acknowledged.
const REUSE_FROM: usize = 16 * 1024;

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    Ok = 0,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// A gRPC error: a code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) code: Code,
    pub(crate) message: String,
    /// The [`Limits`](crate::Limits) field the peer hit, if that is why.
    pub(crate) limit: Option<&'static str>,
}

impl Status {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
            limit: None,
        }
    }

    /// `RESOURCE_EXHAUSTED` because the peer hit `limit`.
    pub(crate) fn limit(limit: &'static str, message: impl Into<String>) -> Self {
        Status {
            limit: Some(limit),
            ..Status::new(Code::ResourceExhausted, message)
        }
    }

    /// The status as trailers (or trailers-only headers).
    pub(crate) fn to_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from(self.code as u16));
        if !self.message.is_empty()
            && let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message))
        {
            h.insert("grpc-message", v);
        }
        h
    }
}

/// `grpc-message` as the gRPC spec (PROTOCOL-HTTP2) requires: the UTF-8
/// bytes, with those outside printable ASCII (0x20–0x7E) and `%` itself
/// percent-encoded.
pub(crate) fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `grpc-timeout` header's duration (PROTOCOL-HTTP2: at most 8 digits
/// and a unit `H`, `M`, `S`, `m`, `u` or `n`); `None` when absent or
/// malformed (a malformed one is ignored, as grpc-go does).
pub(crate) fn timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Decodes the length-prefixed messages of a request body.
pub(crate) struct RequestStream<B, M> {
    body: B,
    buf: BytesMut,
    max_message: usize,
    /// This stream's reservation in the shared budget for buffered request
    /// bytes, and what it holds (the bytes in `buf`).
    budget: Option<crate::limits::Holder>,
    reserved: usize,
    /// Keep a buffer that held a large message (see [`REUSE_FROM`]).
    keep_large: bool,
    _message: PhantomData<fn() -> M>,
}

impl<B, M> RequestStream<B, M>
where
    B: Body + Unpin,
    B::Error: std::fmt::Display,
    M: Message + Default,
{
    pub(crate) fn new(body: B, max_message: usize) -> Self {
        RequestStream {
            body,
            buf: BytesMut::new(),
            max_message,
            budget: None,
            reserved: 0,
            keep_large: false,
            _message: PhantomData,
        }
    }

    /// Keeps a receive buffer that held a message of [`REUSE_FROM`] bytes
    /// or more for the next one: for a protocol whose requests repeat the
    /// whole subscription (SotW).
    pub(crate) fn keep_large(mut self, keep: bool) -> Self {
        self.keep_large = keep;
        self
    }

    /// Accounts the bytes buffered for incomplete requests in `budget`, in
    /// `peer`'s share: a chunk that would pass either, or an eviction to
    /// make room for a small request, fails the stream with
    /// `RESOURCE_EXHAUSTED`.
    pub(crate) fn with_budget(
        mut self,
        budget: crate::limits::Budget,
        peer: Option<std::net::IpAddr>,
    ) -> Self {
        self.budget = Some(budget.holder(peer));
        self
    }

    /// The next message; `Ok(None)` when the peer closed its side.
    pub(crate) async fn message(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(m) = self.decode()? {
                return Ok(Some(m));
            }
            let frame = match &self.budget {
                Some(holder) => tokio::select! {
                    frame = self.body.frame() => frame,
                    () = holder.evicted() => {
                        return Err(Status::limit(
                            "buffered_bytes",
                            "closed to make room in the server's buffer for incomplete requests",
                        ));
                    }
                },
                None => self.body.frame().await,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        if let Some(b) = &self.budget {
                            let n = data.remaining();
                            if !b.try_reserve(n) {
                                return Err(Status::limit(
                                    "buffered_bytes",
                                    "the server's buffer for incomplete requests is full, or this address's share of it",
                                ));
                            }
                            self.reserved += n;
                        }
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            self.buf.put_slice(chunk);
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => return Err(Status::new(Code::Unavailable, e.to_string())),
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(Status::new(
                        Code::Internal,
                        "request ended inside a message",
                    ));
                }
            }
        }
    }

    fn decode(&mut self) -> Result<Option<M>, Status> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::new(
                Code::Unimplemented,
                "compressed requests are not supported",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err(Status::limit(
                "request_bytes",
                format!(
                    "request of {len} bytes exceeds the limit of {}",
                    self.max_message
                ),
            ));
        }
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        // Decoding from `Bytes` lets `bytes` fields borrow the buffer
        // instead of copying.
        let frame = self.buf.split_to(HEADER_LEN + len).freeze();
        if let Some(b) = &self.budget {
            let n = (HEADER_LEN + len).min(self.reserved);
            b.release(n);
            self.reserved -= n;
        }
        let msg = M::decode(frame.slice(HEADER_LEN..))
            .map_err(|e| Status::new(Code::InvalidArgument, format!("malformed request: {e}")))?;
        // Nothing buffered, and the message was small: let go of the
        // allocation. An empty `BytesMut` split from a larger one still
        // holds all of it (its capacity says only what is left after the
        // split), so every stream kept the allocation of its last requests:
        // during a first sync, Envoy's EDS subscriptions (heaptrack:
        // 11.6 MB at the peak of 1,000 proxies' first sync). A new request
        // costs one allocation.
        if self.buf.is_empty() && (HEADER_LEN + len < REUSE_FROM || !self.keep_large) {
            self.buf = BytesMut::new();
        }
        Ok(Some(msg))
    }
}

/// The 5-byte gRPC message prefix: not compressed, then the length.
fn put_prefix(buf: &mut BytesMut, len: usize) {
    buf.put_u8(0);
    buf.put_u32(len as u32);
}

/// One response message as a DATA frame: the 5-byte prefix and the message.
pub(crate) fn message_frame(len: usize, write: impl FnOnce(&mut BytesMut)) -> Frame<Chunks> {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    put_prefix(&mut buf, len);
    write(&mut buf);
    Frame::data(buf.freeze().into())
}

/// One response message of `len` bytes as a DATA frame of the 5-byte
/// prefix and `parts` as they are (not copied).
pub(crate) fn message_frame_of(len: usize, parts: &[Bytes]) -> Frame<Chunks> {
    let mut prefix = BytesMut::with_capacity(HEADER_LEN);
    put_prefix(&mut prefix, len);
    let mut c = Chunks::from(prefix.freeze());
    for p in parts {
        c.push(p.clone());
    }
    Frame::data(c)
}

/// A streaming gRPC response whose frames come from the returned sender.
pub(crate) fn streaming_response(
    capacity: usize,
) -> (
    mpsc::Sender<Result<Frame<Chunks>, Infallible>>,
    Response<ResponseBody>,
) {
    let (tx, rx) = mpsc::channel(capacity);
    let mut resp = Response::new(StreamBody::new(ReceiverStream::new(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    (tx, resp)
}

/// A trailers-only error response.
pub(crate) fn error_response(status: &Status) -> Response<ResponseBody> {
    let (_, mut resp) = streaming_response(1);
    resp.headers_mut().extend(status.to_headers());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded_and_grpc_timeout_parsed() {
        assert_eq!(percent_encode("a b"), "a b");
        assert_eq!(percent_encode("50% é\n"), "50%25 %C3%A9%0A");
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h), None);
        for (v, want) in [
            ("5S", Some(std::time::Duration::from_secs(5))),
            ("100m", Some(std::time::Duration::from_millis(100))),
            ("2H", Some(std::time::Duration::from_secs(7200))),
            ("123456789S", None),
            ("S", None),
            ("5x", None),
            ("-5S", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(timeout(&h), want, "{v}");
        }
    }
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use http_body_util::Full;

    fn framed(msgs: &[DeltaDiscoveryRequest]) -> Bytes {
        let mut out = BytesMut::new();
        for m in msgs {
            out.put_u8(0);
            out.put_u32(m.encoded_len() as u32);
            m.encode(&mut out).unwrap();
        }
        out.freeze()
    }

    fn req(type_url: &str, n: usize) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: (0..n)
                .map(|i| format!("outbound|80||svc-{i}.test"))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn decodes_messages_and_releases_large_buffers() {
        let msgs = [req("a", 2000), req("b", 1)];
        let mut s: RequestStream<_, DeltaDiscoveryRequest> =
            RequestStream::new(Full::new(framed(&msgs)), 4 << 20);
        let first = s.message().await.unwrap().unwrap();
        assert_eq!(first.resource_names_subscribe.len(), 2000);
        let second = s.message().await.unwrap().unwrap();
        assert_eq!(second.type_url, "b");
        // Nothing buffered, nothing held: the 2,000-name request's
        // allocation is not kept for the next request.
        assert!(
            !s.buf.try_reclaim(1),
            "the empty buffer holds an allocation"
        );
        assert_eq!(s.message().await.unwrap(), None);
        // A large message last, on a stream that keeps large buffers (a
        // SotW ACK repeats its subscription): its allocation is kept for
        // the next one; on one that does not (delta), let go.
        for keep in [true, false] {
            let msgs = [req("b", 1), req("a", 2000)];
            let mut s: RequestStream<_, DeltaDiscoveryRequest> =
                RequestStream::new(Full::new(framed(&msgs)), 4 << 20).keep_large(keep);
            s.message().await.unwrap().unwrap();
            s.message().await.unwrap().unwrap();
            assert_eq!(s.buf.try_reclaim(1), keep, "keep_large({keep})");
        }
    }

    #[tokio::test]
    async fn oversized_compressed_and_truncated_requests_are_errors() {
        let big = framed(&[req("a", 100)]);
        let mut s: RequestStream<_, DeltaDiscoveryRequest> =
            RequestStream::new(Full::new(big.clone()), 64);
        assert_eq!(s.message().await.unwrap_err().code, Code::ResourceExhausted);
        let mut compressed = BytesMut::from(&big[..]);
        compressed[0] = 1;
        let mut s: RequestStream<_, DeltaDiscoveryRequest> =
            RequestStream::new(Full::new(compressed.freeze()), 4 << 20);
        assert_eq!(s.message().await.unwrap_err().code, Code::Unimplemented);
        let mut s: RequestStream<_, DeltaDiscoveryRequest> =
            RequestStream::new(Full::new(big.slice(..big.len() - 3)), 4 << 20);
        assert_eq!(s.message().await.unwrap_err().code, Code::Internal);
    }
}
