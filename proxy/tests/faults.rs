//! HTTPFault injection through real sockets: aborts and delays hit the
//! configured share of thousands of requests (counted by the proxy's own
//! `response_flags`, so that the test does not depend on timing), an
//! abort answers with its HTTP status or as gRPC, a delay holds the
//! request and counts against the route's request timeout, and faults on
//! a backendRef apply to that backend only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxy::Proxy;
use proxy::testutil::{echo_server, get, h1_client, h2_client, proxy, sample, scrape};

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }
services:
  - name: svc
    ports: [{ port: 80 }]
    routes:
      - name: faults
        rules:
          - matches: [{ path: { value: /abort-quarter } }]
            filters:
              - fault:
                  name: shop/quarter
                  abort: { status: { http: 503 }, perMillion: 250000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /delay-share } }]
            filters:
              - fault:
                  name: shop/short-delay
                  delay: { delayMs: 1, perMillion: 300000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /slow } }]
            filters:
              - fault:
                  name: shop/slow
                  delay: { delayMs: 400, perMillion: 1000000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /slow-then-abort } }]
            filters:
              - fault:
                  name: shop/both
                  delay: { delayMs: 300, perMillion: 1000000 }
                  abort: { status: { http: 418 }, perMillion: 1000000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /timed } }]
            timeouts: { requestMs: 300 }
            filters:
              - fault:
                  name: shop/very-slow
                  delay: { delayMs: 10000, perMillion: 1000000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /grpc.Svc } }]
            filters:
              - fault:
                  name: shop/unavailable
                  abort: { status: { grpc: 14 }, perMillion: 1000000 }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /split } }]
            backendRefs:
              - name: echo
                weight: 1
                filters:
                  - fault:
                      name: shop/on-echo
                      abort: { status: { http: 500 }, perMillion: 1000000 }
              - { name: other, weight: 1 }
      - name: plain
        rules:
          - backendRefs: [{ name: echo }]
backends:
  - { name: echo, endpoints: [{ address: "{ECHO}" }] }
  - { name: other, endpoints: [{ address: "{OTHER}" }] }
"#;

async fn start() -> std::sync::Arc<Proxy> {
    proxy(
        CONFIG,
        &[
            ("ECHO", echo_server("echo").await.to_string()),
            ("OTHER", echo_server("other").await.to_string()),
        ],
    )
    .await
}

/// `n` GETs of `path` on one connection: how many got each status.
async fn statuses(p: &Proxy, path: &str, n: usize) -> std::collections::BTreeMap<u16, usize> {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (status, _, _) = get(&mut c, path, "svc").await;
        *counts.entry(status.as_u16()).or_default() += 1;
    }
    counts
}

/// Asserts that `hits` of `n` trials is what a share `p` gives, within
/// five standard deviations (a false failure about once in 3.5 million
/// runs).
fn binomial(what: &str, hits: f64, n: f64, p: f64) {
    let mean = n * p;
    let bound = 5.0 * (n * p * (1.0 - p)).sqrt();
    assert!(
        (hits - mean).abs() <= bound,
        "{what}: {hits} of {n}, expected {mean} ± {bound}"
    );
}

#[tokio::test]
async fn an_abort_answers_its_share_of_requests_with_its_status() {
    let p = start().await;
    let n = 2000;
    let counts = statuses(&p, "/abort-quarter", n).await;
    let aborted = counts.get(&503).copied().unwrap_or(0);
    let passed = counts.get(&200).copied().unwrap_or(0);
    assert_eq!(aborted + passed, n, "{counts:?}");
    binomial("aborted", aborted as f64, n as f64, 0.25);
    let metrics = scrape(&p).await;
    let injected = [("response_code", "503"), ("response_flags", "FI")];
    assert_eq!(
        sample(&metrics, "trellis_requests_total", &injected),
        aborted as f64,
        "{metrics}"
    );

    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let body = loop {
        let (status, headers, body) = get(&mut c, "/abort-quarter", "svc").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(headers.contains_key("x-trellis-error"));
            break body;
        }
    };
    assert!(
        body.contains("fault injected by HTTPFault shop/quarter"),
        "{body}"
    );
}

#[tokio::test]
async fn a_delay_holds_its_share_of_requests() {
    let p = start().await;
    let n = 2000;
    let counts = statuses(&p, "/delay-share", n).await;
    assert_eq!(counts.get(&200).copied(), Some(n), "{counts:?}");
    let metrics = scrape(&p).await;
    let delayed = sample(
        &metrics,
        "trellis_requests_total",
        &[("route", "faults"), ("response_flags", "DI")],
    );
    binomial("delayed", delayed, n as f64, 0.3);

    // A delayed request takes at least the delay, and then reaches the
    // backend.
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let began = Instant::now();
    let (status, _, body) = get(&mut c, "/slow", "svc").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"server\":\"echo\""), "{body}");
    assert!(began.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn a_delay_then_an_abort_both_apply() {
    let p = start().await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let began = Instant::now();
    let (status, _, body) = get(&mut c, "/slow-then-abort", "svc").await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT, "{body}");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert!(body.contains("HTTPFault shop/both"), "{body}");
}

#[tokio::test]
async fn a_delay_longer_than_the_request_timeout_answers_504_at_the_timeout() {
    let p = start().await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let began = Instant::now();
    let (status, _, body) = get(&mut c, "/timed", "svc").await;
    let elapsed = began.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body.contains("the request timeout of route faults (300ms) passed"),
        "{body}"
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    // Cut at the timeout, not at the end of the 10 s delay (a generous
    // bound for a loaded machine, not a speed check).
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let metrics = scrape(&p).await;
    let labels = [("response_code", "504"), ("response_flags", "UT")];
    assert_eq!(sample(&metrics, "trellis_requests_total", &labels), 1.0);
}

#[tokio::test]
async fn a_grpc_abort_is_a_trailers_only_grpc_status() {
    let p = start().await;
    let mut c = h2_client(p.listener_addr("out").unwrap()).await;
    let req = Request::post("http://svc/grpc.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers().clone();
    assert_eq!(headers["grpc-status"], "14");
    assert_eq!(headers["content-type"], "application/grpc");
    assert!(
        headers["grpc-message"]
            .to_str()
            .unwrap()
            .contains("HTTPFault shop/unavailable")
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
}

#[tokio::test]
async fn a_fault_on_a_backend_ref_hits_only_that_backend() {
    let p = start().await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (mut aborted, mut other) = (0, 0);
    for _ in 0..200 {
        let (status, _, body) = get(&mut c, "/split", "svc").await;
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => {
                assert!(body.contains("HTTPFault shop/on-echo"), "{body}");
                aborted += 1;
            }
            StatusCode::OK => {
                assert!(body.contains("\"server\":\"other\""), "{body}");
                other += 1;
            }
            s => panic!("{s}: {body}"),
        }
    }
    binomial("aborted on echo", f64::from(aborted), 200.0, 0.5);
    assert_eq!(aborted + other, 200);
    // Requests of other rules are not touched.
    let counts = statuses(&p, "/elsewhere", 100).await;
    assert_eq!(counts.get(&200).copied(), Some(100), "{counts:?}");
}
