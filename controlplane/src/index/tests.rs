use super::*;
use mesh_api::{HeaderMatch, PathMatch, PathMatchType, RouteMatch, ValueMatchType};

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

fn key(ns: &str, name: &str) -> Key {
    Key {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn service(ns: &str, name: &str, ip: &str) -> Service {
    obj(&format!(
        "metadata: {{ name: {name}, namespace: {ns} }}\n\
         spec:\n  clusterIP: {ip}\n  ports: [{{ name: http, port: 9080, appProtocol: http }}]\n"
    ))
}

fn slice(ns: &str, service: &str, port: u16, ips: &[(&str, bool)]) -> EndpointSlice {
    let endpoints: Vec<String> = ips
        .iter()
        .map(|(ip, ready)| {
            format!(
                "  - {{ addresses: [\"{ip}\"], conditions: {{ ready: {ready} }}, targetRef: {{ kind: Pod, name: {service}-pod }} }}\n"
            )
        })
        .collect();
    obj(&format!(
        "metadata:\n  name: {service}-abc\n  namespace: {ns}\n  labels: {{ {SERVICE_NAME_LABEL}: {service} }}\n\
         addressType: IPv4\nports: [{{ name: http, port: {port} }}]\nendpoints:\n{}",
        endpoints.concat()
    ))
}

fn route(ns: &str, name: &str, parent: &str, body: &str) -> HttpRoute {
    obj(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: {name}, namespace: {ns} }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: {parent}, namespace: bookinfo }}]\n{body}"
    ))
}

/// reviews with v1, v2, v3 in namespace `bookinfo`.
fn mesh() -> Index {
    let mut index = Index::default();
    for (i, name) in ["reviews", "reviews-v1", "reviews-v2", "reviews-v3"]
        .iter()
        .enumerate()
    {
        index
            .apply(service("bookinfo", name, &format!("10.96.0.{}", 10 + i)))
            .unwrap();
    }
    index
        .apply(slice("bookinfo", "reviews-v1", 9080, &[("10.1.0.1", true)]))
        .unwrap();
    index
        .apply(slice("bookinfo", "reviews-v2", 9080, &[("10.1.0.2", true)]))
        .unwrap();
    index
        .apply(slice("bookinfo", "reviews-v3", 9080, &[("10.1.0.3", true)]))
        .unwrap();
    index
        .apply(slice(
            "bookinfo",
            "reviews",
            9080,
            &[("10.1.0.1", true), ("10.1.0.2", true), ("10.1.0.3", true)],
        ))
        .unwrap();
    index
}

const SPLIT: &str = "  rules:\n  - backendRefs:\n    - { name: reviews-v1, port: 9080, weight: 80 }\n    - { name: reviews-v2, port: 9080, weight: 10 }\n    - { name: reviews-v3, port: 9080, weight: 10 }\n";

fn backends_of(o: &Outbound) -> Vec<(String, u32)> {
    o.service.routes[0].rules[0]
        .backend_refs
        .iter()
        .map(|b| (b.name.clone(), b.weight))
        .collect()
}

#[test]
fn service_without_route_goes_to_its_own_endpoints_per_port() {
    let index = mesh();
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    assert!(o.service.routes.is_empty());
    assert_eq!(
        o.service.addresses,
        ["10.96.0.10".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(o.service.ports[0].protocol, Protocol::Http);
    assert_eq!(
        o.service.ports[0].backend.as_deref(),
        Some("reviews.bookinfo:9080")
    );
    let eps = index.endpoints(&key("bookinfo", "reviews"), 9080);
    let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(addrs, ["10.1.0.1:9080", "10.1.0.2:9080", "10.1.0.3:9080"]);
    assert_eq!(eps[0].workload.as_deref(), Some("reviews-pod"));
}

#[test]
fn weights_become_weighted_backend_refs() {
    let mut index = mesh();
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    assert_eq!(
        backends_of(&o),
        [
            ("reviews-v1.bookinfo:9080".to_owned(), 80),
            ("reviews-v2.bookinfo:9080".to_owned(), 10),
            ("reviews-v3.bookinfo:9080".to_owned(), 10),
        ]
    );
    let names: Vec<&str> = o.backends.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "reviews.bookinfo:9080",
            "reviews-v1.bookinfo:9080",
            "reviews-v2.bookinfo:9080",
            "reviews-v3.bookinfo:9080"
        ]
    );
    // The whole config the index produces is valid for a proxy.
    index.proxy_config("default").validate().unwrap();
}

