use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use super::*;

/// An app that answers by path: `/ok` 200, `/moved` 302, `/broken` 500,
/// `/slow` after 3 s, `/header` 200 only with `x-probe: yes` and the
/// Host the probe set.
async fn app(tls: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.then(|| {
        let cert = rcgen::generate_simple_self_signed(vec!["app.local".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let status = match req.uri().path() {
                        "/ok" => StatusCode::OK,
                        "/moved" => StatusCode::FOUND,
                        "/broken" => StatusCode::INTERNAL_SERVER_ERROR,
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            StatusCode::OK
                        }
                        "/header" => {
                            let h = req.headers();
                            let ok = h.get("x-probe").is_some_and(|v| v == "yes")
                                && h.get(header::HOST).is_some_and(|v| v == "app.example");
                            if ok {
                                StatusCode::OK
                            } else {
                                StatusCode::BAD_REQUEST
                            }
                        }
                        _ => StatusCode::NOT_FOUND,
                    };
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    addr
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

fn probes(json: serde_json::Value) -> AppProbes {
    AppProbes::parse(&json.to_string(), Some("127.0.0.1".parse().unwrap())).unwrap()
}

fn http(port: u16, path: &str) -> serde_json::Value {
    serde_json::json!({ "httpGet": { "path": path, "port": port, "scheme": "HTTP" } })
}

async fn run(p: &AppProbes, path: &str) -> Result<String, String> {
    p.run(path).await.expect("a probe at the path")
}

#[tokio::test]
async fn http_probes_pass_on_2xx_and_3xx_and_fail_otherwise() {
    let port = app(false).await.port();
    let p = probes(serde_json::json!({
        "/app-health/web/readyz": http(port, "/ok"),
        "/app-health/web/livez": http(port, "/moved"),
        "/app-health/web/startupz": http(port, "/broken"),
        "/app-health/other/readyz": http(port, "/missing"),
    }));
    assert!(
        run(&p, "/app-health/web/readyz")
            .await
            .unwrap()
            .ends_with(": 200")
    );
    assert!(
        run(&p, "/app-health/web/livez")
            .await
            .unwrap()
            .ends_with(": 302")
    );
    let broken = run(&p, "/app-health/web/startupz").await.unwrap_err();
    assert!(
        broken.contains(&format!("GET http://127.0.0.1:{port}/broken: 500")),
        "{broken}"
    );
    assert!(
        run(&p, "/app-health/other/readyz")
            .await
            .unwrap_err()
            .ends_with(": 404")
    );
    assert!(p.run("/app-health/nobody/readyz").await.is_none());
}

#[tokio::test]
async fn http_probes_send_the_probe_headers_and_host() {
    let port = app(false).await.port();
    let p = probes(serde_json::json!({
        "/app-health/web/readyz": { "httpGet": {
            "path": "/header", "port": port,
            "httpHeaders": [{ "name": "X-Probe", "value": "yes" }, { "name": "Host", "value": "app.example" }],
        }},
        "/app-health/web/livez": http(port, "/header"),
    }));
    run(&p, "/app-health/web/readyz").await.unwrap();
    assert!(
        run(&p, "/app-health/web/livez")
            .await
            .unwrap_err()
            .ends_with(": 400")
    );
}

#[tokio::test]
async fn https_probes_accept_any_certificate_as_kubelet_does() {
    let port = app(true).await.port();
    let p = probes(serde_json::json!({
        "/app-health/web/readyz": { "httpGet": { "path": "/ok", "port": port, "scheme": "HTTPS" } },
        "/app-health/web/livez": { "httpGet": { "path": "/broken", "port": port, "scheme": "HTTPS" } },
    }));
    let ok = run(&p, "/app-health/web/readyz").await.unwrap();
    assert!(ok.starts_with("GET https://"), "{ok}");
    assert!(
        run(&p, "/app-health/web/livez")
            .await
            .unwrap_err()
            .ends_with(": 500")
    );
}

#[tokio::test]
async fn a_slow_app_fails_the_probe_at_its_timeout() {
    let port = app(false).await.port();
    let mut slow = http(port, "/slow");
    slow["timeoutSeconds"] = 1.into();
    let p = probes(serde_json::json!({ "/app-health/web/readyz": slow }));
    let started = std::time::Instant::now();
    let why = run(&p, "/app-health/web/readyz").await.unwrap_err();
    assert!(why.contains("no answer within 1s"), "{why}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn tcp_probes_pass_when_the_port_accepts() {
    let open = app(false).await.port();
    let closed = closed_port().await;
    let p = probes(serde_json::json!({
        "/app-health/db/readyz": { "tcpSocket": { "port": open } },
        "/app-health/db/livez": { "tcpSocket": { "port": closed } },
    }));
    assert!(
        run(&p, "/app-health/db/readyz")
            .await
            .unwrap()
            .ends_with("connected")
    );
    let why = run(&p, "/app-health/db/livez").await.unwrap_err();
    assert!(
        why.starts_with(&format!("tcp 127.0.0.1:{closed}: ")),
        "{why}"
    );
}

#[tokio::test]
async fn grpc_probes_ask_the_health_service() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("shop.Orders", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let p = probes(serde_json::json!({
        "/app-health/cart/readyz": { "grpc": { "port": port, "service": "shop.Cart" } },
        "/app-health/orders/readyz": { "grpc": { "port": port, "service": "shop.Orders" } },
        "/app-health/nobody/readyz": { "grpc": { "port": port, "service": "shop.Nobody" } },
    }));
    assert!(
        run(&p, "/app-health/cart/readyz")
            .await
            .unwrap()
            .ends_with("SERVING")
    );
    let why = run(&p, "/app-health/orders/readyz").await.unwrap_err();
    assert!(why.ends_with("NOT_SERVING"), "{why}");
    let why = run(&p, "/app-health/nobody/readyz").await.unwrap_err();
    assert!(why.contains("NotFound"), "{why}");
}

#[test]
fn probes_go_to_the_pod_ip_unless_they_name_a_host() {
    let p = AppProbes::parse(
        r#"{"/app-health/a/readyz": {"tcpSocket": {"port": 80}},
            "/app-health/b/readyz": {"tcpSocket": {"port": 80, "host": "10.0.0.9"}},
            "/app-health/c/readyz": {"httpGet": {"port": 8080, "host": "fd00::1"}}}"#,
        Some("198.18.0.7".parse().unwrap()),
    )
    .unwrap();
    let shown = |path: &str| p.probes[path].action.to_string();
    assert_eq!(shown("/app-health/a/readyz"), "tcp 198.18.0.7:80");
    assert_eq!(shown("/app-health/b/readyz"), "tcp 10.0.0.9:80");
    assert_eq!(shown("/app-health/c/readyz"), "GET http://[fd00::1]:8080/");
    assert_eq!(p.probes["/app-health/a/readyz"].timeout, DEFAULT_TIMEOUT);
}

#[test]
fn a_probe_the_proxy_cannot_run_is_refused_with_its_path() {
    let refused = |json: &str| AppProbes::parse(json, None).unwrap_err().to_string();
    assert!(refused("[]").starts_with("TRELLIS_APP_PROBES is not a JSON object"));
    let e = refused(r#"{"/app-health/a/readyz": {"exec": {"command": ["true"]}}}"#);
    assert!(e.contains("unknown field `exec`"), "{e}");
    let e = refused(r#"{"/app-health/a/readyz": {}}"#);
    assert_eq!(
        e,
        "TRELLIS_APP_PROBES /app-health/a/readyz: needs exactly one of httpGet, tcpSocket, grpc"
    );
    let e = refused(r#"{"/app-health/a/readyz": {"httpGet": {"port": 80, "scheme": "FTP"}}}"#);
    assert!(e.ends_with(r#"scheme "FTP" is not HTTP or HTTPS"#), "{e}");
    let e = refused(r#"{"/healthz/ready": {"tcpSocket": {"port": 80}}}"#);
    assert!(e.contains("does not start with /app-health/"), "{e}");
    let e = refused(r#"{"/app-health/a/readyz": {"tcpSocket": {"port": "http"}}}"#);
    assert!(e.contains("invalid type"), "{e}");
    let e = refused(
        r#"{"/app-health/a/readyz": {"httpGet": {"port": 80, "httpHeaders": [{"name": "bad name", "value": "x"}]}}}"#,
    );
    assert!(e.contains(r#"header "bad name""#), "{e}");
}

/// Exactly what the injector's `mutate()` writes (its tests hold the same
/// text): the injector may not depend on the proxy, so the contract is
/// checked from this side.
#[test]
fn the_probes_the_injector_writes_are_runnable() {
    let written = r#"{"/app-health/reviews/livez":{"tcpSocket":{"port":9080},"timeoutSeconds":3},"/app-health/reviews/readyz":{"httpGet":{"path":"/health","port":9080},"timeoutSeconds":null},"/app-health/reviews/startupz":{"grpc":{"port":9090},"timeoutSeconds":null}}"#;
    let p = AppProbes::parse(written, None).unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(
        p.probes["/app-health/reviews/livez"].timeout,
        Duration::from_secs(3)
    );
    assert_eq!(
        p.probes["/app-health/reviews/startupz"].action.to_string(),
        r#"grpc health 127.0.0.1:9090 service """#
    );
}
