//! One request's record: filled as the request, its response and its body go by, written
//! to the metrics exactly once, when it is dropped.
//!
//! The recorder travels from the layer's future into the response body. Whatever happens,
//! it is dropped once, and its drop records:
//!
//! - the body ended (or said it was over): the normal case;
//! - the inner service failed: status and flags of the [`ProxyError`] (what `LocalReply`
//!   will answer), else `502 UPE` as `LocalReply` answers an unclassified error;
//! - the body was dropped unfinished, or the future before any response: the caller went
//!   away, Envoy's `DC` flag (and response code `0` when no response was ever seen).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Response};
use mesh_core::body::BoxError;
use mesh_core::flags::RESPONSE_FLAGS_HEADER;
use mesh_core::stream_info::StreamInfo;
use mesh_core::{Identity, ProxyError, ResponseFlags};
use tokio::time::Instant;

use super::body::{GrpcFramer, RequestTally};
use super::cache::{ByAddress, NO_GRPC_STATUS, SeriesKey, ServiceKey};
use super::layer::{Direction, Shared};
use super::peer::{PEER_METADATA_HEADER, PeerMetadata};

/// How far a request got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for the inner service's response.
    Waiting,
    /// The response head went out; its body is streaming.
    Streaming,
    /// Nothing more to learn (the inner service failed).
    Finished,
}

#[derive(Debug)]
pub(crate) struct Recorder {
    shared: Arc<Shared>,
    start: Instant,
    stage: Stage,
    /// Outbound: where the route and upstream identity will appear.
    info: Option<StreamInfo>,
    pub(crate) service: ServiceKey,
    pub(crate) peer: Option<Arc<PeerMetadata>>,
    pub(crate) principal: Option<Identity>,
    pub(crate) grpc: bool,
    pub(crate) mtls: bool,
    /// Inbound: the caller is a verified mesh peer that sent its metadata, so it gets ours.
    pub(crate) reply_metadata: bool,
    code: u16,
    flags: ResponseFlags,
    grpc_status: u8,
    /// Made when a request body is wrapped to be counted: a request without a body (the
    /// combined layer does not wrap one) allocates none and counts zero.
    request: Option<Arc<RequestTally>>,
    response_bytes: u64,
    response_messages: u64,
    framer: Option<GrpcFramer>,
    /// The response body is over (set through `&self` by `is_end_stream`).
    ended: AtomicBool,
}