#[test]
fn producer_and_consumer_routes() {
    let mut index = mesh();
    // Producer route, in the service's namespace: every client.
    let to_v1 = "  rules:\n  - backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "producer", "reviews", to_v1))
        .unwrap();
    // Consumer route, in namespace `frontend`: only frontend's clients.
    // Its backend is a service of the consumer's own namespace.
    index
        .apply(service("frontend", "reviews-canary", "10.96.1.1"))
        .unwrap();
    let to_canary = "  rules:\n  - backendRefs: [{ name: reviews-canary, port: 9080 }]\n";
    index
        .apply(route("frontend", "consumer", "reviews", to_canary))
        .unwrap();

    let svc = key("bookinfo", "reviews");
    let seen = |ns: &str| {
        let o = index.outbound(&svc, ns).unwrap();
        let routes: Vec<String> = o.service.routes.iter().map(|r| r.name.clone()).collect();
        (routes, backends_of(&o)[0].0.clone())
    };
    assert_eq!(
        seen("bookinfo"),
        (vec!["producer".into()], "reviews-v1.bookinfo:9080".into())
    );
    assert_eq!(
        seen("other"),
        (vec!["producer".into()], "reviews-v1.bookinfo:9080".into())
    );
    assert_eq!(
        seen("frontend"),
        (
            vec!["consumer".into()],
            "reviews-canary.frontend:9080".into()
        ),
        "consumer routes replace producer routes for their namespace"
    );
}

#[test]
fn a_mesh_route_sends_to_a_backend_in_another_namespace_without_a_grant() {
    let mut index = mesh();
    index
        .apply(service("canary", "reviews-next", "10.96.2.1"))
        .unwrap();
    index
        .apply(slice("canary", "reviews-next", 9080, &[("10.1.2.1", true)]))
        .unwrap();
    let split = "  rules:\n  - backendRefs:\n    - { name: reviews-v1, port: 9080, weight: 90 }\n    - { name: reviews-next, namespace: canary, port: 9080, weight: 10 }\n";
    index
        .apply(route("bookinfo", "split", "reviews", split))
        .unwrap();
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    let backends: Vec<String> = backends_of(&o).into_iter().map(|b| b.0).collect();
    assert!(
        backends.contains(&"reviews-next.canary:9080".to_owned()),
        "{backends:?}"
    );
    let endpoints = index.endpoints(&key("canary", "reviews-next"), 9080);
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
}

#[test]
fn routed_service_has_no_fallback_so_unmatched_requests_get_404() {
    let mut index = mesh();
    let only_reviews = "  rules:\n  - matches: [{ path: { type: PathPrefix, value: /reviews } }]\n    backendRefs: [{ name: reviews-v2, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "only-reviews", "reviews", only_reviews))
        .unwrap();
    let config = index.proxy_config("default");
    config.validate().unwrap();
    let svc = config
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .unwrap();
    // The proxy answers 404 when a service has routes and none matches;
    // tests/index_to_proxy.rs shows that through a real proxy.
    assert_eq!(svc.routes.len(), 1);
    assert_eq!(svc.routes[0].rules.len(), 1);
    let m = &svc.routes[0].rules[0].matches[0];
    assert_eq!(m.path.as_ref().unwrap().value, "/reviews");
}

#[test]
fn deletion_reports_affected_services_and_removes_config() {
    let mut index = mesh();
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    let svc = key("bookinfo", "reviews");

    let changed = index.delete::<HttpRoute>(&key("bookinfo", "split"));
    assert_eq!(changed.services, BTreeSet::from([svc.clone()]));
    assert!(
        index
            .outbound(&svc, "default")
            .unwrap()
            .service
            .routes
            .is_empty()
    );

    let changed = index.delete::<EndpointSlice>(&key("bookinfo", "reviews-v2-abc"));
    assert_eq!(
        changed.services,
        BTreeSet::from([key("bookinfo", "reviews-v2")])
    );
    assert!(
        index
            .endpoints(&key("bookinfo", "reviews-v2"), 9080)
            .is_empty()
    );

    index.delete::<Service>(&svc);
    assert!(index.outbound(&svc, "default").is_none());
    assert_eq!(
        index.delete::<Service>(&svc),
        Changed::default(),
        "deleting twice is a no-op"
    );
}

#[test]
fn not_ready_endpoints_are_left_out() {
    let mut index = mesh();
    index
        .apply(slice(
            "bookinfo",
            "reviews-v1",
            9080,
            &[("10.1.0.1", true), ("10.1.0.9", false)],
        ))
        .unwrap();
    let eps = index.endpoints(&key("bookinfo", "reviews-v1"), 9080);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].address.to_string(), "10.1.0.1:9080");
}

