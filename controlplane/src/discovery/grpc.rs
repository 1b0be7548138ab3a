//! `trellis.discovery.v1.Discovery` over HTTP/2, framing each response in
//! a buffer of its own.
//!
//! Tonic's generated server encodes every message of a response stream
//! into one buffer that keeps the capacity of the largest message for as
//! long as the stream lives. A proxy's first ServiceIndex response lists
//! every service of the mesh, about 90 bytes each: with 10,000 services
//! and 1,000 proxies, that was a megabyte per stream, a gigabyte in all,
//! held for nothing after the first response. Here each response is
//! encoded into an exactly sized buffer that goes away once sent. Requests
//! are decoded by tonic's own `Streaming`, and the stream logic is the
//! same as behind the generated service ([`Server::open`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::Frame;
use mesh_proto::discovery::v1::discovery_server::DiscoveryServer;
use mesh_proto::discovery::v1::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::Server;

/// The path of the one method.
const STREAM_PATH: &str = "/trellis.discovery.v1.Discovery/Stream";
/// The largest request accepted (tonic's default): a reconnecting proxy's
/// `initial_versions` are about 50 bytes per resource it holds.
const MAX_REQUEST: usize = 4 << 20;
/// The length prefix of a gRPC message: a compression flag and a
/// big-endian `u32` length.
const PREFIX: usize = 5;

/// The discovery service, for a `tonic::transport::Server`.
#[derive(Clone)]
pub struct DiscoveryService {
    server: Server,
}

/// The response stream of one proxy as an HTTP body: each response one
/// data frame, then the gRPC status in trailers.
struct Responses {
    rx: mpsc::Receiver<Result<DiscoveryResponse, Status>>,
    done: bool,
}

/// Decodes `DiscoveryRequest`s.
struct RequestDecoder;

impl DiscoveryService {
    pub(super) fn new(server: Server) -> Self {
        Self { server }
    }

    fn stream(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        // No compression is offered, as with tonic's defaults.
        let encoding = request
            .headers()
            .get("grpc-encoding")
            .filter(|e| e.as_bytes() != b"identity");
        if let Some(e) = encoding {
            let message = format!(
                "request compression {:?} is not supported; send uncompressed",
                String::from_utf8_lossy(e.as_bytes())
            );
            return Status::unimplemented(message).into_http();
        }
        let requests =
            Streaming::new_request(RequestDecoder, request.into_body(), None, Some(MAX_REQUEST));
        let rx = self.server.open(requests);
        let mut response =
            http::Response::new(tonic::body::Body::new(Responses { rx, done: false }));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

impl NamedService for DiscoveryService {
    const NAME: &'static str = <DiscoveryServer<Server> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for DiscoveryService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let response = if request.uri().path() == STREAM_PATH {
            self.stream(request)
        } else {
            let message = format!("unknown method {}", request.uri().path());
            Status::unimplemented(message).into_http()
        };
        std::future::ready(Ok(response))
    }
}

impl hyper::body::Body for Responses {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match ready!(self.rx.poll_recv(cx)) {
            Some(Ok(response)) => match frame(&response) {
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// One length-prefixed gRPC message in a buffer of exactly its size.
fn frame(message: &DiscoveryResponse) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!("a response of {len} bytes is beyond gRPC's 4 GiB"))
    })?;
    let mut buf = Vec::with_capacity(PREFIX + len);
    buf.push(0); // not compressed
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}

/// The trailers that end a response stream with `status`.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // A message that cannot be a header value: keep the code.
        map.clear();
        let fallback = Status::new(status.code(), "");
        let _ = fallback.add_header(&mut map);
        if map.is_empty() {
            map.insert(
                "grpc-status",
                http::HeaderValue::from(Code::Internal as i32),
            );
        }
    }
    map
}

impl Decoder for RequestDecoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DiscoveryRequest>, Status> {
        let request = DiscoveryRequest::decode(src)
            .map_err(|e| Status::invalid_argument(format!("a request does not decode: {e}")))?;
        Ok(Some(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_the_length_prefixed_message() {
        let message = DiscoveryResponse {
            nonce: "7".into(),
            ..Default::default()
        };
        let data = frame(&message).unwrap();
        let body = message.encode_to_vec();
        assert_eq!(data.len(), PREFIX + body.len());
        assert_eq!(data[0], 0);
        assert_eq!(
            &data[1..PREFIX],
            &u32::try_from(body.len()).unwrap().to_be_bytes()
        );
        assert_eq!(&data[PREFIX..], &body[..]);
    }

    #[test]
    fn trailers_carry_the_status() {
        let ok = trailers(&Status::ok(""));
        assert_eq!(ok["grpc-status"], "0");
        let bad = trailers(&Status::invalid_argument("no node"));
        assert_eq!(bad["grpc-status"], "3");
        assert_eq!(bad["grpc-message"], "no%20node");
    }
}
