use super::*;
use crate::ValidationError;

fn policy<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).unwrap()
}

/// The `(field, reason)` pairs, with the object name checked once.
fn fields(object: &str, errors: Vec<ValidationError>) -> Vec<String> {
    for e in &errors {
        assert_eq!(e.object, object, "{e}");
    }
    errors.into_iter().map(|e| e.field).collect()
}

#[test]
fn peer_authentication_defaults_to_strict_and_namespace_wide() {
    let pa: PeerAuthentication = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: bookinfo }
spec: {}
",
    );
    assert_eq!(pa.spec.mtls.mode, MtlsMode::Strict);
    assert!(pa.spec.is_namespace_wide());
    assert!(pa.spec.applies_to(&BTreeMap::new()));
    assert!(pa.validate().is_empty());
}

#[test]
fn peer_authentication_with_selector_applies_to_matching_pods() {
    let pa: PeerAuthentication = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: reviews, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  mtls: { mode: PERMISSIVE }
",
    );
    assert_eq!(pa.spec.mtls.mode, MtlsMode::Permissive);
    assert!(!pa.spec.is_namespace_wide());
    let labels = |app: &str| BTreeMap::from([("app".into(), app.into()), ("v".into(), "1".into())]);
    assert!(pa.spec.applies_to(&labels("reviews")));
    assert!(!pa.spec.applies_to(&labels("ratings")));
    assert!(!pa.spec.applies_to(&BTreeMap::new()));
    assert!(pa.validate().is_empty());
}

#[test]
fn mtls_mode_is_spelled_as_istio_does() {
    let err = serde_yaml::from_str::<PeerAuthenticationSpec>("mtls: { mode: strict }").unwrap_err();
    assert!(err.to_string().contains("STRICT"), "{err}");
    let yaml = serde_yaml::to_string(&PeerAuthenticationSpec::default()).unwrap();
    assert_eq!(yaml, "mtls:\n  mode: STRICT\n");
}

#[test]
fn peer_authentication_rejects_empty_and_malformed_selectors() {
    let pa: PeerAuthentication = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: all, namespace: bookinfo }
spec: { selector: {} }
",
    );
    let errors = pa.validate();
    assert!(
        errors[0].reason.contains("remove `selector`"),
        "{}",
        errors[0]
    );
    assert_eq!(
        fields("PeerAuthentication \"bookinfo/all\"", errors),
        ["spec.selector.matchLabels"]
    );

    let pa: PeerAuthentication = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: bad, namespace: bookinfo }
spec:
  selector:
    matchLabels: { app.kubernetes.io/name: reviews, 'bad key': x, version: '-v1', empty: '' }
",
    );
    assert_eq!(
        fields("PeerAuthentication \"bookinfo/bad\"", pa.validate()),
        [
            "spec.selector.matchLabels[bad key]",
            "spec.selector.matchLabels[version]",
        ]
    );
}