#[test]
fn a_filter_the_mesh_cannot_honour_is_applied_as_500_and_reported() {
    let mut index = mesh();
    let filtered = "  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: { set: [{ name: x, value: y }] }\n\
                    \x20   backendRefs:\n    - name: reviews-v1\n      port: 9080\n      filters: [{ type: ExternalAuth, externalAuth: { protocol: HTTP, backendRef: { name: auth, port: 80 } } }]\n\
                    \x20   timeouts: { request: 5s, backendRequest: 1500ms }\n";
    index
        .apply(route("bookinfo", "filtered", "reviews", filtered))
        .unwrap();
    let reported: Vec<(&str, &str)> = index
        .errors()
        .flat_map(|(_, _, errors)| errors.iter().map(|e| (e.field.as_str(), e.reason.as_str())))
        .collect();
    assert_eq!(
        reported,
        [(
            "spec.rules[0].backendRefs[0].filters[0]",
            "the ExternalAuth filter is not supported; the requests of this rule get 500"
        )]
    );
    let svc = index
        .outbound(&key("bookinfo", "reviews"), "bookinfo")
        .unwrap()
        .service;
    let rule = &svc.routes[0].rules[0];
    assert_eq!(
        rule.filters,
        [mesh_api::RouteFilter::RequestHeaderModifier(
            mesh_api::HeaderModifier {
                set: vec![mesh_api::HttpHeader {
                    name: "x".into(),
                    value: "y".into()
                }],
                ..Default::default()
            }
        )]
    );
    assert_eq!(
        rule.backend_refs[0].filters,
        [mesh_api::RouteFilter::Unsupported(
            "the ExternalAuth filter is not supported".into()
        )]
    );
    assert_eq!(
        rule.timeouts,
        mesh_api::Timeouts {
            request_ms: Some(5000),
            backend_request_ms: Some(1500)
        }
    );
    // Fixed, the route is no longer reported.
    let fixed = "  rules:\n  - backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "filtered", "reviews", fixed))
        .unwrap();
    assert_eq!(index.errors().count(), 0);
}

#[test]
fn malformed_filters_and_timeouts_are_refused_naming_the_field() {
    let mut index = mesh();
    let bad = "  rules:\n  - matches: [{ path: { type: Exact, value: /x } }]\n    filters:\n\
               \x20   - type: RequestHeaderModifier\n      requestHeaderModifier: { set: [{ name: 'bad name', value: y }] }\n\
               \x20   - type: URLRewrite\n      urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /y } }\n\
               \x20   - type: RequestRedirect\n      requestRedirect: { statusCode: 305 }\n\
               \x20   - type: ResponseHeaderModifier\n\
               \x20   timeouts: { request: 1s, backendRequest: 2s }\n\
               \x20   retry: { attempts: 11, codes: [200] }\n\
               \x20   backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    let err = index
        .apply(route("bookinfo", "bad", "reviews", bad))
        .unwrap_err();
    let fields: Vec<(&str, &str)> = err
        .errors
        .iter()
        .map(|e| (e.field.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            ("spec.rules[0].retry.attempts", "11 is not 0 to 10"),
            (
                "spec.rules[0].retry.codes[0]",
                "200 is not an error status (400-599)"
            ),
            (
                "spec.rules[0].timeouts.backendRequest",
                "must not be longer than timeouts.request"
            ),
            (
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
                "\"bad name\" is not a valid header name"
            ),
            (
                "spec.rules[0].filters[1].urlRewrite.path.type",
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"
            ),
            (
                "spec.rules[0].filters[2].requestRedirect.statusCode",
                "305 is not a redirect status (301, 302, 303, 307 or 308)"
            ),
            (
                "spec.rules[0].filters[3].responseHeaderModifier",
                "required for type ResponseHeaderModifier"
            ),
            (
                "spec.rules[0].filters",
                "RequestRedirect and URLRewrite cannot both be set"
            ),
        ]
    );
}

#[test]
fn invalid_route_is_refused_naming_the_field_and_the_last_good_version_stays() {
    let mut index = mesh();
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    let broken = "  rules:\n  - matches: [{ path: { type: RegularExpression, value: '/r(' } }]\n    backendRefs: [{ name: reviews-v1 }]\n";
    let err = index
        .apply(route("bookinfo", "split", "reviews", broken))
        .unwrap_err();
    let messages: Vec<String> = err.errors.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].starts_with(
            "HTTPRoute \"bookinfo/split\": spec.rules[0].matches[0].path.value: invalid regular expression"
        ),
        "{messages:?}"
    );
    assert_eq!(
        messages[1],
        "HTTPRoute \"bookinfo/split\": spec.rules[0].backendRefs[0].port: required for a Service backend"
    );
    // Still the 80/10/10 split.
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    assert_eq!(backends_of(&o).len(), 3);
    assert_eq!(index.errors().count(), 1);
    // A good version clears the error.
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    assert_eq!(index.errors().count(), 0);
}

#[test]
fn invalid_service_and_slice_fields_are_named() {
    let mut index = Index::default();
    let bad: Service = obj(
        "metadata: { name: s, namespace: ns }\nspec:\n  clusterIP: 10.0.0.300\n  ports: [{ port: 70000 }]\n",
    );
    let err = index.apply(bad).unwrap_err().to_string();
    assert!(
        err.contains("Service \"ns/s\": spec.clusterIPs[0]: \"10.0.0.300\" is not an IP address"),
        "{err}"
    );
    assert!(
        err.contains("spec.ports[0].port: 70000 is not a port number"),
        "{err}"
    );
    let orphan: EndpointSlice =
        obj("metadata: { name: x, namespace: ns }\naddressType: IPv4\nendpoints: []\n");
    let err = index.apply(orphan).unwrap_err().to_string();
    assert!(
        err.contains("metadata.labels[kubernetes.io/service-name]: missing"),
        "{err}"
    );
}

