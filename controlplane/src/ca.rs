//! The mesh's certificate authority: it signs workload certificates
//! (X.509 SVIDs) for `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
//!
//! A proxy makes its own key and sends a CSR with the credential of its
//! service account; the [`identity`](crate::identity) service asks an
//! [`Authenticator`] which [`Identity`] that credential proves and calls
//! [`Ca::sign`], which refuses a CSR for any other name. Only the CSR's
//! public key and its URI SAN are read: everything else the leaf carries
//! (not a CA, key usage, extended key usage, validity, serial) is the CA's
//! choice, so a CSR cannot ask for more than a workload certificate.
//!
//! The root is a self-signed ECDSA P-256 certificate made on first start
//! and kept by a [`KeyStore`] ([`FileKeyStore`] in local mode,
//! [`SecretKeyStore`] on Kubernetes; an operator may put a root of their
//! own there).
//!
//! A root rotation has three steps, so that no proxy ever meets a
//! certificate from a root it does not trust. [`Ca::prepare`] makes the
//! next root and adds it to the trust bundle, but it signs nothing yet;
//! [`Ca::promote`], called once every proxy holds that bundle (the
//! [`rotation`](crate::rotation) driver checks), makes it the signer and
//! keeps the old root trusted for the longest certificate lifetime; the
//! old root then leaves the bundle by itself.
//!
//! Every method that depends on the time has an `_at` form taking `now`,
//! which the tests use; the plain forms read the system clock.

mod auth;
mod secret;
mod store;
#[cfg(test)]
mod tests;
mod tokenreview;

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use tracing::info;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

pub use auth::{
    AuthFuture, Authenticator, BootstrapTokens, NoAuthenticator, TokensError, bearer_token,
};
pub use secret::{DEFAULT_CA_SECRET, MANAGED_BY_LABEL, ROTATE_ANNOTATION, SecretKeyStore};
pub use store::{
    FileKeyStore, MemoryKeyStore, NEXT_CERT_FILE, NEXT_KEY_FILE, NextRoot, PREVIOUS_ROOTS_FILE,
    PreviousRoot, ROOT_CERT_FILE, ROOT_KEY_FILE, RootMaterial, StoreError,
};
pub use tokenreview::{DEFAULT_TOKEN_AUDIENCE, TokenReviewAuthenticator, identity_of};

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Lifetime of a workload certificate when the CSR asks for none.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a root the CA makes.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far back a certificate's `notBefore` is set, so that a peer whose
/// clock is a little behind accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// How much longer than the longest certificate lifetime a replaced root
/// stays trusted: a replica that has not yet reloaded the promotion may
/// sign with the old root for a few seconds more.
pub const RETIRE_MARGIN: Duration = Duration::from_secs(30);

/// A workload identity: a Kubernetes service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The namespace.
    pub namespace: String,
    /// The service account's name.
    pub service_account: String,
}

/// A SPIFFE ID that does not name a Trellis workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a `spiffe://` URI.
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    NotSpiffe {
        /// The text.
        id: String,
    },
    /// Another trust domain.
    #[error("{id:?} is in trust domain {found:?}, but this mesh is {expected:?}")]
    TrustDomain {
        /// The text.
        id: String,
        /// Its trust domain.
        found: String,
        /// This mesh's.
        expected: String,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("{id:?}: the path must be /ns/<namespace>/sa/<service-account>")]
    Path {
        /// The text.
        id: String,
    },
    /// A name is invalid: a namespace or service account that is not a
    /// Kubernetes name, or a trust domain with characters SPIFFE forbids.
    #[error("{what} {value:?} is invalid: {reason}")]
    Name {
        /// `namespace`, `service account` or `trust domain`.
        what: &'static str,
        /// The name.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Identity {
    /// An identity from validated names: a namespace is a DNS-1123 label,
    /// a service account a DNS-1123 subdomain.
    pub fn new(
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (namespace, service_account) = (namespace.into(), service_account.into());
        check_name("namespace", &namespace, 63, false)?;
        check_name("service account", &service_account, 253, true)?;
        Ok(Self {
            namespace,
            service_account,
        })
    }

    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// Parses `spiffe://<trust_domain>/ns/<namespace>/sa/<service-account>`,
    /// refusing another trust domain.
    pub fn from_spiffe_id(id: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe { id: id.into() })?;
        let (found, path) = rest.split_once('/').unwrap_or((rest, ""));
        if found != trust_domain {
            return Err(IdentityError::TrustDomain {
                id: id.into(),
                found: found.into(),
                expected: trust_domain.into(),
            });
        }
        match path.split('/').collect::<Vec<_>>()[..] {
            ["ns", namespace, "sa", service_account] => Self::new(namespace, service_account),
            _ => Err(IdentityError::Path { id: id.into() }),
        }
    }
}

