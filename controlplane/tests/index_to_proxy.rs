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

#[tokio::test]
async fn routes_from_the_index_route_real_requests_and_unmatched_ones_get_404() {
    let mut index = Index::default();
    for (name, ip) in [("reviews", "10.96.0.10"), ("reviews-v2", "10.96.0.12")] {
        index
            .apply(obj::<Service>(&format!(
                "metadata: {{ name: {name}, namespace: bookinfo }}\n\
                 spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
            )))
            .unwrap();
    }
    let v2 = echo_server("reviews-v2").await;
    index
        .apply(obj::<EndpointSlice>(&format!(
            "metadata:\n  name: reviews-v2-x\n  namespace: bookinfo\n  labels: {{ {SERVICE_NAME_LABEL}: reviews-v2 }}\n\
             addressType: IPv4\nports: [{{ name: http, port: {} }}]\n\
             endpoints: [{{ addresses: [\"127.0.0.1\"], targetRef: {{ kind: Pod, name: reviews-v2 }} }}]\n",
            v2.port()
        )))
        .unwrap();
    index
        .apply(obj::<HttpRoute>(
            "metadata: { name: only-reviews, namespace: bookinfo }\n\
             spec:\n  parentRefs: [{ group: \"\", kind: Service, name: reviews }]\n  rules:\n  \
             - matches: [{ path: { type: PathPrefix, value: /reviews } }]\n    \
             backendRefs: [{ name: reviews-v2, port: 9080 }]\n",
        ))
        .unwrap();

    let mut config = index.proxy_config("productpage-ns");
    config.listeners.push(
        serde_yaml::from_str(
            "{ name: out, address: 127.0.0.1:0, direction: outbound, mode: explicit }",
        )
        .unwrap(),
    );
    let p = proxy::start(proxy::settings::Settings::for_tests(), config)
        .await
        .unwrap();
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
