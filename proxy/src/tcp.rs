//! Opaque TCP: connections that are not HTTP, `CONNECT` tunnels, and
//! upgraded HTTP connections (WebSocket) are copied byte for byte.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::balance::Pick;
use crate::body::{OnEnd, ResponseBody};
use crate::conn::{Conn, Dest};
use crate::pool;
use crate::snapshot::Snapshot;
use crate::telemetry::{self, RequestRecord};

/// Forwards an opaque TCP connection to its destination's default backend.
pub async fn serve<I>(conn: Arc<Conn>, mut io: I)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let snap = conn.shared.snapshot();
    if !conn.listener.is_outbound() && !snap.authorizer.is_empty() {
        let request =
            crate::authz::Request::tcp(conn.peer_identity.as_deref(), conn.inbound_port(&snap));
        if let crate::authz::Decision::Deny { policy, .. } = snap.authorizer.check(&request) {
            debug!(peer = %conn.peer, principal = ?conn.peer_identity, %policy, "TCP connection denied");
            metrics::counter!(crate::authz::DENIED_TOTAL, crate::authz::POLICY_LABEL => policy)
                .increment(1);
            return;
        }
    }
    let dest = match conn.destination(&snap, None).await {
        Ok(d) => d,
        Err(e) => {
            debug!(peer = %conn.peer, error = %e, "closing TCP connection");
            return;
        }
    };
    let Some(pick) = pick(&dest) else {
        debug!(peer = %conn.peer, service = %dest.name(), "closing TCP connection: no endpoint");
        return;
    };
    let dial = pool::Dial::to(
        &pick.endpoint,
        dest.connect_timeout(conn.shared.limits.connect_timeout),
        &conn.shared.tls,
    );
    let labels = labels(&conn, &snap, &dest, &pick, dial.is_tls());
    match dial.connect(None).await {
        Ok(mut upstream) => copy(&mut io, &mut upstream, &labels).await,
        Err(e) => debug!(peer = %conn.peer, error = %e, "TCP upstream connect failed"),
    }
}

/// Answers an explicit-mode `CONNECT host:port`: connects to the target,
/// replies 200, and then tunnels the upgraded connection.
pub async fn connect_tunnel(
    conn: Arc<Conn>,
    snap: &Snapshot,
    mut req: Request<Incoming>,
    record: RequestRecord,
) -> Response<ResponseBody> {
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let dest = match conn.destination(snap, authority.as_deref()).await {
        Ok(d) => d,
        Err(e) => return crate::http::local(e.status(), &e.to_string(), record),
    };
    let Some(pick) = pick(&dest) else {
        let msg = format!("service {} has no endpoints", dest.name());
        return crate::http::local(StatusCode::SERVICE_UNAVAILABLE, &msg, record);
    };
    let addr = pick.endpoint.addr;
    let dial = pool::Dial::to(
        &pick.endpoint,
        dest.connect_timeout(conn.shared.limits.connect_timeout),
        &conn.shared.tls,
    );
    let mut upstream = match dial.connect(None).await {
        Ok(s) => s,
        Err(e) => {
            return crate::http::local(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), record);
        }
    };
    let labels = labels(&conn, snap, &dest, &pick, dial.is_tls());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tasks = conn.shared.tasks.clone();
    tasks.spawn(async move {
        match on_upgrade.await {
            Ok(up) => copy(&mut TokioIo::new(up), &mut upstream, &labels).await,
            Err(e) => debug!(upstream = %addr, error = %e, "CONNECT upgrade failed"),
        }
        drop(pick);
    });
    let mut record = record;
    record.status = StatusCode::OK.as_u16();
    record.upstream = Some(addr);
    Response::new(ResponseBody::local("").on_end(OnEnd {
        record: Some(record),
        pick: None,
        conn: None,
        slot: None,
    }))
}

/// Joins the two halves of an HTTP upgrade (WebSocket) once both sides
/// have switched protocols.
pub async fn join_upgrades(down: OnUpgrade, up: OnUpgrade, addr: SocketAddr) {
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                debug!(upstream = %addr, error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(upstream = %addr, error = %e, "HTTP upgrade failed"),
    }
}

fn pick(dest: &Dest) -> Option<Pick> {
    match dest {
        Dest::Direct { endpoint, .. } => Some(Pick::direct(endpoint.clone())),
        Dest::Service(s, port) => s.port_or_first(*port)?.backend.as_ref()?.balancer.pick(),
    }
}

/// The TCP metric labels. `upstream_tls`: the connection to the endpoint
/// is mutual TLS (what `tls` means outbound; inbound it is the client's).
fn labels(
    conn: &Conn,
    snap: &Snapshot,
    dest: &Dest,
    pick: &Pick,
    upstream_tls: bool,
) -> Vec<(&'static str, String)> {
    let outbound = conn.listener.is_outbound();
    let source = |v: &Arc<str>| {
        if outbound {
            v.to_string()
        } else {
            "unknown".to_owned()
        }
    };
    vec![
        ("direction", conn.listener.direction_label().to_owned()),
        ("source_workload", source(&snap.workload)),
        ("source_namespace", source(&snap.namespace)),
        ("destination_service", dest.name().to_string()),
        ("destination_workload", pick.endpoint.workload.to_string()),
        (
            "tls",
            (if outbound {
                upstream_tls
            } else {
                conn.peer_identity.is_some()
            })
            .to_string(),
        ),
    ]
}

async fn copy<A, B>(down: &mut A, up: &mut B, labels: &[(&'static str, String)])
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    metrics::counter!(telemetry::TCP_OPENED, labels).increment(1);
    let (sent, received) = match tokio::io::copy_bidirectional(down, up).await {
        Ok(n) => n,
        Err(e) => {
            debug!(error = %e, "TCP connection ended with an error");
            (0, 0)
        }
    };
    metrics::counter!(telemetry::TCP_SENT, labels).increment(sent);
    metrics::counter!(telemetry::TCP_RECEIVED, labels).increment(received);
    metrics::counter!(telemetry::TCP_CLOSED, labels).increment(1);
}
