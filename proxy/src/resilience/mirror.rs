//! Request mirrors (Gateway API's `RequestMirror`, GEP-3171): a copy of a
//! share of a rule's requests goes to one endpoint of another backend,
//! fire and forget. The copy never delays or fails the request it copies:
//! its body is kept as the original streams upstream and sent once the
//! original's has ended, its response is read and thrown away, and
//! whatever happens to it is only counted.
//!
//! Copies are bounded so that a slow or silent mirror cannot eat the
//! proxy's memory: at most [`MAX_IN_FLIGHT`] at a time per proxy (the
//! rest are dropped), bodies of at most [`MAX_BODY`] bytes (a longer one
//! is not copied), and each copy ends after [`TIMEOUT`].

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Version};
use mesh_api::Protocol;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::body::{Copied, OnEnd, RequestBody, ResponseBody};
use crate::pool;
use crate::snapshot::BackendEntry;
use crate::tls::Tls;

/// Mirrored requests, by `backend` and `result`: `answered` (any status),
/// `failed`, `timeout`, `overflow` (too many copies in flight),
/// `body_not_copied` (longer than [`MAX_BODY`], or it never ended) and
/// `no_endpoint`.
pub const MIRRORS_TOTAL: &str = "trellis_mirrors_total";

/// The most copies one proxy has in flight.
pub const MAX_IN_FLIGHT: usize = 64;

/// The longest request body a copy carries.
pub const MAX_BODY: usize = 64 * 1024;

/// How long a copy may take, from when the primary is sent (the copy
/// waits for its body) to the end of the mirror's response.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy's copies in flight.
#[derive(Debug)]
pub struct Mirrors {
    permits: Arc<Semaphore>,
}

impl Default for Mirrors {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

/// What a copy needs to reach its backend.
pub struct Dialer {
    /// The workload's identity, for mutual TLS.
    pub tls: Arc<Tls>,
    /// How long a new connection may take.
    pub connect_timeout: Duration,
}

impl Mirrors {
    /// Starts a copy of the request (`parts`, as the primary sends it, and
    /// `body`, which it keeps a copy of) to each of `targets`. `version`
    /// is the client's, which a backend with protocol `auto` speaks.
    pub fn start(
        &self,
        dialer: Dialer,
        targets: Vec<Arc<BackendEntry>>,
        parts: &Parts,
        version: Version,
        body: &mut RequestBody,
    ) {
        let mut copies = Vec::new();
        for target in targets {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                count(&target, "overflow");
                continue;
            };
            let h2 = match target.protocol {
                Protocol::Http2 | Protocol::Grpc => true,
                Protocol::Http | Protocol::Tcp => false,
                Protocol::Auto => version == Version::HTTP_2,
            };
            let mut head = Request::from_parts(parts.clone(), ());
            if crate::http::prepare_request(&mut head, h2, false).is_err() {
                count(&target, "failed");
                continue;
            }
            copies.push(Copy {
                target,
                head: head.into_parts().0,
                h2,
                _permit: permit,
            });
        }
        if copies.is_empty() {
            return;
        }
        let copied = body.tee(MAX_BODY);
        tokio::spawn(async move {
            let sends = tokio::time::timeout(TIMEOUT, send_all(&dialer, &mut copies, copied));
            if sends.await.is_err() {
                // The ones still going.
                for c in copies {
                    count(&c.target, "timeout");
                }
            }
        });
    }
}

/// One copy to send.
struct Copy {
    target: Arc<BackendEntry>,
    head: Parts,
    h2: bool,
    _permit: OwnedSemaphorePermit,
}

/// Waits for the body, then sends every copy; each is taken out of
/// `copies` (and counted) when done.
async fn send_all(dialer: &Dialer, copies: &mut Vec<Copy>, copied: oneshot::Receiver<Copied>) {
    let Ok((data, trailers)) = copied.await else {
        for c in copies.drain(..) {
            count(&c.target, "body_not_copied");
        }
        return;
    };
    let mut sends = tokio::task::JoinSet::new();
    for (i, c) in copies.iter().enumerate() {
        let Some(pick) = c.target.pick(None) else {
            sends.spawn(async move { (i, "no_endpoint") });
            continue;
        };
        let req = Request::from_parts(
            c.head.clone(),
            RequestBody::buffered(data.clone(), trailers.clone()),
        );
        let timeout = c.target.connect_timeout(dialer.connect_timeout);
        let dial = pool::Dial::to(&pick.endpoint, timeout, &dialer.tls);
        let (target, h2) = (c.target.clone(), c.h2);
        sends.spawn(async move {
            let sent = crate::http::send(&pick, req, &dial, h2, false, Some(&target.breaker)).await;
            let result = match sent {
                Ok((resp, conn)) => {
                    let body = ResponseBody::upstream(resp.into_body()).on_end(OnEnd {
                        record: None,
                        pick: Some(pick),
                        conn,
                        slot: None,
                    });
                    drain(body).await
                }
                Err(_) => "failed",
            };
            (i, result)
        });
    }
    let mut done = vec![None; copies.len()];
    while let Some(Ok((i, result))) = sends.join_next().await {
        done[i] = Some(result);
    }
    // Counted in order, each once; a copy whose task was lost failed.
    for (c, result) in copies.drain(..).zip(done) {
        count(&c.target, result.unwrap_or("failed"));
    }
}

/// Reads a mirror's response to its end (so that its connection can be
/// used again) and throws it away.
async fn drain(body: ResponseBody) -> &'static str {
    match http_body_util::BodyExt::collect(body).await {
        Ok(_) => "answered",
        Err(_) => "failed",
    }
}

fn count(target: &BackendEntry, result: &'static str) {
    metrics::counter!(MIRRORS_TOTAL, "backend" => target.name.to_string(), "result" => result)
        .increment(1);
}