#[test]
fn reset_replaces_a_kind_wholesale() {
    let mut index = mesh();
    let (changed, refused) = index.reset(vec![service("bookinfo", "reviews", "10.96.0.10")]);
    assert!(refused.is_empty());
    assert!(
        changed.services.contains(&key("bookinfo", "reviews-v1")),
        "removed services are affected"
    );
    let names: Vec<String> = index
        .service_entries()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["reviews"]);
}

#[test]
fn destination_policy_sets_the_load_balancer() {
    let mut index = mesh();
    let policy: DestinationPolicy = obj(
        "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: { name: rr, namespace: bookinfo }\n\
         spec: { targetRef: { name: reviews }, loadBalancer: { algorithm: roundRobin } }\n",
    );
    let changed = index.apply(policy).unwrap();
    assert_eq!(
        changed.services,
        BTreeSet::from([key("bookinfo", "reviews")])
    );
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    assert_eq!(
        o.backends[0].load_balancer.algorithm,
        mesh_api::LoadBalancerAlgorithm::RoundRobin
    );
}

#[test]
fn destination_policy_sets_the_retry_budget_and_limits_and_routes_their_retries() {
    let mut index = mesh();
    let policy: DestinationPolicy = obj(
        "apiVersion: trellis.dev/v1alpha1\nkind: DestinationPolicy\nmetadata: { name: budget, namespace: bookinfo }\n\
         spec: { targetRef: { name: reviews-v1 }, retryBudget: { retryPercent: 50, ttl: 30s }, connectionPool: { maxRequests: 7, maxRetries: 2 }, outlierDetection: { consecutive5xx: 4, baseEjectionTime: 10s } }\n",
    );
    index.apply(policy).unwrap();
    let retried = "  rules:\n  - retry: { attempts: 2, codes: [503], backoff: 100ms }\n    backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "retried", "reviews", retried))
        .unwrap();
    let o = index
        .outbound(&key("bookinfo", "reviews"), "default")
        .unwrap();
    assert_eq!(
        o.service.routes[0].rules[0].retry,
        Some(mesh_api::Retry {
            attempts: 2,
            codes: vec![503],
            grpc_codes: Vec::new(),
            backoff_ms: 100
        })
    );
    let budget = |name: &str| {
        o.backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.retry_budget)
            .unwrap()
    };
    assert_eq!(
        budget("reviews-v1.bookinfo:9080"),
        mesh_api::RetryBudget {
            percent: 50,
            min_per_second: mesh_api::DEFAULT_MIN_RETRIES_PER_SECOND,
            ttl_ms: 30_000
        }
    );
    assert!(budget("reviews.bookinfo:9080").is_default());
    let limits = o
        .backends
        .iter()
        .find(|b| b.name == "reviews-v1.bookinfo:9080")
        .unwrap()
        .limits;
    assert_eq!(
        limits,
        mesh_api::ConnectionLimits {
            max_requests: 7,
            max_retries: 2,
            ..Default::default()
        }
    );
    let outlier = o
        .backends
        .iter()
        .find(|b| b.name == "reviews-v1.bookinfo:9080")
        .unwrap()
        .outlier_detection;
    assert_eq!(
        outlier,
        Some(mesh_api::OutlierDetection {
            consecutive_5xx: 4,
            base_ejection_ms: 10_000,
            ..Default::default()
        })
    );
}

#[test]
fn protocols_come_from_app_protocol_or_port_name() {
    assert_eq!(
        protocol_of(Some("kubernetes.io/h2c"), None),
        Protocol::Http2
    );
    assert_eq!(protocol_of(None, Some("grpc-api")), Protocol::Grpc);
    assert_eq!(protocol_of(None, Some("tcp-db")), Protocol::Tcp);
    assert_eq!(protocol_of(None, Some("web")), Protocol::Auto);
}

#[test]
fn reapplying_unchanged_objects_changes_nothing() {
    let mut index = mesh();
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    assert_eq!(
        index
            .apply(route("bookinfo", "split", "reviews", SPLIT))
            .unwrap(),
        Changed::default()
    );
    let (changed, refused) = index.reset(vec![
        service("bookinfo", "reviews", "10.96.0.10"),
        service("bookinfo", "reviews-v1", "10.96.0.11"),
        service("bookinfo", "reviews-v2", "10.96.0.12"),
        service("bookinfo", "reviews-v3", "10.96.0.13"),
    ]);
    assert!(refused.is_empty());
    assert_eq!(
        changed,
        Changed::default(),
        "a rescan of the same objects is quiet"
    );
}

