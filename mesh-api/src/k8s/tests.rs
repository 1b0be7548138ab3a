use super::*;

const MESH: &str = r#"# bookinfo's reviews service, as the file source reads it
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
spec:
  selector: { app: reviews }
  ports:
    - name: http
      port: 9080
      targetPort: 9080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc12
  namespace: bookinfo
  labels: { kubernetes.io/service-name: reviews }
addressType: IPv4
ports: [{ name: http, port: 9080, protocol: TCP }]
endpoints:
  - addresses: [10.0.0.7]
    conditions: { ready: true }
    targetRef: { kind: Pod, name: reviews-v1-0, namespace: bookinfo }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews-canary
  namespace: bookinfo
spec:
  parentRefs:
    - group: ""
      kind: Service
      name: reviews
      port: 9080
  rules:
    - matches: [{ path: { type: PathPrefix, value: /reviews } }]
      backendRefs:
        - { name: reviews-v1, port: 9080, weight: 90 }
        - { name: reviews-v2, port: 9080, weight: 10 }
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: bookinfo-reviews, namespace: bookinfo }
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1-0
  namespace: bookinfo
  labels: { app: reviews, version: v1 }
spec:
  serviceAccountName: bookinfo-reviews
  containers: [{ name: reviews, image: bookinfo/reviews }]
status: { podIP: 10.0.0.7 }
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: ratings, namespace: bookinfo }
spec:
  parentRefs: [{ group: "", kind: Service, name: ratings }]
  rules:
    - matches: [{ method: { service: bookinfo.Ratings, method: Get } }]
      backendRefs: [{ name: ratings-v2, port: 9090 }]
---
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  targetRef: { name: reviews }
  loadBalancer: { algorithm: roundRobin }
  connectionPool: { maxConnections: 100 }
---
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: bookinfo }
spec:
  mtls: { mode: PERMISSIVE }
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: reviews, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  rules:
    - from: [{ principals: [cluster.local/ns/bookinfo/sa/bookinfo-productpage] }]
      to: [{ methods: [GET] }]
---
"#;

