use super::*;

const GOOD: &str = r#"
workload: { name: productpage, namespace: default }
listeners:
  - name: outbound
    address: 127.0.0.1:15001
    direction: outbound
    mode: explicit
  - name: inbound
    address: 127.0.0.1:15006
    direction: inbound
    mode: fixed
    target: productpage-local
services:
  - name: productpage-local
    ports: [{ port: 9080 }]
  - name: reviews
    addresses: [10.96.0.10]
    ports: [{ port: 9080, protocol: http }]
    routes:
      - name: reviews-split
        rules:
          - matches:
              - path: { type: PathPrefix, value: /reviews }
                headers: [{ name: x-user, value: jason }]
            backendRefs: [{ name: reviews-v2 }]
          - backendRefs:
              - { name: reviews-v1, weight: 80 }
              - { name: reviews-v2, weight: 10 }
              - { name: reviews-v3, weight: 10 }
backends:
  - name: productpage-local
    endpoints: [{ address: 127.0.0.1:9080 }]
  - name: reviews-v1
    endpoints: [{ address: 127.0.0.1:9081, workload: reviews-v1, labels: { version: v1 } }]
  - name: reviews-v2
    endpoints: [{ address: 127.0.0.1:9082 }]
    loadBalancer: { algorithm: roundRobin }
  - name: reviews-v3
    endpoints: [{ address: 127.0.0.1:9083 }]
"#;

fn errors(yaml: &str) -> Vec<String> {
    match ProxyConfig::from_yaml(yaml) {
        Err(ConfigError::Invalid(errs)) => errs.iter().map(ToString::to_string).collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn good_config_parses_with_defaults() {
    let c = ProxyConfig::from_yaml(GOOD).unwrap();
    assert_eq!(c.listeners[1].mode, ListenerMode::Fixed);
    assert_eq!(c.listeners[0].protocol, Protocol::Auto);
    assert_eq!(c.listeners[0].detect_timeout_ms, DEFAULT_DETECT_TIMEOUT_MS);
    let rule = &c.services[1].routes[0].rules[0];
    assert_eq!(rule.backend_refs[0].weight, 1);
    assert_eq!(rule.matches[0].headers[0].kind, ValueMatchType::Exact);
    assert_eq!(
        c.backends[2].load_balancer.algorithm,
        LoadBalancerAlgorithm::RoundRobin
    );
    assert_eq!(
        c.backends[1].load_balancer.algorithm,
        LoadBalancerAlgorithm::PeakEwma
    );
    assert_eq!(c.services[1].namespace, "default");
    assert!(
        c.services[1]
            .all_hostnames()
            .contains(&"reviews.default.svc.cluster.local".to_owned())
    );
}

#[test]
fn round_trips_through_json_and_yaml() {
    let c = ProxyConfig::from_yaml(GOOD).unwrap();
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<ProxyConfig>(&json).unwrap(), c);
    let yaml = serde_yaml::to_string(&c).unwrap();
    assert_eq!(ProxyConfig::from_yaml(&yaml).unwrap(), c);
}

#[test]
fn yaml_errors_carry_the_location() {
    let err =
        ProxyConfig::from_yaml("listeners:\n  - name: a\n    adress: 1.2.3.4:5\n").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("unknown field `adress`"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
}

#[test]
fn unknown_references_name_object_and_field() {
    let yaml = GOOD.replace(
        "- { name: reviews-v3, weight: 10 }",
        "- { name: reviews-v4, weight: 10 }",
    );
    let errs = errors(&yaml);
    assert_eq!(
        errs,
        vec![
            "service \"default/reviews\": routes[0].rules[1].backendRefs[2].name: \
             no backend named \"reviews-v4\" is defined"
        ]
    );
}

#[test]
fn bad_regex_path_and_method_are_reported_together() {
    let yaml = GOOD
        .replace(
            "{ type: PathPrefix, value: /reviews }",
            "{ type: RegularExpression, value: '/r(' }",
        )
        .replace("headers: [{ name: x-user, value: jason }]", "method: get");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].contains("routes[0].rules[0].matches[0].path.value: invalid regular expression")
    );
    assert!(errs[1].contains("matches[0].method: \"get\" is not an upper-case HTTP method"));
}

#[test]
fn prefix_must_start_with_slash() {
    let yaml = GOOD.replace("value: /reviews", "value: reviews");
    assert!(errors(&yaml)[0].ends_with("path.value: must start with '/'"));
}

#[test]
fn fixed_listener_needs_a_known_target() {
    let yaml = GOOD.replace("target: productpage-local", "target: nope");
    assert_eq!(
        errors(&yaml),
        vec!["listener \"inbound\": target: no service named \"nope\" is defined"]
    );
    let yaml = GOOD.replace("    target: productpage-local\n", "");
    assert!(errors(&yaml)[0].contains("mode fixed needs the name of a target service"));
}

#[test]
fn duplicates_are_rejected() {
    let yaml = GOOD.replace(
        "name: inbound\n    address: 127.0.0.1:15006",
        "name: outbound\n    address: 127.0.0.1:15001",
    );
    let errs = errors(&yaml);
    assert!(
        errs.iter()
            .any(|e| e.contains("another listener has the same name")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("127.0.0.1:15001 is used by another listener")),
        "{errs:?}"
    );
}

#[test]
fn service_without_route_needs_its_backend() {
    let yaml = GOOD.replace(
        "  - name: productpage-local\n    endpoints",
        "  - name: pp\n    endpoints",
    );
    assert_eq!(
        errors(&yaml),
        vec![
            "service \"default/productpage-local\": name: no backend named \"productpage-local\"; \
             define it or attach a route to the service"
        ]
    );
}

#[test]
fn bad_service_names_and_ports() {
    let yaml = GOOD
        .replace(
            "name: reviews\n    addresses",
            "name: Reviews\n    addresses",
        )
        .replace(
            "ports: [{ port: 9080, protocol: http }]",
            "ports: [{ port: 0 }]",
        );
    let errs = errors(&yaml);
    assert!(
        errs.iter()
            .any(|e| e.contains("\"default/Reviews\": name: must be a DNS label")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("ports[0].port: must be 1-65535")),
        "{errs:?}"
    );
}

#[test]
fn filters_are_checked_where_they_stand() {
    let yaml = r#"
services:
  - name: shop
    ports: [{ port: 80 }]
    routes:
      - name: r
        rules:
          - filters:
              - requestHeaderModifier: { set: [{ name: "bad name", value: v }] }
              - requestRedirect: { statusCode: 200, scheme: ftp }
              - urlRewrite: { path: { replaceFullPath: relative } }
            backendRefs:
              - name: shop
                filters: [{ responseHeaderModifier: { remove: ["x y"] } }]
backends:
  - { name: shop }
"#;
    assert_eq!(
        errors(yaml),
        [
            "service \"default/shop\": routes[0].rules[0].filters[0]: \"bad name\" is not a valid header name",
            "service \"default/shop\": routes[0].rules[0].filters[1].requestRedirect.statusCode: 200 is not 301, 302, 303, 307 or 308",
            "service \"default/shop\": routes[0].rules[0].filters[1].requestRedirect.scheme: \"ftp\" is not http or https",
            "service \"default/shop\": routes[0].rules[0].filters[2].urlRewrite.path: must start with '/'",
            "service \"default/shop\": routes[0].rules[0].backendRefs[0].filters[0]: \"x y\" is not a valid header name",
        ]
    );
}