#[test]
fn objects_that_name_another_service_move_with_it() {
    let mut index = mesh();
    let (reviews, v1, v2) = (
        key("bookinfo", "reviews"),
        key("bookinfo", "reviews-v1"),
        key("bookinfo", "reviews-v2"),
    );
    // The slice of reviews-v1 relabelled to reviews-v2: its endpoints move.
    let mut moved = slice("bookinfo", "reviews-v2", 9080, &[("10.1.0.9", true)]);
    moved.metadata.name = Some("reviews-v1-abc".into());
    let changed = index.apply(moved).unwrap();
    assert_eq!(changed.services, BTreeSet::from([v1.clone(), v2.clone()]));
    assert!(index.endpoints(&v1, 9080).is_empty());
    let ips: Vec<_> = index
        .endpoints(&v2, 9080)
        .iter()
        .map(|e| e.address.ip().to_string())
        .collect();
    assert_eq!(ips, ["10.1.0.2", "10.1.0.9"]);

    // A route re-parented from reviews to reviews-v1.
    index
        .apply(route("bookinfo", "split", "reviews", SPLIT))
        .unwrap();
    index
        .apply(route("bookinfo", "split", "reviews-v1", SPLIT))
        .unwrap();
    let routes = |k: &Key| index.outbound(k, "default").unwrap().service.routes.len();
    assert_eq!((routes(&reviews), routes(&v1)), (0, 1));

    // A consumer route in `shop` is seen by clients in `shop` only.
    index
        .apply(route("shop", "mine", "reviews", SPLIT))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(index.consumer_routes(&reviews, "shop"));
    assert!(!index.consumer_routes(&reviews, "default"));
    assert!(!index.consumer_routes(&reviews, "bookinfo"));
    index.delete::<HttpRoute>(&key("shop", "mine"));
    assert!(!index.consumer_routes(&reviews, "shop"));
}

#[test]
fn one_service_entry_is_one_of_service_entries() {
    let index = mesh();
    let all = index.service_entries();
    let keys: Vec<_> = index.service_keys().cloned().collect();
    assert_eq!(keys.len(), all.len());
    for (key, entry) in keys.iter().zip(&all) {
        assert_eq!(index.service_entry(key).as_ref(), Some(entry));
    }
    assert_eq!(index.service_entry(&key("bookinfo", "nope")), None);
}

fn grpc_route(ns: &str, name: &str, parent: &str, body: &str) -> GrpcRoute {
    obj(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{ name: {name}, namespace: {ns} }}\n\
         spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: {parent}, namespace: bookinfo }}]\n{body}"
    ))
}

/// Applies GRPCRoute `bookinfo/grpc` on reviews, one rule with one match
/// `method` to reviews-v1.
fn apply_grpc(index: &mut Index, method: &str) -> Result<Changed, Refused> {
    index.apply(grpc_route(
        "bookinfo",
        "grpc",
        "reviews",
        &format!(
            "  rules:\n  - matches: [{{ method: {method} }}]\n    backendRefs: [{{ name: reviews-v1, port: 9080 }}]\n"
        ),
    ))
}

/// reviews as a client in `client_ns` sees it.
fn reviews(index: &Index, client_ns: &str) -> Outbound {
    index
        .outbound(&key("bookinfo", "reviews"), client_ns)
        .unwrap()
}

fn route_names(index: &Index, client_ns: &str) -> Vec<String> {
    let routes = reviews(index, client_ns).service.routes;
    routes.into_iter().map(|r| r.name).collect()
}

/// The path match of the first match of the first route's first rule.
fn first_path(index: &Index) -> PathMatch {
    let routes = reviews(index, "default").service.routes;
    routes[0].rules[0].matches[0].path.clone().unwrap()
}

fn path(kind: PathMatchType, value: &str) -> PathMatch {
    PathMatch {
        kind,
        value: value.into(),
    }
}

#[test]
fn grpc_route_splits_a_method_by_weight() {
    let mut index = mesh();
    let body = "  rules:\n  - matches:\n    - method: { service: pkg.Svc, method: Method }\n      headers: [{ name: x-canary, value: \"yes\" }]\n\
                \x20   backendRefs:\n    - { name: reviews-v1, port: 9080, weight: 90 }\n    - { name: reviews-v2, port: 9080, weight: 10 }\n";
    let changed = index
        .apply(grpc_route("bookinfo", "grpc-split", "reviews", body))
        .unwrap();
    assert_eq!(
        changed.services,
        BTreeSet::from([key("bookinfo", "reviews")])
    );
    assert_eq!(route_names(&index, "default"), ["grpcroute/grpc-split"]);
    let o = reviews(&index, "default");
    assert_eq!(
        o.service.routes[0].rules[0].matches,
        [RouteMatch {
            path: Some(path(PathMatchType::Exact, "/pkg.Svc/Method")),
            headers: vec![HeaderMatch {
                kind: ValueMatchType::Exact,
                name: "x-canary".into(),
                value: "yes".into(),
            }],
            query_params: Vec::new(),
            method: None,
        }]
    );
    assert_eq!(
        backends_of(&o),
        [
            ("reviews-v1.bookinfo:9080".to_owned(), 90),
            ("reviews-v2.bookinfo:9080".to_owned(), 10),
        ]
    );
    index.proxy_config("default").validate().unwrap();
}

