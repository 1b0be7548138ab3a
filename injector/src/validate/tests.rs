#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use super::*;

/// A review of `object` as the API server sends it for `kubectl apply`.
fn review(operation: &str, group: &str, kind: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1f2b9c3e-0000-4000-8000-000000000001",
            "kind": { "group": group, "version": "v1", "kind": kind },
            "resource": { "group": group, "version": "v1", "resource": "things" },
            "name": object["metadata"]["name"],
            "namespace": "shop",
            "operation": operation,
            "userInfo": { "username": "admin" },
            "object": object,
            "oldObject": null,
            "dryRun": false,
        },
    }))
    .unwrap()
}

fn answered(body: &[u8]) -> (Verdict, Value) {
    let (verdict, review) = validate(body).unwrap();
    (
        verdict,
        serde_json::to_value(review).unwrap()["response"].clone(),
    )
}

fn route(parent_kind: &str, backend: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "name": "reviews", "namespace": "shop" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": parent_kind, "name": "reviews" }],
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": "reviews" } }],
                "backendRefs": [backend],
            }],
        },
    })
}

#[test]
fn a_mesh_route_the_control_plane_would_refuse_is_denied_with_every_field_named() {
    let bad = route("Service", json!({ "name": "reviews-v1" }));
    for operation in ["CREATE", "UPDATE"] {
        let (verdict, response) = answered(&review(
            operation,
            "gateway.networking.k8s.io",
            "HTTPRoute",
            bad.clone(),
        ));
        assert_eq!(verdict, Verdict::Denied);
        assert_eq!(response["allowed"], false);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(r#"HTTPRoute "shop/reviews": spec.rules[0].matches[0].path.value: must start with '/'"#),
            "{message}"
        );
        assert!(
            message.contains("spec.rules[0].backendRefs[0].port: required for a Service backend"),
            "{message}"
        );
    }
}

#[test]
fn a_good_mesh_route_is_allowed_and_a_gateways_route_is_not_the_meshs_business() {
    let mut good = route("Service", json!({ "name": "reviews-v1", "port": 9080 }));
    good["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("/reviews");
    let (verdict, response) = answered(&review(
        "CREATE",
        "gateway.networking.k8s.io",
        "HTTPRoute",
        good,
    ));
    assert_eq!(
        (verdict, &response["allowed"]),
        (Verdict::Allowed, &json!(true))
    );

    // Parents default to Gateway: the same broken rules are a gateway's.
    let gateways = route("Gateway", json!({ "name": "reviews-v1" }));
    let (verdict, response) = answered(&review(
        "CREATE",
        "gateway.networking.k8s.io",
        "HTTPRoute",
        gateways,
    ));
    assert_eq!(
        (verdict, &response["allowed"]),
        (Verdict::Ignored, &json!(true))
    );
}

#[test]
fn trellis_policies_are_checked_by_their_own_validation() {
    let deny_nothing = json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "deny", "namespace": "shop" },
        "spec": { "action": "DENY" },
    });
    let (verdict, response) = answered(&review(
        "CREATE",
        "trellis.dev",
        "AuthorizationPolicy",
        deny_nothing,
    ));
    assert_eq!(verdict, Verdict::Denied);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("spec.rules"), "{message}");
    assert!(message.contains("denies nothing"), "{message}");

    // A shape the CRD type cannot hold is named too, not passed through.
    let wrong = json!({
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": { "name": "strict", "namespace": "shop" },
        "spec": { "mtls": { "mode": "SOMETIMES" } },
    });
    let (verdict, response) = answered(&review(
        "CREATE",
        "trellis.dev",
        "PeerAuthentication",
        wrong,
    ));
    assert_eq!(verdict, Verdict::Denied);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("PeerAuthentication shop/strict cannot be read: "),
        "{message}"
    );
    assert!(message.contains("SOMETIMES"), "{message}");
}

#[test]
fn deletes_and_other_kinds_are_allowed_untouched() {
    let bad = route("Service", json!({ "name": "reviews-v1" }));
    let (verdict, response) = answered(&review(
        "DELETE",
        "gateway.networking.k8s.io",
        "HTTPRoute",
        bad,
    ));
    assert_eq!(
        (verdict, &response["allowed"]),
        (Verdict::Ignored, &json!(true))
    );
    let config_map = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "x", "namespace": "shop" },
    });
    let (verdict, _) = answered(&review("CREATE", "", "ConfigMap", config_map));
    assert_eq!(verdict, Verdict::Ignored);
}