/// Checks a trust domain: lowercase letters, digits, `.`, `-` and `_`, as
/// the SPIFFE ID specification allows.
pub fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    let error = |reason| IdentityError::Name {
        what: "trust domain",
        value: trust_domain.into(),
        reason,
    };
    if trust_domain.is_empty() || trust_domain.len() > 255 {
        return Err(error("it must be 1 to 255 characters long"));
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(error(
            "it may hold only lowercase letters, digits, '.', '-' and '_'",
        ));
    }
    Ok(())
}

/// DNS-1123: lowercase alphanumerics and `-` (and `.` for a subdomain),
/// starting and ending with an alphanumeric.
fn check_name(
    what: &'static str,
    value: &str,
    max: usize,
    dots: bool,
) -> Result<(), IdentityError> {
    let error = |reason| IdentityError::Name {
        what,
        value: value.into(),
        reason,
    };
    if value.is_empty() || value.len() > max {
        return Err(error(if max == 63 {
            "it must be 1 to 63 characters long"
        } else {
            "it must be 1 to 253 characters long"
        }));
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .all(|&b| alnum(b) || b == b'-' || (dots && b == b'.'))
    {
        return Err(error(if dots {
            "it may hold only lowercase letters, digits, '-' and '.'"
        } else {
            "it may hold only lowercase letters, digits and '-'"
        }));
    }
    if !bytes.first().copied().is_some_and(alnum) || !bytes.last().copied().is_some_and(alnum) {
        return Err(error("it must start and end with a letter or digit"));
    }
    Ok(())
}

/// What the CA issues and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaConfig {
    /// The trust domain of every SPIFFE ID the CA signs.
    pub trust_domain: String,
    /// Lifetime of a certificate when the CSR asks for none.
    pub default_ttl: Duration,
    /// The longest lifetime the CA gives; longer requests are shortened.
    pub max_ttl: Duration,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            default_ttl: DEFAULT_CERT_TTL,
            max_ttl: DEFAULT_CERT_TTL,
        }
    }
}

/// The certificate authority. Shared by reference (`Arc<Ca>`); signing
/// never waits on a rotation.
pub struct Ca {
    config: CaConfig,
    store: Box<dyn KeyStore>,
    roots: RwLock<Arc<Roots>>,
    /// Serializes rotations, so that two never both persist.
    rotating: Mutex<()>,
}

/// Where the CA's roots are kept between restarts.
pub trait KeyStore: Send + Sync {
    /// The stored roots, or `None` when nothing is stored yet.
    fn load(&self) -> Result<Option<RootMaterial>, StoreError>;
    /// Replaces the stored roots.
    fn store(&self, material: &RootMaterial) -> Result<(), StoreError>;
    /// Stores `material` if nothing is stored yet. When another writer
    /// stored roots first (another replica starting at the same time),
    /// returns theirs and stores nothing.
    fn create(&self, material: &RootMaterial) -> Result<Option<RootMaterial>, StoreError> {
        self.store(material).map(|()| None)
    }
    /// Where the roots are kept, for logs and errors.
    fn describe(&self) -> String;
    /// Whether the last load found a request to rotate the root (on
    /// Kubernetes, an annotation on the Secret), and its text. A store
    /// that replaces the roots drops the request.
    fn rotation_requested(&self) -> Option<String> {
        None
    }
}