#[test]
fn grpc_method_matches_become_path_matches() {
    let mut index = mesh();
    let cases = [
        (
            "{ service: pkg.Svc }",
            path(PathMatchType::PathPrefix, "/pkg.Svc/"),
        ),
        (
            "{ type: Exact, method: Get.Me }",
            path(PathMatchType::RegularExpression, "/[^/]+/Get\\.Me"),
        ),
        (
            "{ type: RegularExpression, service: 'pkg\\.v[12]\\.Svc', method: 'Get|List' }",
            path(
                PathMatchType::RegularExpression,
                "/(pkg\\.v[12]\\.Svc)/(Get|List)",
            ),
        ),
        (
            "{ type: RegularExpression, method: 'List.*' }",
            path(PathMatchType::RegularExpression, "/([^/]+)/(List.*)"),
        ),
    ];
    for (method, want) in cases {
        apply_grpc(&mut index, method).unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(first_path(&index), want, "{method}");
        index.proxy_config("default").validate().unwrap();
    }

    // No matches: every call.
    let all = "  rules:\n  - backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(grpc_route("bookinfo", "grpc", "reviews", all))
        .unwrap();
    let routes = reviews(&index, "default").service.routes;
    assert!(routes[0].rules[0].matches.is_empty());
}

#[test]
fn invalid_grpc_route_is_refused_naming_the_field_and_the_last_good_version_stays() {
    let mut index = mesh();
    let good = "{ service: pkg.Svc, method: Get }";
    apply_grpc(&mut index, good).unwrap();
    let cases = [
        (
            "{ type: Exact }",
            "spec.rules[0].matches[0].method: set service, method or both",
        ),
        (
            "{ service: pkg/Svc, method: Get }",
            "spec.rules[0].matches[0].method.service: \"pkg/Svc\" must not contain '/'",
        ),
        (
            "{ service: pkg.Svc, method: a/b }",
            "spec.rules[0].matches[0].method.method: \"a/b\" must not contain '/'",
        ),
        (
            "{ type: RegularExpression, service: 'pkg(' }",
            "spec.rules[0].matches[0].method.service: invalid regular expression",
        ),
    ];
    for (method, want) in cases {
        let err = apply_grpc(&mut index, method).unwrap_err();
        let messages: Vec<String> = err.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].starts_with(&format!("GRPCRoute \"bookinfo/grpc\": {want}")),
            "{messages:?}"
        );
        assert_eq!(index.errors().count(), 1);
        assert_eq!(
            first_path(&index),
            path(PathMatchType::Exact, "/pkg.Svc/Get"),
            "the last good version stays"
        );
    }
    let bad_header = "  rules:\n  - matches: [{ headers: [{ type: RegularExpression, name: x, value: '(' }] }]\n";
    let err = index
        .apply(grpc_route("bookinfo", "grpc", "reviews", bad_header))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.rules[0].matches[0].headers[0].value: invalid regular expression"),
        "{err}"
    );
    apply_grpc(&mut index, good).unwrap();
    assert_eq!(index.errors().count(), 0);
}

#[test]
fn grpc_routes_come_before_http_routes_and_may_share_their_names() {
    let mut index = mesh();
    // Same namespace and name for both kinds; the catch-all HTTPRoute
    // would sort first by name.
    let grpc = "  rules:\n  - matches: [{ method: { service: pkg.Svc } }]\n    backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "reviews", "reviews", SPLIT))
        .unwrap();
    index
        .apply(grpc_route("bookinfo", "reviews", "reviews", grpc))
        .unwrap();
    assert_eq!(
        route_names(&index, "default"),
        ["grpcroute/reviews", "reviews"]
    );
    assert_eq!(
        first_path(&index),
        path(PathMatchType::PathPrefix, "/pkg.Svc/")
    );
    index.proxy_config("default").validate().unwrap();

    // A consumer GRPCRoute replaces both producer routes for its namespace.
    let svc = key("bookinfo", "reviews");
    index
        .apply(grpc_route("shop", "mine", "reviews", grpc))
        .unwrap();
    assert!(index.consumer_routes(&svc, "shop"));
    assert_eq!(route_names(&index, "shop"), ["grpcroute/mine"]);

    // Deleting the GRPCRoute leaves the HTTPRoute of the same name.
    let changed = index.delete::<GrpcRoute>(&key("bookinfo", "reviews"));
    assert_eq!(changed.services, BTreeSet::from([svc]));
    assert_eq!(route_names(&index, "default"), ["reviews"]);
    assert_eq!(backends_of(&reviews(&index, "default")).len(), 3);
}

