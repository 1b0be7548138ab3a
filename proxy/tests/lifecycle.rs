//! Config swaps and shutdown: hot swaps under load lose no request, the
//! file source applies good files and keeps the last good config on bad
//! ones, and SIGTERM drains in-flight requests before a clean exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Binary, PATIENCE, eventually, request, send_on};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use proxy::testutil::{echo_server, h1_client, h2_client, proxy, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Config `i` of the swap sequence. Even versions send `/load` to server
/// `a`, odd ones to server `b`, each time through a different shape: the
/// default backend, a route, another route, another default backend.
fn swap_config(i: usize, a: SocketAddr, b: SocketAddr) -> String {
    let service = match i % 4 {
        0 => "  - { name: svc, ports: [{ port: 80 }] }\n".to_owned(),
        1 => format!(
            "  - name: svc\n    ports: [{{ port: 80 }}]\n    routes:\n\
             \x20     - name: to-b-{i}\n        rules:\n\
             \x20         - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]\n\
             \x20           backendRefs: [{{ name: b }}]\n"
        ),
        2 => format!(
            "  - name: svc\n    ports: [{{ port: 80 }}]\n    routes:\n\
             \x20     - name: to-a-{i}\n        rules:\n\
             \x20         - matches: [{{ path: {{ type: Exact, value: /load }} }}]\n\
             \x20           backendRefs: [{{ name: svc }}]\n\
             \x20         - matches: [{{ path: {{ type: PathPrefix, value: /other }} }}]\n\
             \x20           backendRefs: [{{ name: b }}]\n"
        ),
        _ => "  - { name: svc, ports: [{ port: 80 }], backend: b }\n".to_owned(),
    };
    format!(
        "workload: {{ name: swapper }}\n\
         listeners:\n  - {{ name: out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: svc }}\n\
         services:\n{service}\
         backends:\n\
         \x20 - {{ name: svc, endpoints: [{{ address: \"{a}\" }}] }}\n\
         \x20 - {{ name: b, endpoints: [{{ address: \"{b}\" }}] }}\n"
    )
}

