#![allow(clippy::unwrap_used, clippy::expect_used)]

use mesh_api::{BackendRef, HttpRoute, LoadBalancer, RouteRule, ServicePort};

use super::*;

fn service(name: &str, vip: &str) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        hostnames: Vec::new(),
        addresses: vec![vip.parse().unwrap()],
        endpoint_addresses: Vec::new(),
        ports: vec![ServicePort {
            port: 9080,
            name: Some("http".into()),
            protocol: Protocol::Http,
            backend: None,
        }],
        routes: Vec::new(),
        backend: None,
    }
}

fn backend(name: &str) -> Backend {
    Backend {
        name: name.into(),
        endpoints: Vec::new(),
        load_balancer: LoadBalancer::default(),
        protocol: Protocol::Auto,
        retry_budget: Default::default(),
        limits: Default::default(),
        outlier_detection: None,
    }
}

fn endpoint(addr: &str) -> Endpoint {
    Endpoint {
        address: addr.parse().unwrap(),
        workload: Some("reviews-v1".into()),
        labels: Default::default(),
        identity: None,
    }
}

fn resource(name: &str, msg: &impl Message) -> pb::Resource {
    let body = msg.encode_to_vec();
    pb::Resource {
        name: name.into(),
        version: convert::version_of_encoded(&body),
        body,
    }
}

fn response(
    type_url: &str,
    resources: Vec<pb::Resource>,
    removed: &[&str],
) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        type_url: type_url.into(),
        resources,
        removed: removed.iter().map(|s| s.to_string()).collect(),
        nonce: "1".into(),
        system_version: String::new(),
    }
}

fn index(services: &[Service]) -> pb::DiscoveryResponse {
    let resources = services
        .iter()
        .map(|s| {
            resource(
                &key(&s.namespace, &s.name),
                &convert::service_index_entry(s),
            )
        })
        .collect();
    response(pb::TYPE_SERVICE_INDEX, resources, &[])
}

/// `reviews` split over two backends by a route.
fn reviews_outbound() -> pb::DiscoveryResponse {
    let mut reviews = service("reviews", "10.0.0.2");
    reviews.routes = vec![HttpRoute {
        name: "split".into(),
        namespace: "shop".into(),
        rules: vec![RouteRule {
            matches: Vec::new(),
            backend_refs: vec![
                BackendRef {
                    name: "reviews-v1.shop:9080".into(),
                    weight: 90,
                    filters: Vec::new(),
                },
                BackendRef {
                    name: "reviews-v2.shop:9080".into(),
                    weight: 10,
                    filters: Vec::new(),
                },
            ],
            filters: Vec::new(),
            timeouts: Default::default(),
            retry: None,
        }],
        ports: Vec::new(),
    }];
    let backends = [
        backend("reviews-v1.shop:9080"),
        backend("reviews-v2.shop:9080"),
    ];
    let msg = convert::outbound_service(&reviews, &backends);
    response(
        pb::TYPE_OUTBOUND_SERVICE,
        vec![resource("shop/reviews", &msg)],
        &[],
    )
}

fn endpoints(name: &str, addrs: &[&str]) -> pb::DiscoveryResponse {
    let eps: Vec<_> = addrs.iter().map(|a| endpoint(a)).collect();
    let msg = convert::endpoints(name, &eps);
    response(pb::TYPE_ENDPOINTS, vec![resource(name, &msg)], &[])
}

fn bootstrap() -> ProxyConfig {
    ProxyConfig {
        inbound: Default::default(),
        workload: Workload {
            name: "productpage".into(),
            namespace: "shop".into(),
        },
        listeners: Vec::new(),
        services: Vec::new(),
        backends: Vec::new(),
    }
}

fn node() -> pb::Node {
    pb::Node {
        id: "productpage-1".into(),
        namespace: "shop".into(),
        ..Default::default()
    }
}

fn applied(state: &State) -> (ProxyConfig, HashSet<String>) {
    let (config, pending) = state.config();
    config
        .validate_pending(&pending)
        .expect("the assembled config is valid");
    (config, pending)
}

