use super::*;

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml::from_str(text).unwrap()
}

/// The field paths of the errors, with every error's object checked.
fn fields(object: &str, errors: Vec<ValidationError>) -> Vec<String> {
    for e in &errors {
        assert_eq!(e.object, object, "{e}");
    }
    errors.into_iter().map(|e| e.field).collect()
}

fn limit(requests: u32, per: Duration) -> RateLimit {
    RateLimit {
        name: "limit".into(),
        namespace: "bookinfo".into(),
        requests,
        per,
        burst: None,
        route: None,
    }
}

#[test]
fn default_is_strict_with_nothing_else() {
    let policy = InboundPolicy::default();
    assert_eq!(policy.mtls, MtlsMode::Strict);
    assert!(policy.authorization.is_empty() && policy.rate_limits.is_empty());
    assert_eq!(yaml::<InboundPolicy>("{}"), policy);
    assert_eq!(serde_yaml::to_string(&policy).unwrap(), "mtls: STRICT\n");
    assert!(policy.validate().is_ok());
}

#[test]
fn round_trips_through_yaml_in_camel_case() {
    let text = "\
mtls: PERMISSIVE
authorization:
- name: deny-admin
  namespace: bookinfo
  action: DENY
  rules:
  - from:
    - namespaces:
      - '*'
    to:
    - paths:
      - /admin/*
      methods:
      - POST
      ports:
      - 9080
- name: allow-nothing
  namespace: bookinfo
  action: ALLOW
rateLimits:
- name: reviews
  namespace: bookinfo
  requests: 100
  per: 1m30s
  burst: 10
  route: reviews-v2
";
    let policy: InboundPolicy = yaml(text);
    assert_eq!(policy.rate_limits[0].per, Duration::from_secs(90));
    assert_eq!(policy.authorization[0].rules[0].to[0].ports, [9080]);
    assert!(policy.validate().is_ok(), "{:?}", policy.validate());
    assert_eq!(serde_yaml::to_string(&policy).unwrap(), text);
}

#[test]
fn unknown_fields_are_refused() {
    for text in [
        "mtls: STRICT\nmode: STRICT",
        "authorization: [{ name: a, selector: {} }]",
        "authorization: [{ name: a, rules: [{ when: [] }] }]",
        "rateLimits: [{ name: a, requests: 1, per: 1s, period: 1s }]",
    ] {
        let err = serde_yaml::from_str::<InboundPolicy>(text).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{text}: {err}");
    }
}

#[test]
fn per_is_a_gateway_api_duration() {
    for (text, expected) in [
        ("1s", Duration::from_secs(1)),
        ("500ms", Duration::from_millis(500)),
        ("1m", Duration::from_secs(60)),
        ("1h30m", Duration::from_secs(5400)),
        ("1h1m1s1ms", Duration::from_millis(3_661_001)),
        ("90s", Duration::from_secs(90)),
        ("0s", Duration::ZERO),
        ("99999ms", Duration::from_millis(99_999)),
    ] {
        assert_eq!(parse_duration(text), Ok(expected), "{text}");
    }
    for text in [
        "",
        "1",
        "s",
        "1 s",
        "1.5s",
        "-1s",
        "1d",
        "100000s",
        "1h1m1s1ms1s",
        "1sec",
        "1S",
        "1µs",
    ] {
        let err = parse_duration(text).unwrap_err();
        assert!(err.contains("as in 1s, 1m or 1m30s"), "{text}: {err}");
    }
    for (duration, text) in [
        (Duration::from_secs(1), "1s"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_secs(5400), "1h30m"),
        (Duration::from_millis(3_661_001), "1h1m1s1ms"),
        (Duration::from_secs(24 * 3600), "24h"),
        (Duration::ZERO, "0s"),
    ] {
        assert_eq!(format_duration(duration), text);
        assert_eq!(parse_duration(text), Ok(duration));
    }
    let err =
        serde_yaml::from_str::<RateLimit>("{ name: a, requests: 1, per: 1 min }").unwrap_err();
    assert!(
        err.to_string().contains("\"1 min\": not a duration"),
        "{err}"
    );
}

#[test]
fn authorization_validation_names_policy_and_field() {
    let policy: AuthorizationPolicy = yaml(
        "
name: bad
namespace: bookinfo
action: DENY
rules:
  - from:
      - principals: [cluster.local/ns/*/sa/admin, spiffe://cluster.local/ns/a/sa/b, '*', 'cluster.local/*']
        namespaces: [Prod, 'team-*']
      - {}
    to:
      - paths: [reviews, /api/*, '/a*b']
        methods: [get, GET]
        ports: [0, 9080]
      - {}
",
    );
    let errors = policy.validate().unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "authorization policy \"bookinfo/bad\": rules[0].from[0].principals[0]: \
         \"cluster.local/ns/*/sa/admin\": `*` may appear once, as the first or the last \
         character (a suffix or prefix match)"
    );
    assert_eq!(
        fields("authorization policy \"bookinfo/bad\"", errors),
        [
            "rules[0].from[0].principals[0]",
            "rules[0].from[0].principals[1]",
            "rules[0].from[0].namespaces[0]",
            "rules[0].from[1]",
            "rules[0].to[0].paths[0]",
            "rules[0].to[0].paths[2]",
            "rules[0].to[0].methods[0]",
            "rules[0].to[0].ports[0]",
            "rules[0].to[1]",
        ]
    );
}

