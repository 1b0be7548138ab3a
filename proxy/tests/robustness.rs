//! Bad clients and bad upstreams: malformed and oversized requests, slow
//! clients, and upstreams that are down or break off mid-response. Each
//! gets a clear answer or a close, never a hang, and the proxy keeps
//! serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{End, PATIENCE, raw_exchange, read_to_end, request};
use http::StatusCode;
use proxy::Proxy;
use proxy::settings::Settings;
use proxy::testutil::{echo_server, fixed_config, proxy_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy in front of an echo server, with `settings`.
async fn echo_proxy(settings: Settings) -> (Arc<Proxy>, SocketAddr) {
    let echo = echo_server("robust-echo").await;
    let p = proxy_with(settings, &fixed_config(&[echo]), &[]).await;
    let addr = p.listener_addr("out").unwrap();
    (p, addr)
}

/// The proxy still serves a well-formed request.
async fn assert_serving(addr: SocketAddr, after: &str) {
    let r = request(addr, "GET", "/still-there", b"")
        .await
        .unwrap_or_else(|e| panic!("after {after}: {e}"));
    assert_eq!(r.status, StatusCode::OK, "after {after}: {}", r.body);
    assert_eq!(r.served_by(), "robust-echo");
}

/// Sends each case on its own connection and checks that it gets a 400 or
/// a close, never a hang, and that the proxy serves a good request after
/// it. Reports every failing case at once.
async fn check_cases(addr: SocketAddr, cases: &[(&str, &[u8])]) {
    let mut failed = Vec::new();
    for (what, bytes) in cases {
        let (response, end) = raw_exchange(addr, bytes, PATIENCE).await;
        if end == End::Hung {
            failed.push(format!(
                "{what}: the proxy neither answered nor closed: {response:?}"
            ));
        } else if !(response.is_empty() || response.starts_with("HTTP/1.1 400 ")) {
            failed.push(format!("{what}: expected 400 or a close, got {response:?}"));
        }
        assert_serving(addr, what).await;
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[tokio::test]
async fn malformed_requests_get_400_or_a_close_and_the_proxy_keeps_serving() {
    let (_p, addr) = echo_proxy(Settings::for_tests()).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "header line without a colon",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        ),
        (
            "control bytes after the method",
            b"GET \x01\x02\x7f garbage garbage\r\n\r\n",
        ),
        ("unknown version", b"GET / HTTX/9.9\r\nHost: x\r\n\r\n"),
        (
            "space in the header name",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        ),
        (
            "non-numeric content-length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello",
        ),
        (
            "conflicting content-lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
    ];
    check_cases(addr, cases).await;
}

/// The head is valid, so the request is already on its way upstream when
/// the body turns out to be broken: that is still the client's fault.
#[tokio::test]
async fn invalid_chunked_request_body_gets_400_or_a_close() {
    let (_p, addr) = echo_proxy(Settings::for_tests()).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "invalid chunk size",
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk longer than its size",
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    check_cases(addr, cases).await;
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let (_p, addr) = echo_proxy(Settings::for_tests()).await;
    // Over the default 64 KiB limit.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (response, end) = raw_exchange(addr, big.as_bytes(), PATIENCE).await;
    assert_ne!(end, End::Hung);
    assert!(
        response.starts_with("HTTP/1.1 431 "),
        "expected 431, got {end:?} with {:?}",
        &response[..response.len().min(200)]
    );
    // Many headers that add up to more than the limit, each small.
    let many: String = (0..2000)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(40)))
        .collect();
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(big.len() > 64 * 1024);
    let (response, end) = raw_exchange(addr, big.as_bytes(), PATIENCE).await;
    assert_ne!(end, End::Hung);
    assert!(
        response.starts_with("HTTP/1.1 431 "),
        "expected 431, got {end:?} with {:?}",
        &response[..response.len().min(200)]
    );
    // A large head under the limit is forwarded.
    let fine = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    let (response, end) = raw_exchange(addr, fine.as_bytes(), PATIENCE).await;
    assert_eq!(end, End::Closed);
    assert!(
        response.starts_with("HTTP/1.1 200 "),
        "{:?}",
        &response[..response.len().min(200)]
    );
    assert_serving(addr, "oversized heads").await;
}