/// A certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate first, then any intermediates (none today), PEM.
    pub cert_chain_pem: Vec<String>,
    /// The roots that peers should trust, PEM, as of the signing.
    pub trust_bundle_pem: Vec<String>,
    /// When the certificate expires (whole seconds, as in the certificate).
    pub expires: SystemTime,
    /// Its serial number, hex.
    pub serial: String,
    /// The SPIFFE ID it certifies.
    pub spiffe_id: String,
}

/// The control plane's own serving certificate: see
/// [`Ca::issue_server_at`].
pub struct ServerCredentials {
    /// The certificate, as for a workload.
    pub issued: Issued,
    /// Its private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// The serial of the root that signed it, to notice a rotation.
    pub root_serial: String,
}

impl std::fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCredentials")
            .field("issued", &self.issued)
            .field("root_serial", &self.root_serial)
            .finish_non_exhaustive()
    }
}

/// The CA refused or failed to sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The CSR asks for names the caller's credential does not prove.
    #[error(
        "the CSR asks for {requested}, but the caller's credential proves {allowed}: a workload gets a certificate for its own identity only"
    )]
    Foreign {
        /// The names asked for that are not the caller's.
        requested: String,
        /// The caller's SPIFFE ID.
        allowed: String,
    },
    /// The CSR is unusable.
    #[error("bad CSR: {reason}")]
    BadCsr {
        /// What is wrong with it.
        reason: String,
    },
    /// A name for a serving certificate is neither a DNS name nor an IP
    /// address.
    #[error("{name:?} is not a DNS name or an IP address: {reason}")]
    BadServerName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Signing failed on the CA's side.
    #[error("the CA could not sign: {0}")]
    Internal(String),
}

impl SignError {
    /// A short label for metrics: `foreign`, `bad_csr` or `internal`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Foreign { .. } => "foreign",
            Self::BadCsr { .. } => "bad_csr",
            Self::BadServerName { .. } => "bad_server_name",
            Self::Internal(_) => "internal",
        }
    }
}

