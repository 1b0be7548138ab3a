//! A backend's connect and idle timeouts (DestinationPolicy
//! `connectionPool.connectTimeout` and `idleTimeout`) through real sockets:
//! a connect to an endpoint whose accept queue is full gives up at the
//! backend's timeout, and a pooled connection is closed once it sat unused
//! for the backend's idle timeout, while another backend's stays open.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy::testutil::{get, h1_client, proxy};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }
services:
  - { name: quick, ports: [{ port: 80 }] }
  - { name: lasting, ports: [{ port: 80 }] }
  - { name: stuck, ports: [{ port: 80 }] }
backends:
  - { name: quick, limits: { idleTimeoutMs: 300 }, endpoints: [{ address: "{QUICK}" }] }
  - { name: lasting, endpoints: [{ address: "{LASTING}" }] }
  - { name: stuck, limits: { connectTimeoutMs: 200 }, endpoints: [{ address: "{STUCK}" }] }
"#;

/// An HTTP/1 server that counts its open connections.
async fn counting() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let count = open.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let count = count.clone();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from("ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// A listener that never accepts, its queue filled: a connect to it
/// hangs (Linux drops the SYN of a full accept queue).
async fn stuck() -> (
    std::net::SocketAddr,
    tokio::net::TcpListener,
    Vec<TcpStream>,
) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            held.push(s);
        }
    }
    (addr, listener, held)
}

#[tokio::test]
async fn a_backends_connect_and_idle_timeouts_hold() {
    let (quick, quick_open) = counting().await;
    let (lasting, lasting_open) = counting().await;
    let (stuck_addr, _listener, _held) = stuck().await;
    let p = proxy(
        CONFIG,
        &[
            ("QUICK", quick.to_string()),
            ("LASTING", lasting.to_string()),
            ("STUCK", stuck_addr.to_string()),
        ],
    )
    .await;
    let out = p.listener_addr("out").unwrap();

    let mut c = h1_client(out).await;
    let started = Instant::now();
    let (status, _, body) = get(&mut c, "/", "stuck").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("timed out after 200ms"), "{body}");
    // The backend's timeout, not the proxy's default.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    for host in ["quick", "lasting"] {
        let mut c = h1_client(out).await;
        let (status, _, _) = get(&mut c, "/", host).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(quick_open.load(Ordering::SeqCst), 1);
    assert_eq!(lasting_open.load(Ordering::SeqCst), 1);
    // quick's connection goes once it sat unused for 300 ms (the sweep
    // runs every 500 ms); lasting's stays for the default 10 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while quick_open.load(Ordering::SeqCst) > 0 {
        assert!(
            Instant::now() < deadline,
            "quick's pooled connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lasting_open.load(Ordering::SeqCst), 1);
}