#[test]
fn authorization_policy_parses_istio_like_rules() {
    let ap: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: reviews-viewer, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  rules:
    - from:
        - principals: [cluster.local/ns/bookinfo/sa/productpage, '*/sa/admin']
        - namespaces: [monitoring, 'team-*']
      to:
        - paths: [/reviews/*, /health]
          methods: [GET, HEAD]
          ports: [9080]
    - {}
",
    );
    assert_eq!(ap.spec.action, AuthorizationAction::Allow);
    assert_eq!(ap.spec.rules.len(), 2);
    assert_eq!(
        ap.spec.rules[0].from[1].namespaces,
        ["monitoring", "team-*"]
    );
    assert_eq!(ap.spec.rules[0].to[0].ports, [9080]);
    assert_eq!(ap.spec.rules[1], AuthorizationRule::default());
    assert!(ap.validate().is_empty(), "{:?}", ap.validate());
}

#[test]
fn allow_nothing_is_valid_but_deny_nothing_is_not() {
    let allow: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-nothing, namespace: bookinfo }
spec: {}
",
    );
    assert!(allow.validate().is_empty());

    let deny: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-nothing, namespace: bookinfo }
spec: { action: DENY }
",
    );
    let errors = deny.validate();
    assert!(errors[0].reason.contains("denies nothing"), "{}", errors[0]);
    assert_eq!(
        errors[0].to_string(),
        "AuthorizationPolicy \"bookinfo/deny-nothing\": spec.rules: a DENY policy without rules \
         matches no request and denies nothing; add rules (`rules: [{}]` denies every request)"
    );
    assert_eq!(errors.len(), 1);

    let deny_all: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-all, namespace: bookinfo }
spec: { action: DENY, rules: [{}] }
",
    );
    assert!(deny_all.validate().is_empty());
}

#[test]
fn authorization_policy_reports_every_bad_field() {
    let ap: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: bad, namespace: bookinfo }
spec:
  action: DENY
  rules:
    - from:
        - principals:
            - cluster.local/ns/*/sa/admin
            - '*admin*'
            - spiffe://cluster.local/ns/a/sa/b
            - ''
            - '*'
            - 'cluster.local/ns/a/sa/*'
          namespaces: [Bad_NS, 'prod-*', '*']
        - {}
      to:
        - paths: [reviews, /a*b, /ok/*, '/q?x=1', '*', /exact]
          methods: [get, GET, '*', 'M-SEARCH', '']
          ports: [0, 80]
        - {}
",
    );
    let at = "spec.rules[0]";
    assert_eq!(
        fields("AuthorizationPolicy \"bookinfo/bad\"", ap.validate()),
        [
            format!("{at}.from[0].principals[0]"),
            format!("{at}.from[0].principals[1]"),
            format!("{at}.from[0].principals[2]"),
            format!("{at}.from[0].principals[3]"),
            format!("{at}.from[0].namespaces[0]"),
            format!("{at}.from[1]"),
            format!("{at}.to[0].paths[0]"),
            format!("{at}.to[0].paths[1]"),
            format!("{at}.to[0].paths[3]"),
            format!("{at}.to[0].methods[0]"),
            format!("{at}.to[0].methods[2]"),
            format!("{at}.to[0].methods[4]"),
            format!("{at}.to[0].ports[0]"),
            format!("{at}.to[1]"),
        ]
    );
}

#[test]
fn wildcard_messages_say_what_is_allowed() {
    let ap: AuthorizationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: p, namespace: ns }
spec:
  rules: [{ from: [{ principals: [cluster.local/ns/*/sa/admin] }], to: [{ paths: [reviews] }] }]
",
    );
    let errors = ap.validate();
    assert_eq!(errors.len(), 2);
    assert!(
        errors[0]
            .reason
            .contains("`*` may appear once, as the first or the last character"),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1].reason,
        "\"reviews\": must start with '/' or be `*`"
    );
}

#[test]
fn destination_policy_names_object_and_field() {
    let dp: DestinationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  targetRef: { name: '' }
  connectionPool: { maxConnections: 0, maxPendingRequests: 10 }
",
    );
    let errors = dp.validate();
    assert_eq!(
        errors[0].to_string(),
        "DestinationPolicy \"bookinfo/reviews\": spec.targetRef.name: \
         must name a Service in the policy's namespace"
    );
    assert_eq!(
        fields("DestinationPolicy \"bookinfo/reviews\"", errors),
        ["spec.targetRef.name", "spec.connectionPool.maxConnections"]
    );

    let dp: DestinationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews }
spec:
  targetRef: { name: Reviews }
  loadBalancer: { algorithm: roundRobin }
",
    );
    assert_eq!(
        fields("DestinationPolicy \"reviews\"", dp.validate()),
        ["spec.targetRef.name"]
    );
}

#[test]
fn metadata_must_name_the_object() {
    let mut dp = DestinationPolicy::new(
        "",
        DestinationPolicySpec {
            target_ref: ServiceRef {
                name: "reviews".into(),
            },
            load_balancer: None,
            connection_pool: None,
            retry_budget: None,
            outlier_detection: None,
        },
    );
    assert_eq!(
        fields("DestinationPolicy \"\"", dp.validate()),
        ["metadata.name"]
    );
    dp.metadata.name = Some("Reviews_Policy".into());
    dp.metadata.namespace = Some("book info".into());
    assert_eq!(
        fields(
            "DestinationPolicy \"book info/Reviews_Policy\"",
            dp.validate()
        ),
        ["metadata.name", "metadata.namespace"]
    );
}

