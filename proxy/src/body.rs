//! Body types of forwarded requests and responses.
//!
//! Both wrap hyper's `Incoming` without boxing. The response body carries
//! what must happen when a response ends: its pooled HTTP/1 connection goes
//! back to the pool, the endpoint's load count drops, and the request's
//! telemetry is recorded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use crate::balance::Pick;
use crate::telemetry::RequestRecord;

/// A request body sent upstream: streamed from the client, counting its
/// bytes, or replayed from a buffer (a retry, or a first attempt whose
/// body was read ahead so that retries can send it again).
#[derive(Debug)]
pub struct RequestBody {
    inner: RequestInner,
}

#[derive(Debug)]
enum RequestInner {
    Streamed {
        body: Incoming,
        bytes: Arc<AtomicU64>,
        /// Where a copy of the body goes, for mirrors.
        tee: Option<Box<Tee>>,
    },
    Buffered {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
}

/// A copy of a streamed body, kept as it passes (up to a bound) and sent
/// whole when it ends: what mirrors send. The receiver learns nothing if
/// the body grew past the bound, failed, or was dropped before its end.
#[derive(Debug)]
struct Tee {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<http::HeaderMap>,
    done: Option<tokio::sync::oneshot::Sender<Copied>>,
}

/// A whole request body: its data and its trailers.
pub type Copied = (Bytes, Option<http::HeaderMap>);

impl Tee {
    /// Keeps a copy of `frame`; false once the copy is over its bound.
    fn keep(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(d) = frame.data_ref() {
            self.len += d.len();
            if self.len > self.limit {
                return false;
            }
            self.chunks.push(d.clone());
        } else if let Some(t) = frame.trailers_ref() {
            self.trailers = Some(t.clone());
        }
        true
    }

    fn finish(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        let data = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => Bytes::from(self.chunks.concat()),
        };
        // A mirror that gave up no longer listens.
        let _ = done.send((data, self.trailers.take()));
    }
}

/// A response body: from upstream, or made by the proxy.
pub struct ResponseBody {
    inner: Inner,
    end: Option<Box<OnEnd>>,
    deadline: Option<Box<Deadline>>,
}

/// When an upstream body must have ended: past it, an HTTP body fails
/// (hyper resets the stream or closes the connection, so the client sees
/// a truncated response, not a complete one) and a gRPC body ends with
/// `grpc-status: 4` trailers, which is how gRPC says deadline exceeded.
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    grpc: bool,
    message: String,
}

/// An upstream body outlived its deadline.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyTimeout(String);

/// The error of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Inner {
    Local(Option<Bytes>),
    Upstream(Incoming),
}

/// What to do when the response ends.
pub struct OnEnd {
    /// The request's telemetry, recorded when this is dropped.
    pub record: Option<RequestRecord>,
    /// The endpoint's load slot, released when this is dropped.
    pub pick: Option<Pick>,
    /// The HTTP/1 connection to return to the endpoint's pool once the
    /// response has been read to its end.
    pub conn: Option<http1::SendRequest<RequestBody>>,
    /// The request's place under its backend's request limit, given back
    /// when the response ends.
    pub slot: Option<crate::resilience::breaker::Slot>,
}

impl RequestBody {
    /// Wraps `inner`, adding its size to `bytes`.
    pub fn new(inner: Incoming, bytes: Arc<AtomicU64>) -> Self {
        Self {
            inner: RequestInner::Streamed {
                body: inner,
                bytes,
                tee: None,
            },
        }
    }

