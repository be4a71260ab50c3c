//! Entry points for the fuzz targets (`fuzz/`): the request decoders and
//! the delta and SotW state machines, driven the way a stream drives them.
//! Not an API: hidden from the docs, and only `fuzz/` calls it.

use std::sync::Arc;

use prost::Message;

use crate::cache::Snapshot;
use crate::delta::{DeltaConnection, DeltaRequest};
use crate::sotw::{SotwConnection, SotwRequest};

/// Splits `input` into messages: each is a little-endian `u16` length and
/// that many bytes (what is left over is the last message).
fn messages(mut input: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while input.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([input[0], input[1]]));
        let rest = &input[2..];
        let n = len.min(rest.len());
        out.push(&rest[..n]);
        input = &rest[n..];
    }
    out
}

/// Decodes each message of `input` as the delta stream decodes a request
/// and applies it to one connection against `snap`, taking every response
/// in between, with a bound on names as the server sets one.
pub fn delta(snap: &Arc<Snapshot>, input: &[u8]) {
    let mut conn = DeltaConnection::default();
    conn.set_max_names(10_000);
    for m in messages(input) {
        if let Ok(req) = DeltaRequest::decode(m) {
            let _ = conn.handle_decoded(req, snap);
        }
        for _ in 0..1_000 {
            if conn.next_response(snap).is_none() {
                break;
            }
        }
    }
}

/// Like [`delta`], for state-of-the-world requests.
pub fn sotw(snap: &Arc<Snapshot>, input: &[u8]) {
    let mut conn = SotwConnection::default();
    conn.set_max_names(10_000);
    for m in messages(input) {
        if let Ok(req) = SotwRequest::decode(m) {
            let _ = conn.handle_request(req, snap);
        }
        for _ in 0..1_000 {
            if conn.next_response(snap).is_none() {
                break;
            }
        }
    }
}
