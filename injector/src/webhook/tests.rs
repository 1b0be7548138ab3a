#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use super::*;

/// A review as the API server sends it for a ReplicaSet's pod.
fn review(version: &str, operation: &str, pod: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": version,
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": operation,
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        },
    }))
    .unwrap()
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "generateName": "reviews-v1-6b8f7c9d4-", "labels": { "app": "reviews" } },
        "spec": { "containers": [{ "name": "reviews", "image": "trellis/bookinfo:dev" }] },
    })
}

fn answered(body: &[u8]) -> (Verdict, Value) {
    let (verdict, review) = inject(body, &InjectConfig::default()).unwrap();
    (verdict, serde_json::to_value(review).unwrap())
}

/// The patch as the API server reads it: JSON bytes.
fn patch_of(response: &Value) -> json_patch::Patch {
    let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_pod_create_is_answered_with_the_patch_in_the_servers_version() {
    for version in ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] {
        let (verdict, out) = answered(&review(version, "CREATE", pod()));
        assert_eq!(verdict, Verdict::Injected);
        assert_eq!(out["apiVersion"], version);
        assert_eq!(out["kind"], "AdmissionReview");
        let response = &out["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let mut doc = pod();
        json_patch::patch(&mut doc, &patch_of(response)).unwrap();
        let containers: Vec<&str> = doc["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(containers, ["trellis-proxy", "reviews"]);
    }
}

#[test]
fn a_pod_left_alone_is_allowed_without_a_patch() {
    let mut opted_out = pod();
    opted_out["metadata"]["labels"]["trellis.dev/inject"] = "false".into();
    let (verdict, out) = answered(&review("admission.k8s.io/v1", "CREATE", opted_out));
    assert_eq!(verdict, Verdict::Skipped);
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());

    // An UPDATE is not the injector's business.
    let (verdict, out) = answered(&review("admission.k8s.io/v1", "UPDATE", pod()));
    assert_eq!(verdict, Verdict::Ignored);
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());
}

#[test]
fn a_pod_that_cannot_be_meshed_is_denied_with_the_reason() {
    let mut as_proxy = pod();
    as_proxy["spec"]["containers"][0]["securityContext"] = json!({ "runAsUser": 1337 });
    let (verdict, out) = answered(&review("admission.k8s.io/v1", "CREATE", as_proxy));
    assert_eq!(verdict, Verdict::Denied);
    let response = &out["response"];
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("trellis-injector cannot mesh pod shop/reviews-v1-6b8f7c9d4-*: container reviews runs as uid 1337"),
        "{message}"
    );

    let mut unreadable = pod();
    unreadable["spec"]["containers"] = json!("not a list");
    let (verdict, out) = answered(&review("admission.k8s.io/v1", "CREATE", unreadable));
    assert_eq!(verdict, Verdict::Denied);
    let message = out["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("cannot be read as a Pod"), "{message}");
}

#[test]
fn a_body_that_is_not_a_review_is_named() {
    let bad = |body: &[u8]| {
        inject(body, &InjectConfig::default())
            .unwrap_err()
            .to_string()
    };
    assert!(bad(b"{not json").starts_with("the body is not an AdmissionReview: "));
    assert_eq!(
        bad(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
        "the AdmissionReview has no request"
    );
    let e = bad(&review("admission.k8s.io/v2", "CREATE", pod()));
    assert_eq!(
        e,
        r#"the AdmissionReview is "admission.k8s.io/v2", not admission.k8s.io/v1 or v1beta1"#
    );
}

fn write_cert(dir: &Path, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let cert = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    cert
}

#[test]
fn the_certificate_is_reloaded_when_its_files_change_and_kept_when_bad() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path(), "one.trellis.test");
    let c = Certificate::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    assert_eq!(c.get().cert[0].as_ref(), first.cert.der().as_ref());

    std::thread::sleep(Duration::from_millis(20));
    let second = write_cert(dir.path(), "two.trellis.test");
    c.reload();
    assert_eq!(c.get().cert[0].as_ref(), second.cert.der().as_ref());

    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    c.reload();
    assert_eq!(c.get().cert[0].as_ref(), second.cert.der().as_ref());

    let err =
        Certificate::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap_err();
    assert!(
        format!("{err:#}").contains("is not a PEM private key"),
        "{err:#}"
    );
}

/// The real server over HTTPS, as the API server calls it.
#[tokio::test]
async fn the_server_answers_reviews_health_and_metrics_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = write_cert(dir.path(), "trellis-injector.trellis-system.svc");
    let certificate =
        Certificate::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        certificate,
        Arc::new(InjectConfig::default()),
        recorder,
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let call = |method: &'static str, path: &'static str, body: Vec<u8>| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name =
                rustls::pki_types::ServerName::try_from("trellis-injector.trellis-system.svc")
                    .unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, "trellis-injector.trellis-system.svc")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let res = send.send_request(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };

    let (status, body) = call(
        "POST",
        "/inject",
        review("admission.k8s.io/v1", "CREATE", pod()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(out["response"]["patchType"], "JSONPatch");

    let (status, body) = call("POST", "/inject", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.starts_with("the body is not an AdmissionReview"),
        "{body}"
    );

    let (status, _) = call("GET", "/inject", Vec::new()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, body) = call("GET", "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
    let (status, metrics) = call("GET", "/metrics", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics
            .contains(r#"trellis_injector_admissions_total{webhook="inject",result="injected"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"trellis_injector_admissions_total{webhook="inject",result="invalid"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("trellis_injector_admission_duration_seconds"),
        "{metrics}"
    );
}