    /// Keeps a copy of the body as it is sent, for mirrors: the receiver
    /// gets it whole when the body has ended, or nothing if it is longer
    /// than `limit` bytes or does not end. A buffered body is copied at
    /// once.
    pub fn tee(&mut self, limit: usize) -> tokio::sync::oneshot::Receiver<Copied> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match &mut self.inner {
            RequestInner::Streamed { body, tee, .. } => {
                let mut t = Tee {
                    chunks: Vec::new(),
                    len: 0,
                    limit,
                    trailers: None,
                    done: Some(tx),
                };
                if body.is_end_stream() {
                    t.finish();
                } else {
                    *tee = Some(Box::new(t));
                }
            }
            RequestInner::Buffered { data, trailers } => {
                let data = data.clone().unwrap_or_default();
                if data.len() <= limit {
                    let _ = tx.send((data, trailers.clone()));
                }
            }
        }
        rx
    }

    /// A body already read: `data` and, for gRPC and the like, trailers.
    pub fn buffered(data: Bytes, trailers: Option<http::HeaderMap>) -> Self {
        Self {
            inner: RequestInner::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.inner {
            RequestInner::Streamed { body, bytes, tee } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                if let Some(Ok(d)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    bytes.fetch_add(d.map_or(0, |d| d.len() as u64), Ordering::Relaxed);
                }
                if let Some(t) = tee {
                    match &frame {
                        Some(Ok(f)) if !t.keep(f) => *tee = None,
                        Some(Ok(_)) if body.is_end_stream() => t.finish(),
                        Some(Ok(_)) => {}
                        None => t.finish(),
                        Some(Err(_)) => *tee = None,
                    }
                }
                Poll::Ready(frame)
            }
            RequestInner::Buffered { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Streamed { body, .. } => body.is_end_stream(),
            RequestInner::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Streamed { body, .. } => body.size_hint(),
            RequestInner::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl ResponseBody {
    /// A body made by the proxy.
    pub fn local(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        Self {
            inner: Inner::Local((!bytes.is_empty()).then_some(bytes)),
            end: None,
            deadline: None,
        }
    }

    /// A body streamed from upstream.
    pub fn upstream(inner: Incoming) -> Self {
        Self {
            inner: Inner::Upstream(inner),
            end: None,
            deadline: None,
        }
    }

    /// Ends the body at `at`: a gRPC body with `grpc-status: 4` and
    /// `message` in its trailers, any other with an error.
    pub fn deadline(mut self, at: tokio::time::Instant, grpc: bool, message: String) -> Self {
        self.deadline = Some(Box::new(Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            grpc,
            message,
        }));
        self
    }

    /// Attaches what happens when the body ends.
    pub fn on_end(mut self, end: OnEnd) -> Self {
        self.end = Some(Box::new(end));
        self
    }

    fn finish(&mut self, complete: bool) {
        let Some(mut end) = self.end.take() else {
            return;
        };
        if let (true, Some(conn), Some(pick)) = (complete, end.conn.take(), end.pick.as_ref()) {
            pick.endpoint.pool.checkin(conn);
        }
    }

    /// The upstream body is not ready: ends it if its deadline passed.
    fn poll_deadline(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(d) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        ready!(d.sleep.as_mut().poll(cx));
        let Some(d) = self.deadline.take() else {
            return Poll::Pending;
        };
        // Drop the upstream body: the stream (or connection) is reset.
        self.inner = Inner::Local(None);
        if let Some(record) = self.record() {
            record.flags = crate::telemetry::FLAG_UPSTREAM_TIMEOUT;
        }
        if d.grpc {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
            if let Ok(v) = http::HeaderValue::from_str(&d.message) {
                trailers.insert("grpc-message", v);
            }
            if let Some(record) = self.record() {
                record.grpc_status = Some(4);
            }
            self.finish(false);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        self.finish(false);
        Poll::Ready(Some(Err(Box::new(BodyTimeout(d.message)))))
    }

    fn record(&mut self) -> Option<&mut RequestRecord> {
        self.end.as_mut().and_then(|e| e.record.as_mut())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match &mut this.inner {
            Inner::Local(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(frame) => frame.map(|f| f.map_err(BoxError::from)),
                Poll::Pending => return this.poll_deadline(cx),
            },
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(record) = this.record() {
                    if let Some(d) = f.data_ref() {
                        record.response_bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref() {
                        record.grpc_status = crate::http::grpc_status(t).or(record.grpc_status);
                    }
                }
                if this.is_end_stream() {
                    this.finish(true);
                }
            }
            Some(Err(_)) => this.finish(false),
            None => this.finish(true),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Local(b) => b.is_none(),
            Inner::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(body) => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body hyper never polled because it was empty (HEAD, 204, 304)
        // still ended cleanly.
        let complete = self.is_end_stream();
        self.finish(complete);
    }
}
