//! Outlier detection through real sockets: of two endpoints, one always
//! answers 500. It is ejected after the configured number of errors in a
//! row, traffic moves to the healthy one, it comes back after its ejection
//! time and, still failing, is ejected again for twice as long.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy::Proxy;
use proxy::testutil::{echo_server, get, h1_client, sample, scrape};
use tokio::net::TcpListener;

/// A backend whose every answer is 500.
async fn broken() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"broken")));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: outliers }
services:
  - { name: outliers, ports: [{ port: 80 }] }
backends:
  - name: outliers
    loadBalancer: { algorithm: roundRobin }
    endpoints: [{ address: "{BAD}" }, { address: "{GOOD}" }]
    outlierDetection:
      consecutive5xx: 3
      baseEjectionMs: 1000
      maxEjectionPercent: 50
      intervalMs: 600000
"#;

/// Sends `n` requests; returns how many did not get 200.
async fn failures(p: &Proxy, n: usize) -> usize {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let mut failed = 0;
    for _ in 0..n {
        c.ready().await.unwrap();
        let req = Request::get("/")
            .header("host", "outliers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        if resp.status() != StatusCode::OK {
            failed += 1;
        }
        resp.into_body().collect().await.unwrap();
    }
    failed
}

async fn ejected(p: &Proxy) -> serde_json::Value {
    let mut c = h1_client(p.admin_addr()).await;
    let (_, _, body) = get(&mut c, "/config_dump", "localhost").await;
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    dump["ejected"]["outliers"].clone()
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_comes_back_after_its_time() {
    let bad = broken().await;
    let good = echo_server("good").await;
    let p = proxy::testutil::proxy(
        CONFIG,
        &[("BAD", bad.to_string()), ("GOOD", good.to_string())],
    )
    .await;

    // Round robin: the broken endpoint gets every other request until its
    // third error in a row ejects it; after that, none.
    assert_eq!(failures(&p, 40).await, 3);
    let out = ejected(&p).await;
    assert_eq!(out[0]["address"], bad.to_string(), "{out}");
    assert_eq!(out[0]["ejections"], 1);

    // Back after the base ejection time, still broken: three more errors,
    // then out for twice as long.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(ejected(&p).await.is_null(), "still ejected after its time");
    assert_eq!(failures(&p, 40).await, 3);
    let out = ejected(&p).await;
    assert_eq!(out[0]["ejections"], 2);
    assert!(out[0]["remaining_ms"].as_u64().unwrap() > 1000, "{out}");

    let metrics = scrape(&p).await;
    let labels = [("backend", "outliers"), ("reason", "consecutive_5xx")];
    assert_eq!(
        sample(&metrics, "trellis_outlier_ejections_total", &labels),
        2.0
    );
}
