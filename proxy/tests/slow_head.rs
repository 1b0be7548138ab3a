//! Protocol detection is not fooled by a slow client: a request whose
//! first byte comes alone, past the detection timeout, is still served as
//! HTTP (hop-by-hop headers stripped, counted), and a client that sends
//! its head a byte at a time is closed at the header-read timeout, in
//! fixed and explicit listener modes alike (detection is shared by every
//! mode).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proxy::Proxy;
use proxy::settings::Settings;
use proxy::testutil::{echo_server, proxy_with, sample, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
listeners:
  - { name: fixed, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: slow, detectTimeoutMs: 200 }
  - { name: explicit, address: 127.0.0.1:0, direction: outbound, mode: explicit, detectTimeoutMs: 200 }
services:
  - { name: slow, ports: [{ port: 80 }] }
backends:
  - { name: slow, endpoints: [{ address: "{ECHO}" }] }
"#;

async fn start() -> std::sync::Arc<Proxy> {
    let settings = Settings {
        header_read_timeout: Duration::from_secs(1),
        ..Settings::for_tests()
    };
    proxy_with(
        settings,
        CONFIG,
        &[("ECHO", echo_server("slow").await.to_string())],
    )
    .await
}

/// Reads until the proxy closes the connection (or 10 s pass).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_first_byte_alone_past_the_detection_timeout_is_still_http() {
    let p = start().await;
    for listener in ["fixed", "explicit"] {
        let mut s = TcpStream::connect(p.listener_addr(listener).unwrap())
            .await
            .unwrap();
        s.write_all(b"G").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(
            b"ET /slow HTTP/1.1\r\nHost: slow\r\nConnection: close, x-hop\r\nx-hop: 1\r\n\
              Proxy-Authorization: Basic c2VjcmV0\r\nx-kept: 1\r\n\r\n",
        )
        .await
        .unwrap();
        let reply = read_all(&mut s).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{listener}: {reply}");
        let body = &reply[reply.find("\r\n\r\n").unwrap() + 4..];
        let echo: serde_json::Value = serde_json::from_str(body).unwrap();
        let headers = &echo["headers"];
        assert_eq!(headers["x-kept"], "1", "{listener}");
        assert!(headers.get("x-hop").is_none(), "{listener}: {headers}");
        assert!(
            headers.get("proxy-authorization").is_none(),
            "{listener}: {headers}"
        );
    }
    let metrics = scrape(&p).await;
    let counted = sample(
        &metrics,
        "trellis_requests_total",
        &[("destination_service", "slow"), ("response_code", "200")],
    );
    assert_eq!(counted, 2.0, "both requests counted as HTTP");
}

#[tokio::test]
async fn a_byte_a_second_client_is_closed_at_the_header_read_timeout() {
    let p = start().await;
    for listener in ["fixed", "explicit"] {
        // Slow from the first byte (detection) and within the head
        // (hyper's own timer).
        for head in [&b"GET /slow HTTP/1.1\r\nHost: slow\r\n"[..], b""] {
            let s = TcpStream::connect(p.listener_addr(listener).unwrap())
                .await
                .unwrap();
            let (mut rx, mut tx) = s.into_split();
            tx.write_all(head).await.unwrap();
            let began = Instant::now();
            // The rest of a request head that never ends, a byte at a time.
            let rest = b"GET /slow HTTP/1.1\r\nHost: slow\r\nX-Long: "[head.len()..]
                .iter()
                .chain(std::iter::repeat(&b'a'));
            let dribble = async {
                for b in rest {
                    if tx.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            };
            let mut answer = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::select! {
                    () = dribble => {}
                    _ = rx.read_to_end(&mut answer) => {}
                }
            })
            .await;
            let elapsed = began.elapsed();
            assert!(closed.is_ok(), "{listener}: still open after 10 s");
            assert!(
                elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
                "{listener}: closed after {elapsed:?}"
            );
        }
    }
}
