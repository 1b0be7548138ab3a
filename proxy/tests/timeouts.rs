//! Route timeouts (GEP-1742) and gRPC deadlines through real sockets: a
//! slow echo backend, a request timeout and a backend timeout that fire
//! at their configured time with a 504 naming them, the same request
//! without a timeout waiting for the backend, and gRPC calls that end
//! with `grpc-status: 4` (from the route's timeout or the client's
//! `grpc-timeout`, which the upstream also learns).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxy::Proxy;
use proxy::testutil::{echo_server, h1_client, h2_client, proxy, sample, scrape};

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }
services:
  - name: svc
    ports: [{ port: 80 }]
    routes:
      - name: request-timeout
        rules:
          - matches: [{ path: { value: /request } }]
            timeouts: { requestMs: 300 }
            backendRefs: [{ name: echo }]
      - name: backend-timeout
        rules:
          - matches: [{ path: { value: /backend } }]
            timeouts: { requestMs: 10000, backendRequestMs: 300 }
            backendRefs: [{ name: echo }]
      - name: grpc-timeout
        rules:
          - matches: [{ path: { value: /slow.Svc } }]
            timeouts: { requestMs: 300 }
            backendRefs: [{ name: echo }]
      - name: no-timeout
        rules:
          - backendRefs: [{ name: echo }]
backends:
  - { name: echo, endpoints: [{ address: "{ECHO}" }] }
"#;

async fn start() -> std::sync::Arc<Proxy> {
    proxy(CONFIG, &[("ECHO", echo_server("echo").await.to_string())]).await
}

/// GETs `path` from a backend that answers after `delay_ms`.
async fn slow_get(p: &Proxy, path: &str, delay_ms: u64) -> (StatusCode, String, Duration) {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let req = Request::get(path)
        .header("host", "svc")
        .header("x-echo-delay-ms", delay_ms.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let began = Instant::now();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        began.elapsed(),
    )
}

/// The timeout fired at its time: not before, and long before the
/// backend's 10 s (a generous bound for a loaded machine, not a speed
/// check).
fn fired_at(elapsed: Duration, timeout: Duration) {
    assert!(
        elapsed >= timeout,
        "answered after {elapsed:?}, before {timeout:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "answered only after {elapsed:?}"
    );
}

#[tokio::test]
async fn a_request_timeout_answers_504_naming_the_route() {
    let p = start().await;
    let (status, body, elapsed) = slow_get(&p, "/request", 10_000).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body.contains("the request timeout of route request-timeout (300ms) passed"),
        "{body}"
    );
    fired_at(elapsed, Duration::from_millis(300));
    let metrics = scrape(&p).await;
    let labels = [
        ("route", "request-timeout"),
        ("response_code", "504"),
        ("response_flags", "UT"),
    ];
    assert_eq!(sample(&metrics, "trellis_requests_total", &labels), 1.0);
}

#[tokio::test]
async fn a_backend_timeout_cuts_one_attempt() {
    let p = start().await;
    let (status, body, elapsed) = slow_get(&p, "/backend", 10_000).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body.contains("the backend request timeout of route backend-timeout (300ms) passed"),
        "{body}"
    );
    fired_at(elapsed, Duration::from_millis(300));
}

#[tokio::test]
async fn without_a_timeout_a_slow_backend_is_waited_for() {
    let p = start().await;
    let (status, body, elapsed) = slow_get(&p, "/other", 600).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(elapsed >= Duration::from_millis(600));
    // Within its timeout, a routed request is not cut.
    let (status, _, _) = slow_get(&p, "/backend", 50).await;
    assert_eq!(status, StatusCode::OK);
}

/// A gRPC call over h2c; returns the response's status and headers and
/// the headers the echo backend saw (when it answered).
async fn grpc_call(
    p: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, serde_json::Value, Duration) {
    let mut c = h2_client(p.listener_addr("out").unwrap()).await;
    let mut req = Request::post(format!("http://svc{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let began = Instant::now();
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&body).unwrap_or_default(),
        began.elapsed(),
    )
}

#[tokio::test]
async fn a_grpc_call_past_the_route_timeout_gets_deadline_exceeded() {
    let p = start().await;
    let (status, headers, _, elapsed) =
        grpc_call(&p, "/slow.Svc/Call", &[("x-echo-delay-ms", "10000")]).await;
    // Trailers-only: HTTP 200 with the gRPC status in the headers.
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "4");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(
        headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("route grpc-timeout (300ms)"),
        "{headers:?}"
    );
    fired_at(elapsed, Duration::from_millis(300));
}

#[tokio::test]
async fn a_clients_grpc_timeout_is_honoured_and_passed_on() {
    let p = start().await;
    let (status, headers, _, elapsed) = grpc_call(
        &p,
        "/any.Svc/Call",
        &[("x-echo-delay-ms", "10000"), ("grpc-timeout", "250m")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "4");
    assert!(
        headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("the client's grpc-timeout (250ms) passed")
    );
    fired_at(elapsed, Duration::from_millis(250));

    // A call that makes it: the upstream is told what is left, never more
    // than the client gave.
    let (_, _, echo, _) = grpc_call(&p, "/any.Svc/Call", &[("grpc-timeout", "5S")]).await;
    let left = echo["headers"]["grpc-timeout"].as_str().unwrap();
    let left = proxy::resilience::timeout::parse_grpc_timeout(&left.parse().unwrap()).unwrap();
    assert!(
        left <= Duration::from_secs(5) && left > Duration::from_secs(3),
        "upstream saw grpc-timeout {left:?}"
    );
}
