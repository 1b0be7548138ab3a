//! One accepted connection: find where it is going, detect its protocol,
//! and hand it to the HTTP or TCP proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use mesh_api::{Direction, ListenerMode, Protocol};
use tokio::net::TcpStream;
use tracing::debug;

use crate::Shared;
use crate::balance::Endpoint;
use crate::detect::{self, Detected, Rewind};
use crate::listener::ListenerInfo;
use crate::snapshot::{ServiceEntry, Snapshot};

/// The context shared by all requests of one downstream connection.
pub struct Conn {
    /// Proxy-wide state.
    pub shared: Arc<Shared>,
    /// The listener that accepted the connection.
    pub listener: Arc<ListenerInfo>,
    /// The client's address.
    pub peer: SocketAddr,
    /// Where the client was really going, for transparent listeners.
    pub orig_dst: Option<SocketAddr>,
    /// The client's SPIFFE ID, proven over mutual TLS; `None` for
    /// plaintext.
    pub peer_identity: Option<Arc<str>>,
}

/// Where a request or connection goes.
pub enum Dest {
    /// A mesh service, routed and balanced, and the service port the client
    /// addressed when known.
    Service(Arc<ServiceEntry>, Option<u16>),
    /// One address outside any service: passthrough, or the local app.
    Direct {
        /// The name used in metrics.
        name: Arc<str>,
        /// The endpoint, pooled like any other.
        endpoint: Arc<Endpoint>,
    },
}

/// A destination could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// A fixed listener's target is not in the config.
    #[error("the listener's target service {0:?} is not in the current config")]
    UnknownTarget(String),
    /// An explicit-mode request without `Host` or absolute URI.
    #[error("the request names no host: send an absolute URI or a Host header")]
    NoAuthority,
    /// The authority is not `host[:port]`.
    #[error("{0:?} is not a valid host[:port]")]
    BadAuthority(String),
    /// DNS found nothing for a passthrough host.
    #[error("cannot resolve host {0:?}: it is not a mesh service and DNS has no address")]
    Resolve(String),
    /// A transparent connection that was not redirected.
    #[error("no original destination: the connection was not redirected to this listener")]
    NoOriginalDst,
    /// A service known from the control plane's index whose config did not
    /// arrive in time.
    #[error(
        "the config of service {service} did not arrive from the control plane within {}",
        humantime::format_duration(*.waited)
    )]
    NotLoaded {
        /// `namespace/name`.
        service: String,
        /// How long the request waited.
        waited: std::time::Duration,
    },
    /// A pending service that the control plane removed while a request
    /// waited for it.
    #[error("service {0} was removed from the mesh while the request waited for its config")]
    Removed(String),
}