fn expected_server(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "a" } else { "b" }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_no_request() {
    const CLIENTS: usize = 4;
    const SWAPS: usize = 20;
    let a = echo_server("a").await;
    let b = echo_server("b").await;
    let p = proxy(&swap_config(0, a, b), &[]).await;
    let addr = p.listener_addr("out").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served_a = Arc::new(AtomicUsize::new(0));
    let served_b = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (stop, failures) = (stop.clone(), failures.clone());
        let (served_a, served_b) = (served_a.clone(), served_b.clone());
        clients.push(tokio::spawn(async move {
            // One keep-alive connection per client for the whole test: a
            // swap must not break connections that are already open.
            let mut conn = h1_client(addr).await;
            while !stop.load(Ordering::Relaxed) {
                match send_on(&mut conn, "GET", "/load", b"").await {
                    Ok(r) if r.status == StatusCode::OK => match r.served_by() {
                        "a" => served_a.fetch_add(1, Ordering::Relaxed),
                        "b" => served_b.fetch_add(1, Ordering::Relaxed),
                        other => {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("client {c}: served by {other:?}"));
                            0
                        }
                    },
                    Ok(r) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("client {c}: {} {}", r.status, r.body));
                        0
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("client {c}: {e}"));
                        // The connection is unusable now; carry on with a
                        // new one so the failure count stays meaningful.
                        conn = h1_client(addr).await;
                        0
                    }
                };
            }
        }));
    }

    let mut probe = h1_client(addr).await;
    for i in 1..=SWAPS {
        let version = p
            .update(mesh_api::ProxyConfig::from_yaml(&swap_config(i, a, b)).unwrap())
            .await
            .unwrap();
        assert_eq!(version, i as u64 + 1);
        // A request that starts after `update` returns sees the new config.
        let r = send_on(&mut probe, "GET", "/load", b"").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "swap {i}: {}", r.body);
        assert_eq!(
            r.served_by(),
            expected_server(i),
            "swap {i}: probe went to the old backend"
        );
        // The load moves too: wait until the clients have had several
        // responses from the new backend before swapping again, so every
        // swap happens with requests in flight.
        let counter = if expected_server(i) == "a" {
            &served_a
        } else {
            &served_b
        };
        let base = counter.load(Ordering::Relaxed);
        eventually(
            &format!("load to reach server {} after swap {i}", expected_server(i)),
            || {
                let n = counter.load(Ordering::Relaxed);
                async move { (n >= base + 2 * CLIENTS).then_some(()) }
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(PATIENCE, c).await.unwrap().unwrap();
    }
    let failures = failures.lock().unwrap();
    let (na, nb) = (
        served_a.load(Ordering::Relaxed),
        served_b.load(Ordering::Relaxed),
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during {SWAPS} swaps, first ones: {:#?}",
        failures.len(),
        failures.len() + na + nb,
        &failures[..failures.len().min(10)]
    );
    assert!(na > 0 && nb > 0, "served by a: {na}, by b: {nb}");
    assert_eq!(p.snapshot().version, SWAPS as u64 + 1);
}

fn file_config(backend: SocketAddr) -> String {
    format!(
        "workload: {{ name: file-client }}\n\
         listeners:\n  - {{ name: out, address: \"{{LISTEN}}\", direction: outbound, mode: fixed, target: svc }}\n\
         services:\n  - {{ name: svc, ports: [{{ port: 80 }}] }}\n\
         backends:\n  - {{ name: svc, endpoints: [{{ address: \"{backend}\" }}] }}\n"
    )
}

#[tokio::test]
async fn file_watcher_applies_good_files_and_keeps_the_last_good_config() {
    let a = echo_server("file-a").await;
    let b = echo_server("file-b").await;
    let bin = Binary::start("watch", &file_config(a), &[]).await;
    let served_by = || async {
        let r = request(bin.listener, "GET", "/", b"").await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.served_by().to_owned()
    };
    assert_eq!(served_by().await, "file-a");
    assert_eq!(bin.config_version().await, 1);

    // A good file replaces the config.
    bin.rewrite_config(&file_config(b));
    eventually("the rewritten file to move traffic to file-b", || async {
        (served_by().await == "file-b").then_some(())
    })
    .await;
    assert_eq!(bin.config_version().await, 2);

    // A file that is not YAML is refused, and the old config stays.
    let before = refused(&bin.scrape().await);
    bin.rewrite_config("listeners: [ { name: out, address\n  this is: [not yaml\n");
    eventually("the broken file to be refused", || async {
        (refused(&bin.scrape().await) > before).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_eq!(
            served_by().await,
            "file-b",
            "a broken file changed the routing"
        );
    }
    assert_eq!(bin.config_version().await, 2);
    assert!(
        bin.stderr().contains("config file is invalid"),
        "no warning logged:\n{}",
        bin.stderr()
    );

    // So is valid YAML that breaks a rule: a route to a backend that does
    // not exist.
    let before = refused(&bin.scrape().await);
    let invalid = file_config(a).replace(
        "  - { name: svc, ports: [{ port: 80 }] }",
        "  - { name: svc, ports: [{ port: 80 }], routes: [{ name: r, rules: [{ backendRefs: [{ name: missing }] }] }] }",
    );
    assert!(invalid.contains("missing"));
    bin.rewrite_config(&invalid);
    eventually("the invalid config to be refused", || async {
        (refused(&bin.scrape().await) > before).then_some(())
    })
    .await;
    assert_eq!(served_by().await, "file-b");
    assert_eq!(bin.config_version().await, 2);

    // And a good file after a bad one applies again.
    bin.rewrite_config(&file_config(a));
    eventually("the fixed file to move traffic back to file-a", || async {
        (served_by().await == "file-a").then_some(())
    })
    .await;
    assert_eq!(bin.config_version().await, 3);
}

/// `trellis_config_updates_total{result="refused"}` in a scrape.
fn refused(text: &str) -> f64 {
    sample(
        text,
        "trellis_config_updates_total",
        &[("result", "refused")],
    )
}

/// An HTTP/1.1 and h2c upstream that holds every request until `release` turns true, then
/// answers 200 `slow`. `arrived` counts requests that reached it.
async fn gated_server(arrived: Arc<AtomicUsize>, release: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (arrived, release) = (arrived.clone(), release.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let mut release = release.clone();
                    arrived.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _ = release.wait_for(|r| *r).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"slow"))))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    // Held requests: this many HTTP/1.1 ones, each on its own connection,
    // and as many streams on one h2c connection.
    const IN_FLIGHT: usize = 4;
    let arrived = Arc::new(AtomicUsize::new(0));
    let (release, release_rx) = watch::channel(false);
    let slow = gated_server(arrived.clone(), release_rx).await;
    // A drain timeout far beyond the test's patience: an exit within the
    // patience means the drain finished, not that it gave up.
    let mut bin = Binary::start("drain", &file_config(slow), &["--drain-timeout", "120s"]).await;

    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let addr = bin.listener;
            tokio::spawn(async move { request(addr, "GET", &format!("/slow/{i}"), b"").await })
        })
        .collect();
    let h2 = h2_client(bin.listener).await;
    let streams: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let mut h2 = h2.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://svc/slow/h2/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = h2.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((status, body.to_bytes()))
            })
        })
        .collect();
    drop(h2);
    eventually("all requests to reach the slow upstream", || {
        let n = arrived.load(Ordering::SeqCst);
        async move { (n == 2 * IN_FLIGHT).then_some(()) }
    })
    .await;

    bin.sigterm();

    // While the requests are held, the proxy reports not ready...
    eventually("readiness to report 503 while draining", || async {
        let r = request(bin.health, "GET", "/healthz/ready", b"")
            .await
            .ok()?;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let live = request(bin.health, "GET", "/healthz/live", b"")
        .await
        .unwrap();
    assert_eq!(
        live.status,
        StatusCode::OK,
        "liveness must hold during a drain"
    );
    // ...and refuses new connections.
    eventually("the listener to refuse new connections", || async {
        match tokio::net::TcpStream::connect(bin.listener).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        bin.wait_exit(std::time::Duration::from_millis(1))
            .await
            .is_none(),
        "the proxy exited with requests still in flight"
    );

    release.send_replace(true);
    for (i, r) in requests.into_iter().enumerate() {
        let r = r.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("in-flight request {i} failed during the drain: {e}"));
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "slow"),
            "request {i}"
        );
    }
    for (i, r) in streams.into_iter().enumerate() {
        let (status, body) = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight h2 stream {i} failed during the drain: {e}"));
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"slow"[..]),
            "h2 stream {i}"
        );
    }
    let status = bin
        .wait_exit(PATIENCE)
        .await
        .expect("the proxy did not exit after its last request finished");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let log = bin.stderr();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("drained"), "{log}");
    assert!(!log.contains("drain timeout passed"), "{log}");
}

