//! Request mirrors through real sockets: the mirror gets a copy of each
//! mirrored request (method, path, headers and body), a share mirrors its
//! share, a body too long to copy goes to the primary only, and a mirror
//! that never answers neither holds the primary nor takes more than the
//! bounded number of copies in flight.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy::Proxy;
use proxy::resilience::mirror;
use proxy::testutil::{echo_server, get, h1_client, h2_client, proxy, sample, scrape};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }
services:
  - name: svc
    ports: [{ port: 80 }]
    routes:
      - name: copied
        rules:
          - matches: [{ path: { value: /all } }]
            filters: [{ requestMirror: { backend: copies } }]
            backendRefs: [{ name: echo }]
      - name: mirrored
        rules:
          - matches: [{ path: { value: /quarter } }]
            filters: [{ requestMirror: { backend: sampled, perMillion: 250000 } }]
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /big } }]
            filters: [{ requestMirror: { backend: big } }]
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /silent } }]
            filters: [{ requestMirror: { backend: silent } }]
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /split } }]
            backendRefs:
              - name: echo
                weight: 1
                filters: [{ requestMirror: { backend: on-echo } }]
              - { name: other, weight: 1 }
backends:
  - { name: echo, endpoints: [{ address: "{ECHO}" }] }
  - { name: other, endpoints: [{ address: "{OTHER}" }] }
  - { name: copies, endpoints: [{ address: "{COPIES}" }] }
  - { name: sampled, endpoints: [{ address: "{SAMPLED}" }] }
  - { name: big, endpoints: [{ address: "{BIG}" }] }
  - { name: silent, endpoints: [{ address: "{SILENT}" }] }
  - { name: on-echo, endpoints: [{ address: "{ON_ECHO}" }] }
"#;

/// What a mirror received: method, path, body and `x-test` header.
type Received = (String, String, String, Option<String>);

/// An HTTP/1 and h2c server that sends each request it gets to the
/// channel and answers 200.
async fn recorder() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes());
                        let header = parts
                            .headers
                            .get("x-test")
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                        let _ = tx.send((
                            parts.method.to_string(),
                            parts.uri.path().to_owned(),
                            String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
                            header,
                        ));
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "mirror's answer",
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// A server that accepts connections, reads what comes and never
/// answers; it counts the connections open and the most ever open.
async fn silent() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, m) = (open.clone(), most.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open, most)
}

struct Mesh {
    proxy: Arc<Proxy>,
    copies: mpsc::UnboundedReceiver<Received>,
    sampled: mpsc::UnboundedReceiver<Received>,
    big: mpsc::UnboundedReceiver<Received>,
    on_echo: mpsc::UnboundedReceiver<Received>,
    silent_open: Arc<AtomicUsize>,
    silent_most: Arc<AtomicUsize>,
}

async fn start() -> Mesh {
    let (copies_addr, copies) = recorder().await;
    let (sampled_addr, sampled) = recorder().await;
    let (big_addr, big) = recorder().await;
    let (on_echo_addr, on_echo) = recorder().await;
    let (silent_addr, silent_open, silent_most) = silent().await;
    let proxy = proxy(
        CONFIG,
        &[
            ("ECHO", echo_server("echo").await.to_string()),
            ("OTHER", echo_server("other").await.to_string()),
            ("COPIES", copies_addr.to_string()),
            ("SAMPLED", sampled_addr.to_string()),
            ("BIG", big_addr.to_string()),
            ("SILENT", silent_addr.to_string()),
            ("ON_ECHO", on_echo_addr.to_string()),
        ],
    )
    .await;
    Mesh {
        proxy,
        copies,
        sampled,
        big,
        on_echo,
        silent_open,
        silent_most,
    }
}

/// The `trellis_mirrors_total` of `backend` with `result`.
async fn mirrored(p: &Proxy, backend: &str, result: &str) -> f64 {
    let metrics = scrape(p).await;
    sample(
        &metrics,
        mirror::MIRRORS_TOTAL,
        &[("backend", backend), ("result", result)],
    )
}