impl DestError {
    /// The status a request gets for this error.
    pub fn status(&self) -> http::StatusCode {
        match self {
            DestError::NotLoaded { .. } | DestError::Removed(_) => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

impl Conn {
    /// Runs the connection to its end. On an inbound listener of a proxy
    /// with an identity, a connection that opens with a TLS record is
    /// mutual TLS; plaintext is refused unless the workload's
    /// PeerAuthentication is PERMISSIVE.
    pub async fn run(self: Arc<Self>, stream: TcpStream) {
        let tls = &self.shared.tls;
        if self.listener.direction == Direction::Inbound && tls.is_ready() {
            if starts_with_tls(&stream, self.listener.detect_timeout).await {
                match tls.accept(stream, self.peer).await {
                    Ok((stream, identity)) => {
                        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                        let conn = Arc::new(Conn {
                            shared: self.shared.clone(),
                            listener: self.listener.clone(),
                            peer: self.peer,
                            orig_dst: self.orig_dst,
                            peer_identity: Some(identity),
                        });
                        let declared = match alpn.as_deref() {
                            Some(crate::tls::ALPN_H2) => Some(Detected::Http2),
                            Some(crate::tls::ALPN_HTTP1) => Some(Detected::Http1),
                            _ => None,
                        };
                        conn.serve(stream, declared).await;
                    }
                    Err(e) => {
                        debug!(peer = %self.peer, error = %e, "inbound mTLS handshake failed")
                    }
                }
                return;
            }
            if !self.plaintext_allowed() {
                metrics::counter!(
                    PLAINTEXT_REFUSED,
                    "listener" => self.listener.name.to_string()
                )
                .increment(1);
                debug!(peer = %self.peer, "refusing a plaintext connection: mTLS is STRICT");
                return;
            }
        }
        self.serve(stream, None).await;
    }

    /// Whether an inbound plaintext connection is accepted: the workload's
    /// PeerAuthentication mode is PERMISSIVE.
    fn plaintext_allowed(&self) -> bool {
        self.shared.snapshot().config.inbound.mtls == mesh_api::policy::MtlsMode::Permissive
    }

    /// The port an inbound connection was addressed to, for authorization
    /// policies: the original destination's, else the target service's
    /// (a fixed listener in front of the app).
    pub fn inbound_port(&self, snap: &Snapshot) -> u16 {
        self.orig_dst.map(|d| d.port()).unwrap_or_else(|| {
            self.listener
                .target
                .as_deref()
                .and_then(|t| snap.service(t))
                .and_then(|s| s.ports.first())
                .map_or(0, |p| p.port)
        })
    }

    /// Detects the protocol (unless `declared`, or the config declares
    /// it) and serves the connection.
    async fn serve<I>(self: Arc<Self>, mut io: I, declared: Option<Detected>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let detected = match (declared, self.declared_protocol()) {
            (Some(d), _) => (d, Default::default()),
            (None, Protocol::Http) => (Detected::Http1, Default::default()),
            (None, Protocol::Http2 | Protocol::Grpc) => (Detected::Http2, Default::default()),
            (None, Protocol::Tcp) => (Detected::Tcp, Default::default()),
            (None, Protocol::Auto) => {
                let head = self.shared.limits.header_read_timeout;
                match detect::detect(&mut io, self.listener.detect_timeout, head).await {
                    Ok(d) => d,
                    Err(e) => {
                        debug!(peer = %self.peer, error = %e, "connection failed during protocol detection");
                        return;
                    }
                }
            }
        };
        let (protocol, prefix) = detected;
        metrics::counter!(
            crate::telemetry::CONNECTIONS,
            "listener" => self.listener.name.to_string(),
            "protocol" => match protocol {
                Detected::Http1 => "http1",
                Detected::Http2 => "http2",
                Detected::Tcp => "tcp",
            }
        )
        .increment(1);
        let io = Rewind::new(prefix, io);
        match protocol {
            Detected::Http1 => crate::http::serve_h1(self, io).await,
            Detected::Http2 => crate::http::serve_h2(self, io).await,
            Detected::Tcp => crate::tcp::serve(self, io).await,
        }
    }

    /// The protocol the config declares for this connection, which skips
    /// detection: the listener's, else the target service port's.
    fn declared_protocol(&self) -> Protocol {
        if self.listener.protocol != Protocol::Auto {
            return self.listener.protocol;
        }
        let snap = self.shared.snapshot();
        match (self.listener.mode, self.listener.direction, self.orig_dst) {
            (ListenerMode::Transparent, Direction::Outbound, Some(dst)) => snap
                .service_by_vip(dst)
                .map_or(Protocol::Auto, |s| s.protocol(dst.port())),
            (ListenerMode::Fixed, _, _) => self
                .listener
                .target
                .as_deref()
                .and_then(|t| snap.service(t))
                .and_then(|s| (s.ports.len() == 1).then(|| s.ports[0].protocol))
                .unwrap_or(Protocol::Auto),
            _ => Protocol::Auto,
        }
    }

    /// Finds the destination of a request or connection. `authority` is the
    /// request's `host[:port]` (explicit mode); TCP passes `None`.
    pub async fn destination(
        &self,
        snap: &Snapshot,
        authority: Option<&str>,
    ) -> Result<Dest, DestError> {
        let l = &self.listener;
        match l.mode {
            ListenerMode::Fixed => {
                let target = l.target.as_deref().unwrap_or_default();
                let s = snap
                    .service(target)
                    .ok_or_else(|| DestError::UnknownTarget(target.to_owned()))?;
                Ok(Dest::Service(self.loaded(s).await?, None))
            }
            ListenerMode::Explicit => {
                let authority = authority.ok_or(DestError::NoAuthority)?;
                let (host, port) = crate::http::parse_authority(authority, 80)
                    .ok_or_else(|| DestError::BadAuthority(authority.to_owned()))?;
                if let Some(s) = snap.service_by_host(&host, port) {
                    return Ok(Dest::Service(self.loaded(s).await?, Some(port)));
                }
                let addr = match host.parse::<IpAddr>() {
                    Ok(ip) => SocketAddr::new(ip, port),
                    Err(_) => tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| DestError::Resolve(host.clone()))?,
                };
                Ok(self.outside(snap, Arc::from(host.as_str()), addr).await)
            }
            ListenerMode::Transparent => {
                let dst = self.orig_dst.ok_or(DestError::NoOriginalDst)?;
                match l.direction {
                    Direction::Outbound => match snap.service_by_vip(dst) {
                        Some(s) => Ok(Dest::Service(self.loaded(s).await?, Some(dst.port()))),
                        None => Ok(self
                            .outside(snap, Arc::from(dst.ip().to_string()), dst)
                            .await),
                    },
                    // Inbound traffic goes to the app on the same port of
                    // the pod's loopback.
                    Direction::Inbound => {
                        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port());
                        Ok(self.direct(Arc::from(format!("inbound:{}", dst.port())), local))
                    }
                }
            }
        }
    }

    /// `svc` with its config loaded: itself, or for a pending service the
    /// entry that arrives from the control plane.
    pub(crate) async fn loaded(
        &self,
        svc: &Arc<ServiceEntry>,
    ) -> Result<Arc<ServiceEntry>, DestError> {
        if svc.pending {
            self.shared.load(svc).await
        } else {
            Ok(svc.clone())
        }
    }

    /// An outbound destination that is no service's address: a mesh
    /// workload's own address (a pod called by its IP, as headless
    /// Services and StatefulSets are), reached like that service's
    /// endpoint, with mutual TLS and the pod's identity; or else a
    /// passthrough.
    async fn outside(&self, snap: &Snapshot, name: Arc<str>, addr: SocketAddr) -> Dest {
        for svc in snap.services_by_endpoint(addr.ip()) {
            let Ok(svc) = self.loaded(svc).await else {
                continue;
            };
            let Some(e) = svc.endpoint_at(addr) else {
                continue;
            };
            let endpoint = if e.addr == addr {
                e.clone()
            } else {
                // Another port of the pod: its identity all the same.
                self.shared
                    .passthrough_endpoint_as(addr, e.workload.clone(), e.identity.clone())
            };
            return Dest::Direct {
                name: svc.name.clone(),
                endpoint,
            };
        }
        self.direct(name, addr)
    }

    fn direct(&self, name: Arc<str>, addr: SocketAddr) -> Dest {
        Dest::Direct {
            name,
            endpoint: self.shared.passthrough_endpoint(addr),
        }
    }
}

impl Dest {
    /// How long a connect to an endpoint of this destination may take: its
    /// backend's `connectTimeout`, else `default`.
    pub fn connect_timeout(&self, default: std::time::Duration) -> std::time::Duration {
        match self {
            Dest::Service(s, port) => s
                .port_or_first(*port)
                .and_then(|p| p.backend.as_ref())
                .map_or(default, |b| b.connect_timeout(default)),
            Dest::Direct { .. } => default,
        }
    }

    /// The `destination_service` label.
    pub fn name(&self) -> Arc<str> {
        match self {
            Dest::Service(s, _) => s.name.clone(),
            Dest::Direct { name, .. } => name.clone(),
        }
    }
}

/// Counter: inbound plaintext connections refused because mTLS is STRICT.
pub const PLAINTEXT_REFUSED: &str = "trellis_inbound_plaintext_refused_total";

/// Whether the client's first byte is a TLS handshake record (0x16), read
/// without consuming it. A client that sends nothing within `timeout`
/// (a server-speaks-first protocol) is not TLS.
async fn starts_with_tls(stream: &TcpStream, timeout: std::time::Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut first)).await,
        Ok(Ok(1))
    ) && first[0] == 0x16
}

/// Reads `SO_ORIGINAL_DST`: where a connection redirected by iptables was
/// going. `None` when the connection was not redirected (the original
/// destination is then the listener itself, which would loop).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    orig.ok()
        .and_then(|a| a.as_socket())
        .filter(|a| *a != local)
}