#[test]
fn deny_without_rules_is_refused_but_allow_nothing_is_not() {
    let deny: AuthorizationPolicy = yaml("{ name: deny-nothing, action: DENY }");
    let errors = deny.validate().unwrap_err();
    assert_eq!(
        fields("authorization policy \"default/deny-nothing\"", errors),
        ["rules"]
    );
    let allow: AuthorizationPolicy = yaml("{ name: allow-nothing }");
    assert!(allow.validate().is_ok());
    let deny_all: AuthorizationPolicy = yaml("{ name: deny-all, action: DENY, rules: [{}] }");
    assert!(deny_all.validate().is_ok());
}

#[test]
fn rate_limit_validation_names_limit_and_field() {
    let mut bad = limit(0, Duration::ZERO);
    bad.burst = Some(0);
    bad.route = Some("Reviews_Route".into());
    let errors = bad.validate().unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "rate limit \"bookinfo/limit\": requests: must be at least 1; \
         to refuse every request use an authorization policy"
    );
    assert_eq!(
        fields("rate limit \"bookinfo/limit\"", errors),
        ["requests", "per", "burst", "route"]
    );

    let day = Duration::from_secs(24 * 3600);
    assert!(limit(1, day).validate().is_ok());
    let too_long = limit(1, day + Duration::from_millis(1))
        .validate()
        .unwrap_err();
    assert!(
        too_long[0].reason.contains("at most 24h"),
        "{}",
        too_long[0]
    );
    let sub_ms = limit(1, Duration::from_micros(1500))
        .validate()
        .unwrap_err();
    assert!(sub_ms[0].reason.contains("milliseconds"), "{}", sub_ms[0]);

    let mut nameless = limit(1, Duration::from_secs(1));
    nameless.name.clear();
    nameless.namespace = "Book Info".into();
    assert_eq!(
        fields(
            "rate limit \"Book Info/\"",
            nameless.validate().unwrap_err()
        ),
        ["name", "namespace"]
    );
}

#[test]
fn inbound_validation_collects_everything_and_finds_duplicates() {
    let policy: InboundPolicy = yaml(
        "
authorization:
  - { name: a, namespace: ns }
  - { name: a, namespace: ns, rules: [{ to: [{ methods: [get] }] }] }
  - { name: a, namespace: other }
rateLimits:
  - { name: r, namespace: ns, requests: 1, per: 1s }
  - { name: r, namespace: ns, requests: 0, per: 1s }
",
    );
    let errors: Vec<String> = policy
        .validate()
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "authorization policy \"ns/a\": rules[0].to[0].methods[0]: \"get\" is not an \
             upper-case HTTP method such as GET; leave `methods` out to match any",
            "authorization policy \"ns/a\": name: another authorization policy has the same \
             namespace and name",
            "rate limit \"ns/r\": requests: must be at least 1; to refuse every request use an \
             authorization policy",
            "rate limit \"ns/r\": name: another rate limit has the same namespace and name",
        ]
    );
}

