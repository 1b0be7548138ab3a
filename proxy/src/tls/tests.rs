#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::testutil::TestCa;

const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/default/sa/productpage";
const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// Runs one handshake: `server` accepts, `client` connects expecting
/// `expected`. Returns the client's result and the server's (the peer ID
/// it saw).
async fn handshake(
    client: &Arc<Tls>,
    server: &Arc<Tls>,
    expected: &str,
) -> (Result<(), TlsError>, Result<Arc<str>, TlsError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = server.clone();
    let accepted = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let (mut stream, id) = server.accept(tcp, peer).await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        stream.write_all(b"pong").await.unwrap();
        stream.shutdown().await.unwrap();
        Ok(id)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client_result = match client.connect(tcp, addr, expected, Some(ALPN_HTTP1)).await {
        Ok(mut stream) => {
            // A TLS 1.3 client is done before the server has checked its
            // certificate; a refusal shows on the first read.
            let mut buf = Vec::new();
            let exchanged = async {
                stream.write_all(b"ping").await?;
                stream.read_to_end(&mut buf).await
            };
            match exchanged.await {
                Ok(_) => {
                    assert_eq!(buf, b"pong");
                    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
                    Ok(())
                }
                Err(e) => Err(TlsError::Handshake {
                    peer: addr,
                    reason: e.to_string(),
                }),
            }
        }
        Err(e) => Err(e),
    };
    let server_result = tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .expect("server hung")
        .unwrap();
    (client_result, server_result)
}

#[tokio::test]
async fn both_sides_prove_their_identity() {
    let ca = TestCa::new();
    let client = ca.tls(PRODUCTPAGE);
    let server = ca.tls(REVIEWS);
    let (c, s) = handshake(&client, &server, REVIEWS).await;
    c.unwrap();
    assert_eq!(&*s.unwrap(), PRODUCTPAGE);
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_even_with_a_valid_chain() {
    let ca = TestCa::new();
    let client = ca.tls(PRODUCTPAGE);
    let impostor = ca.tls("spiffe://cluster.local/ns/default/sa/ratings");
    let (c, _) = handshake(&client, &impostor, REVIEWS).await;
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains("the server's identity is spiffe://cluster.local/ns/default/sa/ratings, not spiffe://cluster.local/ns/default/sa/reviews"),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_root_is_refused_both_ways() {
    let ours = TestCa::new();
    let theirs = TestCa::new();
    // A server whose certificate chains to another root.
    let (c, _) = handshake(&ours.tls(PRODUCTPAGE), &theirs.tls(REVIEWS), REVIEWS).await;
    // Both test roots have the same name: the chain is found and its
    // signature does not check out.
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
    // A client whose certificate chains to another root.
    let client = Tls::new();
    let (chain, key) = theirs.issue(PRODUCTPAGE);
    client.set_credentials(&chain, key).unwrap();
    client.set_roots(&[ours.root_pem()]).unwrap();
    let (_, s) = handshake(&client, &ours.tls(REVIEWS), REVIEWS).await;
    let err = s.unwrap_err().to_string();
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = TestCa::new();
    let server = Tls::new();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (chain, key) = ca.issue_between(REVIEWS, now - 2 * day, now - day);
    server.set_credentials(&chain, key).unwrap();
    server.set_roots(&[ca.root_pem()]).unwrap();
    let (c, _) = handshake(&ca.tls(PRODUCTPAGE), &server, REVIEWS).await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = TestCa::new();
    let server = ca.tls(REVIEWS);
    // rustls itself refuses to connect without credentials; a raw TLS
    // client without a certificate is what the server must refuse.
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.root_pem().as_bytes()).unwrap())
        .unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
            roots: Arc::new(roots),
            expected: REVIEWS.into(),
            provider: provider(),
        }))
        .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        server.accept(tcp, peer).await.map(|(_, id)| id)
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    // TLS 1.3 clients finish before the server checks their certificate;
    // the failure shows on the server, and on the client's next read.
    if let Ok(mut stream) = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 1];
        assert!(stream.read(&mut buf).await.is_err() || buf == [0]);
    }
    let err = accepted.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("peer sent no certificates"), "{err}");
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_handshakes_and_old_connections_carry_on() {
    let ca = TestCa::new();
    let client = ca.tls(PRODUCTPAGE);
    let server = ca.tls(REVIEWS);
    let first = server.credentials().unwrap();
    let (chain, key) = ca.issue(REVIEWS);
    server.set_credentials(&chain, key).unwrap();
    let second = server.credentials().unwrap();
    assert!(!Arc::ptr_eq(&first.key, &second.key));
    let (c, s) = handshake(&client, &server, REVIEWS).await;
    c.unwrap();
    s.unwrap();
}

#[test]
fn spiffe_ids_and_namespaces_are_read_from_certificates() {
    let ca = TestCa::new();
    let (chain, _) = ca.issue(REVIEWS);
    let der = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    assert_eq!(spiffe_id(&der).as_deref(), Some(REVIEWS));
    assert_eq!(namespace_of(REVIEWS), Some("default"));
    assert_eq!(namespace_of("spiffe://td/ns//sa/x"), None);
    assert_eq!(namespace_of("spiffe://td/other"), None);
    assert_eq!(namespace_of("https://td/ns/a/sa/b"), None);
}

#[test]
fn unusable_material_is_refused_with_the_reason() {
    let tls = Tls::new();
    let ca = TestCa::new();
    assert!(matches!(
        tls.set_roots(&["not a pem".into()]),
        Err(TlsError::EmptyBundle)
    ));
    let (chain, _) = ca.issue(REVIEWS);
    let (_, other_key) = ca.issue(REVIEWS);
    assert!(matches!(
        tls.set_credentials(&chain, other_key),
        Err(TlsError::Key(_))
    ));
    let (_, key) = ca.issue(REVIEWS);
    assert!(matches!(
        tls.set_credentials(&[], key),
        Err(TlsError::EmptyChain)
    ));
    assert!(!tls.is_ready());
}

#[test]
fn a_sign_answers_bundle_is_taken_only_until_discovery_sent_one() {
    let (first, second) = (TestCa::new(), TestCa::new());
    let tls = Tls::new();
    assert!(tls.offer_roots(&[first.root_pem()]).unwrap());
    assert_eq!(tls.root_count(), 1);
    // Discovery's bundle replaces it, and then is the bundle.
    tls.set_roots(&[first.root_pem(), second.root_pem()])
        .unwrap();
    assert_eq!(tls.root_count(), 2);
    assert!(!tls.offer_roots(&[first.root_pem()]).unwrap());
    assert_eq!(tls.root_count(), 2);
}