impl Recorder {
    pub(crate) fn new(shared: Arc<Shared>, start: Instant, grpc: bool) -> Recorder {
        Recorder {
            shared,
            start,
            stage: Stage::Waiting,
            info: None,
            service: ServiceKey::Unknown,
            peer: None,
            principal: None,
            grpc,
            mtls: false,
            reply_metadata: false,
            code: 0,
            flags: ResponseFlags::EMPTY,
            grpc_status: NO_GRPC_STATUS,
            request: None,
            response_bytes: 0,
            response_messages: 0,
            framer: grpc.then(GrpcFramer::default),
            ended: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_stream_info(&mut self, info: StreamInfo) {
        self.info = Some(info);
    }

    pub(crate) fn request_tally(&mut self) -> Arc<RequestTally> {
        self.request.get_or_insert_with(Arc::default).clone()
    }

    /// The response head: status, flags, gRPC status, and the peer metadata exchange.
    pub(crate) fn on_response<B>(&mut self, response: &mut Response<B>) {
        self.stage = Stage::Streaming;
        self.code = response.status().as_u16();
        self.flags = parse_flags(response.headers());
        if self.grpc
            && let Some(status) = response.headers().get("grpc-status")
        {
            // Trailers-only responses carry the status in the head.
            self.grpc_status = parse_grpc_status(status.as_bytes());
        }
        let headers = response.headers_mut();
        match self.shared.direction {
            Direction::Outbound => {
                // Always removed: the app must not see it. Trusted only from a sidecar that
                // proved its identity on this exchange's connection.
                let theirs = headers.remove(PEER_METADATA_HEADER);
                self.note_upstream();
                if self.principal.is_some()
                    && let Some(theirs) = theirs
                {
                    self.peer = self.shared.peers.get(theirs.as_bytes());
                }
            }
            Direction::Inbound => {
                // Only this sidecar speaks for this workload: an app's header is dropped.
                headers.remove(PEER_METADATA_HEADER);
                if self.reply_metadata
                    && let Some(ours) = &self.shared.own_header
                {
                    headers.insert(PEER_METADATA_HEADER, ours.clone());
                }
            }
        }
    }

    /// The inner service failed: what `LocalReply` will answer.
    pub(crate) fn on_error(&mut self, error: &BoxError) {
        self.stage = Stage::Finished;
        let (status, flags) = match ProxyError::find(error) {
            Some(e) => (e.status(), e.flags()),
            None => (
                http::StatusCode::BAD_GATEWAY,
                ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            ),
        };
        self.code = status.as_u16();
        self.flags = flags;
        self.note_upstream();
    }

    pub(crate) fn on_response_data(&mut self, data: &Bytes) {
        self.response_bytes += data.len() as u64;
        if let Some(framer) = &mut self.framer {
            self.response_messages += framer.feed(data);
        }
    }

    pub(crate) fn on_trailers(&mut self, trailers: &HeaderMap) {
        if self.grpc
            && let Some(status) = trailers.get("grpc-status")
        {
            self.grpc_status = parse_grpc_status(status.as_bytes());
        }
    }

    /// The response body is over.
    pub(crate) fn mark_ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    /// Outbound: the route's service and the upstream's verified identity, as the inner
    /// layers recorded them.
    fn note_upstream(&mut self) {
        if let Some(info) = &self.info {
            if let Some(route) = info.route() {
                self.service = ServiceKey::Route(ByAddress(route.service.clone()));
            }
            self.principal = info.upstream_peer();
        }
    }

    fn record(&mut self) {
        match self.stage {
            Stage::Waiting => {
                self.flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
                self.note_upstream();
            }
            Stage::Streaming if !self.ended.load(Ordering::Relaxed) => {
                self.flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
            }
            Stage::Streaming | Stage::Finished => {}
        }
        let key = SeriesKey {
            service: std::mem::replace(&mut self.service, ServiceKey::Unknown),
            peer: self.peer.take().map(ByAddress),
            principal: self.principal.take(),
            code: self.code,
            flags: self.flags,
            grpc_status: if self.grpc {
                self.grpc_status
            } else {
                NO_GRPC_STATUS
            },
            grpc: self.grpc,
            mtls: self.mtls,
        };
        let shared = &self.shared;
        let series = shared
            .series
            .get_or_build(key, |key| shared.build_series(key));
        series.requests.inc();
        series
            .duration
            .observe(self.start.elapsed().as_secs_f64() * 1000.0);
        let (request_bytes, request_messages) = match &self.request {
            Some(tally) => (
                tally.bytes.load(Ordering::Relaxed),
                tally.messages.load(Ordering::Relaxed),
            ),
            None => (0, 0),
        };
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(self.response_bytes as f64);
        if let Some((requests, responses)) = &series.messages {
            requests.inc_by(request_messages);
            responses.inc_by(self.response_messages);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record();
    }
}

/// The flags in `x-mesh-response-flags` (a peer's and ours, comma-joined). Only Envoy's
/// codes count, so a peer cannot invent label values; at most 32 codes per value are read.
pub(crate) fn parse_flags(headers: &HeaderMap) -> ResponseFlags {
    let mut flags = ResponseFlags::EMPTY;
    for value in headers.get_all(RESPONSE_FLAGS_HEADER) {
        let Ok(value) = value.to_str() else { continue };
        for code in value.split(',').take(32) {
            if let Some(flag) = ResponseFlags::from_code(code.trim()) {
                flags |= flag;
            }
        }
    }
    flags
}

/// A `grpc-status` value: the codes 0 to 16; anything else is `2` (UNKNOWN), as gRPC
/// clients read a status they do not know.
pub(crate) fn parse_grpc_status(v: &[u8]) -> u8 {
    match v {
        [d] if d.is_ascii_digit() => d - b'0',
        [b'1', d] if (b'0'..=b'6').contains(d) => 10 + (d - b'0'),
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_statuses_are_bounded() {
        assert_eq!(parse_grpc_status(b"0"), 0);
        assert_eq!(parse_grpc_status(b"14"), 14);
        assert_eq!(parse_grpc_status(b"16"), 16);
        for odd in [&b"17"[..], b"99", b"", b"-1", b"01", b"abc", b"\xff"] {
            assert_eq!(parse_grpc_status(odd), 2);
        }
    }

    #[test]
    fn flags_keep_only_envoy_codes() {
        let mut h = HeaderMap::new();
        h.append(RESPONSE_FLAGS_HEADER, "URX, UF,bogus".parse().unwrap());
        h.append(RESPONSE_FLAGS_HEADER, "UF".parse().unwrap());
        assert_eq!(parse_flags(&h).to_string(), "UF,URX");
        assert_eq!(parse_flags(&HeaderMap::new()).to_string(), "-");
    }
}
