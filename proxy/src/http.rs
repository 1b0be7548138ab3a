//! The HTTP proxy: serve a downstream connection, route each request, and
//! forward it to an endpoint over a pooled upstream connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_api::{AbortStatus, Protocol};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::balance::Pick;
use crate::body::{OnEnd, RequestBody, ResponseBody};
use crate::conn::{Conn, Dest};
use crate::filters::{Filters, Injected, Outcome};
use crate::pool::{self, ConnectError};
use crate::resilience::breaker::{Breaker, Limit, OVERLOADED_HEADER, Overflow, Slot};
use crate::resilience::retry::{
    ATTEMPT_HEADER, MAX_BUFFERED_BODY, REASON_LABEL, RETRIES_SKIPPED_TOTAL, RETRIES_TOTAL, Reason,
};
use crate::resilience::timeout::{self, Deadlines};
use crate::resilience::{mirror, outlier};
use crate::route::{RequestParts, Rule};
use crate::snapshot::{BackendEntry, Snapshot};
use crate::telemetry::{
    self, AccessFields, Dims, FLAG_DELAY_INJECTED, FLAG_FAULT_INJECTED, FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE, FLAG_OVERFLOW, FLAG_UPSTREAM_FAILURE, FLAG_UPSTREAM_TIMEOUT, RequestRecord,
};

/// Serves HTTP/1 on `io` until the client closes or the proxy drains.
pub async fn serve_h1<I>(conn: Arc<Conn>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &conn.shared.limits;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .preserve_header_case(true)
        .writev(false)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    let served = builder
        .serve_connection(TokioIo::new(io), service(conn.clone()))
        .with_upgrades();
    drive(&conn, served, |s| s.graceful_shutdown()).await;
}

/// Serves HTTP/2 on `io` until the client closes or the proxy drains.
pub async fn serve_h2<I>(conn: Arc<Conn>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(conn.shared.limits.max_header_bytes as u32);
    let served = builder.serve_connection(TokioIo::new(io), service(conn.clone()));
    drive(&conn, served, |s| s.graceful_shutdown()).await;
}

fn service(
    conn: Arc<Conn>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<ResponseBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| handle(conn.clone(), req))
}

/// Runs a served connection; when the proxy drains, asks it to shut down
/// gracefully (finish the request in flight, or send GOAWAY) and waits.
async fn drive<S, E>(conn: &Conn, served: S, shutdown: impl FnOnce(Pin<&mut S>))
where
    S: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(served);
    let result = tokio::select! {
        r = &mut served => r,
        () = conn.shared.drain.cancelled() => {
            shutdown(served.as_mut());
            served.await
        }
    };
    if let Err(e) = result {
        debug!(peer = %conn.peer, error = %e, "downstream connection ended with an error");
    }
}

/// Handles one request. Every failure becomes a response, never an error,
/// so hyper keeps the connection for the next request.
async fn handle(
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let snap = conn.shared.snapshot();
    let access = conn.shared.access_log.then(|| {
        Box::new(AccessFields {
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            authority: authority(&req).unwrap_or_default().to_owned(),
            peer: conn.peer,
            version: req.version(),
        })
    });
    let outbound = conn.listener.is_outbound();
    let dims = match (&conn.peer_identity, outbound) {
        (_, true) => Dims {
            direction: conn.listener.direction_label(),
            source_workload: snap.workload.clone(),
            source_namespace: snap.namespace.clone(),
            destination_service: telemetry::unknown(),
            route: telemetry::empty(),
            tls: false,
            source_principal: conn
                .shared
                .tls
                .credentials()
                .map_or_else(telemetry::unknown, |c| c.spiffe_id.clone()),
        },
        (Some(peer), false) => Dims {
            direction: conn.listener.direction_label(),
            source_workload: telemetry::unknown(),
            source_namespace: crate::tls::namespace_of(peer)
                .map_or_else(telemetry::unknown, Arc::from),
            destination_service: telemetry::unknown(),
            route: telemetry::empty(),
            tls: true,
            source_principal: peer.clone(),
        },
        (None, false) => Dims {
            direction: conn.listener.direction_label(),
            source_workload: telemetry::unknown(),
            source_namespace: telemetry::unknown(),
            destination_service: telemetry::unknown(),
            route: telemetry::empty(),
            tls: false,
            source_principal: telemetry::unknown(),
        },
    };
    let mut dims = dims;

    if !outbound && let Err(refusal) = admit(&conn, &snap, &req).await {
        let record = RequestRecord::new(conn.shared.metrics.clone(), dims, start, access);
        let mut resp = local(refusal.status, &refusal.message, record);
        if let Some(secs) = refusal.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        return Ok(resp);
    }

    if req.method() == Method::CONNECT {
        let record = RequestRecord::new(conn.shared.metrics.clone(), dims, start, access);
        return Ok(crate::tcp::connect_tunnel(conn, &snap, req, record).await);
    }
    let routed = route(&conn, &snap, &mut req, &mut dims).await;
    let record = RequestRecord::new(conn.shared.metrics.clone(), dims, start, access);
    Ok(match routed {
        Ok(routed) => forward(&conn, req, routed, record, start).await,
        Err(answer) => answer.respond(record),
    })
}

