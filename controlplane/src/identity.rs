//! The identity service: `trellis.identity.v1.Identity/Sign` over gRPC,
//! served beside discovery on port 15012.
//!
//! A call is authenticated ([`Authenticator`]: which identity does the
//! caller's credential prove?), then signed by the [`Ca`], which refuses a
//! CSR for any other identity. Status codes: `UNAUTHENTICATED` for a
//! missing or unknown credential, `PERMISSION_DENIED` for a CSR naming
//! another identity (the message names the requested and the allowed
//! one), `INVALID_ARGUMENT` for an unusable CSR, `INTERNAL` when the CA
//! fails.
//!
//! Metrics: `trellis_ca_certificates_issued_total`, and
//! `trellis_ca_sign_errors_total{reason}` with reason `unauthenticated`,
//! `foreign`, `bad_csr` or `internal`.

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use mesh_proto::identity::v1::identity_server::{Identity as IdentityApi, IdentityServer};
use mesh_proto::identity::v1::{SignRequest, SignResponse};
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::ca::{Authenticator, Ca, SignError};

/// Counter of certificates issued.
pub const METRIC_ISSUED: &str = "trellis_ca_certificates_issued_total";
/// Counter of refused or failed sign calls, by `reason`.
pub const METRIC_SIGN_ERRORS: &str = "trellis_ca_sign_errors_total";

/// The Sign service. Cheap to clone.
#[derive(Clone)]
pub struct IdentityService {
    ca: Arc<Ca>,
    authenticator: Arc<dyn Authenticator>,
    issued: Arc<Issuances>,
}

/// The last certificate issued per SPIFFE ID, for `/debug/identities` and
/// `meshctl proxy-status`.
#[derive(Debug, Default)]
pub struct Issuances(std::sync::Mutex<std::collections::BTreeMap<String, IssuedCert>>);

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedCert {
    /// Serial number, hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix_seconds: i64,
}

/// What `/debug/identities` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identities {
    /// The trust domain.
    pub trust_domain: String,
    /// The last certificate issued to each SPIFFE ID since the control
    /// plane started.
    pub certificates: std::collections::BTreeMap<String, IssuedCert>,
}

impl Issuances {
    /// A copy of the records.
    pub fn snapshot(&self, trust_domain: &str) -> Identities {
        Identities {
            trust_domain: trust_domain.to_owned(),
            certificates: self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

impl IdentityService {
    /// A service signing with `ca` for the callers `authenticator` knows.
    pub fn new(ca: Arc<Ca>, authenticator: Arc<dyn Authenticator>) -> Self {
        Self {
            ca,
            authenticator,
            issued: Arc::default(),
        }
    }

    /// The tonic service, for `tonic::transport::Server::add_service`.
    pub fn service(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    /// The issuance records, shared with the admin server.
    pub fn issuances(&self) -> Arc<Issuances> {
        self.issued.clone()
    }
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl IdentityApi for IdentityService {
    #[instrument(name = "sign", skip_all, fields(peer = ?request.remote_addr()))]
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let identity = match self.authenticator.authenticate(request.metadata()).await {
            Ok(identity) => identity,
            Err(status) => {
                count_error("unauthenticated");
                warn!(error = %status.message(), "sign refused: unauthenticated");
                return Err(status);
            }
        };
        let SignRequest {
            csr_pem,
            ttl_seconds,
        } = request.into_inner();
        let ttl = (ttl_seconds > 0).then(|| Duration::from_secs(ttl_seconds));
        let issued = self.ca.sign(&csr_pem, &identity, ttl).map_err(|e| {
            count_error(e.reason());
            warn!(
                identity = %identity.spiffe_id(self.ca.trust_domain()),
                error = %e,
                "sign refused"
            );
            status(e)
        })?;
        metrics::counter!(METRIC_ISSUED).increment(1);
        let expires = issued
            .expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.issued
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                issued.spiffe_id.clone(),
                IssuedCert {
                    serial: issued.serial.clone(),
                    expires_unix_seconds: expires,
                },
            );
        info!(
            identity = %issued.spiffe_id,
            serial = %issued.serial,
            expires = %humantime::format_rfc3339_seconds(issued.expires),
            "certificate issued"
        );
        Ok(Response::new(SignResponse {
            cert_chain_pem: issued.cert_chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            expires_unix_seconds: expires,
        }))
    }
}

fn count_error(reason: &'static str) {
    metrics::counter!(METRIC_SIGN_ERRORS, "reason" => reason).increment(1);
}

/// The gRPC status of a refused or failed signing.
pub fn status(error: SignError) -> Status {
    match error {
        SignError::Foreign { .. } => Status::permission_denied(error.to_string()),
        SignError::BadCsr { .. } | SignError::BadServerName { .. } => {
            Status::invalid_argument(error.to_string())
        }
        SignError::Internal(_) => Status::internal(error.to_string()),
    }
}
