//! The index's output drives a real proxy: Kubernetes objects in, requests
//! through the proxy routed as the HTTPRoute says, 404 for requests that
//! match no rule of a routed service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use controlplane::index::{Index, SERVICE_NAME_LABEL};
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proxy::testutil::{echo_server, get, h1_client};

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

/// Service `ns/name` on port 9080.
fn service(index: &mut Index, ns: &str, name: &str, ip: &str) {
    index
        .apply(obj::<Service>(&format!(
            "metadata: {{ name: {name}, namespace: {ns} }}\n\
             spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
        )))
        .unwrap();
}

/// Service `ns/name`'s one endpoint: an echo server on loopback that says
/// it is `name`.
async fn echo_endpoint(index: &mut Index, ns: &str, name: &str) {
    let echo = echo_server(name).await;
    index
        .apply(obj::<EndpointSlice>(&format!(
            "metadata:\n  name: {name}-x\n  namespace: {ns}\n  labels: {{ {SERVICE_NAME_LABEL}: {name} }}\n\
             addressType: IPv4\nports: [{{ name: http, port: {} }}]\n\
             endpoints: [{{ addresses: [\"127.0.0.1\"], targetRef: {{ kind: Pod, name: {name} }} }}]\n",
            echo.port()
        )))
        .unwrap();
}

/// A proxy running the index's config for a client in another namespace,
/// with an explicit outbound listener `out`.
async fn proxy_of(index: &Index) -> std::sync::Arc<proxy::Proxy> {
    let mut config = index.proxy_config("productpage-ns");
    config.listeners.push(
        serde_yaml::from_str(
            "{ name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }",
        )
        .unwrap(),
    );
    proxy::start(proxy::settings::Settings::for_tests(), config)
        .await
        .unwrap()
}

#[tokio::test]
async fn routes_from_the_index_route_real_requests_and_unmatched_ones_get_404() {
    let mut index = Index::default();
    service(&mut index, "bookinfo", "reviews", "10.96.0.10");
    service(&mut index, "bookinfo", "reviews-v2", "10.96.0.12");
    echo_endpoint(&mut index, "bookinfo", "reviews-v2").await;
    index
        .apply(obj::<HttpRoute>(
            "metadata: { name: only-reviews, namespace: bookinfo }\n\
             spec:\n  parentRefs: [{ group: \"\", kind: Service, name: reviews }]\n  rules:\n  \
             - matches: [{ path: { type: PathPrefix, value: /reviews } }]\n    \
             backendRefs: [{ name: reviews-v2, port: 9080 }]\n",
        ))
        .unwrap();
    let p = proxy_of(&index).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;

    let (status, headers, _) = get(
        &mut c,
        "http://reviews.bookinfo.svc.cluster.local:9080/reviews/1",
        "x",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "reviews-v2");

    let (status, _, body) = get(&mut c, "http://reviews.bookinfo:9080/ratings/1", "x").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body, "no route of service reviews matches this request\n");
}

/// GEP-1294: a mesh route's backend may be a Service in another namespace,
/// with no ReferenceGrant; requests reach it through the proxy.
#[tokio::test]
async fn a_route_sends_requests_to_a_backend_in_another_namespace() {
    let mut index = Index::default();
    service(&mut index, "bookinfo", "reviews", "10.96.0.10");
    service(&mut index, "canary", "reviews-next", "10.96.1.10");
    echo_endpoint(&mut index, "canary", "reviews-next").await;
    index
        .apply(obj::<HttpRoute>(
            "metadata: { name: to-canary, namespace: bookinfo }\n\
             spec:\n  parentRefs: [{ group: \"\", kind: Service, name: reviews }]\n  rules:\n  \
             - backendRefs: [{ name: reviews-next, namespace: canary, port: 9080 }]\n",
        ))
        .unwrap();
    let p = proxy_of(&index).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (status, headers, body) = get(&mut c, "http://reviews.bookinfo:9080/reviews/1", "x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-served-by"], "reviews-next");
}