/// Why the inbound side refuses a request.
struct Refusal {
    status: StatusCode,
    message: String,
    /// Seconds, for `Retry-After`.
    retry_after: Option<u64>,
}

/// The workload's inbound policy for one request: authorization (DENY
/// first, then ALLOW), then rate limits. Refusals are counted by policy.
async fn admit(conn: &Conn, snap: &Snapshot, req: &Request<Incoming>) -> Result<(), Refusal> {
    if !snap.authorizer.is_empty() {
        let request = crate::authz::Request::http(
            conn.peer_identity.as_deref(),
            req.method().as_str(),
            req.uri().path(),
            conn.inbound_port(snap),
        );
        if let crate::authz::Decision::Deny { policy, reason } = snap.authorizer.check(&request) {
            debug!(peer = %conn.peer, principal = ?conn.peer_identity, %policy, "request denied");
            metrics::counter!(crate::authz::DENIED_TOTAL, crate::authz::POLICY_LABEL => policy)
                .increment(1);
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                message: format!("RBAC: {reason}"),
                retry_after: None,
            });
        }
    }
    if !snap.rate_limits.is_empty() {
        let route = if snap.rate_limits.has_route_limits() {
            inbound_route(conn, snap, req).await
        } else {
            None
        };
        if let Err(limited) = snap
            .rate_limits
            .check(route.as_deref(), tokio::time::Instant::now())
        {
            metrics::counter!(
                crate::ratelimit::RATE_LIMITED_TOTAL,
                crate::ratelimit::POLICY_LABEL => limited.policy.to_owned()
            )
            .increment(1);
            let secs = limited.retry_after.header_seconds();
            return Err(Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("rate limit {} exceeded; retry in {secs}s", limited.policy),
                retry_after: Some(secs),
            });
        }
    }
    Ok(())
}