/// The CA could not start or rotate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The key store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored root is unusable.
    #[error("the CA root in {place} is unusable: {reason}")]
    BadRoot {
        /// Where it is kept.
        place: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Making a new root failed.
    #[error("cannot make a CA root: {0}")]
    Generate(#[from] rcgen::Error),
    /// A promotion without a next root.
    #[error("no rotation is under way: there is no next root to make the signer")]
    NoNextRoot,
    /// The trust domain is invalid.
    #[error(transparent)]
    TrustDomain(#[from] IdentityError),
}

/// Public facts about the signing root, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// The root's subject.
    pub subject: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it became valid.
    pub not_before: SystemTime,
    /// When it expires.
    pub not_after: SystemTime,
}

/// The roots in force: the signer, the next root while a rotation waits
/// for every proxy to trust it, and the roots the signer replaced that
/// are still trusted. Replaced whole, never changed in place.
struct Roots {
    signer: Arc<Signer>,
    next: Option<Arc<Signer>>,
    previous: Vec<PreviousRoot>,
}

struct Signer {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    info: RootInfo,
}

impl Ca {
    /// Opens the CA on `store`: loads its roots, or makes a root and
    /// stores it when the store is empty.
    pub fn open(config: CaConfig, store: Box<dyn KeyStore>) -> Result<Self, CaError> {
        Self::open_at(config, store, SystemTime::now())
    }

    /// [`Ca::open`] at `now`.
    pub fn open_at(
        config: CaConfig,
        store: Box<dyn KeyStore>,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        check_trust_domain(&config.trust_domain)?;
        let roots = match store.load()? {
            Some(material) => {
                let roots = Roots::from_material(material, now, &store.describe())?;
                info!(
                    store = %store.describe(),
                    root = %roots.signer.info.subject,
                    serial = %roots.signer.info.serial,
                    expires = %humantime::format_rfc3339_seconds(roots.signer.info.not_after),
                    previous = roots.previous.len(),
                    "CA root loaded"
                );
                roots
            }
            None => {
                let signer = Arc::new(Signer::generate(&config.trust_domain, now)?);
                let roots = Roots {
                    signer,
                    next: None,
                    previous: Vec::new(),
                };
                match store.create(&roots.material())? {
                    None => {
                        info!(
                            store = %store.describe(),
                            root = %roots.signer.info.subject,
                            serial = %roots.signer.info.serial,
                            expires = %humantime::format_rfc3339_seconds(roots.signer.info.not_after),
                            "CA root created"
                        );
                        roots
                    }
                    Some(theirs) => {
                        let roots = Roots::from_material(theirs, now, &store.describe())?;
                        info!(
                            store = %store.describe(),
                            root = %roots.signer.info.subject,
                            serial = %roots.signer.info.serial,
                            "another replica created the CA root first; using it"
                        );
                        roots
                    }
                }
            }
        };
        Ok(Self {
            config,
            store,
            roots: RwLock::new(Arc::new(roots)),
            rotating: Mutex::new(()),
        })
    }

    /// The trust domain of the identities this CA signs.
    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// What the CA issues.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The signing root.
    pub fn root(&self) -> RootInfo {
        self.roots().signer.info.clone()
    }

    /// Signs `csr_pem` for `identity`, the identity the caller proved.
    /// `requested_ttl` is shortened to the maximum; `None` means the
    /// default.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &Identity,
        requested_ttl: Option<Duration>,
    ) -> Result<Issued, SignError> {
        self.sign_at(csr_pem, identity, requested_ttl, SystemTime::now())
    }

    /// [`Ca::sign`] at `now`.
    pub fn sign_at(
        &self,
        csr_pem: &str,
        identity: &Identity,
        requested_ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<Issued, SignError> {
        let spiffe_id = identity.spiffe_id(&self.config.trust_domain);
        let public_key = check_csr(csr_pem, &spiffe_id)?;
        let ttl = requested_ttl
            .filter(|ttl| !ttl.is_zero())
            .unwrap_or(self.config.default_ttl)
            .min(self.config.max_ttl);
        let san = SanType::URI(
            spiffe_id
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| SignError::Internal(e.to_string()))?,
        );
        self.issue(&self.roots(), &public_key, vec![san], spiffe_id, ttl, now)
    }

    /// A serving certificate, and its new P-256 key, for the control plane
    /// itself: the SPIFFE ID of `identity` and `names` (DNS names, or IP
    /// addresses) as SANs, valid for the default lifetime. The key never
    /// leaves the CA's process, so no CSR is involved.
    pub fn issue_server_at(
        &self,
        identity: &Identity,
        names: &[String],
        now: SystemTime,
    ) -> Result<ServerCredentials, SignError> {
        let internal = |e: rcgen::Error| SignError::Internal(e.to_string());
        let spiffe_id = identity.spiffe_id(&self.config.trust_domain);
        let mut sans = vec![SanType::URI(
            spiffe_id.clone().try_into().map_err(internal)?,
        )];
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    let bad = |reason: String| SignError::BadServerName {
                        name: name.clone(),
                        reason,
                    };
                    rustls_pki_types::DnsName::try_from(name.as_str())
                        .map_err(|e| bad(e.to_string()))?;
                    SanType::DnsName(name.clone().try_into().map_err(|e| bad(format!("{e}")))?)
                }
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(internal)?;
        let roots = self.roots();
        let ttl = self.config.default_ttl;
        let issued = self.issue(&roots, &key, sans, spiffe_id, ttl, now)?;
        Ok(ServerCredentials {
            key_pkcs8_der: key.serialize_der(),
            root_serial: roots.signer.info.serial.clone(),
            issued,
        })
    }

    /// Signs a leaf for `public_key` with `sans`, valid for `ttl` from
    /// `now` but never past the signing root.
    fn issue(
        &self,
        roots: &Roots,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        spiffe_id: String,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Issued, SignError> {
        // A leaf must not outlive the root that vouches for it.
        let expires = whole_seconds(later(now, ttl)).min(roots.signer.info.not_after);
        let serial = random_serial();
        let internal = |e: rcgen::Error| SignError::Internal(e.to_string());

        let mut params = CertificateParams::default();
        // SPIFFE X.509-SVIDs name the workload in the URI SAN only; with
        // an empty subject rcgen marks the SAN critical, as RFC 5280 asks.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        // digitalSignature only: keyEncipherment is RSA key transport,
        // which RFC 5480 does not allow for an EC key, and TLS 1.3 never
        // uses.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = earlier(now, CLOCK_SKEW).into();
        params.not_after = expires.into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &roots.signer.issuer)
            .map_err(internal)?;

        Ok(Issued {
            cert_chain_pem: vec![cert.pem()],
            trust_bundle_pem: roots.bundle(now),
            expires,
            serial: hex(&serial),
            spiffe_id,
        })
    }

    /// The roots peers should trust now, PEM: the signer, and during a
    /// rotation's overlap the root it replaced.
    pub fn trust_bundle_pem(&self) -> Vec<String> {
        self.trust_bundle_pem_at(SystemTime::now())
    }

    /// [`Ca::trust_bundle_pem`] at `now`.
    pub fn trust_bundle_pem_at(&self, now: SystemTime) -> Vec<String> {
        self.roots().bundle(now)
    }

    /// The next root, while a rotation waits to make it the signer.
    pub fn next_root(&self) -> Option<RootInfo> {
        self.roots().next.as_ref().map(|n| n.info.clone())
    }

    /// Starts a rotation: makes the next root and adds it to the trust
    /// bundle, persisted first. It signs nothing until [`Ca::promote`].
    /// When a next root is there already (made earlier, or put in the
    /// store by an operator), returns it and changes nothing.
    pub fn prepare(&self) -> Result<RootInfo, CaError> {
        self.prepare_at(SystemTime::now())
    }

    /// [`Ca::prepare`] at `now`.
    pub fn prepare_at(&self, now: SystemTime) -> Result<RootInfo, CaError> {
        let _rotating = self.rotating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.roots();
        if let Some(next) = &old.next {
            return Ok(next.info.clone());
        }
        let next = Arc::new(Signer::generate(&self.config.trust_domain, now)?);
        let info = next.info.clone();
        let roots = Roots {
            signer: old.signer.clone(),
            next: Some(next),
            previous: old.live_previous(now),
        };
        self.store.store(&roots.material())?;
        info!(
            next = %info.subject,
            serial = %info.serial,
            signer = %old.signer.info.serial,
            "CA root rotation started: the next root is in the trust bundle and signs once every proxy holds it"
        );
        self.swap(roots);
        Ok(info)
    }

    /// Makes the next root the signer. The one it replaces stays in the
    /// trust bundle for the longest certificate lifetime and
    /// [`RETIRE_MARGIN`], so that every certificate it signed expires
    /// before it leaves. Persisted before it takes effect.
    pub fn promote(&self) -> Result<RootInfo, CaError> {
        self.promote_at(SystemTime::now())
    }

    /// [`Ca::promote`] at `now`.
    pub fn promote_at(&self, now: SystemTime) -> Result<RootInfo, CaError> {
        let _rotating = self.rotating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.roots();
        let Some(next) = &old.next else {
            return Err(CaError::NoNextRoot);
        };
        let trusted_until = whole_seconds(later(now, self.config.max_ttl + RETIRE_MARGIN));
        let mut previous = vec![PreviousRoot {
            cert_pem: old.signer.cert_pem.clone(),
            trusted_until,
        }];
        previous.extend(old.live_previous(now));
        let roots = Roots {
            signer: next.clone(),
            next: None,
            previous,
        };
        self.store.store(&roots.material())?;
        info!(
            root = %roots.signer.info.subject,
            serial = %roots.signer.info.serial,
            replaced = %old.signer.info.serial,
            old_trusted_until = %humantime::format_rfc3339_seconds(trusted_until),
            "CA root rotated: the new root signs"
        );
        let info = roots.signer.info.clone();
        self.swap(roots);
        Ok(info)
    }

    /// Whether the signing root has used `fraction` of its lifetime, when
    /// a rotation should start.
    pub fn rotation_due_at(&self, fraction: f64, now: SystemTime) -> bool {
        let info = &self.roots().signer.info;
        let life = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        now.duration_since(info.not_before)
            .is_ok_and(|used| used >= life.mul_f64(fraction.clamp(0.0, 1.0)))
    }

    /// Whether the key store holds a request to rotate (see
    /// [`KeyStore::rotation_requested`]), as of the last load.
    pub fn rotation_requested(&self) -> Option<String> {
        self.store.rotation_requested()
    }

    /// Reads the key store again and takes what it holds when that
    /// changed: another replica's rotation, or an operator's root. Returns
    /// whether anything changed. A store found empty or unusable changes
    /// nothing (and is an error): the roots in use stay.
    pub fn reload(&self) -> Result<bool, CaError> {
        self.reload_at(SystemTime::now())
    }

    /// [`Ca::reload`] at `now`.
    pub fn reload_at(&self, now: SystemTime) -> Result<bool, CaError> {
        let _rotating = self.rotating.lock().unwrap_or_else(PoisonError::into_inner);
        let place = self.store.describe();
        let Some(material) = self.store.load()? else {
            return Err(CaError::BadRoot {
                place,
                reason: "it is empty now; keeping the roots in use (restore it, or restart the control plane to make a new root)".into(),
            });
        };
        let current = self.roots();
        if material == current.material() {
            return Ok(false);
        }
        let roots = Roots::from_material(material, now, &place)?;
        if roots.material() == current.material() {
            return Ok(false);
        }
        info!(
            store = %place,
            root = %roots.signer.info.serial,
            next = roots.next.as_ref().map(|n| n.info.serial.as_str()).unwrap_or("none"),
            previous = roots.previous.len(),
            "CA roots reloaded"
        );
        self.swap(roots);
        Ok(true)
    }

    /// The roots and where a rotation stands, for `/debug/ca`.
    pub fn status_at(&self, now: SystemTime) -> CaStatus {
        let roots = self.roots();
        CaStatus {
            signer: (&roots.signer.info).into(),
            next: roots.next.as_ref().map(|n| (&n.info).into()),
            previous: roots
                .previous
                .iter()
                .filter(|p| p.trusted_until > now)
                .map(|p| PreviousStatus {
                    root: root_info(&p.cert_pem)
                        .map(|info| (&info).into())
                        .unwrap_or_default(),
                    trusted_until: humantime::format_rfc3339_seconds(p.trusted_until).to_string(),
                })
                .collect(),
        }
    }

    fn swap(&self, roots: Roots) {
        *self.roots.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(roots);
    }

    fn roots(&self) -> Arc<Roots> {
        // The roots are swapped whole, so a panic elsewhere cannot have
        // left them half-changed: a poisoned lock still holds good roots.
        self.roots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("config", &self.config)
            .field("store", &self.store.describe())
            .field("root", &self.root())
            .finish_non_exhaustive()
    }
}