fn parse_ok(text: &str) -> Vec<Object> {
    parse_documents(text)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn parse_err(text: &str) -> ParseError {
    let mut results = parse_documents(text);
    assert_eq!(results.len(), 1, "{results:?}");
    results.remove(0).unwrap_err()
}

#[test]
fn parses_every_kind_and_skips_empty_documents() {
    let objects = parse_ok(MESH);
    let kinds: Vec<&str> = objects.iter().map(Object::kind).collect();
    assert_eq!(
        kinds,
        [
            "Service",
            "EndpointSlice",
            "HTTPRoute",
            "ServiceAccount",
            "Pod",
            "GRPCRoute",
            "DestinationPolicy",
            "PeerAuthentication",
            "AuthorizationPolicy",
        ]
    );
    for o in &objects {
        assert_eq!(
            o.meta().namespace.as_deref(),
            Some("bookinfo"),
            "{}",
            o.kind()
        );
    }
}

#[test]
fn typed_fields_survive() {
    let objects = parse_ok(MESH);
    let Object::Service(svc) = &objects[0] else {
        panic!("{:?}", objects[0])
    };
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.ports.as_ref().unwrap()[0].port, 9080);
    assert_eq!(spec.selector.as_ref().unwrap()["app"], "reviews");

    let Object::EndpointSlice(slice) = &objects[1] else {
        panic!("{:?}", objects[1])
    };
    assert_eq!(slice.endpoints[0].addresses, ["10.0.0.7"]);
    assert_eq!(
        slice.metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        "reviews"
    );

    let Object::HttpRoute(route) = &objects[2] else {
        panic!("{:?}", objects[2])
    };
    let parent = &route.spec.parent_refs.as_ref().unwrap()[0];
    assert_eq!(
        (
            parent.group.as_deref(),
            parent.kind.as_deref(),
            parent.name.as_str()
        ),
        (Some(""), Some("Service"), "reviews")
    );
    assert_eq!(parent.port, Some(9080));
    let rule = &route.spec.rules.as_ref().unwrap()[0];
    let weights: Vec<(&str, Option<i32>)> = rule
        .backend_refs
        .as_ref()
        .unwrap()
        .iter()
        .map(|b| (b.name.as_str(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [("reviews-v1", Some(90)), ("reviews-v2", Some(10))]
    );

    let Object::Pod(pod) = &objects[4] else {
        panic!("{:?}", objects[4])
    };
    assert_eq!(
        pod.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("bookinfo-reviews")
    );

    let Object::PeerAuthentication(pa) = &objects[7] else {
        panic!("{:?}", objects[7])
    };
    assert_eq!(pa.spec.mtls.mode, crate::crd::MtlsMode::Permissive);

    let Object::AuthorizationPolicy(ap) = &objects[8] else {
        panic!("{:?}", objects[8])
    };
    assert_eq!(ap.spec.rules[0].to[0].methods, ["GET"]);
    assert!(ap.validate().is_empty());
}

#[test]
fn a_single_document_needs_no_separator() {
    let objects = parse_ok("apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: a }\n");
    assert_eq!(objects.len(), 1);
    assert!(parse_documents("").is_empty());
    assert!(parse_documents("# nothing\n---\n---\n...\n").is_empty());
}

#[test]
fn a_broken_document_reports_its_file_line_and_spares_the_others() {
    let text = "\
apiVersion: v1
kind: ServiceAccount
metadata: { name: a }
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
 namespace: bookinfo
---
apiVersion: v1
kind: ServiceAccount
metadata: { name: b }
";
    let results = parse_documents(text);
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok());
    assert!(results[2].is_ok());
    let err = results[1].clone().unwrap_err();
    assert_eq!((err.document, err.line), (1, 9), "{err}");
    // The error's own position is in `line`; the context's is moved to the
    // file's numbering too.
    assert_eq!(err.column, Some(2));
    assert_eq!(
        err.to_string(),
        "line 9 column 2 (document 1): did not find expected key, \
         while parsing a block mapping at line 5 column 1"
    );
}

#[test]
fn a_type_error_reports_the_field_and_its_line() {
    let text = "\
---
# the reviews service
apiVersion: v1
kind: Service
metadata: { name: reviews }
spec:
  ports:
    - port: http
";
    let err = parse_err(text);
    assert_eq!((err.document, err.line), (0, 8), "{err}");
    assert!(err.reason.contains("spec.ports[0].port"), "{err}");
}

#[test]
fn a_bad_trellis_enum_is_a_parse_error() {
    let text = "\
apiVersion: trellis.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default }
spec:
  mtls:
    mode: strict
";
    let err = parse_err(text);
    assert_eq!(err.line, 6, "{err}");
    assert!(err.reason.contains("STRICT"), "{err}");
}

#[test]
fn an_unknown_kind_names_apiversion_and_kind() {
    let text = "\
apiVersion: v1
kind: ServiceAccount
metadata: { name: a }
---

apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: reviews }
";
    let results = parse_documents(text);
    let err = results[1].clone().unwrap_err();
    assert_eq!((err.document, err.line, err.column), (1, 7, None));
    assert!(
        err.reason.starts_with(
            "unknown object apiVersion \"networking.istio.io/v1\" kind \"VirtualService\""
        ),
        "{err}"
    );
    assert!(
        err.reason
            .contains("gateway.networking.k8s.io/v1 HTTPRoute")
    );
}

#[test]
fn a_document_without_type_meta_is_an_error_at_its_start() {
    let err = parse_err("---\n\nmetadata: { name: a }\n");
    assert_eq!(err.line, 3);
    assert!(err.reason.contains("apiVersion and kind"), "{err}");
    let err = parse_err("- a list\n");
    assert!(err.reason.contains("mapping"), "{err}");
}

#[test]
fn an_old_api_version_is_unknown() {
    let err = parse_err(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: { name: r }\n",
    );
    assert_eq!(err.line, 2);
    assert!(err.reason.contains("v1beta1"), "{err}");
}

#[test]
fn context_positions_are_moved_to_file_lines() {
    assert_eq!(
        rewrite_lines(
            "did not find key, while parsing a block mapping at line 2 column 1",
            10
        ),
        "did not find key, while parsing a block mapping at line 12 column 1"
    );
}
