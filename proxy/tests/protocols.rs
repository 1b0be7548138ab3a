//! Each protocol the proxy carries, through real sockets: HTTP/1.1, h2c,
//! gRPC unary and streaming, WebSocket, opaque TCP, a server-speaks-first
//! protocol, and the explicit (forward-proxy) mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use common::streams::{grpc_client, grpc_frame, grpc_request, grpc_server, websocket_echo_server};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, channel::Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy::testutil::{echo_server, fixed_config, get, h1_client, h2_client, proxy, subst};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

async fn fixed_proxy(upstream: SocketAddr) -> SocketAddr {
    let p = proxy(&fixed_config(&[upstream]), &[]).await;
    p.listener_addr("out").unwrap()
}

#[tokio::test]
async fn http1_request_reaches_upstream_and_back() {
    let addr = fixed_proxy(echo_server("a").await).await;
    let mut c = h1_client(addr).await;
    for i in 0..3 {
        let (status, headers, body) = get(&mut c, &format!("/hello/{i}?x=1"), "svc").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-served-by"], "a");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["path"], format!("/hello/{i}?x=1"));
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["headers"]["host"], "svc");
    }
}

#[tokio::test]
async fn http1_post_body_is_streamed_upstream() {
    let addr = fixed_proxy(echo_server("a").await).await;
    let mut c = h1_client(addr).await;
    let body = "x".repeat(300_000);
    let req = Request::post("/upload")
        .header("host", "svc")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    let echo: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body"].as_str().unwrap().len(), body.len());
}

/// A raw upstream that records the request head it receives and answers
/// with a response whose header names have unusual case.
async fn raw_upstream() -> (SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        tx.send(String::from_utf8(head).unwrap()).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nX-Resp-CaSe: yes\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let _ = s.read(&mut [0u8; 16]).await;
    });
    (addr, rx)
}

