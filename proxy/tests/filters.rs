//! Route filters through real sockets, against an echo backend that
//! reports what it received: header modifiers, redirects, URL rewrites,
//! backend-level filters, an unsupported filter's 500, and routes bound
//! to one port of a service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxy::Proxy;
use proxy::testutil::{echo_server, h1_client, proxy};

/// An explicit-mode listener (the authority picks service and port) and
/// service `shop` with ports 80 and 8080, whose routes bind port 80 only.
const CONFIG: &str = r#"
listeners:
  - { name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }
services:
  - name: shop
    ports: [{ port: 80, backend: plain }, { port: 8080, backend: plain }]
    routes:
      - name: shop-filters
        ports: [80]
        rules:
          - matches: [{ path: { value: /headers } }]
            filters:
              - requestHeaderModifier:
                  set: [{ name: x-set, value: set-by-route }]
                  add: [{ name: x-add, value: added }]
                  remove: [x-drop]
              - responseHeaderModifier:
                  set: [{ name: x-resp-set, value: "1" }]
                  add: [{ name: x-resp-add, value: route }]
                  remove: [x-served-by]
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /old } }]
            filters:
              - urlRewrite:
                  hostname: rewritten.example
                  path: { replacePrefixMatch: /new }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { type: Exact, value: /full } }]
            filters:
              - urlRewrite: { path: { replaceFullPath: /replaced } }
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /moved } }]
            filters:
              - requestRedirect:
                  scheme: https
                  hostname: example.org
                  path: { replacePrefixMatch: /here }
                  statusCode: 301
            backendRefs: [{ name: echo }]
          - matches: [{ path: { value: /same-host } }]
            filters:
              - requestRedirect: { path: { replaceFullPath: /elsewhere } }
          - matches: [{ path: { value: /per-backend } }]
            backendRefs:
              - name: echo
                filters:
                  - requestHeaderModifier: { set: [{ name: x-backend, value: echo }] }
          - matches: [{ path: { value: /cors } }]
            filters:
              - unsupported: the CORS filter is not supported
            backendRefs: [{ name: echo }]
backends:
  - { name: echo, endpoints: [{ address: "{ECHO}" }] }
  - { name: plain, endpoints: [{ address: "{PLAIN}" }] }
"#;

async fn shop() -> std::sync::Arc<Proxy> {
    let vars = [
        ("ECHO", echo_server("echo").await.to_string()),
        ("PLAIN", echo_server("plain").await.to_string()),
    ];
    proxy(CONFIG, &vars).await
}

struct Seen {
    status: StatusCode,
    headers: http::HeaderMap,
    /// The echo's JSON, or `Null` for a body that is not JSON.
    echo: serde_json::Value,
    body: String,
}

async fn send(p: &Proxy, authority: &str, path: &str, headers: &[(&str, &str)]) -> Seen {
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let mut req = Request::get(format!("http://{authority}{path}")).header("host", authority);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
    Seen {
        status: parts.status,
        headers: parts.headers,
        echo: serde_json::from_str(&body).unwrap_or_default(),
        body,
    }
}

#[tokio::test]
async fn request_and_response_headers_are_set_added_and_removed() {
    let p = shop().await;
    let seen = send(
        &p,
        "shop:80",
        "/headers",
        &[
            ("x-set", "from-client"),
            ("x-add", "from-client"),
            ("x-drop", "secret"),
            ("x-echo-header", "x-resp-add=upstream"),
        ],
    )
    .await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.body);
    let h = &seen.echo["headers"];
    assert_eq!(
        h["x-set"], "set-by-route",
        "set replaces the client's value"
    );
    assert!(h.get("x-drop").is_none(), "x-drop is removed: {h}");
    let add: Vec<_> = seen.headers.get_all("x-resp-add").iter().collect();
    assert_eq!(add, ["upstream", "route"], "add appends to the upstream's");
    assert_eq!(seen.headers["x-resp-set"], "1");
    assert!(
        seen.headers.get("x-served-by").is_none(),
        "removed from the response"
    );
}

#[tokio::test]
async fn an_added_request_header_keeps_the_clients_value() {
    let p = shop().await;
    let seen = send(&p, "shop:80", "/headers", &[("x-add", "from-client")]).await;
    let values: Vec<&str> = seen.echo["header_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pair| pair[0] == "x-add")
        .map(|pair| pair[1].as_str().unwrap())
        .collect();
    assert_eq!(values, ["from-client", "added"]);
}

#[tokio::test]
async fn url_rewrite_changes_host_and_path_the_backend_sees() {
    let p = shop().await;
    let seen = send(&p, "shop:80", "/old/item?id=7", &[]).await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.body);
    assert_eq!(seen.echo["path"], "/new/item?id=7");
    assert_eq!(seen.echo["headers"]["host"], "rewritten.example");
    let seen = send(&p, "shop:80", "/old", &[]).await;
    assert_eq!(seen.echo["path"], "/new");
    let seen = send(&p, "shop:80", "/full?q=1", &[]).await;
    assert_eq!(seen.echo["path"], "/replaced?q=1");
    assert_eq!(seen.echo["headers"]["host"], "shop:80", "host untouched");
}

#[tokio::test]
async fn redirects_answer_without_forwarding() {
    let p = shop().await;
    let seen = send(&p, "shop:80", "/moved/a/b?x=1", &[]).await;
    assert_eq!(seen.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(seen.headers["location"], "https://example.org/here/a/b?x=1");
    assert!(
        seen.headers.get("x-served-by").is_none(),
        "no backend was called"
    );
    // Unset parts keep the request's; 302 is the default status.
    let seen = send(&p, "shop:80", "/same-host", &[]).await;
    assert_eq!(seen.status, StatusCode::FOUND);
    assert_eq!(seen.headers["location"], "http://shop/elsewhere");
}

#[tokio::test]
async fn backend_filters_apply_to_that_backend() {
    let p = shop().await;
    let seen = send(&p, "shop:80", "/per-backend", &[]).await;
    assert_eq!(seen.echo["headers"]["x-backend"], "echo");
    let other = send(&p, "shop:80", "/headers", &[]).await;
    assert!(other.echo["headers"].get("x-backend").is_none());
}

#[tokio::test]
async fn an_unsupported_filter_answers_500_naming_it() {
    let p = shop().await;
    let seen = send(&p, "shop:80", "/cors", &[]).await;
    assert_eq!(seen.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        seen.body
            .contains("route shop-filters: the CORS filter is not supported"),
        "{}",
        seen.body
    );
    assert!(seen.headers.get("x-served-by").is_none());
    // The route's other rules work.
    assert_eq!(
        send(&p, "shop:80", "/full", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_route_bound_to_one_port_leaves_the_others_alone() {
    let p = shop().await;
    let bound = send(&p, "shop:80", "/full", &[]).await;
    assert_eq!(bound.echo["server"], "echo");
    assert_eq!(bound.echo["path"], "/replaced");
    // Port 8080 has no route: its requests go to its backend as they
    // are, and a path no rule matches is not a 404 there.
    let other = send(&p, "shop:8080", "/full", &[]).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.echo["server"], "plain");
    assert_eq!(other.echo["path"], "/full");
    assert_eq!(
        send(&p, "shop:8080", "/nothing", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&p, "shop:80", "/nothing", &[]).await.status,
        StatusCode::NOT_FOUND
    );
}