#[test]
fn indexed_services_are_pending_until_asked_for() {
    let mut state = State::new(bootstrap(), &node());
    state
        .merge(index(&[
            service("reviews", "10.0.0.2"),
            service("ratings", "10.0.0.3"),
        ]))
        .unwrap();
    let (config, pending) = applied(&state);
    assert_eq!(config.services.len(), 2);
    assert_eq!(
        pending,
        HashSet::from(["shop/reviews".to_owned(), "shop/ratings".to_owned()])
    );

    let request = state
        .want("shop/reviews".into())
        .expect("a new subscription");
    assert_eq!(request.type_url, pb::TYPE_OUTBOUND_SERVICE);
    assert_eq!(request.subscribe, ["shop/reviews"]);
    assert!(state.want("shop/reviews".into()).is_none(), "asked once");
    assert!(
        state.want("shop/unknown".into()).is_none(),
        "a service the index does not know is not subscribed"
    );
}

#[test]
fn a_service_loads_once_its_outbound_config_and_every_backends_endpoints_arrived() {
    let mut state = State::new(bootstrap(), &node());
    state
        .merge(index(&[service("reviews", "10.0.0.2")]))
        .unwrap();
    state.want("shop/reviews".into());

    state.merge(reviews_outbound()).unwrap();
    let change = state.resubscribe_endpoints();
    assert_eq!(
        change.subscribe,
        ["reviews-v1.shop:9080", "reviews-v2.shop:9080"]
    );
    assert!(change.unsubscribe.is_empty());
    assert_eq!(applied(&state).1.len(), 1, "still waiting for endpoints");

    state
        .merge(endpoints("reviews-v1.shop:9080", &["127.0.0.1:9001"]))
        .unwrap();
    assert_eq!(
        applied(&state).1.len(),
        1,
        "one backend's endpoints missing"
    );
    state
        .merge(endpoints(
            "reviews-v2.shop:9080",
            &["127.0.0.1:9002", "127.0.0.1:9003"],
        ))
        .unwrap();
    let (config, pending) = applied(&state);
    assert!(pending.is_empty());
    let reviews = &config.services[0];
    assert_eq!(reviews.routes[0].rules[0].backend_refs[0].weight, 90);
    let v2 = config
        .backends
        .iter()
        .find(|b| b.name == "reviews-v2.shop:9080")
        .unwrap();
    assert_eq!(v2.endpoints.len(), 2);
}

#[test]
fn endpoints_no_backend_needs_any_more_are_unsubscribed() {
    let mut state = State::new(bootstrap(), &node());
    state
        .merge(index(&[service("reviews", "10.0.0.2")]))
        .unwrap();
    state.want("shop/reviews".into());
    state.merge(reviews_outbound()).unwrap();
    state.resubscribe_endpoints();

    // The route goes away: the service falls back to its own backend.
    let reviews = service("reviews", "10.0.0.2");
    let msg = convert::outbound_service(&reviews, &[backend("reviews")]);
    state
        .merge(response(
            pb::TYPE_OUTBOUND_SERVICE,
            vec![resource("shop/reviews", &msg)],
            &[],
        ))
        .unwrap();
    let change = state.resubscribe_endpoints();
    assert_eq!(change.subscribe, ["reviews"]);
    assert_eq!(
        change.unsubscribe,
        ["reviews-v1.shop:9080", "reviews-v2.shop:9080"]
    );
}

#[test]
fn a_removed_service_leaves_the_config() {
    let mut state = State::new(bootstrap(), &node());
    state
        .merge(index(&[
            service("reviews", "10.0.0.2"),
            service("ratings", "10.0.0.3"),
        ]))
        .unwrap();
    state.want("shop/ratings".into());
    state
        .merge(response(
            pb::TYPE_OUTBOUND_SERVICE,
            Vec::new(),
            &["shop/ratings"],
        ))
        .unwrap();
    let (config, _) = applied(&state);
    assert_eq!(config.services.len(), 1, "ratings is gone: {config:?}");
    state
        .merge(response(
            pb::TYPE_SERVICE_INDEX,
            Vec::new(),
            &["shop/reviews"],
        ))
        .unwrap();
    assert!(applied(&state).0.services.is_empty());
}