#[test]
fn deleting_a_grpc_route_removes_its_routes() {
    let mut index = mesh();
    apply_grpc(&mut index, "{ service: pkg.Svc, method: Get }").unwrap();
    let changed = index.delete::<GrpcRoute>(&key("bookinfo", "grpc"));
    assert_eq!(
        changed.services,
        BTreeSet::from([key("bookinfo", "reviews")])
    );
    assert!(route_names(&index, "default").is_empty());
    assert_eq!(
        index.delete::<HttpRoute>(&key("bookinfo", "grpc")),
        Changed::default(),
        "an HTTPRoute of that name never existed"
    );
}

fn fault(ns: &str, name: &str, spec: &str) -> HttpFault {
    obj(&format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: HTTPFault\n\
         metadata: {{ name: {name}, namespace: {ns} }}\nspec: {spec}\n"
    ))
}

/// The fault filters of the first rule of `service`'s first route, as a
/// client in the service's namespace gets them.
fn rule_filters(index: &Index, service: &Key) -> Vec<mesh_api::RouteFilter> {
    let svc = index.outbound(service, &service.namespace).unwrap().service;
    svc.routes[0].rules[0].filters.clone()
}

#[test]
fn an_extension_ref_to_an_http_fault_carries_its_settings_and_follows_it() {
    let mut index = mesh();
    let reviews = key("bookinfo", "reviews");
    let faulted = "  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: { group: trellis.dev, kind: HTTPFault, name: flaky }\n\
                   \x20   backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "faulted", "reviews", faulted))
        .unwrap();
    // Named before it exists: the rule answers 500 rather than skip it.
    assert_eq!(
        rule_filters(&index, &reviews),
        [mesh_api::RouteFilter::Unsupported(
            "HTTPFault bookinfo/flaky does not exist".into()
        )]
    );
    assert_eq!(index.errors().count(), 0, "the route itself is fine");

    let changed = index
        .apply(fault(
            "bookinfo",
            "flaky",
            "{ abort: { httpStatus: 503, percent: 10 } }",
        ))
        .unwrap();
    assert!(changed.services.contains(&reviews), "{changed:?}");
    let abort = mesh_api::FaultAbort {
        status: mesh_api::AbortStatus::Http(503),
        per_million: 100_000,
    };
    assert_eq!(
        rule_filters(&index, &reviews),
        [mesh_api::RouteFilter::Fault(mesh_api::Fault {
            name: "bookinfo/flaky".into(),
            delay: None,
            abort: Some(abort),
        })]
    );
    index.proxy_config("bookinfo").validate().unwrap();

    // An invalid edit is refused and the last good version stays.
    let refused = index
        .apply(fault("bookinfo", "flaky", "{ abort: { httpStatus: 200 } }"))
        .unwrap_err();
    assert_eq!(refused.errors[0].field, "spec.abort.httpStatus");
    assert!(matches!(
        &rule_filters(&index, &reviews)[0],
        mesh_api::RouteFilter::Fault(f) if f.abort == Some(abort)
    ));

    // A fault nobody names changes no service; deleting the named one
    // changes reviews back to 500.
    let other = index
        .apply(fault("bookinfo", "unused", "{ delay: { fixedDelay: 1s } }"))
        .unwrap();
    assert!(other.services.is_empty(), "{other:?}");
    let gone = index.delete::<HttpFault>(&key("bookinfo", "flaky"));
    assert!(gone.services.contains(&reviews));
    assert!(matches!(
        &rule_filters(&index, &reviews)[0],
        mesh_api::RouteFilter::Unsupported(_)
    ));
}

#[test]
fn an_extension_ref_of_another_kind_is_applied_as_500_and_reported() {
    let mut index = mesh();
    let other = "  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: { group: example.com, kind: Lua, name: script }\n\
                 \x20   backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "lua", "reviews", other))
        .unwrap();
    let reported: Vec<String> = index
        .errors()
        .flat_map(|(_, _, errors)| errors.iter().map(|e| e.reason.clone()))
        .collect();
    assert_eq!(reported.len(), 1);
    assert!(
        reported[0].contains("the mesh's only extension filter is HTTPFault"),
        "{reported:?}"
    );
    assert!(matches!(
        &rule_filters(&index, &key("bookinfo", "reviews"))[0],
        mesh_api::RouteFilter::Unsupported(_)
    ));
}