impl Roots {
    fn from_material(
        material: RootMaterial,
        now: SystemTime,
        place: &str,
    ) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::BadRoot {
            place: place.into(),
            reason,
        };
        let signer = Arc::new(Signer::load(material.cert_pem, material.key_pem, now).map_err(bad)?);
        // A promotion interrupted before the next root's files were
        // removed leaves the signer there twice.
        let next = match material.next {
            Some(next) if next.cert_pem != signer.cert_pem => Some(Arc::new(
                Signer::load(next.cert_pem, next.key_pem, now)
                    .map_err(|e| bad(format!("the next root: {e}")))?,
            )),
            _ => None,
        };
        let mut previous = Vec::new();
        for p in material.previous {
            if p.trusted_until <= now || p.cert_pem == signer.cert_pem {
                continue;
            }
            parse_cert(&p.cert_pem).map_err(|e| bad(format!("a previous root: {e}")))?;
            previous.push(p);
        }
        Ok(Self {
            signer,
            next,
            previous,
        })
    }

    fn material(&self) -> RootMaterial {
        RootMaterial {
            cert_pem: self.signer.cert_pem.clone(),
            key_pem: self.signer.key_pem.clone(),
            next: self.next.as_ref().map(|n| NextRoot {
                cert_pem: n.cert_pem.clone(),
                key_pem: n.key_pem.clone(),
            }),
            previous: self.previous.clone(),
        }
    }

    /// The replaced roots still trusted at `now`.
    fn live_previous(&self, now: SystemTime) -> Vec<PreviousRoot> {
        self.previous
            .iter()
            .filter(|p| p.trusted_until > now)
            .cloned()
            .collect()
    }

    /// The signer, the next root, then the replaced roots still trusted.
    fn bundle(&self, now: SystemTime) -> Vec<String> {
        std::iter::once(self.signer.cert_pem.clone())
            .chain(self.next.iter().map(|n| n.cert_pem.clone()))
            .chain(
                self.previous
                    .iter()
                    .filter(|p| p.trusted_until > now)
                    .map(|p| p.cert_pem.clone()),
            )
            .collect()
    }
}