/// An upstream that accepts any HTTP/1.1 upgrade with 101 and then echoes
/// raw bytes.
async fn upgrade_echo_server() -> SocketAddr {
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
                let switched = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: test-echo\r\n\r\n";
                if s.write_all(switched).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Reads exactly `n` bytes or fails the test after the patience.
async fn read_n(s: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .expect("nothing came back through the upgraded connection")
        .expect("the upgraded connection broke");
    buf
}

/// An upgraded connection (WebSocket and the like) is a connection in
/// flight like any other: a drain lets it run until it ends or the drain
/// timeout passes, and the process does not exit under it.
#[tokio::test]
async fn sigterm_lets_upgraded_connections_finish() {
    let upstream = upgrade_echo_server().await;
    let mut bin = Binary::start(
        "drain-upgrade",
        &file_config(upstream),
        &["--drain-timeout", "120s"],
    )
    .await;

    let mut s = tokio::net::TcpStream::connect(bin.listener).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: test-echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        head.extend(read_n(&mut s, 1).await);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    s.write_all(b"before").await.unwrap();
    assert_eq!(read_n(&mut s, 6).await, b"before");

    bin.sigterm();
    // Draining, not gone: readiness says 503 and the process stays.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let exited = loop {
        if let Some(status) = bin.wait_exit(std::time::Duration::from_millis(20)).await {
            break Some(status);
        }
        let ready = request(bin.health, "GET", "/healthz/ready", b"").await;
        if ready.is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE) {
            break None;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never reported 503 after SIGTERM"
        );
    };
    if let Some(status) = exited {
        panic!(
            "the proxy exited ({status}) on SIGTERM with an upgraded connection open; \
             drain did not wait for it"
        );
    }

    // Still carrying bytes in both directions during the drain...
    s.write_all(b"during")
        .await
        .unwrap_or_else(|e| panic!("the upgraded connection was cut when the drain started: {e}"));
    let mut buf = [0u8; 6];
    let echoed = tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
        .await
        .unwrap();
    assert!(
        echoed.is_ok() && &buf == b"during",
        "the upgraded connection was cut when the drain started: {echoed:?}"
    );

    // ...and once the client closes it, the drain is done.
    drop(s);
    let status = bin
        .wait_exit(PATIENCE)
        .await
        .expect("the proxy did not exit after its last connection closed");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        !bin.stderr().contains("drain timeout passed"),
        "{}",
        bin.stderr()
    );
}