/// An HTTPRoute's filters, timeouts and parentRef port, from the
/// Kubernetes object through the index to a real proxy; a filter the mesh
/// cannot honour is reported by the index and its rule answers 500.
#[tokio::test]
async fn filters_timeouts_and_a_parent_port_reach_the_proxy() {
    let mut index = Index::default();
    index
        .apply(obj::<Service>(
            "metadata: { name: shop, namespace: bookinfo }\n\
             spec: { clusterIP: 10.96.0.20, ports: [{ name: http, port: 9080 }, { name: admin, port: 9081 }] }\n",
        ))
        .unwrap();
    let echo = echo_server("shop").await;
    index
        .apply(obj::<EndpointSlice>(&format!(
            "metadata:\n  name: shop-x\n  namespace: bookinfo\n  labels: {{ {SERVICE_NAME_LABEL}: shop }}\n\
             addressType: IPv4\nports: [{{ name: http, port: {0} }}, {{ name: admin, port: {0} }}]\n\
             endpoints: [{{ addresses: [\"127.0.0.1\"], targetRef: {{ kind: Pod, name: shop }} }}]\n",
            echo.port()
        )))
        .unwrap();
    let route = obj::<HttpRoute>(
        "metadata: { name: shop-route, namespace: bookinfo }\n\
         spec:\n  parentRefs: [{ group: \"\", kind: Service, name: shop, port: 9080 }]\n  rules:\n  \
         - matches: [{ path: { value: /headers } }]\n    \
           filters:\n    \
           - type: RequestHeaderModifier\n      requestHeaderModifier: { set: [{ name: x-route, value: shop-route }] }\n    \
           - type: URLRewrite\n      urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /rewritten } }\n    \
           timeouts: { request: 300ms }\n    \
           backendRefs: [{ name: shop, port: 9080 }]\n  \
         - matches: [{ path: { value: /cors } }]\n    \
           filters: [{ type: CORS, cors: { allowOrigins: [\"https://example.com\"] } }]\n    \
           backendRefs: [{ name: shop, port: 9080 }]\n",
    );
    index.apply(route.clone()).unwrap();
    let reported: Vec<String> = index
        .errors()
        .flat_map(|(_, _, errors)| errors.iter().map(ToString::to_string))
        .collect();
    assert_eq!(
        reported,
        [
            "HTTPRoute \"bookinfo/shop-route\": spec.rules[1].filters[0]: the CORS filter is not supported; the requests of this rule get 500"
        ]
    );
    let verdicts = index.http_route_verdicts(&route);
    assert!(!verdicts[0].accepted.holds, "{verdicts:?}");
    assert_eq!(verdicts[0].accepted.reason, "UnsupportedValue");

    let p = proxy_of(&index).await;
    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let host = "shop.bookinfo.svc.cluster.local";

    let (status, _, body) = get(&mut c, &format!("http://{host}:9080/headers/a"), "x").await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-route"], "shop-route");
    assert_eq!(echo["path"], "/rewritten/a");

    let slow = http::Request::get(format!("http://{host}:9080/headers"))
        .header("host", "x")
        .header("x-echo-delay-ms", "10000")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = c.send_request(slow).await.unwrap();
    assert_eq!(resp.status(), 504);

    let mut c = h1_client(p.listener_addr("out").unwrap()).await;
    let (status, _, body) = get(&mut c, &format!("http://{host}:9080/cors"), "x").await;
    assert_eq!(status, 500);
    assert!(body.contains("the CORS filter is not supported"), "{body}");
    assert_eq!(
        get(&mut c, &format!("http://{host}:9080/other"), "x")
            .await
            .0,
        404
    );

    // Port 9081 is not the route's: its requests go to its backend as
    // they are.
    let (status, _, body) = get(&mut c, &format!("http://{host}:9081/headers/a"), "x").await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(echo["headers"].get("x-route").is_none());
    assert_eq!(echo["path"], "/headers/a");
    assert_eq!(
        get(&mut c, &format!("http://{host}:9081/other"), "x")
            .await
            .0,
        200
    );
}