#[test]
fn a_resource_that_cannot_be_converted_is_refused_with_its_name() {
    let mut state = State::new(bootstrap(), &node());
    let garbage = pb::Resource {
        name: "shop/reviews".into(),
        version: "1".into(),
        body: vec![0xff, 0xff, 0xff],
    };
    let err = state
        .merge(response(pb::TYPE_SERVICE_INDEX, vec![garbage], &[]))
        .unwrap_err();
    assert!(
        err.contains("shop/reviews") && err.contains("decode"),
        "{err}"
    );

    let bad = endpoints("reviews-v1.shop:9080", &["127.0.0.1:9001"]);
    let mut msg = pb::Endpoints::decode(bad.resources[0].body.as_slice()).unwrap();
    msg.endpoints[0].address = "not an address".into();
    let err = state
        .merge(response(
            pb::TYPE_ENDPOINTS,
            vec![resource("reviews-v1.shop:9080", &msg)],
            &[],
        ))
        .unwrap_err();
    assert!(
        err.contains("reviews-v1.shop:9080") && err.contains("endpoints[0].address"),
        "{err}"
    );

    let wrong = index(&[service("ratings", "10.0.0.3")]).resources[0].clone();
    let misnamed = pb::Resource {
        name: "shop/reviews".into(),
        ..wrong
    };
    let err = state
        .merge(response(pb::TYPE_SERVICE_INDEX, vec![misnamed], &[]))
        .unwrap_err();
    assert!(err.contains("holds service \"shop/ratings\""), "{err}");
}

#[test]
fn a_new_stream_sends_what_is_held() {
    let mut state = State::new(bootstrap(), &node());
    state
        .merge(index(&[service("reviews", "10.0.0.2")]))
        .unwrap();
    state.want("shop/reviews".into());
    state.merge(reviews_outbound()).unwrap();
    state.resubscribe_endpoints();
    state
        .merge(endpoints("reviews-v1.shop:9080", &["127.0.0.1:9001"]))
        .unwrap();

    let node = pb::Node {
        id: "productpage-1".into(),
        ..Default::default()
    };
    let requests = state.initial_requests(node);
    assert_eq!(requests.len(), 5);
    assert_eq!(requests[0].node.as_ref().unwrap().id, "productpage-1");
    assert_eq!(requests[0].subscribe, [pb::WILDCARD]);
    assert!(requests[0].initial_versions.contains_key("shop/reviews"));
    assert_eq!(requests[1].subscribe, ["shop/reviews"]);
    assert!(requests[1].initial_versions.contains_key("shop/reviews"));
    assert_eq!(requests[2].type_url, pb::TYPE_ENDPOINTS);
    assert_eq!(requests[2].subscribe.len(), 2);
    // Only the endpoints that arrived are claimed as held.
    assert_eq!(
        requests[2].initial_versions.keys().collect::<Vec<_>>(),
        ["reviews-v1.shop:9080"]
    );
}

#[test]
fn the_inbound_policy_comes_from_the_control_plane_until_it_withdraws_it() {
    let mut state = State::new(bootstrap(), &node());
    assert_eq!(applied(&state).0.inbound, InboundPolicy::default());
    let policy: InboundPolicy = serde_yaml::from_str(
        "mtls: PERMISSIVE\nrateLimits: [{ name: rl, namespace: shop, requests: 5, per: 1s }]\n",
    )
    .unwrap();
    let msg = convert::inbound_config("shop", "productpage-1", &policy);
    state
        .merge(response(
            pb::TYPE_INBOUND_CONFIG,
            vec![resource("shop/productpage-1", &msg)],
            &[],
        ))
        .unwrap();
    assert_eq!(applied(&state).0.inbound, policy);
    // Another proxy's inbound config is refused.
    let err = state
        .merge(response(
            pb::TYPE_INBOUND_CONFIG,
            vec![resource("shop/other", &msg)],
            &[],
        ))
        .unwrap_err();
    assert!(err.contains("not this proxy's"), "{err}");
    state
        .merge(response(
            pb::TYPE_INBOUND_CONFIG,
            Vec::new(),
            &["shop/productpage-1"],
        ))
        .unwrap();
    assert_eq!(applied(&state).0.inbound, InboundPolicy::default());
}

#[test]
fn an_empty_trust_bundle_is_refused() {
    let mut state = State::new(bootstrap(), &node());
    let empty = pb::TrustBundle {
        roots_pem: Vec::new(),
    };
    let err = state
        .merge(response(
            pb::TYPE_TRUST_BUNDLE,
            vec![resource(pb::TRUST_BUNDLE, &empty)],
            &[],
        ))
        .unwrap_err();
    assert!(err.contains("holds no root"), "{err}");
}