#[test]
fn a_request_mirror_names_its_backend_which_the_proxy_is_sent() {
    let mut index = mesh();
    let reviews = key("bookinfo", "reviews");
    // The mirror's Service may be in another namespace (GEP-1294).
    let mirrored = "  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror: { backendRef: { name: reviews-v3, port: 9080 }, percent: 25 }\n\
                    \x20   - type: RequestMirror\n      requestMirror: { backendRef: { name: shadow, namespace: staging, port: 8080 }, fraction: { numerator: 1, denominator: 3 } }\n\
                    \x20   backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    index
        .apply(route("bookinfo", "mirrored", "reviews", mirrored))
        .unwrap();
    assert_eq!(index.errors().count(), 0);
    assert_eq!(
        rule_filters(&index, &reviews),
        [
            mesh_api::RouteFilter::RequestMirror(mesh_api::RequestMirror {
                backend: "reviews-v3.bookinfo:9080".into(),
                per_million: 250_000,
            }),
            mesh_api::RouteFilter::RequestMirror(mesh_api::RequestMirror {
                backend: "shadow.staging:8080".into(),
                per_million: 333_333,
            }),
        ]
    );
    let backends: Vec<String> = index
        .outbound(&reviews, "bookinfo")
        .unwrap()
        .backends
        .into_iter()
        .map(|b| b.name)
        .collect();
    for mirror in ["reviews-v3.bookinfo:9080", "shadow.staging:8080"] {
        assert!(backends.iter().any(|b| b == mirror), "{backends:?}");
    }

    let bad = "  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror: { backendRef: { name: reviews-v3 }, percent: 101 }\n\
               \x20   - type: RequestMirror\n      requestMirror: { backendRef: { name: reviews-v3, port: 9080 }, percent: 5, fraction: { numerator: 1 } }\n\
               \x20   - type: RequestMirror\n      requestMirror: { backendRef: { name: reviews-v3, port: 9080 }, fraction: { numerator: 3, denominator: 2 } }\n\
               \x20   - type: RequestMirror\n\
               \x20   backendRefs: [{ name: reviews-v1, port: 9080 }]\n";
    let err = index
        .apply(route("bookinfo", "bad-mirror", "reviews", bad))
        .unwrap_err();
    let fields: Vec<(&str, &str)> = err
        .errors
        .iter()
        .map(|e| (e.field.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (
                "spec.rules[0].filters[0].requestMirror.percent",
                "101 is not 0 to 100"
            ),
            (
                "spec.rules[0].filters[0].requestMirror.backendRef.port",
                "required for a Service backend"
            ),
            (
                "spec.rules[0].filters[1].requestMirror",
                "set percent or fraction, not both"
            ),
            (
                "spec.rules[0].filters[2].requestMirror.fraction.numerator",
                "3 is more than the denominator 2"
            ),
            (
                "spec.rules[0].filters[3].requestMirror",
                "required for type RequestMirror"
            ),
        ]
    );
}

#[test]
fn a_grpc_routes_retry_annotations_retry_its_grpc_statuses() {
    let mut index = mesh();
    let mut retried = grpc_route(
        "bookinfo",
        "retried",
        "reviews",
        "  rules:\n  - backendRefs: [{ name: reviews-v1, port: 9080 }]\n  - backendRefs: [{ name: reviews-v2, port: 9080 }]\n",
    );
    retried.metadata.annotations = Some(
        [
            (
                "retry.trellis.dev/codes",
                "unavailable, RESOURCE_EXHAUSTED, 4",
            ),
            ("retry.trellis.dev/attempts", "3"),
            ("retry.trellis.dev/backoff", "50ms"),
            ("example.com/other", "ignored"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into(),
    );
    index.apply(retried.clone()).unwrap();
    let o = index
        .outbound(&key("bookinfo", "reviews"), "bookinfo")
        .unwrap();
    let expected = Some(mesh_api::Retry {
        attempts: 3,
        codes: Vec::new(),
        grpc_codes: vec![14, 8, 4],
        backoff_ms: 50,
    });
    // On every rule of the route.
    for rule in &o.service.routes[0].rules {
        assert_eq!(rule.retry, expected);
    }

    retried.metadata.annotations = Some(
        [
            ("retry.trellis.dev/codes", "unavailable, nope, 17"),
            ("retry.trellis.dev/attempts", "11"),
            ("retry.trellis.dev/limit", "2"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into(),
    );
    let err = index.apply(retried).unwrap_err();
    let fields: Vec<(&str, &str)> = err
        .errors
        .iter()
        .map(|e| (e.field.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            (
                "metadata.annotations[\"retry.trellis.dev/attempts\"]",
                "\"11\" is not 0 to 10"
            ),
            (
                "metadata.annotations[\"retry.trellis.dev/codes\"]",
                "\"nope\" is not a gRPC error status (1 to 16, or a name such as unavailable)"
            ),
            (
                "metadata.annotations[\"retry.trellis.dev/codes\"]",
                "\"17\" is not a gRPC error status (1 to 16, or a name such as unavailable)"
            ),
            (
                "metadata.annotations[\"retry.trellis.dev/limit\"]",
                "unknown annotation: retry.trellis.dev/ takes codes, attempts and backoff"
            ),
        ]
    );
}