/// Waits until `backend`'s copies counted with `result` reach `n`.
async fn wait_mirrored(p: &Proxy, backend: &str, result: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = mirrored(p, backend, result).await;
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{backend}: {got} copies {result}, expected {n}:\n{}",
            scrape(p).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    body: Bytes,
) -> (StatusCode, serde_json::Value) {
    let req = Request::post(path)
        .header("host", "svc")
        .header("x-test", "kept")
        .body(Full::new(body))
        .unwrap();
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn every_mirrored_request_reaches_the_mirror_with_its_body() {
    let mut m = start().await;
    let addr = m.proxy.listener_addr("out").unwrap();
    let mut c = h1_client(addr).await;
    let n = 50;
    for i in 0..n {
        let (status, echoed) = post(&mut c, "/all", Bytes::from(format!("payload-{i}"))).await;
        assert_eq!(status, StatusCode::OK);
        // The client gets the primary's answer, never the mirror's.
        assert_eq!(echoed["server"], "echo");
        assert_eq!(echoed["body"], format!("payload-{i}"));
    }
    // And over HTTP/2, where the copy keeps the client's version.
    let mut h2 = h2_client(addr).await;
    let req = Request::put("http://svc/all")
        .body(Full::new(Bytes::from("over h2")))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut received = Vec::new();
    for _ in 0..=n {
        let r = tokio::time::timeout(Duration::from_secs(10), m.copies.recv())
            .await
            .expect("a copy never reached the mirror")
            .unwrap();
        received.push(r);
    }
    received.sort();
    let mut expected: Vec<Received> = (0..n)
        .map(|i| {
            (
                "POST".to_owned(),
                "/all".to_owned(),
                format!("payload-{i}"),
                Some("kept".to_owned()),
            )
        })
        .collect();
    expected.push(("PUT".into(), "/all".into(), "over h2".into(), None));
    expected.sort();
    assert_eq!(received, expected);
    wait_mirrored(&m.proxy, "copies", "answered", f64::from(n + 1)).await;
    // A mirrored request is counted once, as the client's (each test's
    // proxy shares the process's metrics: this route is this test's).
    let metrics = scrape(&m.proxy).await;
    assert_eq!(
        sample(&metrics, "trellis_requests_total", &[("route", "copied")]),
        f64::from(n + 1),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_mirror_copies_its_share_of_the_requests() {
    let mut m = start().await;
    let mut c = h1_client(m.proxy.listener_addr("out").unwrap()).await;
    let n = 2000;
    for _ in 0..n {
        let (status, _, _) = get(&mut c, "/quarter", "svc").await;
        assert_eq!(status, StatusCode::OK);
    }
    // The copies trail their primaries by a moment: wait until the count
    // stops moving.
    let mut copies = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut more = 0;
        while m.sampled.try_recv().is_ok() {
            more += 1;
        }
        if more == 0 {
            break;
        }
        copies += more;
    }
    let (p, n) = (0.25, f64::from(n));
    let bound = 5.0 * (n * p * (1.0 - p)).sqrt();
    assert!(
        (f64::from(copies) - n * p).abs() <= bound,
        "{copies} of {n} mirrored, expected {} ± {bound}",
        n * p
    );
    assert_eq!(
        mirrored(&m.proxy, "sampled", "answered").await,
        f64::from(copies)
    );
}

#[tokio::test]
async fn a_mirror_on_a_backend_ref_copies_that_backends_requests_only() {
    let mut m = start().await;
    let mut c = h1_client(m.proxy.listener_addr("out").unwrap()).await;
    let mut to_echo = 0;
    for _ in 0..200 {
        let (status, headers, _) = get(&mut c, "/split", "svc").await;
        assert_eq!(status, StatusCode::OK);
        if headers["x-served-by"] == "echo" {
            to_echo += 1;
        }
    }
    assert!(
        to_echo > 0 && to_echo < 200,
        "{to_echo} of 200 went to echo"
    );
    wait_mirrored(&m.proxy, "on-echo", "answered", f64::from(to_echo)).await;
    let mut copies = 0;
    while m.on_echo.try_recv().is_ok() {
        copies += 1;
    }
    assert_eq!(copies, to_echo);
}

#[tokio::test]
async fn a_body_too_long_to_copy_goes_to_the_primary_only() {
    let mut m = start().await;
    let mut c = h1_client(m.proxy.listener_addr("out").unwrap()).await;
    let long = "x".repeat(mirror::MAX_BODY + 1);
    let (status, echoed) = post(&mut c, "/big", Bytes::from(long.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed["body"].as_str().unwrap().len(), long.len());
    wait_mirrored(&m.proxy, "big", "body_not_copied", 1.0).await;
    // One that fits is copied whole.
    let fits = "y".repeat(mirror::MAX_BODY);
    let (status, _) = post(&mut c, "/big", Bytes::from(fits.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let copy = tokio::time::timeout(Duration::from_secs(10), m.big.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(copy.2, fits);
    assert!(m.big.try_recv().is_err(), "the long body was copied");
}

#[tokio::test]
async fn a_mirror_that_never_answers_holds_neither_the_primary_nor_more_than_the_bound() {
    let m = start().await;
    let mut c = h1_client(m.proxy.listener_addr("out").unwrap()).await;
    let n = 3 * mirror::MAX_IN_FLIGHT;
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        let (status, headers, _) = get(&mut c, "/silent", "svc").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-served-by"], "echo");
    }
    // A primary that waited for its copy would take the copy's whole
    // timeout: this is a check of behaviour, not of speed.
    assert!(
        slowest < mirror::TIMEOUT / 2,
        "a primary took {slowest:?} with a mirror that never answers"
    );
    let overflow = mirrored(&m.proxy, "silent", "overflow").await;
    assert!(overflow > 0.0, "{}", scrape(&m.proxy).await);
    let most = m.silent_most.load(Ordering::SeqCst);
    assert!(
        most <= mirror::MAX_IN_FLIGHT,
        "{most} copies were open on the silent mirror at once"
    );
    // Each copy in flight ends at its timeout and lets its connection go.
    let in_flight = n as f64 - overflow;
    wait_mirrored(&m.proxy, "silent", "timeout", in_flight).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.silent_open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections to the silent mirror stay open after the copies' timeout",
            m.silent_open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With the copies gone, new ones go out again.
    let (status, _, _) = get(&mut c, "/silent", "svc").await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.silent_open.load(Ordering::SeqCst), 1);
}