impl Signer {
    /// A new self-signed ECDSA P-256 root, valid for [`ROOT_VALIDITY`].
    fn generate(trust_domain: &str, now: SystemTime) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        // Each root gets a name of its own: during a rotation two roots
        // are trusted, and verifiers match an issuer by name first.
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Trellis root CA {trust_domain} {}", hex(&serial[..4])),
        );
        // Path length 0: the root signs workload certificates only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = earlier(now, CLOCK_SKEW).into();
        params.not_after = whole_seconds(later(now, ROOT_VALIDITY)).into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Self::load(cert_pem, key_pem, now).map_err(|reason| CaError::BadRoot {
            place: "a new root".into(),
            reason,
        })
    }

    /// Checks a root (generated or the operator's) and makes it the
    /// issuer.
    fn load(cert_pem: String, key_pem: String, now: SystemTime) -> Result<Self, String> {
        let der = parse_cert(&cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if !cert.is_ca() {
            return Err("the certificate is not a CA (basicConstraints cA is not set)".into());
        }
        if let Ok(Some(usage)) = cert.key_usage()
            && !usage.value.key_cert_sign()
        {
            return Err("the certificate's key usage does not allow keyCertSign".into());
        }
        let not_after = unix_time(cert.validity().not_after.timestamp());
        if not_after <= now {
            return Err(format!(
                "the certificate expired at {}; replace it, or remove it and its key to make a new root",
                humantime::format_rfc3339_seconds(not_after)
            ));
        }
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| format!("the private key does not parse (want PKCS#8 PEM): {e}"))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("the private key does not belong to the certificate".into());
        }
        let info = info_of(&cert);
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)
            .map_err(|e| format!("rcgen cannot sign with it: {e}"))?;
        Ok(Self {
            cert_pem,
            key_pem,
            issuer,
            info,
        })
    }
}