#[tokio::test]
async fn stalled_request_head_is_closed_and_other_clients_are_unaffected() {
    let mut settings = Settings::for_tests();
    settings.header_read_timeout = Duration::from_millis(300);
    let (_p, addr) = echo_proxy(settings).await;

    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /stalled HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Others are served while that head is incomplete.
    let mut other = proxy::testutil::h1_client(addr).await;
    for i in 0..5 {
        let r = common::send_on(&mut other, "GET", &format!("/other/{i}"), b"")
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let (response, end) = read_to_end(&mut stalled, PATIENCE).await;
    assert_ne!(end, End::Hung, "a stalled request head was never timed out");
    assert!(
        response.is_empty() || response.starts_with("HTTP/1.1 408 "),
        "expected a close or 408, got {response:?}"
    );
    // New clients are served too. (Not `other`: it has now been idle for
    // about a header read timeout, which is the subject of
    // `idle_keep_alive_connection_outlives_the_header_read_timeout`.)
    assert_serving(addr, "a stalled request head").await;
}

/// On HTTP/1 the header read timeout runs from the end of the previous
/// response, so it is also the keep-alive idle timeout (as nginx's
/// `client_header_timeout` and `keepalive_timeout` together): a connection
/// idle for less survives, one idle for longer is closed.
#[tokio::test]
async fn idle_keep_alive_connection_lives_until_the_header_read_timeout() {
    let mut settings = Settings::for_tests();
    settings.header_read_timeout = Duration::from_secs(2);
    let (_p, addr) = echo_proxy(settings).await;
    let mut conn = proxy::testutil::h1_client(addr).await;
    let r = common::send_on(&mut conn, "GET", "/first", b"")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = common::send_on(&mut conn, "GET", "/second", b"")
        .await
        .unwrap_or_else(|e| panic!("idle keep-alive connection closed early: {e}"));
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    tokio::time::timeout(PATIENCE, async {
        while !conn.is_closed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the proxy keeps idle connections past the header read timeout");
}

#[tokio::test]
async fn slow_request_body_still_completes() {
    let mut settings = Settings::for_tests();
    settings.header_read_timeout = Duration::from_millis(300);
    let (_p, addr) = echo_proxy(settings).await;

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // The body takes longer than the header read timeout, which must not
    // apply to it.
    for b in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let (response, end) = read_to_end(&mut s, PATIENCE).await;
    assert_eq!(end, End::Closed, "{response:?}");
    assert!(response.starts_with("HTTP/1.1 200 "), "{response:?}");
    assert!(response.contains(r#""body":"0123456789""#), "{response:?}");
}

const TWO_SERVICES: &str = "\
listeners:
  - { name: bad, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: bad-svc }
  - { name: good, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: good-svc }
services:
  - { name: bad-svc, ports: [{ port: 80 }] }
  - { name: good-svc, ports: [{ port: 80 }] }
backends:
  - { name: bad-svc, endpoints: [{ address: \"{BAD}\" }] }
  - { name: good-svc, endpoints: [{ address: \"{GOOD}\" }] }
";

async fn two_services(bad: SocketAddr) -> (Arc<Proxy>, SocketAddr, SocketAddr) {
    let good = echo_server("good").await;
    let p = proxy_with(
        Settings::for_tests(),
        TWO_SERVICES,
        &[("BAD", bad.to_string()), ("GOOD", good.to_string())],
    )
    .await;
    let (b, g) = (
        p.listener_addr("bad").unwrap(),
        p.listener_addr("good").unwrap(),
    );
    (p, b, g)
}

#[tokio::test]
async fn upstream_that_is_down_gets_503_naming_it() {
    // A port that is bound but not listening: reserved for this test, and
    // every connection to it is refused.
    let reserved =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let down = reserved.local_addr().unwrap().as_socket().unwrap();
    let (_p, bad, good) = two_services(down).await;
    for _ in 0..3 {
        let r = request(bad, "GET", "/", b"").await.unwrap();
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
        assert!(
            r.body.contains(&down.to_string()),
            "the 503 body does not name the upstream {down}: {:?}",
            r.body
        );
        assert_eq!(r.headers["x-trellis-error"], "1");
        let ok = request(good, "GET", "/", b"").await.unwrap();
        assert_eq!((ok.status, ok.served_by()), (StatusCode::OK, "good"));
    }
}

/// An upstream that breaks HTTP: on `/partial` it promises 1000 body bytes,
/// sends 100 and closes; on anything else it closes without answering.
async fn broken_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /partial ") {
                    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
                    resp.extend_from_slice(&[b'p'; 100]);
                    let _ = s.write_all(&resp).await;
                }
                // Dropping the socket closes it.
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_that_breaks_off_gives_an_error_and_the_proxy_keeps_serving() {
    let broken = broken_upstream().await;
    let (_p, bad, good) = two_services(broken).await;
    for _ in 0..3 {
        // Cut off mid-body: the status has gone out, so the client can only
        // see the body end early.
        match request(bad, "GET", "/partial", b"").await {
            Err(e) => assert!(e.contains("body"), "unexpected failure: {e}"),
            Ok(r) => panic!(
                "a truncated upstream body reached the client as complete: {} with {} bytes",
                r.status,
                r.body.len()
            ),
        }
        // Closed before any response: 502 naming the upstream.
        let r = request(bad, "GET", "/nothing", b"").await.unwrap();
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
        assert!(r.body.contains(&broken.to_string()), "{:?}", r.body);
        let ok = request(good, "GET", "/", b"").await.unwrap();
        assert_eq!((ok.status, ok.served_by()), (StatusCode::OK, "good"));
    }
}
