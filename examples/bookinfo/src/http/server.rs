//! The accept loop every bookinfo service runs: HTTP/1.1 and h2c on one
//! port, `/health` answered here for all services, graceful drain on
//! shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Body, json, method_not_allowed};

/// How long in-flight requests get to finish once shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the loop pauses after a failed `accept` (usually EMFILE) so it
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One bookinfo service: turns a request head into a response. Bodies of
/// inbound requests are ignored; every route is a GET.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. `/health` and non-GET methods never reach this.
    fn handle(&self, req: Parts) -> impl Future<Output = Response<Body>> + Send;
}

/// Serves `handler` on `listener` until `shutdown` completes, then stops
/// accepting and waits up to [`DRAIN_TIMEOUT`] for open requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) {
    let handler = Arc::new(handler);
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let handler = Arc::clone(&handler);
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = Arc::clone(&handler);
            async move { Ok::<_, Infallible>(route(handler.as_ref(), req).await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(
            async move {
                if let Err(error) = conn.await {
                    debug!(error = %super::error_chain(error.as_ref()), "connection ended with an error");
                }
            }
            .instrument(info_span!("conn", %peer)),
        );
    }

    drop(listener);
    info!("shutting down, draining open connections");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(timeout = ?DRAIN_TIMEOUT, "connections still open after the drain timeout");
    }
}

async fn route<H: Handler>(handler: &H, req: Request<Incoming>) -> Response<Body> {
    // The body is dropped unread: no route takes one, and hyper closes the
    // connection rather than reuse it if a large body was left unread.
    let (parts, _body) = req.into_parts();
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return method_not_allowed();
    }
    if parts.uri.path() == "/health" {
        return json(StatusCode::OK, &serde_json::json!({ "status": "ok" }));
    }
    handler.handle(parts).await
}