#[test]
fn authorization_policy_from_crd_keeps_rules_and_drops_selector() {
    let object: crd::AuthorizationPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: reviews-viewer, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  action: DENY
  rules:
    - from: [{ principals: ['*/sa/admin'], namespaces: ['team-*'] }]
      to: [{ paths: [/reviews/*], methods: [GET], ports: [9080] }]
    - {}
",
    );
    let policy = AuthorizationPolicy::from_crd(&object).unwrap();
    let expected: AuthorizationPolicy = yaml(
        "
name: reviews-viewer
namespace: bookinfo
action: DENY
rules:
  - from: [{ principals: ['*/sa/admin'], namespaces: ['team-*'] }]
    to: [{ paths: [/reviews/*], methods: [GET], ports: [9080] }]
  - {}
",
    );
    assert_eq!(policy, expected);
    assert!(policy.validate().is_ok());
    assert_eq!(policy.id(), "bookinfo/reviews-viewer");

    let no_namespace: crd::AuthorizationPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: allow-nothing }
spec: {}
",
    );
    let policy = AuthorizationPolicy::from_crd(&no_namespace).unwrap();
    assert_eq!(
        (policy.namespace.as_str(), policy.action, policy.rules.len()),
        ("default", AuthorizationAction::Allow, 0)
    );
}

#[test]
fn authorization_policy_from_crd_reports_the_objects_errors() {
    let object: crd::AuthorizationPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: bad, namespace: bookinfo }
spec:
  rules: [{ to: [{ paths: [reviews], methods: [get] }] }]
",
    );
    let errors = AuthorizationPolicy::from_crd(&object).unwrap_err();
    assert_eq!(
        fields("AuthorizationPolicy \"bookinfo/bad\"", errors),
        [
            "spec.rules[0].to[0].paths[0]",
            "spec.rules[0].to[0].methods[0]"
        ]
    );
}

#[test]
fn rate_limit_from_crd() {
    let object: crd::RateLimitPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: reviews-v2, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  targetRef: { name: reviews-v2 }
  limit: { requests: 10, per: 1m }
  burst: 5
",
    );
    assert_eq!(
        RateLimit::from_crd(&object).unwrap(),
        RateLimit {
            name: "reviews-v2".into(),
            namespace: "bookinfo".into(),
            requests: 10,
            per: Duration::from_secs(60),
            burst: Some(5),
            route: Some("reviews-v2".into()),
        }
    );

    let workload_wide: crd::RateLimitPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: all }
spec: { limit: { requests: 100, per: 500ms } }
",
    );
    let limit = RateLimit::from_crd(&workload_wide).unwrap();
    assert_eq!(
        (
            limit.namespace.as_str(),
            limit.route.as_deref(),
            limit.burst_or_default()
        ),
        ("default", None, 100)
    );
    assert_eq!(limit.per, Duration::from_millis(500));
    assert!(limit.validate().is_ok());

    // A GRPCRoute is named in the model as the index names it.
    let grpc: crd::RateLimitPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: grpc, namespace: bookinfo }
spec:
  targetRef: { kind: GRPCRoute, name: ratings }
  limit: { requests: 10, per: 1s }
",
    );
    let limit = RateLimit::from_crd(&grpc).unwrap();
    assert_eq!(limit.route.as_deref(), Some("grpcroute/ratings"));
    assert!(limit.validate().is_ok());

    let bad: crd::RateLimitPolicy = yaml(
        "apiVersion: trellis.dev/v1alpha1
kind: RateLimitPolicy
metadata: { name: bad, namespace: bookinfo }
spec:
  targetRef: { kind: Gateway, name: '' }
  limit: { requests: 0, per: 1 second }
  burst: 0
",
    );
    assert_eq!(
        fields(
            "RateLimitPolicy \"bookinfo/bad\"",
            RateLimit::from_crd(&bad).unwrap_err()
        ),
        [
            "spec.targetRef.kind",
            "spec.targetRef.name",
            "spec.limit.requests",
            "spec.limit.per",
            "spec.burst",
        ]
    );
}

#[test]
fn a_selector_less_policy_selects_every_workload() {
    let labels = BTreeMap::from([("app".to_owned(), "reviews".to_owned())]);
    assert!(selects(&None, &labels));
    assert!(selects(&None, &BTreeMap::new()));
    let reviews = Some(WorkloadSelector {
        match_labels: labels.clone(),
    });
    assert!(selects(&reviews, &labels));
    assert!(!selects(&reviews, &BTreeMap::new()));
    let ratings = Some(WorkloadSelector {
        match_labels: BTreeMap::from([("app".to_owned(), "ratings".to_owned())]),
    });
    assert!(!selects(&ratings, &labels));
}
