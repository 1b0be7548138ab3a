//! The identity service over the network: a control plane started as the
//! binary starts it (`run::start`, gRPC on 127.0.0.1:0), a proxy-like
//! client that makes its key and CSR with rcgen and calls Sign.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use controlplane::run::{self, ControlPlane};
use controlplane::settings::Settings;
use mesh_proto::identity::v1::SignRequest;
use mesh_proto::identity::v1::identity_client::IdentityClient;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::extensions::GeneralName;

const TOKENS: &str = "\
tokens:
  - token: token-of-productpage
    namespace: default
    serviceAccount: productpage
  - token: token-of-reviews
    namespace: default
    serviceAccount: reviews
";
const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// A fresh directory, removed when dropped, with an empty config directory
/// `mesh` and the tokens file.
fn dirs(name: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("trellis-identity-{name}-"))
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("mesh")).unwrap();
    std::fs::write(dir.path().join("tokens.yaml"), TOKENS).unwrap();
    dir
}

/// The control plane on a fresh directory, which it reads while it runs:
/// keep the [`TempDir`] until the test ends.
async fn start(name: &str) -> (TempDir, ControlPlane, IdentityClient<Channel>) {
    let dir = dirs(name);
    let settings = Settings {
        bootstrap_tokens: Some(dir.path().join("tokens.yaml")),
        ..Settings::for_tests(dir.path().join("mesh"))
    };
    let cp = run::start(&settings).await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.discovery_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (dir, cp, IdentityClient::new(channel))
}

/// What a proxy does at start: a key of its own and a CSR for its ID.
fn csr(spiffe_id: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn sign_request(token: &str, csr_pem: String) -> tonic::Request<SignRequest> {
    let mut request = tonic::Request::new(SignRequest {
        csr_pem,
        ttl_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn der(pem: &str) -> Vec<u8> {
    pem::parse(pem).unwrap().into_contents()
}

#[tokio::test]
async fn a_good_token_gets_a_certificate_for_its_identity() {
    let (_dir, cp, mut client) = start("good").await;
    let (key, csr) = csr(PRODUCTPAGE);
    let response = client
        .sign(sign_request("token-of-productpage", csr))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(response.cert_chain_pem.len(), 1);
    assert_eq!(response.trust_bundle_pem, cp.ca.trust_bundle_pem());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let left = response.expires_unix_seconds - i64::try_from(now.as_secs()).unwrap();
    assert!((23 * 3600..=24 * 3600).contains(&left), "{left}");

    // The certificate is the proxy's key, named by its SPIFFE ID alone,
    // and chains to the trust bundle as rustls checks it.
    let leaf_der = der(&response.cert_chain_pem[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    assert_eq!(
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names,
        vec![GeneralName::URI(PRODUCTPAGE)]
    );
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
    let roots: Vec<CertificateDer<'_>> = response
        .trust_bundle_pem
        .iter()
        .map(|r| der(r).into())
        .collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf_der = CertificateDer::from(leaf_der);
    webpki::EndEntityCert::try_from(&leaf_der)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated() {
    let (_dir, _cp, mut client) = start("wrong").await;
    let status = client
        .sign(sign_request("token-of-nobody", csr(PRODUCTPAGE).1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("unknown bootstrap token"),
        "{}",
        status.message()
    );

    let mut request = tonic::Request::new(SignRequest {
        csr_pem: csr(PRODUCTPAGE).1,
        ttl_seconds: 0,
    });
    request.metadata_mut().remove("authorization");
    let status = client.sign(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_token_for_one_service_account_cannot_get_another() {
    let (_dir, _cp, mut client) = start("foreign").await;
    let status = client
        .sign(sign_request("token-of-productpage", csr(REVIEWS).1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(REVIEWS) && status.message().contains(PRODUCTPAGE),
        "{}",
        status.message()
    );
}
