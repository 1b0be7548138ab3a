//! Telemetry after known traffic: request and TCP metrics with their
//! labels, the health and admin endpoints, and JSON access logs.
//!
//! The Prometheus recorder is process-wide, so every test here uses its own
//! service, workload and listener names and its label sets never mix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{Binary, eventually, request, send_on};
use http::StatusCode;
use proxy::testutil::{echo_server, h1_client, proxy, sample, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HTTP_CONFIG: &str = "\
workload: { name: metrics-client, namespace: metrics-ns }
listeners:
  - { name: metrics-http-out, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: metrics-http-svc }
services:
  - name: metrics-http-svc
    ports: [{ port: 80 }]
    routes:
      - name: metrics-route
        rules:
          - matches: [{ path: { type: PathPrefix, value: /api } }]
            backendRefs: [{ name: metrics-http-backend }]
backends:
  - name: metrics-http-backend
    endpoints: [{ address: \"{ECHO}\", workload: metrics-echo-v1 }]
";

#[tokio::test]
async fn request_metrics_match_known_traffic() {
    let echo = echo_server("metrics-echo").await;
    let p = proxy(HTTP_CONFIG, &[("ECHO", echo.to_string())]).await;
    let addr = p.listener_addr("metrics-http-out").unwrap();

    // All on one keep-alive connection: 7 GETs and 3 POSTs that match the
    // route, then one request that matches no rule.
    let mut conn = h1_client(addr).await;
    let mut request_bytes = 0;
    let mut response_bytes = 0;
    for i in 0..7 {
        let r = send_on(&mut conn, "GET", &format!("/api/items/{i}"), b"")
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        response_bytes += r.body.len();
    }
    for size in [100, 250, 1000] {
        let body = vec![b'x'; size];
        let r = send_on(&mut conn, "POST", "/api/items", &body)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        request_bytes += size;
        response_bytes += r.body.len();
    }
    let miss = send_on(&mut conn, "GET", "/nomatch", b"").await.unwrap();
    assert_eq!(miss.status, StatusCode::NOT_FOUND, "{}", miss.body);

    let common = [
        ("direction", "outbound"),
        ("source_workload", "metrics-client"),
        ("source_namespace", "metrics-ns"),
        ("destination_service", "metrics-http-svc"),
        ("tls", "false"),
    ];
    let ok: Vec<_> = common
        .iter()
        .copied()
        .chain([
            ("destination_workload", "metrics-echo-v1"),
            ("route", "metrics-route"),
            ("response_code", "200"),
            ("grpc_status", ""),
        ])
        .collect();
    let not_found: Vec<_> = common
        .iter()
        .copied()
        .chain([
            ("destination_workload", ""),
            ("route", ""),
            ("response_code", "404"),
        ])
        .collect();
    // Records are written when a response ends, which can be a moment
    // after the client has it.
    let text = eventually("11 requests in the metrics", || async {
        let text = scrape(&p).await;
        let total = sample(&text, "trellis_requests_total", &common);
        (total >= 11.0).then_some(text)
    })
    .await;
    let v = |metric: &str, labels: &[(&str, &str)]| sample(&text, metric, labels);
    let all = format!("metrics:\n{text}");

    assert_eq!(v("trellis_requests_total", &common), 11.0, "{all}");
    assert_eq!(v("trellis_requests_total", &ok), 10.0, "{all}");
    assert_eq!(v("trellis_requests_total", &not_found), 1.0, "{all}");
    assert_eq!(
        v("trellis_request_duration_seconds_count", &ok),
        10.0,
        "{all}"
    );
    assert_eq!(
        v("trellis_request_duration_seconds_count", &not_found),
        1.0,
        "{all}"
    );
    assert!(
        v("trellis_request_duration_seconds_sum", &ok) > 0.0,
        "{all}"
    );
    let inf: Vec<_> = ok.iter().copied().chain([("le", "+Inf")]).collect();
    assert_eq!(
        v("trellis_request_duration_seconds_bucket", &inf),
        10.0,
        "{all}"
    );
    assert_eq!(v("trellis_request_bytes_count", &ok), 10.0, "{all}");
    assert_eq!(
        v("trellis_request_bytes_sum", &ok),
        request_bytes as f64,
        "{all}"
    );
    assert_eq!(v("trellis_request_bytes_sum", &not_found), 0.0, "{all}");
    assert_eq!(v("trellis_response_bytes_count", &ok), 10.0, "{all}");
    assert_eq!(
        v("trellis_response_bytes_sum", &ok),
        response_bytes as f64,
        "{all}"
    );
    assert_eq!(
        v("trellis_response_bytes_sum", &not_found),
        miss.body.len() as f64,
        "{all}"
    );
    assert_eq!(
        v(
            "trellis_downstream_connections_total",
            &[("listener", "metrics-http-out"), ("protocol", "http1")]
        ),
        1.0,
        "{all}"
    );
}

const TCP_CONFIG: &str = "\
workload: { name: metrics-tcp-client }
listeners:
  - { name: metrics-tcp-declared, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: metrics-tcp-svc, protocol: tcp }
  - { name: metrics-tcp-detected, address: 127.0.0.1:0, direction: outbound, mode: fixed, target: metrics-tcp-svc }
services:
  - { name: metrics-tcp-svc, ports: [{ port: 9000 }] }
backends:
  - name: metrics-tcp-svc
    endpoints: [{ address: \"{ECHO}\", workload: metrics-tcp-echo }]
";

/// Sends `n` bytes that are not HTTP, reads the echo, half-closes and
/// waits for the proxy to close.
async fn tcp_round_trip(addr: SocketAddr, n: usize) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    s.write_all(&data).await.unwrap();
    let mut back = vec![0; n];
    tokio::time::timeout(common::PATIENCE, s.read_exact(&mut back))
        .await
        .expect("no echo through the TCP proxy")
        .unwrap();
    assert_eq!(back, data);
    s.shutdown().await.unwrap();
    let (rest, end) = common::read_to_end(&mut s, common::PATIENCE).await;
    assert_eq!((rest.as_str(), end), ("", common::End::Closed));
}

#[tokio::test]
async fn tcp_metrics_count_opaque_connections() {
    let echo = common::tcp_echo_server().await;
    let p = proxy(TCP_CONFIG, &[("ECHO", echo.to_string())]).await;
    // One listener declares TCP; the other detects it from the first bytes.
    tcp_round_trip(p.listener_addr("metrics-tcp-declared").unwrap(), 1000).await;
    tcp_round_trip(p.listener_addr("metrics-tcp-detected").unwrap(), 500).await;

    let labels = [
        ("direction", "outbound"),
        ("source_workload", "metrics-tcp-client"),
        ("source_namespace", "default"),
        ("destination_service", "metrics-tcp-svc"),
        ("destination_workload", "metrics-tcp-echo"),
        ("tls", "false"),
    ];
    let text = eventually("both TCP connections to be recorded as closed", || async {
        let text = scrape(&p).await;
        (sample(&text, "trellis_tcp_connections_closed_total", &labels) >= 2.0).then_some(text)
    })
    .await;
    let v = |metric: &str, labels: &[(&str, &str)]| sample(&text, metric, labels);
    let all = format!("metrics:\n{text}");
    assert_eq!(
        v("trellis_tcp_connections_opened_total", &labels),
        2.0,
        "{all}"
    );
    assert_eq!(
        v("trellis_tcp_connections_closed_total", &labels),
        2.0,
        "{all}"
    );
    assert_eq!(v("trellis_tcp_sent_bytes_total", &labels), 1500.0, "{all}");
    assert_eq!(
        v("trellis_tcp_received_bytes_total", &labels),
        1500.0,
        "{all}"
    );
    assert_eq!(
        v(
            "trellis_downstream_connections_total",
            &[("listener", "metrics-tcp-detected"), ("protocol", "tcp")]
        ),
        1.0,
        "{all}"
    );
    assert_eq!(
        v(
            "trellis_downstream_connections_total",
            &[("listener", "metrics-tcp-declared"), ("protocol", "tcp")]
        ),
        1.0,
        "{all}"
    );
}

#[tokio::test]
async fn health_and_config_dump_endpoints() {
    let echo = echo_server("health-echo").await;
    let yaml = proxy::testutil::fixed_config(&[echo])
        .replace("name: svc", "name: health-svc")
        .replace("target: svc", "target: health-svc")
        .replace("name: out", "name: health-out");
    let p = proxy(
        &format!("workload: {{ name: health-client, namespace: health-ns }}\n{yaml}"),
        &[],
    )
    .await;

    let live = request(p.health_addr(), "GET", "/healthz/live", b"")
        .await
        .unwrap();
    assert_eq!((live.status, live.body.trim()), (StatusCode::OK, "live"));
    let ready = request(p.health_addr(), "GET", "/healthz/ready", b"")
        .await
        .unwrap();
    assert_eq!((ready.status, ready.body.trim()), (StatusCode::OK, "ready"));
    let other = request(p.health_addr(), "GET", "/nope", b"").await.unwrap();
    assert_eq!(other.status, StatusCode::NOT_FOUND);

    let dump = |r: common::Reply| -> serde_json::Value {
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.headers["content-type"], "application/json");
        serde_json::from_str(&r.body).unwrap()
    };
    let d = dump(
        request(p.admin_addr(), "GET", "/config_dump", b"")
            .await
            .unwrap(),
    );
    assert_eq!(d["version"], 1, "{d:#}");
    assert_eq!(d["config"]["workload"]["name"], "health-client", "{d:#}");
    assert_eq!(d["config"]["workload"]["namespace"], "health-ns", "{d:#}");
    assert_eq!(d["config"]["services"][0]["name"], "health-svc", "{d:#}");
    assert_eq!(
        d["config"]["backends"][0]["endpoints"][0]["address"],
        echo.to_string(),
        "{d:#}"
    );

    // An update shows up in the dump with the next version.
    let other_echo = echo_server("health-echo-2").await;
    let next = yaml.replace(&echo.to_string(), &other_echo.to_string());
    let next = format!("workload: {{ name: health-client, namespace: health-ns }}\n{next}");
    p.update(mesh_api::ProxyConfig::from_yaml(&next).unwrap())
        .await
        .unwrap();
    let d = dump(
        request(p.admin_addr(), "GET", "/config_dump", b"")
            .await
            .unwrap(),
    );
    assert_eq!(d["version"], 2, "{d:#}");
    assert_eq!(
        d["config"]["backends"][0]["endpoints"][0]["address"],
        other_echo.to_string(),
        "{d:#}"
    );
    // A refused update leaves both.
    let mut bad = mesh_api::ProxyConfig::from_yaml(&next).unwrap();
    bad.services[0].backend = Some("missing".into());
    assert!(p.update(bad).await.is_err());
    let d = dump(
        request(p.admin_addr(), "GET", "/config_dump", b"")
            .await
            .unwrap(),
    );
    assert_eq!(d["version"], 2, "{d:#}");

    // Draining: not ready, still live.
    assert!(p.shutdown().await, "an idle proxy must drain at once");
    let ready = request(p.health_addr(), "GET", "/healthz/ready", b"")
        .await
        .unwrap();
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );
    let live = request(p.health_addr(), "GET", "/healthz/live", b"")
        .await
        .unwrap();
    assert_eq!(live.status, StatusCode::OK);
}

const LOG_CONFIG: &str = "\
workload: { name: log-client }
listeners:
  - { name: out, address: \"{LISTEN}\", direction: outbound, mode: fixed, target: log-svc }
services:
  - name: log-svc
    ports: [{ port: 80 }]
    routes:
      - name: log-route
        rules:
          - backendRefs: [{ name: log-backend }]
backends:
  - name: log-backend
    endpoints: [{ address: \"{ECHO}\", workload: log-echo }]
";

#[tokio::test]
async fn access_log_writes_one_json_line_per_request_when_enabled() {
    let echo = echo_server("log-echo").await;
    let yaml = LOG_CONFIG.replace("{ECHO}", &echo.to_string());
    let bin = Binary::start("access-log", &yaml, &["--access-log"]).await;

    let get = request(bin.listener, "GET", "/logged?x=1", b"")
        .await
        .unwrap();
    assert_eq!(get.status, StatusCode::OK, "{}", get.body);
    let post = request(bin.listener, "POST", "/logged", &[b'p'; 42])
        .await
        .unwrap();
    assert_eq!(post.status, StatusCode::OK, "{}", post.body);

    let lines = eventually("two access log lines on stdout", || async {
        let out = bin.stdout();
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |m: &str| {
        entries
            .iter()
            .find(|e| e["method"] == m)
            .unwrap_or_else(|| panic!("no {m} line in {lines:#?}"))
    };
    let g = find("GET");
    assert_eq!(g["path"], "/logged?x=1", "{g:#}");
    assert_eq!(g["response_code"], 200, "{g:#}");
    assert_eq!(g["upstream_host"], echo.to_string(), "{g:#}");
    assert!(g["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{g:#}");
    assert_eq!(g["direction"], "outbound", "{g:#}");
    assert_eq!(g["destination_service"], "log-svc", "{g:#}");
    assert_eq!(g["destination_workload"], "log-echo", "{g:#}");
    assert_eq!(g["route"], "log-route", "{g:#}");
    assert_eq!(g["source_workload"], "log-client", "{g:#}");
    assert_eq!(g["protocol"], "HTTP/1.1", "{g:#}");
    assert_eq!(g["bytes_received"], 0, "{g:#}");
    assert_eq!(g["bytes_sent"], get.body.len(), "{g:#}");
    assert!(
        g["timestamp"].as_str().is_some_and(|t| !t.is_empty()),
        "{g:#}"
    );
    let p = find("POST");
    assert_eq!(p["path"], "/logged", "{p:#}");
    assert_eq!(p["response_code"], 200, "{p:#}");
    assert_eq!(p["bytes_received"], 42, "{p:#}");
    assert_eq!(p["bytes_sent"], post.body.len(), "{p:#}");
}

#[tokio::test]
async fn access_log_is_off_by_default() {
    let echo = echo_server("nolog-echo").await;
    let yaml = LOG_CONFIG.replace("{ECHO}", &echo.to_string());
    let bin = Binary::start("no-access-log", &yaml, &[]).await;
    let r = request(bin.listener, "GET", "/quiet", b"").await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The access log line and the metrics are written at the same moment
    // (when the request's record is dropped), so once the request is
    // counted, a line would be there.
    eventually("the request to be counted", || async {
        let text = bin.scrape().await;
        (sample(&text, "trellis_requests_total", &[("route", "log-route")]) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(bin.stdout(), "", "stdout without --access-log");
}
