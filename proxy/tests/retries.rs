//! Retries (GEP-1731) and the retry budget through real sockets, against
//! backends that fail on purpose and count what reaches them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy::Proxy;
use proxy::testutil::{h1_client, proxy, sample, scrape};
use rand::Rng;
use tokio::net::TcpListener;

/// A backend that answers 503 to `fail_percent` % of requests (at random)
/// and 200 to the rest, with a JSON body saying which attempt it saw and
/// how many body bytes arrived. Counts every request.
struct Flaky {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

async fn flaky(name: &'static str, fail_percent: u32) -> Flaky {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let attempt = req
                            .headers()
                            .get("x-trellis-attempt")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let fail = rand::rng().random_range(0..100) < fail_percent;
                        let json = serde_json::json!({
                            "server": name,
                            "attempt": attempt,
                            "body_bytes": body.len(),
                        });
                        let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
                        if fail {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Flaky { addr, hits }
}

/// Service `svc` with a retrying route and a route without retries, over
/// the endpoints `{EPS}`, and the backend's budget `{BUDGET}`.
const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }
services:
  - name: svc
    ports: [{ port: 80 }]
    routes:
      - name: retried
        rules:
          - matches: [{ path: { value: /retried } }]
            retry: { attempts: {ATTEMPTS}, backoffMs: 1 }
            backendRefs: [{ name: b }]
      - name: plain
        rules:
          - backendRefs: [{ name: b }]
backends:
  - { name: b, loadBalancer: { algorithm: {ALGORITHM} }, endpoints: [{EPS}], retryBudget: {BUDGET} }
"#;

async fn start(eps: &[SocketAddr], attempts: u32, budget: &str, algorithm: &str) -> Arc<Proxy> {
    let eps: Vec<String> = eps
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    proxy(
        CONFIG,
        &[
            ("EPS", eps.join(", ")),
            ("ATTEMPTS", attempts.to_string()),
            ("BUDGET", budget.to_owned()),
            ("ALGORITHM", algorithm.to_owned()),
        ],
    )
    .await
}

/// Sends `n` requests on one connection; returns the bodies of the ones
/// that got 200 and how many did not.
async fn run(
    p: &Proxy,
    path: &str,
    n: usize,
    body: &'static [u8],
) -> (Vec<serde_json::Value>, usize) {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (mut ok, mut failed) = (Vec::new(), 0);
    for _ in 0..n {
        c.ready().await.unwrap();
        let req = Request::post(path)
            .header("host", "svc")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        if status == StatusCode::OK {
            ok.push(serde_json::from_slice(&bytes).unwrap());
        } else {
            failed += 1;
        }
    }
    (ok, failed)
}

#[tokio::test]
async fn retries_turn_a_half_failing_backend_into_success() {
    let b = flaky("b", 50).await;
    let p = start(&[b.addr], 8, "{ percent: 200 }", "peakEwma").await;
    let (ok, failed) = run(&p, "/retried", 1000, b"payload").await;
    eprintln!("50 % failing backend, 8 retries: {failed} of 1000 failed");
    // P(9 failures in a row) = 0.2 %: about 2 of 1000.
    assert!(failed < 10, "{failed} of 1000 failed with retries");
    assert!(
        ok.iter().all(|r| r["body_bytes"] == 7),
        "every attempt got the whole body"
    );
    assert!(
        ok.iter().any(|r| r["attempt"] != "1"),
        "some succeeded on a retry"
    );
    // The same backend without retries fails half the time.
    let (_, failed) = run(&p, "/plain", 200, b"").await;
    eprintln!("the same backend without retries: {failed} of 200 failed");
    assert!(failed > 60, "only {failed} of 200 failed without retries");
    let metrics = scrape(&p).await;
    assert!(sample(&metrics, "trellis_retries_total", &[("reason", "status")]) > 400.0);
}

#[tokio::test]
async fn under_a_full_outage_retries_stay_within_the_budget() {
    let b = flaky("down", 100).await;
    let p = start(&[b.addr], 3, "{ percent: 20, minPerSecond: 0 }", "peakEwma").await;
    let (_, failed) = run(&p, "/retried", 500, b"").await;
    assert_eq!(failed, 500);
    let hits = b.hits.load(Ordering::Relaxed);
    eprintln!("full outage, 3 retries, budget 20 %: {hits} attempts for 500 requests");
    // 500 requests, at most 20 % more as retries; 3 retries each would
    // have been 2000.
    assert!(hits <= 600, "{hits} attempts for 500 requests");
    assert!(hits >= 590, "the budget was not used: {hits} attempts");
    let metrics = scrape(&p).await;
    assert!(
        sample(
            &metrics,
            "trellis_retries_skipped_total",
            &[("reason", "budget")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_post_with_an_unbuffered_body_is_never_retried() {
    let b = flaky("down", 100).await;
    let p = start(&[b.addr], 3, "{ percent: 1000 }", "peakEwma").await;
    // A chunked body of unknown length cannot be replayed.
    let stream = tokio::net::TcpStream::connect(p.listener_addr("out").unwrap())
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunks = futures_util::stream::iter(
        [b"one ".as_slice(), b"two"]
            .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::from_static(c)))),
    );
    let req = Request::post("/retried")
        .header("host", "svc")
        .body(StreamBody::new(chunks))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        b.hits.load(Ordering::Relaxed),
        1,
        "an unbuffered POST was retried"
    );
    // A small body of known length is buffered and retried.
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let req = Request::post("/retried")
        .header("host", "svc")
        .body(Full::new(Bytes::from_static(b"buffered")))
        .unwrap();
    assert_eq!(c.send_request(req).await.unwrap().status(), 503);
    assert_eq!(b.hits.load(Ordering::Relaxed), 1 + 4);
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_and_tells_it_the_attempt() {
    let bad = flaky("bad", 100).await;
    let good = flaky("good", 0).await;
    let p = start(&[bad.addr, good.addr], 1, "{ percent: 100 }", "roundRobin").await;
    let (ok, failed) = run(&p, "/retried", 40, b"").await;
    assert_eq!(failed, 0, "one retry on the other endpoint always succeeds");
    assert!(ok.iter().all(|r| r["server"] == "good"));
    let attempts: Vec<&str> = ok.iter().map(|r| r["attempt"].as_str().unwrap()).collect();
    assert!(
        attempts.contains(&"1") && attempts.contains(&"2"),
        "{attempts:?}"
    );
    assert!(bad.hits.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn a_connection_refused_before_the_request_is_tried_on_another_endpoint() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let good = flaky("good", 0).await;
    let p = start(&[closed, good.addr], 0, "{ percent: 20 }", "roundRobin").await;
    // The route without a retry policy: connection failures alone.
    let (ok, failed) = run(&p, "/plain", 20, b"").await;
    assert_eq!(failed, 0);
    assert_eq!(ok.len(), 20);
    let metrics = scrape(&p).await;
    assert!(sample(&metrics, "trellis_retries_total", &[("reason", "connect")]) >= 1.0);
}

/// A gRPC backend (h2c) that ends `fail_percent` % of calls at once with
/// a trailers-only `grpc-status: {code}`, and answers the rest with a
/// message and `grpc-status: 0` in trailers. Counts every call.
async fn flaky_grpc(fail_percent: u32, code: &'static str) -> Flaky {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            // gRPC's frames are small writes: without this, Nagle holds
            // each answer for the proxy's delayed ACK.
            s.set_nodelay(true).unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let fail = rand::rng().random_range(0..100) < fail_percent;
                    async move {
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> = if fail {
                            Vec::new()
                        } else {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            vec![
                                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                                Ok(Frame::trailers(trailers)),
                            ]
                        };
                        let mut resp =
                            Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        if fail {
                            resp.headers_mut()
                                .insert("grpc-status", code.parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Flaky { addr, hits }
}

const GRPC_CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }
services:
  - name: svc
    ports: [{ port: 80, protocol: grpc }]
    routes:
      - name: grpc-retried
        rules:
          - matches: [{ path: { value: /retried.Svc } }]
            retry: { attempts: 8, grpcCodes: [14], backoffMs: 1 }
            backendRefs: [{ name: b }]
      - name: grpc-plain
        rules:
          - backendRefs: [{ name: b }]
backends:
  - { name: b, protocol: grpc, endpoints: [{ address: "{EP}" }], retryBudget: { percent: 200 } }
"#;

/// `n` unary calls to `path`: how many ended with each `grpc-status`
/// (from the headers of a trailers-only answer, else the trailers).
async fn grpc_calls(p: &Proxy, path: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut c = proxy::testutil::h2_client(p.listener_addr("out").unwrap()).await;
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..n {
        let req = Request::post(format!("http://svc{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        let early = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.unwrap();
        let status = early
            .or_else(|| collected.trailers()?.get("grpc-status").cloned())
            .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
        *statuses.entry(status).or_default() += 1;
    }
    statuses
}

#[tokio::test]
async fn grpc_calls_are_retried_on_the_policys_grpc_statuses_only() {
    let b = flaky_grpc(50, "14").await;
    let p = proxy(GRPC_CONFIG, &[("EP", b.addr.to_string())]).await;
    let n = 400;
    let retried = grpc_calls(&p, "/retried.Svc/Get", n).await;
    let ok = retried.get("0").copied().unwrap_or(0);
    assert!(ok * 100 > n * 99, "{retried:?}");
    let metrics = scrape(&p).await;
    assert!(
        sample(
            &metrics,
            "trellis_retries_total",
            &[("reason", "grpc_status")]
        ) > 0.0,
        "{metrics}"
    );
    // Without the policy half of the calls fail.
    let plain = grpc_calls(&p, "/plain.Svc/Get", n).await;
    let failed = plain.get("14").copied().unwrap_or(0);
    assert!(failed > n / 4, "{plain:?}");

    // A status the policy does not name is not retried.
    let other = flaky_grpc(50, "13").await;
    let p = proxy(GRPC_CONFIG, &[("EP", other.addr.to_string())]).await;
    let before = other.hits.load(Ordering::Relaxed);
    let statuses = grpc_calls(&p, "/retried.Svc/Get", 200).await;
    let hits = other.hits.load(Ordering::Relaxed) - before;
    assert_eq!(hits, 200, "calls ending 13 were retried: {statuses:?}");
    assert!(
        statuses.get("13").copied().unwrap_or(0) > 50,
        "{statuses:?}"
    );
}
