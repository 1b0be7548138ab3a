//! Circuit breaking through real sockets: a backend that holds every
//! request a while and records how many it holds at once. Past a limit the
//! proxy answers at once with 503 and names the limit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy::Proxy;
use proxy::testutil::{h1_client, proxy, sample, scrape};
use tokio::net::TcpListener;

/// A backend that answers each request after `hold`, counting the
/// requests it holds now, the most it ever held, and the connections it
/// has open.
struct Holding {
    addr: SocketAddr,
    peak: Arc<AtomicUsize>,
    peak_connections: Arc<AtomicUsize>,
}

async fn holding(hold: Duration) -> Holding {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (conns, peak_connections) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (p, pc) = (peak.clone(), peak_connections.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let open = conns.fetch_add(1, Ordering::SeqCst) + 1;
            pc.fetch_max(open, Ordering::SeqCst);
            let (now, p, conns) = (now.clone(), p.clone(), conns.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (now, p) = (now.clone(), p.clone());
                    async move {
                        let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(held, Ordering::SeqCst);
                        tokio::time::sleep(hold).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                conns.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Holding {
        addr,
        peak,
        peak_connections,
    }
}

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: {SVC} }
services:
  - { name: {SVC}, ports: [{ port: 80 }] }
backends:
  - { name: {SVC}, endpoints: [{ address: "{ADDR}" }], limits: {LIMITS} }
"#;

/// Fires `n` requests at once, each on its own connection; returns each
/// one's status, `x-trellis-overloaded` header and completion time.
async fn burst(p: &Proxy, n: usize) -> Vec<(StatusCode, String, Instant)> {
    let addr = p.listener_addr("out").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut c = h1_client(addr).await;
            let req = Request::get("/")
                .header("host", "svc")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = c.send_request(req).await.unwrap();
            let status = resp.status();
            let limit = resp
                .headers()
                .get("x-trellis-overloaded")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            resp.into_body().collect().await.unwrap();
            (status, limit, Instant::now())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The refused requests were answered before any admitted one finished:
/// they did not wait in a queue.
fn refused_fast(results: &[(StatusCode, String, Instant)]) {
    let first_ok = results
        .iter()
        .filter(|r| r.0 == StatusCode::OK)
        .map(|r| r.2)
        .min()
        .unwrap();
    let last_refused = results
        .iter()
        .filter(|r| r.0 != StatusCode::OK)
        .map(|r| r.2)
        .max()
        .unwrap();
    assert!(last_refused < first_ok, "a refused request waited");
}

#[tokio::test]
async fn max_requests_holds_concurrency_at_the_limit() {
    let b = holding(Duration::from_millis(1500)).await;
    let vars = [
        ("ADDR", b.addr.to_string()),
        ("LIMITS", "{ maxRequests: 5 }".into()),
        ("SVC", "requests".into()),
    ];
    let p = proxy(CONFIG, &vars).await;
    let results = burst(&p, 40).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 != StatusCode::OK).collect();
    assert_eq!(ok, 5, "admitted");
    assert_eq!(
        b.peak.load(Ordering::SeqCst),
        5,
        "the backend held more than the limit"
    );
    assert_eq!(refused.len(), 35);
    assert!(
        refused
            .iter()
            .all(|r| r.0 == StatusCode::SERVICE_UNAVAILABLE && r.1 == "max-requests")
    );
    refused_fast(&results);
    let metrics = scrape(&p).await;
    let labels = [
        ("destination_service", "requests"),
        ("response_code", "503"),
        ("response_flags", "UO"),
    ];
    assert_eq!(sample(&metrics, "trellis_requests_total", &labels), 35.0);
    // Once they finish, the limit admits again.
    assert!(burst(&p, 3).await.iter().all(|r| r.0 == StatusCode::OK));
}

#[tokio::test]
async fn max_connections_caps_the_connections_to_an_endpoint() {
    let b = holding(Duration::from_millis(1500)).await;
    let vars = [
        ("ADDR", b.addr.to_string()),
        ("LIMITS", "{ maxConnections: 2 }".into()),
        ("SVC", "connections".into()),
    ];
    let p = proxy(CONFIG, &vars).await;
    let results = burst(&p, 10).await;
    let ok = results.iter().filter(|r| r.0 == StatusCode::OK).count();
    assert_eq!(ok, 2);
    assert_eq!(b.peak_connections.load(Ordering::SeqCst), 2);
    assert!(
        results
            .iter()
            .filter(|r| r.0 != StatusCode::OK)
            .all(|r| r.1 == "max-connections")
    );
    refused_fast(&results);
    // The two connections are reused afterwards, within the limit.
    assert!(burst(&p, 2).await.iter().all(|r| r.0 == StatusCode::OK));
}
