//! Mutual TLS between two real proxies: a client proxy whose endpoint has
//! an identity, and a server proxy that terminates mTLS on its inbound
//! listener. A TCP relay between them records every byte on the wire.
//!
//! The certificates come from a test CA (`TestCa`); the control plane's CA
//! and the identity client are tested with the control plane. The tests
//! share one metrics recorder, so the counts they check filter on labels
//! only their own traffic has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Buf;
use common::streams::{grpc_client, grpc_frame, grpc_request, grpc_server, websocket_echo_server};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use http_body_util::channel::Channel;

use http::StatusCode;
use proxy::testutil::{TestCa, echo_server, get, h1_client, proxy, sample, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/mtls/sa/productpage";
const SERVER_ID: &str = "spiffe://cluster.local/ns/mtls/sa/reviews";

/// The client proxy: a fixed outbound listener to `reviews`, whose one
/// endpoint is `{TAP}` and must prove `{IDENTITY}`.
const CLIENT: &str = "\
workload: { name: mtls-productpage, namespace: mtls }
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: reviews }
services:
  - { name: reviews, namespace: mtls, ports: [{ port: 9080 }] }
backends:
  - name: reviews
    endpoints: [{ address: \"{TAP}\", workload: mtls-reviews, identity: \"{IDENTITY}\" }]
";

/// The server proxy: an inbound listener in front of the app.
const SERVER: &str = "\
workload: { name: mtls-reviews, namespace: mtls }
listeners:
  - { name: in, address: 127.0.0.1:0, direction: inbound, mode: fixed, target: app }
services:
  - { name: app, namespace: mtls, ports: [{ port: 9080 }] }
backends:
  - { name: app, endpoints: [{ address: \"{APP}\" }] }
";

/// A TCP relay from a free port to `to`, keeping every byte it carries in
/// each direction.
struct Tap {
    addr: SocketAddr,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Mutex::new(Vec::new()));
        let (u, d) = (up.clone(), down.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let server = TcpStream::connect(to).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(relay(cr, sw, u.clone()));
                tokio::spawn(relay(sr, cw, d.clone()));
            }
        });
        Self { addr, up, down }
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.lock().unwrap().extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The two proxies with certificates from `ca`, the client expecting the
/// server to be `expected`.
async fn pair(ca: &TestCa, expected: &str) -> (Arc<proxy::Proxy>, Arc<proxy::Proxy>, Tap) {
    let app = echo_server("mtls-app").await;
    let server = proxy(SERVER, &[("APP", app.to_string())]).await;
    let (chain, key) = ca.issue(SERVER_ID);
    server.tls().set_credentials(&chain, key).unwrap();
    server.tls().set_roots(&[ca.root_pem()]).unwrap();
    let tap = Tap::start(server.listener_addr("in").unwrap()).await;
    let client = proxy(
        CLIENT,
        &[
            ("TAP", tap.addr.to_string()),
            ("IDENTITY", expected.to_owned()),
        ],
    )
    .await;
    let (chain, key) = ca.issue(CLIENT_ID);
    client.tls().set_credentials(&chain, key).unwrap();
    client.tls().set_roots(&[ca.root_pem()]).unwrap();
    (client, server, tap)
}

#[tokio::test]
async fn the_wire_between_two_proxies_carries_tls_records_only() {
    let ca = TestCa::new();
    let (client, server, tap) = pair(&ca, SERVER_ID).await;
    let mut c = h1_client(client.listener_addr("out").unwrap()).await;
    for i in 0..5 {
        let (status, headers, body) = get(&mut c, &format!("/secret/{i}"), "reviews").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["x-served-by"], "mtls-app");
        assert!(body.contains(&format!("/secret/{i}")));
    }

    let up = tap.up.lock().unwrap().clone();
    let down = tap.down.lock().unwrap().clone();
    assert!(!up.is_empty() && !down.is_empty());
    // A TLS handshake record first, application data records after.
    assert_eq!(
        up[0], 0x16,
        "the client's first byte is not a TLS handshake"
    );
    assert_eq!(&up[1..3], [0x03, 0x01], "TLS record version");
    assert_eq!(
        down[0], 0x16,
        "the server's first byte is not a TLS handshake"
    );
    assert!(
        contains(&up, &[0x17, 0x03, 0x03]),
        "no application data records"
    );
    for plain in [
        &b"GET "[..],
        b"HTTP/1.1",
        b"/secret/",
        b"mtls-app",
        b"x-served-by",
    ] {
        assert!(
            !contains(&up, plain),
            "plaintext {plain:?} on the wire upstream"
        );
        assert!(
            !contains(&down, plain),
            "plaintext {plain:?} on the wire downstream"
        );
    }

    // The server saw the client's identity; both sides count mTLS.
    let metrics = scrape(&server).await;
    let inbound = sample(
        &metrics,
        "trellis_requests_total",
        &[
            ("direction", "inbound"),
            ("tls", "true"),
            ("source_principal", CLIENT_ID),
            ("source_namespace", "mtls"),
            ("destination_service", "app"),
            ("response_code", "200"),
        ],
    );
    assert_eq!(inbound, 5.0, "{metrics}");
    let metrics = scrape(&client).await;
    let outbound = sample(
        &metrics,
        "trellis_requests_total",
        &[
            ("direction", "outbound"),
            ("tls", "true"),
            ("source_principal", CLIENT_ID),
            ("destination_service", "reviews"),
            ("response_code", "200"),
        ],
    );
    assert_eq!(outbound, 5.0, "{metrics}");
}

#[tokio::test]
async fn a_server_proving_another_identity_is_refused() {
    let ca = TestCa::new();
    let (client, _server, _tap) = pair(&ca, "spiffe://cluster.local/ns/mtls/sa/ratings").await;
    let mut c = h1_client(client.listener_addr("out").unwrap()).await;
    let (status, _, body) = get(&mut c, "/", "reviews").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.contains(
            "the server's identity is spiffe://cluster.local/ns/mtls/sa/reviews, not spiffe://cluster.local/ns/mtls/sa/ratings"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn strict_inbound_refuses_plaintext() {
    let ca = TestCa::new();
    let (_client, server, _tap) = pair(&ca, SERVER_ID).await;
    let mut plain = TcpStream::connect(server.listener_addr("in").unwrap())
        .await
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = plain.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(
        n,
        0,
        "a plaintext request got an answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let metrics = scrape(&server).await;
    assert!(
        sample(
            &metrics,
            "trellis_inbound_plaintext_refused_total",
            &[("listener", "in")]
        ) >= 1.0,
        "{metrics}"
    );
}

/// The rotation test's client proxy: three fixed outbound listeners, one
/// per kind of traffic, each to its own service behind the server proxy.
const ROTATION_CLIENT: &str = "\
workload: { name: rot-client, namespace: mtls }
listeners:
  - { name: http, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: rot-http }
  - { name: grpc, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: rot-grpc }
  - { name: ws, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: rot-ws }
services:
  - { name: rot-http, namespace: mtls, ports: [{ port: 80 }] }
  - { name: rot-grpc, namespace: mtls, ports: [{ port: 80 }] }
  - { name: rot-ws, namespace: mtls, ports: [{ port: 80 }] }
backends:
  - { name: rot-http, endpoints: [{ address: \"{HTTP}\", identity: \"{ID}\" }] }
  - { name: rot-grpc, endpoints: [{ address: \"{GRPC}\", identity: \"{ID}\" }] }
  - { name: rot-ws, endpoints: [{ address: \"{WS}\", identity: \"{ID}\" }] }
";

/// The rotation test's server proxy: an inbound listener per app.
const ROTATION_SERVER: &str = "\
workload: { name: rot-server, namespace: mtls }
listeners:
  - { name: http, address: 127.0.0.1:0, direction: inbound, mode: fixed, target: http-app }
  - { name: grpc, address: 127.0.0.1:0, direction: inbound, mode: fixed, target: grpc-app }
  - { name: ws, address: 127.0.0.1:0, direction: inbound, mode: fixed, target: ws-app }
services:
  - { name: http-app, namespace: mtls, ports: [{ port: 80 }] }
  - { name: grpc-app, namespace: mtls, ports: [{ port: 80, protocol: grpc }] }
  - { name: ws-app, namespace: mtls, ports: [{ port: 80 }] }
backends:
  - { name: http-app, endpoints: [{ address: \"{HTTP}\" }] }
  - { name: grpc-app, endpoints: [{ address: \"{GRPC}\" }], protocol: grpc }
  - { name: ws-app, endpoints: [{ address: \"{WS}\" }] }
";

/// Keeps `clients` HTTP/1 connections sending requests through `addr`,
/// counting successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn new() -> Self {
        Self {
            stop: Arc::default(),
            ok: Arc::default(),
            failures: Arc::default(),
            tasks: Vec::new(),
        }
    }

    /// Adds `n` clients, each on a new connection (so the proxy needs new
    /// upstream connections, with handshakes under the current certs).
    fn add(&mut self, addr: SocketAddr, n: usize) {
        for _ in 0..n {
            let (stop, ok, failures) = (self.stop.clone(), self.ok.clone(), self.failures.clone());
            self.tasks.push(tokio::spawn(async move {
                let mut c = h1_client(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    let (status, _, body) = get(&mut c, "/", "rot-http").await;
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.lock().unwrap().push(format!("{status}: {body}"));
                    }
                }
            }));
        }
    }

    /// Waits until `more` further requests have succeeded.
    async fn progress(&self, more: u64) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.ok.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the load stalled");
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

fn install(p: &proxy::Proxy, ca: &TestCa, id: &str, roots: &[String]) {
    let (chain, key) = ca.issue(id);
    p.tls().set_roots(roots).unwrap();
    p.tls().set_credentials(&chain, key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_root_rotation_under_load_fail_nothing_and_keep_streams() {
    use tokio_tungstenite::tungstenite::Message;
    let old_root = TestCa::new();
    let new_root = TestCa::new();
    let (old, new) = (old_root.root_pem(), new_root.root_pem());

    let server = proxy(
        ROTATION_SERVER,
        &[
            ("HTTP", echo_server("rot-app").await.to_string()),
            ("GRPC", grpc_server().await.to_string()),
            ("WS", websocket_echo_server().await.to_string()),
        ],
    )
    .await;
    install(&server, &old_root, SERVER_ID, std::slice::from_ref(&old));
    let client = proxy(
        ROTATION_CLIENT,
        &[
            ("HTTP", server.listener_addr("http").unwrap().to_string()),
            ("GRPC", server.listener_addr("grpc").unwrap().to_string()),
            ("WS", server.listener_addr("ws").unwrap().to_string()),
            ("ID", SERVER_ID.to_owned()),
        ],
    )
    .await;
    install(&client, &old_root, CLIENT_ID, std::slice::from_ref(&old));

    // A gRPC bidirectional stream and a WebSocket, open throughout.
    let mut grpc = grpc_client(client.listener_addr("grpc").unwrap()).await;
    let (mut grpc_tx, body) = Channel::<bytes::Bytes, std::convert::Infallible>::new(1);
    grpc_tx.send_data(grpc_frame(b"m0")).await.unwrap();
    let resp = grpc.send_request(grpc_request(body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut grpc_rx = resp.into_body();
    let mut grpc_seq = 0;
    let ws_tcp = TcpStream::connect(client.listener_addr("ws").unwrap())
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://rot-ws/chat", ws_tcp)
        .await
        .unwrap();
    let mut ws_seq = 0;
    // Both streams answer, each message in turn.
    let mut exchange = async |grpc_tx: &mut http_body_util::channel::Sender<
        bytes::Bytes,
        std::convert::Infallible,
    >| {
        let frame = tokio::time::timeout(Duration::from_secs(10), grpc_rx.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut data = frame.into_data().unwrap();
        data.advance(5);
        assert_eq!(&data[..], format!("m{grpc_seq}").as_bytes());
        grpc_seq += 1;
        grpc_tx
            .send_data(grpc_frame(format!("m{grpc_seq}").as_bytes()))
            .await
            .unwrap();
        ws.send(Message::text(format!("w{ws_seq}"))).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(format!("w{ws_seq}")));
        ws_seq += 1;
    };

    let http = client.listener_addr("http").unwrap();
    let mut load = Load::new();
    load.add(http, 2);
    load.progress(100).await;
    exchange(&mut grpc_tx).await;

    // Three certificate renewals on both sides, each followed by new
    // connections that handshake with the new certificates.
    for _ in 0..3 {
        install(&server, &old_root, SERVER_ID, std::slice::from_ref(&old));
        install(&client, &old_root, CLIENT_ID, std::slice::from_ref(&old));
        load.add(http, 1);
        load.progress(100).await;
        exchange(&mut grpc_tx).await;
    }

    // Root rotation: both roots trusted everywhere first, then new leaves
    // from the new root, then the old root retired.
    let both = [old.clone(), new.clone()];
    server.tls().set_roots(&both).unwrap();
    client.tls().set_roots(&both).unwrap();
    load.add(http, 1);
    load.progress(100).await;
    install(&server, &new_root, SERVER_ID, &both);
    load.add(http, 1);
    load.progress(100).await;
    install(&client, &new_root, CLIENT_ID, &both);
    load.add(http, 1);
    load.progress(100).await;
    exchange(&mut grpc_tx).await;
    server.tls().set_roots(std::slice::from_ref(&new)).unwrap();
    client.tls().set_roots(std::slice::from_ref(&new)).unwrap();
    load.add(http, 2);
    load.progress(200).await;
    exchange(&mut grpc_tx).await;

    // A fresh connection after the rotation handshakes with the new root
    // only: a leaf of the old root is now refused.
    let stale = proxy::tls::Tls::new();
    let (chain, key) = old_root.issue(CLIENT_ID);
    stale.set_credentials(&chain, key).unwrap();
    stale.set_roots(&[old.clone(), new.clone()]).unwrap();
    let tcp = TcpStream::connect(server.listener_addr("http").unwrap())
        .await
        .unwrap();
    let peer = server.listener_addr("http").unwrap();
    let refused = match stale.connect(tcp, peer, SERVER_ID, None).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            let mut buf = [0u8; 1];
            !matches!(s.read(&mut buf).await, Ok(1))
        }
    };
    assert!(refused, "a leaf of the retired root was accepted");

    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 1000, "{ok}");
    drop(grpc_tx);
    ws.close(None).await.unwrap();
}