/// The route an inbound request matches among the routes of the service
/// it addressed (by `Host`), for per-route rate limits. A sidecar holds
/// the services it never called itself as pending (names only), so the
/// addressed service is loaded first, as an outbound request would load
/// it; if that fails, only the workload-wide limits apply.
async fn inbound_route(conn: &Conn, snap: &Snapshot, req: &Request<Incoming>) -> Option<Arc<str>> {
    let (host, port) = authority(req).and_then(|a| parse_authority(a, 80))?;
    let svc = conn.loaded(snap.service_by_host(&host, port)?).await.ok()?;
    let parts = RequestParts {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    svc.routes
        .find(&parts, Some(port))
        .map(|m| m.rule.route.clone())
}

/// Where routing sends a request.
struct Routed {
    pick: Pick,
    protocol: Protocol,
    /// The matched rule and the index of its chosen backend, for the
    /// rule's timeouts and the response filters; `None` without routes.
    rule: Option<(Arc<Rule<Arc<BackendEntry>>>, usize)>,
    /// The backend, for retries' endpoints and budget; `None` for a
    /// passthrough destination.
    backend: Option<Arc<BackendEntry>>,
    /// The HTTPFaults the request drew.
    fault: Injected,
    /// The backends its mirrors drew send copies to.
    mirrors: Vec<Arc<BackendEntry>>,
}

/// A response the proxy gives instead of forwarding.
enum Answer {
    /// An error: status, message and response flags.
    Error(StatusCode, String, &'static str),
    /// A route's redirect: status and `Location`.
    Redirect(StatusCode, HeaderValue),
}

impl Answer {
    fn error(status: StatusCode, message: String) -> Self {
        Answer::Error(status, message, "")
    }

    fn respond(self, mut record: RequestRecord) -> Response<ResponseBody> {
        match self {
            Answer::Error(status, message, flags) => {
                record.flags = flags;
                local(status, &message, record)
            }
            Answer::Redirect(status, location) => {
                let mut resp = local(status, "", record);
                resp.headers_mut().insert(header::LOCATION, location);
                resp.headers_mut().remove("x-trellis-error");
                resp
            }
        }
    }
}

/// Finds the request's destination, matches its route, runs the rule's
/// and the backend's request filters, and picks a backend and an
/// endpoint. Sets the `destination_service` and `route` labels on `dims`
/// as they become known.
async fn route(
    conn: &Conn,
    snap: &Snapshot,
    req: &mut Request<Incoming>,
    dims: &mut Dims,
) -> Result<Routed, Answer> {
    let dest = conn
        .destination(snap, authority(req))
        .await
        .map_err(|e| Answer::error(e.status(), e.to_string()))?;
    dims.destination_service = dest.name();
    // Inbound, the listener's target is the local app; the service the
    // client addressed names the destination better, when it is known.
    if !conn.listener.is_outbound()
        && let Some((host, port)) = authority(req).and_then(|a| parse_authority(a, 80))
        && let Some(s) = snap.service_by_host(&host, port)
    {
        dims.destination_service = s.name.clone();
    }
    let (svc, port) = match dest {
        Dest::Direct { endpoint, .. } => {
            return Ok(Routed {
                pick: Pick::direct(endpoint),
                protocol: Protocol::Auto,
                rule: None,
                backend: None,
                fault: Injected::default(),
                mirrors: Vec::new(),
            });
        }
        Dest::Service(svc, port) => (svc, port),
    };
    let mut fault = Injected::default();
    let mut mirrors = Vec::new();
    let (backend, rule) = if !svc.routes.binds(port) {
        let port = svc.port_or_first(port);
        let backend = port.and_then(|p| p.backend.as_ref()).ok_or_else(|| {
            let msg = format!("service {} has no backend", svc.name);
            Answer::Error(
                StatusCode::SERVICE_UNAVAILABLE,
                msg,
                FLAG_NO_HEALTHY_UPSTREAM,
            )
        })?;
        (backend.clone(), None)
    } else {
        let parts = RequestParts {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        let matched = svc.routes.find(&parts, port).ok_or_else(|| {
            let msg = format!("no route of service {} matches this request", svc.name);
            Answer::Error(StatusCode::NOT_FOUND, msg, FLAG_NO_ROUTE)
        })?;
        let rule = matched.rule;
        dims.route = rule.route.clone();
        let default_port = port.unwrap_or(80);
        filter(
            &rule.route,
            &rule.filters,
            req,
            matched.prefix,
            default_port,
        )?;
        let (i, (backend, filters)) = rule
            .pick(rand::rng().random())
            .and_then(|i| Some((i, rule.backend(i)?)))
            .ok_or_else(|| {
                let msg = format!("route {} has no usable backend", rule.route);
                Answer::error(StatusCode::INTERNAL_SERVER_ERROR, msg)
            })?;
        filter(&rule.route, filters, req, matched.prefix, default_port)?;
        rule.filters.draw_faults(&mut fault);
        filters.draw_faults(&mut fault);
        mirrors = rule
            .mirrors(i)
            .filter(|m| crate::filters::hits(m.per_million))
            .map(|m| m.backend.clone())
            .collect();
        (backend.clone(), Some((rule.clone(), i)))
    };
    let pick = backend.pick(None).ok_or_else(|| {
        let msg = format!("backend {} has no endpoints", backend.name);
        Answer::Error(
            StatusCode::SERVICE_UNAVAILABLE,
            msg,
            FLAG_NO_HEALTHY_UPSTREAM,
        )
    })?;
    Ok(Routed {
        pick,
        protocol: backend.protocol,
        rule,
        backend: Some(backend),
        fault,
        mirrors,
    })
}

/// Runs request filters; an answer if they redirect or cannot be honoured.
fn filter(
    route: &str,
    filters: &Filters,
    req: &mut Request<Incoming>,
    prefix: &str,
    default_port: u16,
) -> Result<(), Answer> {
    if filters.is_empty() {
        return Ok(());
    }
    match filters.on_request(req, prefix, default_port) {
        Outcome::Forward => Ok(()),
        Outcome::Redirect(status, location) => Err(Answer::Redirect(status, location)),
        Outcome::Unsupported(why) => Err(Answer::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("route {route}: {why}"),
        )),
    }
}

/// Sends `req` to the picked endpoint, within the rule's timeouts,
/// retrying as its retry policy and the backend's budget allow, and wraps
/// the response.
async fn forward(
    conn: &Conn,
    mut req: Request<Incoming>,
    routed: Routed,
    mut record: RequestRecord,
    start: Instant,
) -> Response<ResponseBody> {
    let Routed {
        mut pick,
        protocol,
        rule,
        backend,
        fault,
        mirrors,
    } = routed;
    let upgrade = is_upgrade(&req);
    let h2 = match protocol {
        Protocol::Http2 | Protocol::Grpc => true,
        Protocol::Http | Protocol::Tcp => false,
        Protocol::Auto => req.version() == Version::HTTP_2,
    } && !upgrade;
    let route: Arc<str> = rule
        .as_ref()
        .map_or_else(telemetry::empty, |(r, _)| r.route.clone());

    let grpc = is_grpc(req.headers());
    let grpc_timeout = if grpc {
        req.headers()
            .get("grpc-timeout")
            .and_then(timeout::parse_grpc_timeout)
    } else {
        None
    };
    let deadlines = match (&rule, grpc_timeout) {
        (None, None) => None,
        (rule, grpc_timeout) => {
            let timeouts = rule.as_ref().map(|(r, _)| r.timeouts).unwrap_or_default();
            // `start` is std's; the deadlines run on tokio's clock, so
            // that tests can pause it. The time already spent counts.
            let now = tokio::time::Instant::now();
            let arrived = now.checked_sub(start.elapsed()).unwrap_or(now);
            Some(Deadlines::new(arrived, &timeouts, grpc_timeout)).filter(|d| !d.is_none())
        }
    };
    if !fault.is_none() {
        let deadline = deadlines.and_then(|d| d.request());
        record = match inject(fault, deadline, &route, grpc, record).await {
            Ok(record) => record,
            Err(answer) => return answer,
        };
    }
    let policy = rule.as_ref().and_then(|(r, _)| r.retry.as_ref());
    let request_slot = match &backend {
        Some(b) => match b.breaker.acquire(Limit::Requests) {
            Ok(slot) => Some(slot),
            Err(o) => return overloaded(&b.name, o, record),
        },
        None => None,
    };
    if let Some(b) = &backend {
        b.budget.deposit(tokio::time::Instant::now());
    }
    // Held until the response is ready: a retry in flight.
    let mut _retry_slot: Option<Slot> = None;

    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_version = req.version();
    if let Err(msg) = prepare_request(&mut req, h2, upgrade) {
        return local(StatusCode::BAD_REQUEST, &msg, record);
    }
    let (parts, body) = req.into_parts();
    // A retry needs the body again: read it ahead when it is small.
    let (first_body, replay) = if policy.is_some() && !upgrade {
        let first = deadlines.and_then(|d| d.attempt(tokio::time::Instant::now()));
        match buffer(body, &record, first.map(|a| a.at)).await {
            Ok(Buffered::Whole(data, trailers)) => {
                let r = Replay {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    version: parts.version,
                    headers: parts.headers.clone(),
                    data,
                    trailers,
                };
                (r.body(), Some(r))
            }
            Ok(Buffered::Streaming(body)) => {
                (RequestBody::new(body, record.request_bytes.clone()), None)
            }
            Err(e) => {
                let msg = format!("reading the request body: {e}");
                return local(StatusCode::BAD_REQUEST, &msg, record);
            }
        }
    } else {
        (RequestBody::new(body, record.request_bytes.clone()), None)
    };
    let mut first_body = first_body;
    if !mirrors.is_empty() && !upgrade {
        let dialer = mirror::Dialer {
            tls: conn.shared.tls.clone(),
            connect_timeout: conn.shared.limits.connect_timeout,
        };
        let shared = &conn.shared;
        shared
            .mirrors
            .start(dialer, mirrors, &parts, client_version, &mut first_body);
    }
    let mut next = Some(Request::from_parts(parts, first_body));

    let mut retries = 0u32;
    let (mut resp, h1_conn, attempt) = loop {
        let mut req = match next.take() {
            Some(r) => r,
            // Only a buffered request reaches a retry without its body.
            None => match &replay {
                Some(r) => r.request(),
                None => break (None, None, None),
            },
        };
        if policy.is_some() {
            req.headers_mut()
                .insert(ATTEMPT_HEADER, HeaderValue::from(retries + 1));
        }
        let attempt = deadlines.and_then(|d| d.attempt(tokio::time::Instant::now()));
        if grpc && let Some(a) = &attempt {
            // The upstream learns what is left of the deadline.
            let left = a.at.saturating_duration_since(tokio::time::Instant::now());
            req.headers_mut()
                .insert("grpc-timeout", timeout::grpc_timeout_value(left));
        }
        let addr = pick.endpoint.addr;
        record.destination_workload = pick.endpoint.workload.clone();
        record.upstream = Some(addr);
        let default_connect = conn.shared.limits.connect_timeout;
        let dial = pool::Dial::to(
            &pick.endpoint,
            backend
                .as_ref()
                .map_or(default_connect, |b| b.connect_timeout(default_connect)),
            &conn.shared.tls,
        );
        // Inbound, `tls` already says whether the client came over mTLS;
        // outbound, it says whether the hop upstream is.
        if dial.is_tls() {
            record.set_tls(true);
        }
        let breaker = backend.as_ref().map(|b| &b.breaker);
        let send = send(&pick, req, &dial, h2, upgrade, breaker);
        let sent = match &attempt {
            None => Ok(send.await),
            Some(a) => tokio::time::timeout_at(a.at, send).await.map_err(|_| *a),
        };
        // Why this attempt failed, and whether it may be retried: the
        // request back when it was never written.
        let (reason, unsent, failure) = match sent {
            Ok(Ok((r, c))) => {
                observe_outlier(backend.as_deref(), addr, outlier_result(r.status()));
                match policy {
                    Some(p) if p.retries_status(r.status()) => {
                        pick.observe_failure();
                        (Reason::Status, None, Failure::Status(r, c))
                    }
                    Some(p) if grpc && p.retries_grpc(r.headers()) => {
                        (Reason::GrpcStatus, None, Failure::Status(r, c))
                    }
                    _ => break (Some(r), c, attempt),
                }
            }
            Ok(Err(SendError {
                error: ForwardError::Overflow(o),
                ..
            })) => {
                let name = backend.as_ref().map_or("", |b| &*b.name);
                return overloaded(name, o, record);
            }
            Ok(Err(SendError { error, unsent })) => {
                let reason = match &error {
                    ForwardError::Connect(_) => Reason::Connect,
                    ForwardError::Http(_) | ForwardError::Overflow(_) => Reason::Reset,
                };
                if !matches!(&error, ForwardError::Http(h) if h.is_user()) {
                    pick.observe_failure();
                }
                (reason, unsent, Failure::Error(error))
            }
            Err(a) => {
                pick.observe_failure();
                (Reason::Timeout, None, Failure::Timeout(a))
            }
        };
        let user_error = matches!(&failure, Failure::Error(ForwardError::Http(h)) if h.is_user());
        if !user_error && !matches!(failure, Failure::Status(..)) {
            observe_outlier(backend.as_deref(), addr, outlier::Outcome::GatewayError);
        }
        let wanted = match policy {
            Some(p) => retries < p.attempts,
            // Without a policy, only a request never written is retried,
            // once.
            None => reason == Reason::Connect && retries < 1,
        } && !user_error
            && !matches!(&failure, Failure::Timeout(a) if a.source != timeout::Source::Backend);
        let replayable = unsent.is_some() || replay.is_some();
        if wanted && !replayable {
            metrics::counter!(RETRIES_SKIPPED_TOTAL, REASON_LABEL => "unbuffered").increment(1);
        }
        let allowed = wanted && replayable;
        let backoff = policy.map_or(Duration::ZERO, |p| p.backoff(retries + 1));
        let in_time = deadlines
            .and_then(|d| d.attempt(tokio::time::Instant::now()))
            .is_none_or(|a| {
                a.source == timeout::Source::Backend || tokio::time::Instant::now() + backoff < a.at
            });
        let repick = allowed
            && in_time
            && backend.as_ref().is_some_and(|b| {
                let ok = b.budget.withdraw(tokio::time::Instant::now());
                if !ok {
                    metrics::counter!(RETRIES_SKIPPED_TOTAL, REASON_LABEL => "budget").increment(1);
                }
                ok
            });
        let other = repick
            .then(|| backend.as_ref().and_then(|b| b.pick(Some(addr))))
            .flatten();
        let Some(other) = other else {
            // No retry: this attempt's failure is the answer.
            match failure {
                Failure::Status(r, c) => break (Some(r), c, attempt),
                Failure::Error(e) => {
                    let status = match &e {
                        ForwardError::Connect(_) | ForwardError::Overflow(_) => {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                        // Our own request body failed: the client sent a
                        // broken body or went away. Not the upstream's
                        // fault.
                        ForwardError::Http(h) if h.is_user() => StatusCode::BAD_REQUEST,
                        ForwardError::Http(_) => StatusCode::BAD_GATEWAY,
                    };
                    if let ForwardError::Connect(_) = e {
                        record.flags = FLAG_UPSTREAM_FAILURE;
                    }
                    debug!(upstream = %addr, error = %e, "forwarding failed");
                    return local(status, &format!("upstream {addr}: {e}"), record);
                }
                Failure::Timeout(a) => {
                    debug!(upstream = %addr, "{}", a.message(&route));
                    return timed_out(a, &route, grpc, record);
                }
            }
        };
        drop(failure);
        metrics::counter!(RETRIES_TOTAL, REASON_LABEL => reason.label()).increment(1);
        debug!(upstream = %addr, reason = reason.label(), retry = retries + 1, "retrying");
        retries += 1;
        next = unsent;
        pick = other;
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
    };
    let Some(mut resp) = resp.take() else {
        return local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request could not be sent again",
            record,
        );
    };
    pick.observe_response();
    let addr = pick.endpoint.addr;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            // Tracked, so that a drain waits for the upgraded connection.
            conn.shared
                .tasks
                .spawn(crate::tcp::join_upgrades(down, up, addr));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    if let Some((rule, i)) = &rule {
        if let Some((_, filters)) = rule.backend(*i) {
            filters.on_response(resp.headers_mut());
        }
        rule.filters.on_response(resp.headers_mut());
    }
    record.status = resp.status().as_u16();
    record.grpc_status = grpc_status(resp.headers());
    let deadline = attempt.map(|a| (a.at, a.message(&route)));
    resp.map(|body| {
        let body = ResponseBody::upstream(body).on_end(OnEnd {
            record: Some(record),
            pick: Some(pick),
            conn: h1_conn,
            slot: request_slot,
        });
        match deadline {
            Some((at, message)) => body.deadline(at, grpc, message),
            None => body,
        }
    })
}

/// The answer when deadline `a` passed before a response came.
fn timed_out(
    a: timeout::AttemptDeadline,
    route: &str,
    grpc: bool,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    let message = a.message(route);
    record.flags = FLAG_UPSTREAM_TIMEOUT;
    if grpc {
        grpc_local(4, &message, record)
    } else {
        local(StatusCode::GATEWAY_TIMEOUT, &message, record)
    }
}

/// Injects the faults a request drew: holds it for the delay (cut short
/// by the request's `deadline`, which then answers as a timeout), then
/// answers the abort. The record back when the request goes on.
async fn inject(
    fault: Injected,
    deadline: Option<timeout::AttemptDeadline>,
    route: &str,
    grpc: bool,
    mut record: RequestRecord,
) -> Result<RequestRecord, Response<ResponseBody>> {
    if let Some(delay) = fault.delay {
        record.flags = FLAG_DELAY_INJECTED;
        let until = tokio::time::Instant::now() + delay;
        match deadline {
            Some(a) if a.at <= until => {
                tokio::time::sleep_until(a.at).await;
                return Err(timed_out(a, route, grpc, record));
            }
            _ => tokio::time::sleep_until(until).await,
        }
    }
    let Some((status, name)) = fault.abort else {
        return Ok(record);
    };
    record.flags = FLAG_FAULT_INJECTED;
    let message = format!("fault injected by HTTPFault {name}");
    Err(match status {
        AbortStatus::Grpc(code) => grpc_local(u16::try_from(code).unwrap_or(2), &message, record),
        AbortStatus::Http(code) => local(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &message,
            record,
        ),
    })
}

/// What a response's status says of its endpoint.
fn outlier_result(status: StatusCode) -> outlier::Outcome {
    match status.as_u16() {
        502..=504 => outlier::Outcome::GatewayError,
        500..=599 => outlier::Outcome::Error5xx,
        _ => outlier::Outcome::Success,
    }
}

/// Feeds an attempt's result to the backend's outlier detector, if it has
/// one, and counts an ejection.
fn observe_outlier(backend: Option<&BackendEntry>, addr: SocketAddr, result: outlier::Outcome) {
    let Some((b, d)) = backend.and_then(|b| Some((b, b.outlier.as_ref()?))) else {
        return;
    };
    let total = b.balancer.endpoints().len();
    if let Some(reason) = d.record(addr, result, total, tokio::time::Instant::now()) {
        debug!(backend = %b.name, endpoint = %addr, reason, "endpoint ejected");
        metrics::counter!(
            outlier::EJECTIONS_TOTAL,
            "backend" => b.name.to_string(),
            "reason" => reason
        )
        .increment(1);
    }
}

/// How an attempt failed.
enum Failure {
    /// A response whose status the policy retries.
    Status(
        Response<Incoming>,
        Option<hyper::client::conn::http1::SendRequest<RequestBody>>,
    ),
    /// No response.
    Error(ForwardError),
    /// The attempt's deadline passed.
    Timeout(timeout::AttemptDeadline),
}

/// A request kept to be sent again: its head, and its body read ahead.
struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Replay {
    fn body(&self) -> RequestBody {
        RequestBody::buffered(self.data.clone(), self.trailers.clone())
    }

    fn request(&self) -> Request<RequestBody> {
        let mut req = Request::new(self.body());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A request body read ahead for retries, or left streaming.
enum Buffered {
    Whole(Bytes, Option<HeaderMap>),
    Streaming(Incoming),
}

/// Reads `body` whole when it is empty or its length is known and at most
/// [`MAX_BUFFERED_BODY`], before `deadline`; leaves it streaming
/// otherwise. Its size is counted in `record` here, once, however many
/// attempts send it.
async fn buffer(
    body: Incoming,
    record: &RequestRecord,
    deadline: Option<tokio::time::Instant>,
) -> Result<Buffered, String> {
    use http_body::Body as _;
    if !body.is_end_stream()
        && body
            .size_hint()
            .exact()
            .is_none_or(|n| n > MAX_BUFFERED_BODY)
    {
        return Ok(Buffered::Streaming(body));
    }
    let read = http_body_util::BodyExt::collect(body);
    let collected = match deadline {
        Some(at) => tokio::time::timeout_at(at, read)
            .await
            .map_err(|_| "the client did not send it in time".to_owned())?,
        None => read.await,
    }
    .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    record
        .request_bytes
        .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(Buffered::Whole(data, trailers))
}

/// Sends one attempt on the endpoint's pool, within the backend's limits
/// on connections and on requests waiting for one.
pub(crate) async fn send(
    pick: &Pick,
    req: Request<RequestBody>,
    dial: &pool::Dial,
    h2: bool,
    upgrade: bool,
    breaker: Option<&Arc<Breaker>>,
) -> Result<
    (
        Response<Incoming>,
        Option<hyper::client::conn::http1::SendRequest<RequestBody>>,
    ),
    SendError,
> {
    if h2 {
        send_h2(pick, req, dial, breaker).await.map(|r| (r, None))
    } else if upgrade {
        let (open, _pending) = match may_connect(pick, breaker) {
            Ok(p) => p,
            Err(o) => return Err(SendError::unsent(ForwardError::Overflow(o), req)),
        };
        let mut c = match pool::connect_h1(open, dial, true).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::unsent(e.into(), req)),
        };
        c.send_request(req)
            .await
            .map(|r| (r, None))
            .map_err(|e| SendError::sent(e.into()))
    } else {
        send_h1(pick, req, dial, breaker)
            .await
            .map(|(r, c)| (r, Some(c)))
    }
}

/// A new connection to the picked endpoint, if the backend's limits allow
/// it: its place among the endpoint's open connections, and a place among
/// the requests waiting for one (held while connecting).
fn may_connect(
    pick: &Pick,
    breaker: Option<&Arc<Breaker>>,
) -> Result<(pool::OpenGuard, Option<Slot>), Overflow> {
    let max = breaker.map_or(usize::MAX, |b| b.max_connections() as usize);
    let open = match (pick.endpoint.pool.reserve(max), breaker) {
        (Some(open), _) => open,
        (None, Some(b)) => return Err(b.overflow(Limit::Connections)),
        // Without a backend the limit is usize::MAX connections.
        (None, None) => {
            return Err(Overflow {
                limit: Limit::Connections,
                max: u32::MAX,
            });
        }
    };
    let pending = breaker.map(|b| b.acquire(Limit::Pending)).transpose()?;
    Ok((open, pending))
}

/// The fast 503 of a request a circuit-breaker limit refused.
fn overloaded(backend: &str, o: Overflow, mut record: RequestRecord) -> Response<ResponseBody> {
    record.flags = FLAG_OVERFLOW;
    let mut resp = local(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("backend {backend}: {o}"),
        record,
    );
    resp.headers_mut()
        .insert(OVERLOADED_HEADER, HeaderValue::from_static(o.limit.name()));
    resp
}

/// Whether a request is a gRPC call (`application/grpc`, `+proto` and the
/// like).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// A gRPC error made by the proxy: a trailers-only response (HTTP 200 with
/// `grpc-status` in the headers), which every gRPC client reads, where a
/// 504 body would be a protocol error to it.
fn grpc_local(code: u16, message: &str, mut record: RequestRecord) -> Response<ResponseBody> {
    record.status = 200;
    record.grpc_status = Some(code);
    let mut resp = Response::new(ResponseBody::local("").on_end(OnEnd {
        record: Some(record),
        pick: None,
        conn: None,
        slot: None,
    }));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    // grpc-message is percent-encoded; ours are ASCII without '%'.
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    h.insert("x-trellis-error", HeaderValue::from_static("1"));
    resp
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Overflow(Overflow),
}

/// A failed attempt, with the request when it was never written (and so
/// may go to another endpoint whatever its body).
pub(crate) struct SendError {
    error: ForwardError,
    unsent: Option<Request<RequestBody>>,
}

impl SendError {
    fn sent(error: ForwardError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }

    fn unsent(error: ForwardError, req: Request<RequestBody>) -> Self {
        Self {
            error,
            unsent: Some(req),
        }
    }
}

/// How often a request is re-sent on another connection when a pooled one
/// turns out to be closed before the request was written.
const STALE_RETRIES: usize = 3;

async fn send_h1(
    pick: &Pick,
    mut req: Request<RequestBody>,
    dial: &pool::Dial,
    breaker: Option<&Arc<Breaker>>,
) -> Result<
    (
        Response<Incoming>,
        hyper::client::conn::http1::SendRequest<RequestBody>,
    ),
    SendError,
> {
    let pool = &pick.endpoint.pool;
    for _ in 0..STALE_RETRIES {
        let Some(mut c) = pool.checkout() else { break };
        if c.ready().await.is_err() {
            continue;
        }
        match c.try_send_request(req).await {
            Ok(resp) => return Ok((resp, c)),
            Err(mut e) => match e.take_message() {
                // Never written: safe to send again on a fresh connection.
                Some(r) => req = r,
                None => return Err(SendError::sent(e.into_error().into())),
            },
        }
    }
    let (open, pending) = match may_connect(pick, breaker) {
        Ok(p) => p,
        Err(o) => return Err(SendError::unsent(ForwardError::Overflow(o), req)),
    };
    let mut c = match pool::connect_h1(open, dial, false).await {
        Ok(c) => c,
        Err(e) => return Err(SendError::unsent(e.into(), req)),
    };
    drop(pending);
    match c.try_send_request(req).await {
        Ok(resp) => Ok((resp, c)),
        Err(mut e) => Err(match e.take_message() {
            Some(r) => SendError::unsent(e.into_error().into(), r),
            None => SendError::sent(e.into_error().into()),
        }),
    }
}

async fn send_h2(
    pick: &Pick,
    req: Request<RequestBody>,
    dial: &pool::Dial,
    breaker: Option<&Arc<Breaker>>,
) -> Result<Response<Incoming>, SendError> {
    let pool = &pick.endpoint.pool;
    let mut c = match pool.h2() {
        Some(c) => c,
        None => {
            let (open, _pending) = match may_connect(pick, breaker) {
                Ok(p) => p,
                Err(o) => return Err(SendError::unsent(ForwardError::Overflow(o), req)),
            };
            match pool::connect_h2(open, dial).await {
                Ok(c) => {
                    pool.set_h2(c.clone());
                    c
                }
                Err(e) => return Err(SendError::unsent(e.into(), req)),
            }
        }
    };
    if let Err(e) = c.ready().await {
        return Err(SendError::unsent(e.into(), req));
    }
    match c.try_send_request(req).await {
        Ok(resp) => Ok(resp),
        Err(mut e) => Err(match e.take_message() {
            Some(r) => SendError::unsent(e.into_error().into(), r),
            None => SendError::sent(e.into_error().into()),
        }),
    }
}

/// The request's target authority: the URI's (absolute form, HTTP/2) or
/// the `Host` header.
pub fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Rewrites the request for the upstream hop: drops hop-by-hop headers and
/// puts the URI in the form the upstream protocol needs.
pub(crate) fn prepare_request<B>(
    req: &mut Request<B>,
    h2: bool,
    upgrade: bool,
) -> Result<(), String> {
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let origin_form = req.uri().scheme().is_none() && req.uri().authority().is_none();
    if h2 {
        if origin_form {
            let authority = authority(req)
                .ok_or("request has no Host header or authority")?
                .to_owned();
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()
                .map_err(|e| format!("bad request target: {e}"))?;
        }
        req.headers_mut().remove(header::HOST);
        *req.version_mut() = Version::HTTP_2;
    } else {
        if !origin_form {
            // Absolute form (explicit proxy requests, HTTP/2 clients): the
            // authority moves to Host and the URI keeps only the path.
            if let Some(a) = req.uri().authority()
                && !req.headers().contains_key(header::HOST)
            {
                let v = HeaderValue::from_str(a.as_str()).map_err(|_| "bad authority")?;
                req.headers_mut().insert(header::HOST, v);
            }
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = Uri::try_from(path).map_err(|e| format!("bad request target: {e}"))?;
        }
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(())
}

/// Removes headers that describe one connection rather than the message
/// (RFC 9110 section 7.6.1), keeping `Upgrade` on upgrade requests and
/// `TE: trailers`, which gRPC needs end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names with
    // pre-parsed constants is much cheaper than a lookup per name.
    if !keep_upgrade && !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP[3..] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Headers that only ever describe one hop. The first three need care
/// (`Connection` lists more, `Upgrade` survives upgrades, `TE: trailers`
/// survives for gRPC); the rest are always removed.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
];

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The `grpc-status` of trailers, or of a trailers-only response's headers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response made by the proxy itself, recorded like any other.
pub fn local(
    status: StatusCode,
    message: &str,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    record.status = status.as_u16();
    let mut resp = Response::new(ResponseBody::local(format!("{message}\n")).on_end(OnEnd {
        record: Some(record),
        pick: None,
        conn: None,
        slot: None,
    }));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("x-trellis-error", HeaderValue::from_static("1"));
    resp
}

/// Socket address of a `host:port` authority, for passthrough targets.
pub fn parse_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    let a: http::uri::Authority = authority.parse().ok()?;
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    Some((
        host.to_ascii_lowercase(),
        a.port_u16().unwrap_or(default_port),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_host() {
        let mut req = Request::get("http://reviews:9080/reviews/0?x=1")
            .body(())
            .unwrap();
        prepare_request(&mut req, false, false).unwrap();
        assert_eq!(req.uri(), "/reviews/0?x=1");
        assert_eq!(req.headers()[header::HOST], "reviews:9080");
    }

    #[test]
    fn h2_upstream_gets_scheme_and_authority() {
        let mut req = Request::get("/x")
            .header("host", "svc:80")
            .body(())
            .unwrap();
        prepare_request(&mut req, true, false).unwrap();
        assert_eq!(req.uri(), "http://svc:80/x");
        assert!(req.headers().get(header::HOST).is_none());
    }

    #[test]
    fn authorities_parse_with_default_port() {
        assert_eq!(
            parse_authority("Reviews:9080", 80),
            Some(("reviews".into(), 9080))
        );
        assert_eq!(parse_authority("ratings", 80), Some(("ratings".into(), 80)));
        assert_eq!(
            parse_authority("[::1]:8080", 80),
            Some(("::1".into(), 8080))
        );
    }
}
