//! Upstream connections of one endpoint, reused across requests.
//!
//! HTTP/1 connections carry one request at a time: a connection is checked
//! out for a request and checked back in when the response body has been
//! read to its end. HTTP/2 connections are shared: one per endpoint carries
//! every concurrent request until it closes.
//!
//! [`Dial`] says how to reach an endpoint: plain TCP, or mutual TLS when the
//! endpoint has an identity and the proxy has one of its own.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::balance::Endpoint;
use crate::body::RequestBody;
use crate::tls::{self, Tls, TlsError};

/// How long a connection may sit idle in the pool unless its backend's
/// `idleTimeout` says otherwise. Shorter than the idle timeouts of common
/// servers (ours is 60 s, hyper's and nginx's longer), so that the pool
/// rarely hands out a connection the server is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the proxy closes the pooled connections past their idle
/// timeout.
pub const IDLE_SWEEP: Duration = Duration::from_millis(500);
/// Idle HTTP/1 connections kept per endpoint.
pub const MAX_IDLE: usize = 256;

/// The connections of one endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    h1: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection and when a request last took it.
    h2: Mutex<Option<(http2::SendRequest<RequestBody>, Instant)>>,
    /// Connections open now, idle or busy: each connection's task holds
    /// one count until the connection closes.
    open: Arc<AtomicUsize>,
    /// The idle timeout in milliseconds; 0 is [`IDLE_TIMEOUT`].
    idle_ms: AtomicU64,
}

/// One connection's count in its pool, taken before it is opened (so
/// that concurrent connects see each other) and given back when the
/// connect fails or the connection's task ends.
#[derive(Debug)]
pub struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Idle {
    conn: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// Connecting to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect failed.
    #[error("connect to {addr} failed: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TCP connect did not finish in time.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The mutual TLS handshake failed (or the proxy has no certificate).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

impl Pool {
    /// An idle HTTP/1 connection that is still open, if any.
    pub fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let timeout = self.idle_timeout();
        while let Some(i) = idle.pop() {
            if !i.conn.is_closed() && i.since.elapsed() < timeout {
                return Some(i.conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, conn: http1::SendRequest<RequestBody>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// The shared HTTP/2 connection, if it is open.
    pub fn h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let (conn, used) = h2.as_mut().filter(|(c, _)| !c.is_closed())?;
        *used = Instant::now();
        Some(conn.clone())
    }

    /// Makes `conn` the shared HTTP/2 connection.
    pub fn set_h2(&self, conn: http2::SendRequest<RequestBody>) {
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some((conn, Instant::now()));
    }

    /// The idle timeout: `timeout`, or [`IDLE_TIMEOUT`] for `None`.
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| {
            u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.idle_ms.store(ms, Ordering::Relaxed);
    }

    /// How long a connection may sit unused.
    pub fn idle_timeout(&self) -> Duration {
        match self.idle_ms.load(Ordering::Relaxed) {
            0 => IDLE_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// Closes the connections unused for longer than the idle timeout:
    /// an HTTP/1 one waiting in the pool, and the HTTP/2 one when no
    /// request took it for that long (streams still open on it keep it
    /// until they end).
    pub fn expire_idle(&self) {
        let timeout = self.idle_timeout();
        self.h1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|i| !i.conn.is_closed() && i.since.elapsed() < timeout);
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        if h2
            .as_ref()
            .is_some_and(|(c, used)| c.is_closed() || used.elapsed() >= timeout)
        {
            *h2 = None;
        }
    }

    /// Connections open now to the endpoint, idle or busy.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a connection about to be opened, if fewer than `max` are
    /// open or opening.
    pub fn reserve(&self, max: usize) -> Option<OpenGuard> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| OpenGuard(self.open.clone()))
    }

    /// Idle HTTP/1 connections, for tests and the admin page.
    pub fn idle(&self) -> usize {
        self.h1.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How to reach one endpoint.
#[derive(Debug, Clone)]
pub struct Dial {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The connect timeout.
    pub timeout: Duration,
    /// Mutual TLS: the proxy's identity and the SPIFFE ID the endpoint
    /// must prove.
    pub tls: Option<(Arc<Tls>, Arc<str>)>,
}

impl Dial {
    /// How to reach `endpoint`: mutual TLS when it has an identity and
    /// `tls` (the proxy's) is ready, plain TCP otherwise.
    pub fn to(endpoint: &Endpoint, timeout: Duration, tls: &Arc<Tls>) -> Self {
        let tls = endpoint
            .identity
            .as_ref()
            .filter(|_| tls.is_ready())
            .map(|id| (tls.clone(), id.clone()));
        Self {
            addr: endpoint.addr,
            timeout,
            tls,
        }
    }

    /// Plain TCP to `addr`.
    pub fn plain(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            tls: None,
        }
    }

    /// Whether connections are mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects, and for mutual TLS does the handshake offering `alpn`.
    pub async fn connect(&self, alpn: Option<&[u8]>) -> Result<Upstream, ConnectError> {
        let tcp = connect_tcp(self.addr, self.timeout).await?;
        match &self.tls {
            None => Ok(Upstream::Plain(tcp)),
            Some((tls, identity)) => {
                let stream = tls.connect(tcp, self.addr, identity, alpn).await?;
                Ok(Upstream::Tls(Box::new(stream)))
            }
        }
    }
}

/// An upstream connection: plain TCP or mutual TLS over it.
#[derive(Debug)]
pub enum Upstream {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a TCP connection with `TCP_NODELAY`.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    // Latency matters more than packet count for proxied request/response
    // traffic; failing to set it only costs latency.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens an HTTP/1 connection and drives it on its own task, which holds
/// `open` (its count in the pool) while the connection lives. `upgrades`
/// keeps the connection usable for a protocol upgrade.
pub async fn connect_h1(
    open: OpenGuard,
    dial: &Dial,
    upgrades: bool,
) -> Result<http1::SendRequest<RequestBody>, ConnectError> {
    let addr = dial.addr;
    let io = TokioIo::new(dial.connect(Some(tls::ALPN_HTTP1)).await?);
    let (send, conn) = http1::Builder::new()
        .preserve_header_case(true)
        .writev(false)
        .handshake(io)
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _open = open;
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = result {
            debug!(%addr, error = %e, "upstream HTTP/1 connection closed");
        }
    });
    Ok(send)
}

/// Opens an HTTP/2 connection (prior knowledge) and drives it on its own
/// task, which holds `open` while the connection lives.
pub async fn connect_h2(
    open: OpenGuard,
    dial: &Dial,
) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
    let addr = dial.addr;
    let io = TokioIo::new(dial.connect(Some(tls::ALPN_H2)).await?);
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(io)
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        let _open = open;
        if let Err(e) = conn.await {
            debug!(%addr, error = %e, "upstream HTTP/2 connection closed");
        }
    });
    Ok(send)
}
