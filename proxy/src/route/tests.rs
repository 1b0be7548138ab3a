use super::*;

fn table(yaml: &str) -> RouteTable<String> {
    let routes: Vec<HttpRoute> = serde_yaml::from_str(yaml).unwrap();
    RouteTable::new(&routes, |name| Some(name.to_owned())).unwrap()
}

fn route_of(
    t: &RouteTable<String>,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let uri: http::Uri = uri.parse().unwrap();
    let method = http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let parts = RequestParts {
        method: &method,
        path: uri.path(),
        query: uri.query(),
        headers: &map,
    };
    t.find(&parts, None).map(|m| {
        m.rule
            .pick(0)
            .and_then(|i| m.rule.backend(i))
            .map_or_else(|| "<none>".into(), |(b, _)| b.clone())
    })
}

fn get(t: &RouteTable<String>, uri: &str) -> Option<String> {
    route_of(t, "GET", uri, &[])
}

#[test]
fn exact_path() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    backendRefs: [{name: exact}]\n",
    );
    assert_eq!(get(&t, "/a").as_deref(), Some("exact"));
    assert_eq!(get(&t, "/a/"), None);
    assert_eq!(get(&t, "/ab"), None);
}

#[test]
fn prefix_path_respects_segment_boundaries() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /foo/}}]\n    backendRefs: [{name: p}]\n",
    );
    assert_eq!(get(&t, "/foo").as_deref(), Some("p"));
    assert_eq!(get(&t, "/foo/bar?x=1").as_deref(), Some("p"));
    assert_eq!(get(&t, "/foobar"), None);
}

#[test]
fn regex_path_matches_whole_path() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{path: {type: RegularExpression, value: '/items/[0-9]+'}}]\n    backendRefs: [{name: re}]\n",
    );
    assert_eq!(get(&t, "/items/42").as_deref(), Some("re"));
    assert_eq!(get(&t, "/items/42/x"), None);
    assert_eq!(get(&t, "/x/items/42"), None);
}

#[test]
fn headers_exact_and_regex() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{headers: [{name: X-User, value: jason}, {type: RegularExpression, name: x-env, value: 'prod|stage'}]}]\n    backendRefs: [{name: h}]\n",
    );
    assert_eq!(
        route_of(&t, "GET", "/", &[("x-user", "jason"), ("x-env", "stage")]).as_deref(),
        Some("h")
    );
    assert_eq!(
        route_of(&t, "GET", "/", &[("x-user", "jason"), ("x-env", "staging")]),
        None
    );
    assert_eq!(
        route_of(&t, "GET", "/", &[("x-user", "Jason"), ("x-env", "prod")]),
        None
    );
    assert_eq!(route_of(&t, "GET", "/", &[("x-user", "jason")]), None);
}

#[test]
fn query_params_are_decoded() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{queryParams: [{name: q, value: 'a b'}, {type: RegularExpression, name: n, value: '[0-9]+'}]}]\n    backendRefs: [{name: q}]\n",
    );
    assert_eq!(get(&t, "/?q=a+b&n=7").as_deref(), Some("q"));
    assert_eq!(get(&t, "/?n=7&q=a%20b").as_deref(), Some("q"));
    assert_eq!(get(&t, "/?q=a+b&n=x"), None);
    assert_eq!(get(&t, "/?q=ab&n=7"), None);
}

#[test]
fn method() {
    let t =
        table("- name: r\n  rules:\n  - matches: [{method: POST}]\n    backendRefs: [{name: m}]\n");
    assert_eq!(route_of(&t, "POST", "/x", &[]).as_deref(), Some("m"));
    assert_eq!(route_of(&t, "GET", "/x", &[]), None);
}

#[test]
fn precedence_follows_gateway_api_order() {
    // Rules are listed least specific first so that order alone would pick
    // the wrong one.
    let t = table(
        r#"
- name: r
  rules:
  - backendRefs: [{name: catch-all}]
  - matches: [{path: {value: /api}, queryParams: [{name: debug, value: "1"}]}]
    backendRefs: [{name: query}]
  - matches: [{path: {value: /api}, headers: [{name: x-a, value: "1"}]}]
    backendRefs: [{name: one-header}]
  - matches: [{path: {value: /api}, headers: [{name: x-a, value: "1"}, {name: x-b, value: "1"}]}]
    backendRefs: [{name: two-headers}]
  - matches: [{path: {value: /api}, method: GET}]
    backendRefs: [{name: method}]
  - matches: [{path: {value: /api/v1}}]
    backendRefs: [{name: longer-prefix}]
  - matches: [{path: {type: RegularExpression, value: "/api/v[0-9]/special"}}]
    backendRefs: [{name: regex}]
  - matches: [{path: {type: Exact, value: /api/v1/special}}]
    backendRefs: [{name: exact}]
"#,
    );
    assert_eq!(get(&t, "/api/v1/special").as_deref(), Some("exact"));
    assert_eq!(get(&t, "/api/v2/special").as_deref(), Some("regex"));
    assert_eq!(get(&t, "/api/v1/other").as_deref(), Some("longer-prefix"));
    let hdrs = [("x-a", "1"), ("x-b", "1")];
    assert_eq!(
        route_of(&t, "GET", "/api/x", &hdrs).as_deref(),
        Some("method")
    );
    assert_eq!(
        route_of(&t, "PUT", "/api/x", &hdrs).as_deref(),
        Some("two-headers")
    );
    assert_eq!(
        route_of(&t, "PUT", "/api/x?debug=1", &[("x-a", "1")]).as_deref(),
        Some("one-header")
    );
    assert_eq!(
        route_of(&t, "PUT", "/api/x?debug=1", &[]).as_deref(),
        Some("query")
    );
    assert_eq!(get(&t, "/other").as_deref(), Some("catch-all"));
}

#[test]
fn ties_go_to_the_earlier_route_then_rule() {
    let t = table(
        "- name: first\n  rules:\n  - matches: [{path: {value: /x}}]\n    backendRefs: [{name: a}]\n  - matches: [{path: {value: /x}}]\n    backendRefs: [{name: b}]\n- name: second\n  rules:\n  - matches: [{path: {value: /x}}]\n    backendRefs: [{name: c}]\n",
    );
    assert_eq!(get(&t, "/x").as_deref(), Some("a"));
}

#[test]
fn unmatched_request_finds_no_rule_and_empty_rule_has_no_backend() {
    let t = table(
        "- name: r\n  rules:\n  - matches: [{path: {value: /a}}]\n    backendRefs: [{name: a}]\n  - matches: [{path: {value: /b}}]\n",
    );
    assert_eq!(get(&t, "/c"), None, "no match means 404");
    assert_eq!(
        get(&t, "/b").as_deref(),
        Some("<none>"),
        "no backends means 500"
    );
}

#[test]
fn weights_split_proportionally() {
    let t = table(
        "- name: r\n  rules:\n  - backendRefs: [{name: a, weight: 80}, {name: b, weight: 10}, {name: zero, weight: 0}, {name: c, weight: 10}]\n",
    );
    let parts = RequestParts {
        method: &http::Method::GET,
        path: "/",
        query: None,
        headers: &http::HeaderMap::new(),
    };
    let rule = t.find(&parts, None).unwrap().rule;
    let mut counts = std::collections::HashMap::new();
    for roll in 0..100u64 {
        let (b, _) = rule.backend(rule.pick(roll).unwrap()).unwrap();
        *counts.entry(b.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts["a"], 80);
    assert_eq!(counts["b"], 10);
    assert_eq!(counts["c"], 10);
    assert!(!counts.contains_key("zero"));
}
