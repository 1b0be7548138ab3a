//! The workload identity client: gets the proxy's certificate from the
//! control plane's CA and keeps it fresh.
//!
//! The key pair is made here, in memory, and never leaves the process: the
//! CA sees only a CSR for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
//! authenticated by the credential in `--token-file` (a bootstrap token in
//! local mode, a service-account token on Kubernetes). The certificate is
//! renewed at about half its lifetime (with jitter, so a fleet does not
//! renew at once); a failed attempt is retried with backoff while the
//! current certificate stays in use. Each renewal swaps the credentials in
//! [`Tls`], which only new handshakes see.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_proto::identity::v1::SignRequest;
use mesh_proto::identity::v1::identity_client::IdentityClient;
use rand::Rng;
use tracing::{info, warn};

use crate::discovery::Dialer;
use crate::tls::Tls;

/// First retry delay after a failed signing; doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The credential file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key or CSR could not be made.
    #[error("cannot make a key and CSR for {id}: {reason}")]
    Csr {
        /// The SPIFFE ID.
        id: String,
        /// Why.
        reason: String,
    },
    /// The CA could not be reached or refused.
    #[error("the CA refused or failed: {0}")]
    Sign(#[from] tonic::Status),
    /// The CA's answer cannot be used.
    #[error("the CA's certificate cannot be used: {0}")]
    Issued(#[from] crate::tls::TlsError),
}

/// Gets and renews the proxy's certificate.
pub struct Client {
    dialer: Dialer,
    token_file: PathBuf,
    spiffe_id: String,
    tls: Arc<Tls>,
}

impl Client {
    /// A client for the CA that `dialer` reaches (on the discovery port)
    /// that proves itself with the token in `token_file` and asks for
    /// `spiffe_id`.
    pub fn new(dialer: Dialer, token_file: PathBuf, spiffe_id: String, tls: Arc<Tls>) -> Self {
        Self {
            dialer,
            token_file,
            spiffe_id,
            tls,
        }
    }

    /// Runs forever: get a certificate, then renew it at about half its
    /// lifetime.
    pub async fn run(self) {
        let mut retry = RETRY_BASE;
        loop {
            match self.renew().await {
                Ok(expires) => {
                    retry = RETRY_BASE;
                    let wait = renewal_delay(SystemTime::now(), expires, rand::rng().random());
                    info!(id = %self.spiffe_id, ?wait, "workload certificate installed");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    warn!(id = %self.spiffe_id, error = %e, ?retry, "cannot get a workload certificate; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One signing round: a new key, a CSR, the CA's answer installed.
    /// Returns when the new certificate expires.
    pub async fn renew(&self) -> Result<SystemTime, IdentityError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| IdentityError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let (csr_pem, key_der) = csr(&self.spiffe_id)?;
        let channel = self.dialer.connect().await?;
        let mut request = tonic::Request::new(SignRequest {
            csr_pem,
            ttl_seconds: 0,
        });
        let bearer = format!("Bearer {}", token.trim());
        let value = bearer
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("the token is not valid header text"))?;
        request.metadata_mut().insert("authorization", value);
        let issued = IdentityClient::new(channel)
            .sign(request)
            .await?
            .into_inner();
        self.tls.offer_roots(&issued.trust_bundle_pem)?;
        let credentials = self.tls.set_credentials(&issued.cert_chain_pem, key_der)?;
        Ok(credentials.expires)
    }
}

/// A fresh P-256 key pair and a CSR for `spiffe_id`: the PEM CSR and the
/// PKCS#8 DER key.
pub fn csr(spiffe_id: &str) -> Result<(String, Vec<u8>), IdentityError> {
    let fail = |reason: String| IdentityError::Csr {
        id: spiffe_id.to_owned(),
        reason,
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| fail(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    let uri = rcgen::string::Ia5String::try_from(spiffe_id).map_err(|e| fail(e.to_string()))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| fail(e.to_string()))?;
    Ok((csr, key.serialize_der()))
}

/// How long to wait before renewing a certificate that expires at
/// `expires`: half the time left, scaled by `jitter` (0..1) to between 40%
/// and 60% of it, at least a second.
pub fn renewal_delay(now: SystemTime, expires: SystemTime, jitter: f64) -> Duration {
    let left = expires.duration_since(now).unwrap_or_default();
    left.mul_f64(0.4 + 0.2 * jitter.clamp(0.0, 1.0))
        .max(Duration::from_secs(1))
}

/// The SPIFFE ID of a workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn renewal_comes_at_about_half_the_lifetime() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renewal_delay(now, now + day, 0.5), day / 2);
        assert_eq!(renewal_delay(now, now + day, 0.0), day.mul_f64(0.4));
        assert_eq!(renewal_delay(now, now + day, 1.0), day.mul_f64(0.6));
        // Expired or about to: renew right away, but not in a hot loop.
        assert_eq!(renewal_delay(now, now, 0.5), Duration::from_secs(1));
        assert_eq!(renewal_delay(now + day, now, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn the_csr_asks_for_the_spiffe_id_only() {
        let id = spiffe_id("cluster.local", "shop", "reviews");
        let (pem, key) = csr(&id).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!key.is_empty());
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap();
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .unwrap();
        let uris: Vec<String> = parsed
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(
                    san.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(uris, [format!("URI({id})")]);
    }
}