/// The roots and where a rotation stands, as `/debug/ca` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// The root that signs.
    pub signer: RootSummary,
    /// The next root, in the bundle but not signing, during a rotation.
    pub next: Option<RootSummary>,
    /// Replaced roots still trusted.
    pub previous: Vec<PreviousStatus>,
}

/// A root in a [`CaStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RootSummary {
    /// Its serial number, hex.
    pub serial: String,
    /// Its subject.
    pub subject: String,
    /// When it expires, RFC 3339.
    pub not_after: String,
}

impl From<&RootInfo> for RootSummary {
    fn from(info: &RootInfo) -> Self {
        Self {
            serial: info.serial.clone(),
            subject: info.subject.clone(),
            not_after: humantime::format_rfc3339_seconds(info.not_after).to_string(),
        }
    }
}

/// A replaced root in a [`CaStatus`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreviousStatus {
    /// The root.
    pub root: RootSummary,
    /// When it leaves the bundle, RFC 3339.
    pub trusted_until: String,
}

/// The facts of a root certificate, PEM.
pub fn root_info(pem: &str) -> Result<RootInfo, String> {
    let der = parse_cert(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    Ok(info_of(&cert))
}

fn info_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> RootInfo {
    RootInfo {
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: unix_time(cert.validity().not_before.timestamp()),
        not_after: unix_time(cert.validity().not_after.timestamp()),
    }
}

fn unix_time(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or_default())
}

