//! The index's output drives a real proxy: Kubernetes objects in, requests
//! through the proxy routed as the HTTPRoute says, 404 for requests that
//! match no rule of a routed service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use controlplane::index::{Index, SERVICE_NAME_LABEL};
use gateway_api::apis::standard::httproutes::HttpRoute;
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