async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    timeout(LIMIT, async {
        let mut buf = [0u8; 4096];
        while !resp.ends_with(b"ok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&resp));
            resp.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap();
    String::from_utf8(resp).unwrap()
}

#[tokio::test]
async fn http1_header_case_is_kept_both_ways() {
    let (up, head) = raw_upstream().await;
    let addr = fixed_proxy(up).await;
    let resp = raw_exchange(
        addr,
        "GET /c HTTP/1.1\r\nHost: svc\r\nX-MiXeD-Case: 1\r\n\r\n",
    )
    .await;
    let head = head.await.unwrap();
    assert!(head.contains("X-MiXeD-Case: 1\r\n"), "{head}");
    assert!(resp.contains("X-Resp-CaSe: yes\r\n"), "{resp}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let (up, head) = raw_upstream().await;
    let addr = fixed_proxy(up).await;
    raw_exchange(
        addr,
        "GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\nX-Kept: 1\r\n\r\n",
    )
    .await;
    let head = head.await.unwrap().to_ascii_lowercase();
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection: keep-alive, x-secret",
    ] {
        assert!(!head.contains(gone), "{gone} forwarded: {head}");
    }
    assert!(head.contains("x-kept: 1"), "{head}");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_detected_and_kept_upstream() {
    let addr = fixed_proxy(echo_server("h2").await).await;
    let mut c = h2_client(addr).await;
    let mut streams = Vec::new();
    for i in 0..10 {
        let req = Request::get(format!("http://svc/s/{i}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        streams.push(c.send_request(req));
    }
    for (i, s) in futures_util::future::join_all(streams)
        .await
        .into_iter()
        .enumerate()
    {
        let resp = s.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let echo: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(echo["version"], "HTTP/2.0");
        assert_eq!(echo["path"], format!("/s/{i}"));
    }
}

#[tokio::test]
async fn grpc_unary_call_with_trailers() {
    let addr = fixed_proxy(grpc_server().await).await;
    let mut c = grpc_client(addr).await;
    let (mut tx, body) = Channel::new(1);
    let call = tokio::spawn(c.send_request(grpc_request(body)));
    tx.send_data(grpc_frame(b"hello")).await.unwrap();
    drop(tx);
    let resp = timeout(LIMIT, call).await.unwrap().unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), grpc_frame(b"hello"));
}

#[tokio::test]
async fn grpc_bidirectional_stream_is_not_buffered() {
    let addr = fixed_proxy(grpc_server().await).await;
    let mut c = grpc_client(addr).await;
    let (mut tx, body) = Channel::new(1);
    tx.send_data(grpc_frame(b"m0")).await.unwrap();
    let resp = timeout(LIMIT, c.send_request(grpc_request(body)))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    // Each reply arrives before the next message is sent: the proxy
    // streams both directions instead of buffering whole bodies.
    for i in 0..5 {
        let frame = timeout(LIMIT, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut data = frame.into_data().unwrap();
        assert_eq!(data.get_u8(), 0);
        let len = data.get_u32() as usize;
        assert_eq!(&data[..len], format!("m{i}").as_bytes());
        if i < 4 {
            tx.send_data(grpc_frame(format!("m{}", i + 1).as_bytes()))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let trailers = timeout(LIMIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(trailers.into_trailers().unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    use tokio_tungstenite::tungstenite::Message;
    let addr = fixed_proxy(websocket_echo_server().await).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://svc/chat", stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..20 {
        ws.send(Message::text(format!("msg {i}"))).await.unwrap();
        let back = timeout(LIMIT, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(back, Message::text(format!("msg {i}")));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let back = timeout(LIMIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.unwrap();
}

async fn tcp_echo_server(banner: Option<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                if let Some(b) = banner {
                    s.write_all(b).await.unwrap();
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn opaque_tcp_is_forwarded_byte_for_byte() {
    let addr = fixed_proxy(tcp_echo_server(None).await).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let ((), n) = timeout(LIMIT, async { tokio::join!(write, read) })
        .await
        .unwrap();
    n.unwrap();
    assert_eq!(&back[..3], &[0x16, 0x03, 0x01]);
    assert_eq!(&back[3..], &payload[..]);
}

#[tokio::test]
async fn server_speaks_first_protocol_does_not_hang() {
    let upstream = tcp_echo_server(Some(b"220 smtp.example ESMTP ready\r\n")).await;
    let yaml = fixed_config(&[upstream]).replace(
        "mode: fixed, target: svc }",
        "mode: fixed, target: svc, detectTimeoutMs: 200 }",
    );
    let p = proxy(&yaml, &[]).await;
    let mut s = TcpStream::connect(p.listener_addr("out").unwrap())
        .await
        .unwrap();
    // The client waits for the server's greeting without sending anything.
    let mut banner = [0u8; 30];
    timeout(LIMIT, s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220 smtp.example ESMTP ready\r\n");
    s.write_all(b"EHLO me\r\n").await.unwrap();
    let mut reply = [0u8; 9];
    timeout(LIMIT, s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply, b"EHLO me\r\n");
}

#[tokio::test]
async fn declared_tcp_port_skips_detection() {
    let upstream = tcp_echo_server(Some(b"hello")).await;
    // One hour of detection would hang the test if detection ran.
    let yaml = fixed_config(&[upstream])
        .replace(
            "mode: fixed, target: svc }",
            "mode: fixed, target: svc, detectTimeoutMs: 3600000 }",
        )
        .replace(
            "ports: [{ port: 80 }]",
            "ports: [{ port: 80, protocol: tcp }]",
        );
    let p = proxy(&yaml, &[]).await;
    let mut s = TcpStream::connect(p.listener_addr("out").unwrap())
        .await
        .unwrap();
    let mut banner = [0u8; 5];
    timeout(LIMIT, s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"hello");
}

const EXPLICIT: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }
services:
  - name: reviews
    ports: [{ port: 9080 }]
backends:
  - { name: reviews, endpoints: [{ address: "{UP}" }] }
"#;

#[tokio::test]
async fn explicit_mode_routes_absolute_form_requests_by_host() {
    let up = echo_server("reviews").await;
    let p = proxy(EXPLICIT, &[("UP", up.to_string())]).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (status, headers, body) = get(
        &mut c,
        "http://reviews.default.svc.cluster.local:9080/r/1",
        "ignored",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["x-served-by"], "reviews");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/r/1", "upstream gets origin form");
}

#[tokio::test]
async fn explicit_mode_passes_unknown_hosts_through() {
    let outside = echo_server("outside").await;
    let p = proxy(EXPLICIT, &[("UP", "127.0.0.1:1".into())]).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (status, headers, _) = get(&mut c, &format!("http://{outside}/x"), "ignored").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-served-by"], "outside");
}

#[tokio::test]
async fn explicit_mode_connect_tunnels_to_the_service() {
    let up = tcp_echo_server(None).await;
    let p = proxy(EXPLICIT, &[("UP", up.to_string())]).await;
    let mut s = TcpStream::connect(p.listener_addr("out").unwrap())
        .await
        .unwrap();
    s.write_all(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    timeout(LIMIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
    })
    .await
    .unwrap();
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"\x00tunnelled bytes").await.unwrap();
    let mut back = [0u8; 16];
    timeout(LIMIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00tunnelled bytes");
}

#[tokio::test]
async fn explicit_mode_without_host_is_a_clear_error() {
    let p = proxy(&subst(EXPLICIT, &[("UP", "127.0.0.1:1".into())]), &[]).await;
    let mut s = TcpStream::connect(p.listener_addr("out").unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    timeout(LIMIT, s.read_to_string(&mut resp))
        .await
        .unwrap()
        .unwrap();
    assert!(
        resp.starts_with("HTTP/1.0 502") || resp.starts_with("HTTP/1.1 502"),
        "{resp}"
    );
    assert!(resp.contains("names no host"), "{resp}");
}

/// An echo server that counts the connections it accepts.
async fn counting_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_http1_connections_are_pooled_and_reused() {
    let (up, accepted) = counting_server().await;
    let addr = fixed_proxy(up).await;
    // Sequential requests over fresh client connections: the proxy keeps
    // reusing one upstream connection.
    for _ in 0..20 {
        let mut c = h1_client(addr).await;
        let (status, _, body) = get(&mut c, "/", "svc").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_http2_connection_is_shared_by_concurrent_streams() {
    let (up, accepted) = counting_server().await;
    let addr = fixed_proxy(up).await;
    let mut c = h2_client(addr).await;
    // The first request opens the upstream connection; the rest share it.
    let first = c.send_request(
        Request::get("http://svc/")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    let streams: Vec<_> = (0..20)
        .map(|_| {
            c.send_request(
                Request::get("http://svc/")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        })
        .collect();
    for r in futures_util::future::join_all(streams).await {
        assert_eq!(r.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