#[test]
fn manifests_are_named_for_the_crd_and_carry_the_header() {
    let manifests = manifests().unwrap();
    let names: Vec<&str> = manifests.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "destinationpolicies.trellis.dev.yaml",
            "peerauthentications.trellis.dev.yaml",
            "authorizationpolicies.trellis.dev.yaml",
            "ratelimitpolicies.trellis.dev.yaml",
            "httpfaults.trellis.dev.yaml",
            "httproutes.gateway.networking.k8s.io.yaml",
            "grpcroutes.gateway.networking.k8s.io.yaml",
        ]
    );
    for (name, yaml) in &manifests {
        assert!(yaml.starts_with(&format!("{MANIFEST_HEADER}\n")), "{name}");
        let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).unwrap();
        let (group, version) = if name.contains(GATEWAY_API_GROUP) {
            (GATEWAY_API_GROUP, "v1")
        } else {
            (GROUP, VERSION)
        };
        assert_eq!(crd.spec.group, group);
        assert_eq!(crd.spec.versions[0].name, version);
        assert_eq!(format!("{}.yaml", crd.metadata.name.unwrap()), *name);
    }
}

#[test]
fn schemas_carry_enums_defaults_and_descriptions() {
    let crd = PeerAuthentication::crd();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let mode = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["mtls"]["properties"]
        ["mode"];
    assert_eq!(mode["enum"], serde_json::json!(["STRICT", "PERMISSIVE"]));
    assert!(
        mode["description"]
            .as_str()
            .unwrap()
            .contains("accepts only mutual TLS")
    );
}

#[test]
fn rate_limit_policy_parses_with_defaults() {
    let rl: RateLimitPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  targetRef: { name: reviews-v2 }
  limit: { requests: 100, per: 1m }
",
    );
    let target = rl.spec.target_ref.as_ref().unwrap();
    assert_eq!(
        (
            target.group.as_str(),
            target.kind.as_str(),
            target.name.as_str()
        ),
        ("gateway.networking.k8s.io", "HTTPRoute", "reviews-v2")
    );
    assert_eq!(rl.spec.limit.requests, 100);
    assert_eq!(rl.spec.burst, None);
    assert!(
        rl.spec
            .applies_to(&BTreeMap::from([("app".into(), "reviews".into())]))
    );
    assert!(!rl.spec.applies_to(&BTreeMap::new()));
    assert!(rl.validate().is_empty(), "{:?}", rl.validate());
}

#[test]
fn rate_limit_policy_reports_every_bad_field() {
    let rl: RateLimitPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: bad, namespace: bookinfo }
spec:
  selector: {}
  targetRef: { group: networking.istio.io, kind: VirtualService, name: Reviews }
  limit: { requests: 0, per: 0s }
  burst: 0
",
    );
    let errors = rl.validate();
    assert_eq!(
        errors[1].to_string(),
        "RateLimitPolicy \"bookinfo/bad\": spec.targetRef.group: \"networking.istio.io\": \
         must be \"gateway.networking.k8s.io\""
    );
    assert_eq!(
        fields("RateLimitPolicy \"bookinfo/bad\"", errors),
        [
            "spec.selector.matchLabels",
            "spec.targetRef.group",
            "spec.targetRef.kind",
            "spec.targetRef.name",
            "spec.limit.requests",
            "spec.limit.per",
            "spec.burst",
        ]
    );

    for (per, reason) in [
        ("1 s", "not a duration"),
        ("25h", "at most 24h"),
        ("0ms", "longer than 0"),
    ] {
        let mut rl = rl.clone();
        rl.spec = RateLimitPolicySpec {
            selector: None,
            target_ref: None,
            limit: RequestLimit {
                requests: 1,
                per: per.into(),
            },
            burst: None,
        };
        let errors = rl.validate();
        assert_eq!(errors.len(), 1, "{per}: {errors:?}");
        assert_eq!(errors[0].field, "spec.limit.per");
        assert!(errors[0].reason.contains(reason), "{}", errors[0]);
    }
}

#[test]
fn rate_limit_schema_checks_the_period_and_minimums() {
    let crd = RateLimitPolicy::crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["rlp".to_owned()]));
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["limit"]));
    let limit = &spec["properties"]["limit"];
    assert_eq!(
        limit["properties"]["per"]["pattern"],
        "^([0-9]{1,5}(h|m|s|ms)){1,4}$"
    );
    assert_eq!(limit["properties"]["requests"]["minimum"], 1.0);
    assert_eq!(spec["properties"]["burst"]["minimum"], 1.0);
    let target = &spec["properties"]["targetRef"]["properties"];
    assert_eq!(target["kind"]["default"], "HTTPRoute");
    assert_eq!(target["group"]["default"], "gateway.networking.k8s.io");
}

