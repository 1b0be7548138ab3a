#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use mesh_api as m;
use prost::Message;

use super::*;
use crate::discovery::v1 as w;

fn port(
    port: u16,
    name: Option<&str>,
    protocol: m::Protocol,
    backend: Option<&str>,
) -> m::ServicePort {
    m::ServicePort {
        port,
        name: name.map(str::to_owned),
        protocol,
        backend: backend.map(str::to_owned),
    }
}

fn path(kind: m::PathMatchType, value: &str) -> Option<m::PathMatch> {
    Some(m::PathMatch {
        kind,
        value: value.to_owned(),
    })
}

fn backend_ref(name: &str, weight: u32) -> m::BackendRef {
    m::BackendRef {
        name: name.to_owned(),
        weight,
        filters: Vec::new(),
    }
}

/// One filter of every kind, each path rewrite kind, set and unset parts.
fn every_filter() -> Vec<m::RouteFilter> {
    let header = |name: &str, value: &str| m::HttpHeader {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    vec![
        m::RouteFilter::RequestHeaderModifier(m::HeaderModifier {
            set: vec![header("x-set", "1")],
            add: vec![header("x-add", "a"), header("x-add", "b")],
            remove: vec!["x-drop".to_owned()],
        }),
        m::RouteFilter::ResponseHeaderModifier(m::HeaderModifier::default()),
        m::RouteFilter::RequestRedirect(m::RequestRedirect {
            scheme: Some("https".to_owned()),
            hostname: Some("example.com".to_owned()),
            path: Some(m::PathRewrite::ReplacePrefixMatch("/new".to_owned())),
            port: Some(8443),
            status_code: 301,
        }),
        m::RouteFilter::RequestRedirect(m::RequestRedirect {
            scheme: None,
            hostname: None,
            path: None,
            port: None,
            status_code: 302,
        }),
        m::RouteFilter::UrlRewrite(m::UrlRewrite {
            hostname: None,
            path: Some(m::PathRewrite::ReplaceFullPath("/full".to_owned())),
        }),
        m::RouteFilter::Unsupported("the CORS filter is not supported".to_owned()),
    ]
}

fn backend(name: &str, algorithm: m::LoadBalancerAlgorithm, protocol: m::Protocol) -> m::Backend {
    m::Backend {
        name: name.to_owned(),
        endpoints: Vec::new(),
        load_balancer: m::LoadBalancer { algorithm },
        protocol,
        retry_budget: m::RetryBudget::default(),
        limits: m::ConnectionLimits::default(),
        outlier_detection: None,
    }
}

/// A service with routes using every match type, weights (including 0),
/// per-port backends, a default backend, host names and both address
/// families.
fn reviews() -> (m::Service, Vec<m::Backend>) {
    let service = m::Service {
        name: "reviews".to_owned(),
        namespace: "bookinfo".to_owned(),
        hostnames: vec!["reviews.example.com".to_owned()],
        addresses: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        endpoint_addresses: Vec::new(),
        ports: vec![
            port(
                9080,
                Some("http"),
                m::Protocol::Http,
                Some("reviews.bookinfo:9080"),
            ),
            port(9090, None, m::Protocol::Grpc, Some("reviews.bookinfo:9090")),
            port(9091, Some("h2"), m::Protocol::Http2, None),
            port(9092, Some("raw"), m::Protocol::Tcp, None),
            port(9093, None, m::Protocol::Auto, None),
        ],
        routes: vec![
            m::HttpRoute {
                name: "reviews-canary".to_owned(),
                namespace: "bookinfo".to_owned(),
                rules: vec![
                    m::RouteRule {
                        matches: vec![
                            m::RouteMatch {
                                path: path(m::PathMatchType::Exact, "/reviews/1"),
                                headers: vec![
                                    m::HeaderMatch {
                                        kind: m::ValueMatchType::Exact,
                                        name: "x-user".to_owned(),
                                        value: "jason".to_owned(),
                                    },
                                    m::HeaderMatch {
                                        kind: m::ValueMatchType::RegularExpression,
                                        name: "x-trace".to_owned(),
                                        value: "^[0-9a-f]+$".to_owned(),
                                    },
                                ],
                                query_params: vec![
                                    m::QueryParamMatch {
                                        kind: m::ValueMatchType::Exact,
                                        name: "debug".to_owned(),
                                        value: "1".to_owned(),
                                    },
                                    m::QueryParamMatch {
                                        kind: m::ValueMatchType::RegularExpression,
                                        name: "v".to_owned(),
                                        value: "v[23]".to_owned(),
                                    },
                                ],
                                method: Some("GET".to_owned()),
                            },
                            m::RouteMatch {
                                path: path(m::PathMatchType::RegularExpression, "/r/[0-9]+"),
                                ..Default::default()
                            },
                            // No conditions at all: matches every request.
                            m::RouteMatch::default(),
                        ],
                        backend_refs: vec![m::BackendRef {
                            filters: every_filter(),
                            ..backend_ref("reviews-v2.bookinfo:9080", 1)
                        }],
                        filters: every_filter(),
                        timeouts: m::Timeouts {
                            request_ms: Some(10_000),
                            backend_request_ms: Some(2_500),
                        },
                        retry: Some(m::Retry {
                            attempts: 3,
                            codes: vec![500, 503],
                            grpc_codes: vec![14, 8],
                            backoff_ms: 50,
                        }),
                    },
                    m::RouteRule {
                        matches: vec![m::RouteMatch {
                            path: path(m::PathMatchType::PathPrefix, "/"),
                            method: Some("POST".to_owned()),
                            ..Default::default()
                        }],
                        backend_refs: vec![
                            backend_ref("reviews-v1.bookinfo:9080", 90),
                            backend_ref("reviews-v2.bookinfo:9080", 10),
                            backend_ref("reviews-v3.bookinfo:9080", 0),
                        ],
                        filters: Vec::new(),
                        timeouts: m::Timeouts {
                            request_ms: None,
                            backend_request_ms: Some(100),
                        },
                        retry: None,
                    },
                    // No matches (every request) and no backends (500).
                    m::RouteRule {
                        matches: Vec::new(),
                        backend_refs: Vec::new(),
                        filters: Vec::new(),
                        timeouts: m::Timeouts::default(),
                        retry: Some(m::Retry {
                            attempts: 0,
                            codes: Vec::new(),
                            grpc_codes: Vec::new(),
                            backoff_ms: 0,
                        }),
                    },
                ],
                ports: vec![9080, 9093],
            },
            m::HttpRoute {
                name: "reviews-consumer".to_owned(),
                namespace: "productpage".to_owned(),
                rules: vec![m::RouteRule {
                    matches: Vec::new(),
                    backend_refs: vec![backend_ref("reviews-v3.bookinfo:9080", 1)],
                    filters: Vec::new(),
                    timeouts: m::Timeouts::default(),
                    retry: None,
                }],
                ports: Vec::new(),
            },
        ],
        backend: Some("reviews.bookinfo:9093".to_owned()),
    };
    let backends = vec![
        backend(
            "reviews.bookinfo:9080",
            m::LoadBalancerAlgorithm::PeakEwma,
            m::Protocol::Http,
        ),
        backend(
            "reviews.bookinfo:9090",
            m::LoadBalancerAlgorithm::RoundRobin,
            m::Protocol::Grpc,
        ),
        backend(
            "reviews.bookinfo:9093",
            m::LoadBalancerAlgorithm::PeakEwma,
            m::Protocol::Auto,
        ),
        backend(
            "reviews-v1.bookinfo:9080",
            m::LoadBalancerAlgorithm::RoundRobin,
            m::Protocol::Http2,
        ),
        backend(
            "reviews-v2.bookinfo:9080",
            m::LoadBalancerAlgorithm::PeakEwma,
            m::Protocol::Tcp,
        ),
        backend(
            "reviews-v3.bookinfo:9080",
            m::LoadBalancerAlgorithm::PeakEwma,
            m::Protocol::Http,
        ),
    ];
    (service, backends)
}

fn endpoints_v1() -> Vec<m::Endpoint> {
    vec![
        m::Endpoint {
            address: "10.244.0.5:9080".parse().unwrap(),
            workload: Some("reviews-v1".to_owned()),
            labels: BTreeMap::from([
                ("app".to_owned(), "reviews".to_owned()),
                ("version".to_owned(), "v1".to_owned()),
            ]),
            identity: Some("spiffe://cluster.local/ns/default/sa/reviews".to_owned()),
        },
        m::Endpoint {
            address: "[fd00::5]:9080".parse().unwrap(),
            workload: None,
            labels: BTreeMap::new(),
            identity: None,
        },
    ]
}

/// Through the bytes, as the discovery stream carries it.
fn through_wire<T: Message + Default>(msg: &T) -> T {
    T::decode(msg.encode_to_vec().as_slice()).unwrap()
}

#[test]
fn outbound_service_round_trips() {
    let (service, backends) = reviews();
    let wire = through_wire(&outbound_service(&service, &backends));
    assert_eq!(wire.default_backend, "reviews.bookinfo:9093");
    assert!(wire.backends.iter().all(|b| b.endpoints == b.name));
    let (service2, backends2) = outbound_from_wire(&wire).unwrap();
    assert_eq!(service2, service);
    assert_eq!(backends2, backends);
}

#[test]
fn outbound_service_without_default_backend_round_trips() {
    let (mut service, backends) = reviews();
    service.backend = None;
    service.routes.clear();
    let wire = outbound_service(&service, &backends);
    assert_eq!(wire.default_backend, "");
    assert_eq!(outbound_from_wire(&wire).unwrap(), (service, backends));
}

#[test]
fn outbound_service_leaves_out_endpoints() {
    let (service, mut backends) = reviews();
    backends[0].endpoints = endpoints_v1();
    let wire = outbound_service(&service, &backends);
    let (_, backends2) = outbound_from_wire(&wire).unwrap();
    assert!(backends2[0].endpoints.is_empty());
}

#[test]
fn service_index_entry_round_trips_addressing() {
    let (mut service, _) = reviews();
    service.endpoint_addresses = vec!["10.1.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
    let entry = through_wire(&service_index_entry(&service));
    assert_eq!(entry.addresses, ["10.96.0.10", "fd00::10"]);
    assert_eq!(entry.endpoint_addresses, ["10.1.0.7", "fd00::7"]);
    assert!(entry.ports.iter().all(|p| p.backend.is_empty()));

    // Routing is the outbound resource's business.
    service.routes.clear();
    service.backend = None;
    for p in &mut service.ports {
        p.backend = None;
    }
    assert_eq!(service_from_index_entry(&entry).unwrap(), service);
}

#[test]
fn endpoints_round_trip() {
    let eps = endpoints_v1();
    let wire = through_wire(&endpoints("reviews-v1.bookinfo:9080", &eps));
    assert_eq!(wire.name, "reviews-v1.bookinfo:9080");
    assert_eq!(wire.endpoints[1].address, "[fd00::5]:9080");
    assert_eq!(
        endpoints_from_wire(&wire).unwrap(),
        ("reviews-v1.bookinfo:9080".to_owned(), eps)
    );
    let empty = endpoints_from_wire(&endpoints("x.y:1", &[])).unwrap();
    assert_eq!(empty, ("x.y:1".to_owned(), Vec::new()));
}

#[test]
fn assembled_config_from_the_wire_validates() {
    let (service, backends) = reviews();
    let (service, mut backends) =
        outbound_from_wire(&outbound_service(&service, &backends)).unwrap();
    for b in &mut backends {
        let wire = endpoints(&b.name, &endpoints_v1());
        let (name, eps) = endpoints_from_wire(&wire).unwrap();
        assert_eq!(name, b.name);
        b.endpoints = eps;
    }
    let config = m::ProxyConfig {
        inbound: Default::default(),
        services: vec![service],
        backends,
        ..Default::default()
    };
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn enums_convert_both_ways() {
    for p in [
        m::Protocol::Auto,
        m::Protocol::Http,
        m::Protocol::Http2,
        m::Protocol::Grpc,
        m::Protocol::Tcp,
    ] {
        assert_eq!(m::Protocol::from(w::Protocol::from(p)), p);
    }
    for t in [
        m::PathMatchType::Exact,
        m::PathMatchType::PathPrefix,
        m::PathMatchType::RegularExpression,
    ] {
        assert_eq!(m::PathMatchType::from(w::PathMatchType::from(t)), t);
    }
    for t in [
        m::ValueMatchType::Exact,
        m::ValueMatchType::RegularExpression,
    ] {
        assert_eq!(m::ValueMatchType::from(w::ValueMatchType::from(t)), t);
    }
    for a in [
        m::LoadBalancerAlgorithm::PeakEwma,
        m::LoadBalancerAlgorithm::RoundRobin,
    ] {
        assert_eq!(
            m::LoadBalancerAlgorithm::from(w::LoadBalancerAlgorithm::from(a)),
            a
        );
    }
    // The proto defaults (value 0) are the model's defaults.
    assert_eq!(
        m::PathMatchType::from(w::PathMatchType::default()),
        m::PathMatchType::default()
    );
    assert_eq!(
        m::Protocol::from(w::Protocol::default()),
        m::Protocol::default()
    );
}

#[test]
fn missing_load_balancer_is_the_default() {
    let (service, backends) = reviews();
    let mut wire = outbound_service(&service, &backends);
    wire.backends[1].load_balancer = None;
    let (_, backends2) = outbound_from_wire(&wire).unwrap();
    assert_eq!(backends2[1].load_balancer, m::LoadBalancer::default());
}

fn outbound_error(edit: impl FnOnce(&mut w::OutboundService)) -> ConvertError {
    let (service, backends) = reviews();
    let mut wire = outbound_service(&service, &backends);
    edit(&mut wire);
    outbound_from_wire(&wire).unwrap_err()
}

#[test]
fn bad_endpoint_address_names_resource_and_field() {
    let mut wire = endpoints("reviews-v1.bookinfo:9080", &endpoints_v1());
    wire.endpoints[1].address = "10.0.0.1".to_owned();
    let err = endpoints_from_wire(&wire).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"Endpoints "reviews-v1.bookinfo:9080": endpoints[1].address: "10.0.0.1" is not ip:port"#
    );
    assert_eq!(err.problem, Problem::NotSocketAddr("10.0.0.1".to_owned()));
}

#[test]
fn endpoint_port_zero_is_an_error() {
    let mut wire = endpoints("b", &endpoints_v1());
    wire.endpoints[0].address = "10.0.0.1:0".to_owned();
    let err = endpoints_from_wire(&wire).unwrap_err();
    assert_eq!(err.field, "endpoints[0].address");
    assert_eq!(err.problem, Problem::BadPort(0));
}

#[test]
fn bad_service_address_is_an_error() {
    let err = outbound_error(|w| w.addresses[1] = "10.0.0.300".to_owned());
    assert_eq!(
        err.to_string(),
        r#"OutboundService "bookinfo/reviews": addresses[1]: "10.0.0.300" is not an IP address"#
    );

    let (service, _) = reviews();
    let mut entry = service_index_entry(&service);
    entry.addresses[0] = "10.96.0.10:80".to_owned();
    let err = service_from_index_entry(&entry).unwrap_err();
    assert_eq!(err.resource_type, "ServiceIndexEntry");
    assert_eq!(err.resource, "bookinfo/reviews");
    assert_eq!(err.field, "addresses[0]");
}

#[test]
fn zero_and_oversized_ports_are_errors() {
    let err = outbound_error(|w| w.ports[2].port = 0);
    assert_eq!(
        err.to_string(),
        r#"OutboundService "bookinfo/reviews": ports[2].port: 0 is not a port; ports are 1-65535"#
    );

    let (service, _) = reviews();
    let mut entry = service_index_entry(&service);
    entry.ports[0].port = 65536;
    let err = service_from_index_entry(&entry).unwrap_err();
    assert_eq!(err.field, "ports[0].port");
    assert_eq!(err.problem, Problem::BadPort(65536));
}

#[test]
fn unknown_enum_values_are_errors() {
    let unknown = |enum_name| Problem::UnknownEnum {
        enum_name,
        value: 42,
    };

    let err = outbound_error(|w| w.ports[0].protocol = 42);
    assert_eq!(
        (err.field.as_str(), err.problem),
        ("ports[0].protocol", unknown("Protocol"))
    );

    let err = outbound_error(|w| w.backends[3].protocol = 42);
    assert_eq!(
        (err.field.as_str(), err.problem),
        ("backends[3].protocol", unknown("Protocol"))
    );

    let err = outbound_error(|w| {
        w.backends[1].load_balancer = Some(w::LoadBalancer { algorithm: 42 });
    });
    assert_eq!(
        err.to_string(),
        r#"OutboundService "bookinfo/reviews": backends[1].load_balancer.algorithm: 42 is not a known LoadBalancerAlgorithm value; is the control plane newer than this proxy?"#
    );

    let err = outbound_error(|w| {
        if let Some(p) = &mut w.routes[0].rules[0].matches[1].path {
            p.r#type = 42;
        }
    });
    assert_eq!(
        (err.field.as_str(), err.problem),
        (
            "routes[0].rules[0].matches[1].path.type",
            unknown("PathMatchType")
        )
    );

    let err = outbound_error(|w| w.routes[0].rules[0].matches[0].headers[1].r#type = 42);
    assert_eq!(
        (err.field.as_str(), err.problem),
        (
            "routes[0].rules[0].matches[0].headers[1].type",
            unknown("ValueMatchType")
        )
    );

    let err = outbound_error(|w| w.routes[0].rules[0].matches[0].query_params[0].r#type = -1);
    assert_eq!(
        err.field,
        "routes[0].rules[0].matches[0].query_params[0].type"
    );
    assert_eq!(
        err.problem,
        Problem::UnknownEnum {
            enum_name: "ValueMatchType",
            value: -1
        }
    );

    let (service, _) = reviews();
    let mut entry = service_index_entry(&service);
    entry.ports[4].protocol = 5;
    let err = service_from_index_entry(&entry).unwrap_err();
    assert_eq!(err.field, "ports[4].protocol");
}

#[test]
fn backend_endpoints_must_name_the_backend() {
    let err = outbound_error(|w| w.backends[0].endpoints = "other".to_owned());
    assert_eq!(err.field, "backends[0].endpoints");
    assert_eq!(
        err.problem,
        Problem::EndpointsName {
            backend: "reviews.bookinfo:9080".to_owned(),
            found: "other".to_owned(),
        }
    );
}

#[test]
fn resource_names() {
    assert_eq!(resource_name("bookinfo", "reviews"), "bookinfo/reviews");
    assert_eq!(
        parse_resource_name("bookinfo/reviews"),
        Some(("bookinfo", "reviews"))
    );
    for bad in ["reviews", "/reviews", "bookinfo/", "a/b/c", "", "/"] {
        assert_eq!(parse_resource_name(bad), None, "{bad:?}");
    }
}

#[test]
fn versions_are_stable_content_hashes() {
    // FNV-1a's offset basis: the hash of no bytes. Pins the algorithm, so
    // versions survive a control plane upgrade.
    assert_eq!(version_of(&w::Endpoints::default()), "cbf29ce484222325");

    let (service, backends) = reviews();
    let a = outbound_service(&service, &backends);
    let v = version_of(&a);
    assert_eq!(v.len(), 16);
    assert_eq!(version_of(&through_wire(&a)), v);
    assert_eq!(version_of(&outbound_service(&service, &backends)), v);
    assert_eq!(version_of_encoded(&a.encode_to_vec()), v);
    // FNV-1a 64 of "a", a published test vector.
    assert_eq!(version_of_encoded(b"a"), "af63dc4c8601ec8c");

    let mut b = a.clone();
    b.routes[0].rules[1].backend_refs[0].weight = 80;
    assert_ne!(version_of(&b), v);

    // Map fields encode in key order, whatever the insertion order.
    let mut e1 = endpoints("b", &endpoints_v1());
    let mut e2 = e1.clone();
    e1.endpoints[0].labels.clear();
    e2.endpoints[0].labels.clear();
    for i in 0..50 {
        e1.endpoints[0]
            .labels
            .insert(format!("k{i}"), i.to_string());
        e2.endpoints[0]
            .labels
            .insert(format!("k{}", 49 - i), (49 - i).to_string());
    }
    assert_eq!(version_of(&e1), version_of(&e2));
}

#[test]
fn inbound_policy_round_trips() {
    let policy: m::InboundPolicy = serde_yaml::from_str(
        "mtls: PERMISSIVE\n\
         authorization:\n\
         - name: no-admin\n  namespace: shop\n  action: DENY\n  rules:\n\
         \x20 - from: [{ principals: [cluster.local/ns/shop/sa/ratings], namespaces: [shop] }]\n\
         \x20   to: [{ paths: [/admin/*], methods: [GET], ports: [9080] }]\n\
         - { name: allow-nothing, namespace: shop, rules: [] }\n\
         rateLimits:\n\
         - { name: rl, namespace: shop, requests: 10, per: 1500ms, burst: 3 }\n\
         - { name: route-rl, namespace: shop, requests: 5, per: 1s, route: reviews-split }\n",
    )
    .unwrap();
    policy.validate().unwrap();
    let wire = through_wire(&inbound_config("shop", "reviews-v1", &policy));
    assert_eq!(inbound_from_wire(&wire).unwrap(), policy);
    assert_eq!(m::InboundPolicy::default(), {
        let wire = inbound_config("shop", "x", &m::InboundPolicy::default());
        inbound_from_wire(&wire).unwrap()
    });
}

#[test]
fn inbound_config_errors_name_the_field() {
    let mut wire = inbound_config("shop", "reviews-v1", &m::InboundPolicy::default());
    wire.mtls = 7;
    let err = inbound_from_wire(&wire).unwrap_err();
    assert_eq!(err.resource, "shop/reviews-v1");
    assert_eq!(err.field, "mtls");
}