/// Checks that a CSR is well formed, signed by its own key, holds an ECDSA
/// P-256 key, and names `allowed` and nothing else; returns its key.
fn check_csr(csr_pem: &str, allowed: &str) -> Result<SubjectPublicKeyInfo, SignError> {
    let bad = |reason: String| SignError::BadCsr { reason };
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| bad(format!("not PEM ({e})")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "the PEM block is a {:?}, want a \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| bad(format!("not a PKCS#10 certificate request ({e})")))?;
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes of garbage follow the request",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|e| {
        bad(format!(
            "its signature does not verify with its own public key ({e}): was it altered?"
        ))
    })?;
    let spki = &csr.certification_request_info.subject_pki;
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .ok()
        .filter(|key| rcgen::PublicKeyData::algorithm(key) == &PKCS_ECDSA_P256_SHA256)
        .ok_or_else(|| {
            bad(format!(
                "its key is not ECDSA P-256 (key algorithm {}); the CA signs P-256 keys only",
                spki.algorithm.algorithm
            ))
        })?;

    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter().map(describe_name));
        }
    }
    let foreign: Vec<&String> = names.iter().filter(|n| **n != uri_name(allowed)).collect();
    if !foreign.is_empty() {
        return Err(SignError::Foreign {
            requested: foreign
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            allowed: allowed.into(),
        });
    }
    match names.len() {
        1 => Ok(key),
        0 => Err(bad(format!(
            "it has no subject alternative name; it must carry exactly one, the URI SAN {allowed}"
        ))),
        n => Err(bad(format!(
            "it carries the URI SAN {allowed} {n} times; once is enough"
        ))),
    }
}

fn uri_name(uri: &str) -> String {
    format!("URI {uri}")
}

/// A SAN as an error message shows it.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => uri_name(uri),
        GeneralName::DNSName(dns) => format!("DNS name {dns}"),
        GeneralName::RFC822Name(mail) => format!("email {mail}"),
        GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
            Ok(v4) => format!("IP address {}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*ip) {
                Ok(v6) => format!("IP address {}", std::net::Ipv6Addr::from(v6)),
                Err(_) => "an IP address".into(),
            },
        },
        other => format!("the name {other}"),
    }
}

/// The DER of the first certificate in `pem`.
fn parse_cert(pem: &str) -> Result<Vec<u8>, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("the certificate is not PEM ({e})"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!(
            "the PEM block is a {:?}, want a \"CERTIFICATE\"",
            block.label
        ));
    }
    x509_parser::parse_x509_certificate(&block.contents)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    Ok(block.contents)
}

/// 16 random bytes, positive and without a leading zero byte, so that
/// every serial encodes to the same length (RFC 5280 allows up to 20).
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Certificates hold whole seconds; so does what the CA reports.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    UNIX_EPOCH + Duration::from_secs(since.as_secs())
}

/// The latest time an X.509 certificate can hold: 9999-12-31T23:59:59Z.
const END_OF_TIME: Duration = Duration::from_secs(253_402_300_799);

/// `t + d`, saturating at [`END_OF_TIME`] (a huge overlap must not panic).
fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .unwrap_or(UNIX_EPOCH + END_OF_TIME)
        .min(UNIX_EPOCH + END_OF_TIME)
}

/// `t - d`, saturating at the epoch.
fn earlier(t: SystemTime, d: Duration) -> SystemTime {
    whole_seconds(t.checked_sub(d).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH))
}