#[test]
fn the_gateway_crds_list_no_null_in_an_enum_and_carry_the_api_approval() {
    for crd in gateway_crds() {
        let text = serde_json::to_string(&crd).unwrap();
        assert!(
            !text.contains(",null]") && !text.contains("[null"),
            "{}",
            crd.metadata.name.unwrap_or_default()
        );
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert!(annotations.contains_key("api-approved.kubernetes.io"));
    }
}

#[test]
fn destination_policy_limits_and_retry_budget_are_checked_and_read() {
    let dp: DestinationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  targetRef: { name: reviews }
  connectionPool: { maxRequests: 0, maxRetries: 3, connectTimeout: 0s, idleTimeout: 5 minutes }
  retryBudget: { retryPercent: 2000, ttl: 500ms }
",
    );
    assert_eq!(
        fields("DestinationPolicy \"bookinfo/reviews\"", dp.validate()),
        [
            "spec.connectionPool.maxRequests",
            "spec.connectionPool.connectTimeout",
            "spec.connectionPool.idleTimeout",
            "spec.retryBudget.retryPercent",
            "spec.retryBudget.ttl"
        ]
    );
    let dp: DestinationPolicy = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  targetRef: { name: reviews }
  connectionPool: { maxRequests: 50, maxRetries: 3, connectTimeout: 500ms, idleTimeout: 1m30s }
  retryBudget: { minRetriesPerSecond: 0, ttl: 1m }
",
    );
    assert!(dp.validate().is_empty());
    assert_eq!(
        dp.limits(),
        crate::ConnectionLimits {
            max_requests: 50,
            max_retries: 3,
            connect_timeout_ms: Some(500),
            idle_timeout_ms: Some(90_000),
            ..Default::default()
        }
    );
    assert_eq!(
        dp.retry_budget(),
        crate::RetryBudget {
            percent: crate::DEFAULT_RETRY_PERCENT,
            min_per_second: 0,
            ttl_ms: 60_000
        }
    );
}

#[test]
fn http_fault_reads_shares_and_statuses() {
    let fault: HttpFault = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: HTTPFault
metadata: { name: flaky, namespace: shop }
spec:
  delay: { fixedDelay: 1500ms, fraction: { numerator: 1, denominator: 1000 } }
  abort: { grpcStatus: 14, percent: 25 }
",
    );
    assert!(fault.validate().is_empty(), "{:?}", fault.validate());
    let model = fault.to_model("shop/flaky".into());
    assert_eq!(
        model,
        crate::Fault {
            name: "shop/flaky".into(),
            delay: Some(crate::FaultDelay {
                delay_ms: 1500,
                per_million: 1000
            }),
            abort: Some(crate::FaultAbort {
                status: crate::AbortStatus::Grpc(14),
                per_million: 250_000
            }),
        }
    );
    // Without a share, every request.
    let all: HttpFault = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: HTTPFault
metadata: { name: all, namespace: shop }
spec: { abort: { httpStatus: 503 } }
",
    );
    let abort = all.to_model("shop/all".into()).abort.unwrap();
    assert_eq!(abort.status, crate::AbortStatus::Http(503));
    assert_eq!(abort.per_million, crate::PER_MILLION);
}

#[test]
fn http_fault_reports_every_bad_field() {
    let empty: HttpFault = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: HTTPFault
metadata: { name: empty, namespace: shop }
spec: {}
",
    );
    assert_eq!(
        fields("HTTPFault \"shop/empty\"", empty.validate()),
        ["spec"]
    );
    let bad: HttpFault = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: HTTPFault
metadata: { name: bad, namespace: shop }
spec:
  delay: { fixedDelay: 2h, percent: 101 }
  abort: { httpStatus: 200, fraction: { numerator: 3, denominator: 2 } }
",
    );
    let errors = bad.validate();
    let reasons: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        fields("HTTPFault \"shop/bad\"", errors),
        [
            "spec.delay.fixedDelay",
            "spec.delay.percent",
            "spec.abort.httpStatus",
            "spec.abort.fraction.numerator"
        ],
        "{reasons:#?}"
    );
    let both: HttpFault = policy(
        "apiVersion: trellis.dev/v1alpha1
kind: HTTPFault
metadata: { name: both, namespace: shop }
spec:
  abort: { httpStatus: 503, grpcStatus: 14, percent: 5, fraction: { numerator: 1 } }
",
    );
    assert_eq!(
        fields("HTTPFault \"shop/both\"", both.validate()),
        ["spec.abort", "spec.abort"]
    );
}