/// kubelet's probes, rewritten by the injector to the health port, reach
/// the app from inside the pod: the app's answer decides, and the probe
/// that cannot pass says what it saw.
#[tokio::test]
async fn the_health_port_runs_the_apps_probes_for_kubelet() {
    let app = echo_server("app").await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let probes = serde_json::json!({
        "/app-health/web/readyz": { "httpGet": { "path": "/healthz", "port": app.port() } },
        "/app-health/web/livez": { "tcpSocket": { "port": app.port() } },
        "/app-health/db/readyz": { "tcpSocket": { "port": closed_port } },
    })
    .to_string();
    let yaml = "listeners:\n  - { name: out, address: \"{LISTEN}\", direction: outbound, mode: fixed, target: svc }\n\
                services:\n  - { name: svc, ports: [{ port: 80 }] }\n\
                backends:\n  - { name: svc, endpoints: [] }\n";
    let bin = Binary::start(
        "app-probes",
        yaml,
        &["--app-probes", &probes, "--pod-ip", "127.0.0.1"],
    )
    .await;
    let ready = request(bin.health, "GET", "/app-health/web/readyz", b"")
        .await
        .unwrap();
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
    let live = request(bin.health, "GET", "/app-health/web/livez", b"")
        .await
        .unwrap();
    assert_eq!(live.status, StatusCode::OK, "{}", live.body);
    let db = request(bin.health, "GET", "/app-health/db/readyz", b"")
        .await
        .unwrap();
    assert_eq!(db.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        db.body
            .starts_with(&format!("tcp 127.0.0.1:{closed_port}: ")),
        "{}",
        db.body
    );
    let none = request(bin.health, "GET", "/app-health/nobody/readyz", b"")
        .await
        .unwrap();
    assert_eq!(none.status, StatusCode::NOT_FOUND);
}

/// A probe list the proxy cannot run stops it at start, named.
#[tokio::test]
async fn unrunnable_app_probes_stop_the_proxy_at_start() {
    let dir = common::temp_dir("bad-probes");
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, "listeners: []\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--health-addr", "127.0.0.1:0"])
        .env(
            "TRELLIS_APP_PROBES",
            r#"{"/app-health/web/readyz": {"exec": {"command": ["true"]}}}"#,
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TRELLIS_APP_PROBES is not a JSON object of probes"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `exec`"), "{stderr}");
}
