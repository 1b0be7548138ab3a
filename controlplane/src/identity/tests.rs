#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::Code;

use super::*;
use crate::ca::{BootstrapTokens, CaConfig, MemoryKeyStore, NoAuthenticator};

const TOKENS: &str = "\
tokens:
  - token: productpage-token
    namespace: default
    serviceAccount: productpage
";

fn service(authenticator: Arc<dyn Authenticator>) -> IdentityService {
    let ca = Ca::open(CaConfig::default(), Box::new(MemoryKeyStore::default())).unwrap();
    IdentityService::new(Arc::new(ca), authenticator)
}

fn tokens() -> Arc<dyn Authenticator> {
    Arc::new(BootstrapTokens::parse(TOKENS, "tokens.yaml").unwrap())
}

fn csr(spiffe_id: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(token: Option<&str>, csr_pem: String, ttl_seconds: u64) -> Request<SignRequest> {
    let mut request = Request::new(SignRequest {
        csr_pem,
        ttl_seconds,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn now_unix() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

#[tokio::test]
async fn signs_for_the_token_identity() {
    let svc = service(tokens());
    let before = now_unix();
    let response = svc
        .sign(request(Some("productpage-token"), csr(PRODUCTPAGE), 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.cert_chain_pem.len(), 1);
    assert_eq!(response.trust_bundle_pem, svc.ca.trust_bundle_pem());
    let day = i64::try_from(crate::ca::DEFAULT_CERT_TTL.as_secs()).unwrap();
    assert!(
        (before + day..=now_unix() + day).contains(&response.expires_unix_seconds),
        "{}",
        response.expires_unix_seconds
    );

    // A requested lifetime shorter than the default is honoured.
    let response = svc
        .sign(request(Some("productpage-token"), csr(PRODUCTPAGE), 600))
        .await
        .unwrap()
        .into_inner();
    assert!(response.expires_unix_seconds <= now_unix() + 600);
    assert!(response.expires_unix_seconds >= before + 600);
}

#[tokio::test]
async fn refusals_have_the_right_codes_and_say_why() {
    let svc = service(tokens());

    let foreign = svc
        .sign(request(Some("productpage-token"), csr(REVIEWS), 0))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::PermissionDenied);
    assert!(
        foreign.message().contains(REVIEWS) && foreign.message().contains(PRODUCTPAGE),
        "{}",
        foreign.message()
    );

    let bad = svc
        .sign(request(Some("productpage-token"), "garbage".into(), 0))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("bad CSR"), "{}", bad.message());

    for token in [None, Some("wrong-token")] {
        let status = svc
            .sign(request(token, csr(PRODUCTPAGE), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
}

#[tokio::test]
async fn without_an_authenticator_nothing_is_signed() {
    let svc = service(Arc::new(NoAuthenticator));
    let status = svc
        .sign(request(Some("productpage-token"), csr(PRODUCTPAGE), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("--bootstrap-tokens"));
}

#[test]
fn sign_errors_map_to_status_codes() {
    let cases = [
        (
            SignError::Foreign {
                requested: "a".into(),
                allowed: "b".into(),
            },
            Code::PermissionDenied,
        ),
        (
            SignError::BadCsr { reason: "x".into() },
            Code::InvalidArgument,
        ),
        (SignError::Internal("x".into()), Code::Internal),
    ];
    for (error, code) in cases {
        let message = error.to_string();
        let status = status(error);
        assert_eq!(status.code(), code);
        assert_eq!(status.message(), message);
    }
}
