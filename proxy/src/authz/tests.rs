//! The allow/deny matrix: each test compiles a set of policies and checks a
//! table of requests against it.

use super::*;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
const RATINGS: &str = "spiffe://cluster.local/ns/bookinfo/sa/ratings";
const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";
const PROMETHEUS: &str = "spiffe://cluster.local/ns/team-monitoring/sa/prometheus";
const FOREIGN: &str = "spiffe://example.org/ns/bookinfo/sa/productpage";
/// An identity without the `/ns/<namespace>/` part.
const ODD: &str = "spiffe://cluster.local/workload/productpage";

/// What a case expects: allowed, or denied by the named policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allow,
    Deny(&'static str),
}
use Expect::{Allow, Deny};

fn authorizer(yaml: &str) -> Authorizer {
    let policies: Vec<AuthorizationPolicy> = serde_yaml::from_str(yaml).unwrap();
    for p in &policies {
        p.validate().unwrap();
    }
    Authorizer::new(&policies)
}

fn get<'a>(principal: Option<&'a str>, path: &'a str) -> Request<'a> {
    Request::http(principal, "GET", path, 9080)
}

fn check(authorizer: &Authorizer, cases: &[(Request<'_>, Expect)]) {
    let mut failures = Vec::new();
    for (i, (request, expect)) in cases.iter().enumerate() {
        let decision = authorizer.check(request);
        let ok = match (expect, &decision) {
            (Allow, Decision::Allow) => true,
            (Deny(expected), Decision::Deny { policy, .. }) => policy == expected,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "case {i}: {request:?}: expected {expect:?}, got {decision:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn no_policies_allow_everything() {
    let none = authorizer("[]");
    assert!(none.is_empty());
    check(
        &none,
        &[
            (get(None, "/"), Allow),
            (get(Some(PRODUCTPAGE), "/admin"), Allow),
            (Request::http(None, "DELETE", "/x", 1), Allow),
            (Request::tcp(None, 5432), Allow),
            (Request::tcp(Some(ADMIN), 5432), Allow),
        ],
    );
}

#[test]
fn allow_policies_require_a_matching_rule() {
    let allow = authorizer(
        "
- name: reviews-viewer
  namespace: bookinfo
  rules:
    - from: [{ principals: [cluster.local/ns/bookinfo/sa/productpage] }]
      to: [{ paths: [/reviews/*], methods: [GET, HEAD] }]
",
    );
    check(
        &allow,
        &[
            (get(Some(PRODUCTPAGE), "/reviews/1"), Allow),
            (
                Request::http(Some(PRODUCTPAGE), "HEAD", "/reviews/1", 9080),
                Allow,
            ),
            (
                Request::http(Some(PRODUCTPAGE), "POST", "/reviews/1", 9080),
                Deny(NO_ALLOW_MATCH),
            ),
            (get(Some(PRODUCTPAGE), "/reviews"), Deny(NO_ALLOW_MATCH)),
            (get(Some(PRODUCTPAGE), "/ratings/1"), Deny(NO_ALLOW_MATCH)),
            (get(Some(RATINGS), "/reviews/1"), Deny(NO_ALLOW_MATCH)),
            (get(Some(FOREIGN), "/reviews/1"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/reviews/1"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    let decision = allow.check(&get(None, "/reviews/1"));
    assert_eq!(
        decision,
        Decision::Deny {
            policy: NO_ALLOW_MATCH.into(),
            reason: NOT_ALLOWED.into()
        }
    );
    assert!(!decision.is_allowed());
}

#[test]
fn deny_beats_allow() {
    let policies = authorizer(
        "
- name: allow-all
  namespace: bookinfo
  rules: [{}]
- name: deny-admin
  namespace: bookinfo
  action: DENY
  rules:
    - to: [{ paths: [/admin, /admin/*] }]
- name: deny-ops-writes
  namespace: bookinfo
  action: DENY
  rules:
    - from: [{ namespaces: [ops] }]
      to: [{ methods: [POST, PUT, DELETE] }]
",
    );
    check(
        &policies,
        &[
            (get(Some(PRODUCTPAGE), "/reviews/1"), Allow),
            (get(None, "/reviews/1"), Allow),
            (
                get(Some(PRODUCTPAGE), "/admin"),
                Deny("bookinfo/deny-admin"),
            ),
            (
                get(Some(ADMIN), "/admin/users"),
                Deny("bookinfo/deny-admin"),
            ),
            (get(None, "/admin"), Deny("bookinfo/deny-admin")),
            (get(Some(ADMIN), "/reviews/1"), Allow),
            (
                Request::http(Some(ADMIN), "POST", "/reviews/1", 9080),
                Deny("bookinfo/deny-ops-writes"),
            ),
            (
                Request::http(Some(PRODUCTPAGE), "POST", "/reviews/1", 9080),
                Allow,
            ),
            // A plaintext peer has no namespace, so the namespaced DENY
            // does not match it.
            (Request::http(None, "POST", "/reviews/1", 9080), Allow),
        ],
    );
    assert_eq!(
        policies.check(&get(None, "/admin")),
        Decision::Deny {
            policy: "bookinfo/deny-admin".into(),
            reason: DENIED_BY_POLICY.into()
        }
    );
}

#[test]
fn deny_only_policies_allow_the_rest() {
    let deny = authorizer(
        "
- name: deny-plaintext-admin
  namespace: bookinfo
  action: DENY
  rules: [{ to: [{ paths: ['/admin*'] }] }]
",
    );
    check(
        &deny,
        &[
            (get(None, "/"), Allow),
            (get(Some(RATINGS), "/ratings"), Allow),
            (
                get(Some(RATINGS), "/administrator"),
                Deny("bookinfo/deny-plaintext-admin"),
            ),
        ],
    );
}

#[test]
fn allow_nothing_denies_everything_else_allowed_by_other_policies() {
    let nothing = authorizer("[{ name: allow-nothing, namespace: bookinfo }]");
    check(
        &nothing,
        &[
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
            (get(Some(PRODUCTPAGE), "/"), Deny(NO_ALLOW_MATCH)),
            (Request::tcp(Some(PRODUCTPAGE), 9080), Deny(NO_ALLOW_MATCH)),
        ],
    );
    let nothing_but_health = authorizer(
        "
- { name: allow-nothing, namespace: bookinfo }
- { name: health, namespace: bookinfo, rules: [{ to: [{ paths: [/health] }] }] }
",
    );
    check(
        &nothing_but_health,
        &[
            (get(None, "/health"), Allow),
            (get(Some(PRODUCTPAGE), "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
}

#[test]
fn principal_wildcards() {
    let by_principal = |pattern: &str| {
        authorizer(&format!(
            "[{{ name: p, namespace: bookinfo, rules: [{{ from: [{{ principals: ['{pattern}'] }}] }}] }}]"
        ))
    };
    check(
        &by_principal("*"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            (get(Some(FOREIGN), "/"), Allow),
            (get(Some(ODD), "/"), Allow),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_principal("cluster.local/ns/bookinfo/*"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            (get(Some(RATINGS), "/"), Allow),
            (get(Some(ADMIN), "/"), Deny(NO_ALLOW_MATCH)),
            (get(Some(FOREIGN), "/"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_principal("*/sa/productpage"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            (get(Some(FOREIGN), "/"), Allow),
            (get(Some(RATINGS), "/"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_principal("cluster.local/ns/bookinfo/sa/productpage"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            // Without the scheme, as some callers pass it.
            (
                get(Some("cluster.local/ns/bookinfo/sa/productpage"), "/"),
                Allow,
            ),
            (get(Some(FOREIGN), "/"), Deny(NO_ALLOW_MATCH)),
            (
                get(
                    Some("spiffe://cluster.local/ns/bookinfo/sa/productpage2"),
                    "/",
                ),
                Deny(NO_ALLOW_MATCH),
            ),
        ],
    );
}

#[test]
fn namespaces_come_from_the_identity() {
    let by_namespace = |pattern: &str| {
        authorizer(&format!(
            "[{{ name: p, namespace: bookinfo, rules: [{{ from: [{{ namespaces: ['{pattern}'] }}] }}] }}]"
        ))
    };
    check(
        &by_namespace("bookinfo"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            // The trust domain does not matter to a namespace match.
            (get(Some(FOREIGN), "/"), Allow),
            (get(Some(ADMIN), "/"), Deny(NO_ALLOW_MATCH)),
            (get(Some(ODD), "/"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_namespace("team-*"),
        &[
            (get(Some(PROMETHEUS), "/"), Allow),
            (get(Some(PRODUCTPAGE), "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_namespace("*ops"),
        &[
            (get(Some(ADMIN), "/"), Allow),
            (get(Some(PROMETHEUS), "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    check(
        &by_namespace("*"),
        &[
            (get(Some(PRODUCTPAGE), "/"), Allow),
            (get(Some(ODD), "/"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    assert_eq!(
        Request::tcp(Some(PROMETHEUS), 1).namespace(),
        Some("team-monitoring")
    );
    assert_eq!(Request::tcp(Some(ODD), 1).namespace(), None);
    assert_eq!(
        Request::tcp(Some("spiffe://cluster.local/ns/"), 1).namespace(),
        None
    );
    assert_eq!(Request::tcp(None, 1).namespace(), None);
}

#[test]
fn paths_exact_prefix_and_any() {
    let paths = authorizer(
        "
- name: p
  namespace: bookinfo
  rules:
    - to: [{ paths: [/health, /api/*, /static*] }]
",
    );
    check(
        &paths,
        &[
            (get(None, "/health"), Allow),
            (get(None, "/health?verbose=1"), Allow),
            (get(None, "/health/"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/healthz"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/Health"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/api/"), Allow),
            (get(None, "/api/v1/reviews"), Allow),
            (get(None, "/api"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/apix"), Deny(NO_ALLOW_MATCH)),
            (get(None, "/static"), Allow),
            (get(None, "/static.css"), Allow),
            (get(None, "/"), Deny(NO_ALLOW_MATCH)),
        ],
    );
    let any = authorizer("[{ name: p, namespace: bookinfo, rules: [{ to: [{ paths: ['*'] }] }] }]");
    check(
        &any,
        &[
            (get(None, "/"), Allow),
            (get(None, "/anything/at/all"), Allow),
            (Request::tcp(None, 9080), Deny(NO_ALLOW_MATCH)),
        ],
    );
}

#[test]
fn paths_are_normalized_before_matching() {
    let deny = authorizer(
        "
- name: deny-admin
  namespace: bookinfo
  action: DENY
  rules: [{ to: [{ paths: [/admin, /admin/*] }] }]
",
    );
    let denied = Deny("bookinfo/deny-admin");
    check(
        &deny,
        &[
            (get(None, "/admin"), denied),
            (get(None, "/public/../admin"), denied),
            (get(None, "/./admin/x"), denied),
            (get(None, "/%61dmin"), denied),
            (get(None, "/%2e%2E/admin"), denied),
            (get(None, "/admin#top"), denied),
            (get(None, "/admin%2Fx"), Allow),
            (get(None, "/public/admin"), Allow),
        ],
    );
    let escaped = authorizer(
        "[{ name: p, namespace: bookinfo, rules: [{ to: [{ paths: ['/%7euser/*', /a%2fb] }] }] }]",
    );
    check(
        &escaped,
        &[
            (get(None, "/~user/x"), Allow),
            (get(None, "/%7Euser/x"), Allow),
            (get(None, "/a%2Fb"), Allow),
            (get(None, "/a/b"), Deny(NO_ALLOW_MATCH)),
        ],
    );
}

#[test]
fn methods_and_ports() {
    let ops = authorizer(
        "
- name: p
  namespace: bookinfo
  rules:
    - to:
        - { methods: [GET], ports: [9080] }
        - { ports: [15090] }
",
    );
    check(
        &ops,
        &[
            (Request::http(None, "GET", "/", 9080), Allow),
            (Request::http(None, "get", "/", 9080), Deny(NO_ALLOW_MATCH)),
            (Request::http(None, "POST", "/", 9080), Deny(NO_ALLOW_MATCH)),
            (Request::http(None, "GET", "/", 9081), Deny(NO_ALLOW_MATCH)),
            (Request::http(None, "POST", "/", 15090), Allow),
        ],
    );
}

#[test]
fn every_set_field_must_match_and_any_entry_may() {
    let policy = authorizer(
        "
- name: p
  namespace: bookinfo
  rules:
    - from:
        - { principals: ['*/sa/productpage'], namespaces: [bookinfo] }
        - { namespaces: [ops] }
      to:
        - { paths: [/reviews/*], methods: [GET] }
        - { methods: [DELETE], ports: [9080] }
",
    );
    check(
        &policy,
        &[
            (get(Some(PRODUCTPAGE), "/reviews/1"), Allow),
            // Principal matches but the namespace does not.
            (
                get(
                    Some("spiffe://cluster.local/ns/other/sa/productpage"),
                    "/reviews/1",
                ),
                Deny(NO_ALLOW_MATCH),
            ),
            (get(Some(ADMIN), "/reviews/1"), Allow),
            (
                Request::http(Some(ADMIN), "DELETE", "/anything", 9080),
                Allow,
            ),
            (
                Request::http(Some(ADMIN), "DELETE", "/reviews/1", 8080),
                Deny(NO_ALLOW_MATCH),
            ),
            (get(Some(RATINGS), "/reviews/1"), Deny(NO_ALLOW_MATCH)),
        ],
    );
}

#[test]
fn plaintext_matches_only_rules_without_sources() {
    let policy = authorizer(
        "
- name: mesh-only
  namespace: bookinfo
  rules: [{ from: [{ principals: ['*'] }] }]
- name: public-health
  namespace: bookinfo
  rules: [{ to: [{ paths: [/health] }] }]
",
    );
    check(
        &policy,
        &[
            (get(Some(PRODUCTPAGE), "/reviews/1"), Allow),
            (get(None, "/health"), Allow),
            (get(None, "/reviews/1"), Deny(NO_ALLOW_MATCH)),
            (Request::tcp(None, 9080), Deny(NO_ALLOW_MATCH)),
            (Request::tcp(Some(PRODUCTPAGE), 9080), Allow),
        ],
    );
}

#[test]
fn tcp_connections_fail_closed_on_http_only_fields() {
    let allow = authorizer(
        "
- name: tcp
  namespace: bookinfo
  rules:
    - from: [{ namespaces: [bookinfo] }]
      to: [{ ports: [5432] }]
    - to: [{ paths: [/reviews/*], ports: [9080] }]
    - to: [{ methods: [GET] }]
",
    );
    check(
        &allow,
        &[
            (Request::tcp(Some(PRODUCTPAGE), 5432), Allow),
            (Request::tcp(Some(ADMIN), 5432), Deny(NO_ALLOW_MATCH)),
            (Request::tcp(None, 5432), Deny(NO_ALLOW_MATCH)),
            // ALLOW rules with paths or methods never match TCP.
            (Request::tcp(Some(PRODUCTPAGE), 9080), Deny(NO_ALLOW_MATCH)),
            (Request::tcp(Some(ADMIN), 9080), Deny(NO_ALLOW_MATCH)),
            (get(Some(ADMIN), "/reviews/1"), Allow),
        ],
    );
    let deny = authorizer(
        "
- name: deny-admin-writes
  namespace: bookinfo
  action: DENY
  rules:
    - from: [{ namespaces: [ops] }]
      to: [{ methods: [POST], ports: [9080] }]
",
    );
    let denied = Deny("bookinfo/deny-admin-writes");
    check(
        &deny,
        &[
            // DENY rules drop their HTTP-only fields for TCP and match on the rest.
            (Request::tcp(Some(ADMIN), 9080), denied),
            (Request::tcp(Some(ADMIN), 9081), Allow),
            (Request::tcp(Some(PRODUCTPAGE), 9080), Allow),
            (Request::http(Some(ADMIN), "GET", "/", 9080), Allow),
            (Request::http(Some(ADMIN), "POST", "/", 9080), denied),
        ],
    );
}

#[test]
fn path_normalization() {
    for (path, normal) in [
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b?x=/../y", "/a/b"),
        ("/a#/..", "/a"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../a", "/a"),
        ("/a//../b", "/a/b"),
        ("/%7Euser/%41%2f%2F", "/~user/A%2F%2F"),
        ("/%2e%2E/%2e/x", "/x"),
        ("/%zz/%4", "/%zz/%4"),
        ("/é/%C3%A9", "/é/%C3%A9"),
        ("*", "*"),
    ] {
        assert_eq!(normalize_path(path), normal, "{path}");
    }
    assert!(matches!(normalize_path("/a/b?q"), Cow::Borrowed("/a/b")));
    assert!(matches!(normalize_path("/a/b"), Cow::Borrowed(_)));
}
