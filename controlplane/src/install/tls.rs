//! The injector's serving certificate: a CA of its own that only the
//! webhook configuration trusts (its `caBundle`), and a leaf for
//! `trellis-injector.<namespace>.svc`, the name the API server dials.
//!
//! `meshctl install` and `upgrade` keep what the cluster holds while it
//! is good ([`WebhookTls::plan`]): a leaf is re-signed by the same CA when
//! it nears its end, so the `caBundle` stays right and the injector picks
//! the new files up without a restart. A new CA is made only when there
//! is none or it nears its own end; the old one then stays in the bundle
//! beside it, so that admission keeps working while the injector still
//! serves the old leaf.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use x509_parser::extensions::GeneralName;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// The CA's lifetime.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// The leaf's lifetime.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// A leaf with less left than this is re-signed by `install`/`upgrade`.
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// A CA with less left than this is replaced.
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Clocks of the machine running meshctl and of the API server may differ.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The DNS name the API server uses for the injector's Service.
pub fn injector_host(namespace: &str) -> String {
    format!("{}.{namespace}.svc", super::INJECTOR)
}

/// PEM of the CA, its key, the leaf and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTls {
    /// The CA that signed the leaf.
    pub ca_cert: String,
    /// Its key (kept in a Secret the injector does not mount).
    pub ca_key: String,
    /// The injector's certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// What the webhook's `caBundle` holds: the CA, and the CA it
    /// replaced while that is still valid.
    pub ca_bundle: String,
}

/// What [`WebhookTls::plan`] did with what the cluster held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Everything kept.
    Kept,
    /// A new leaf from the same CA, and why.
    Renewed(String),
    /// A new CA and leaf, and why.
    New(String),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kept => f.write_str("the certificate in the cluster is kept"),
            Self::Renewed(why) => write!(f, "a new certificate from the same CA ({why})"),
            Self::New(why) => write!(f, "a new CA and certificate ({why})"),
        }
    }
}

/// PEM the cluster holds, any of it missing.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub ca_cert: Option<String>,
    pub ca_key: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl WebhookTls {
    /// What to apply for an injector in `namespace` given what the cluster
    /// `held`: kept while good, the leaf re-signed near its end or when it
    /// does not match, everything new when the CA is missing, unusable or
    /// near its end.
    pub fn plan(held: &Held, namespace: &str, now: SystemTime) -> Result<(Self, Plan), String> {
        let host = injector_host(namespace);
        let (Some(ca_cert), Some(ca_key)) = (&held.ca_cert, &held.ca_key) else {
            return Ok((
                Self::generate(&host, now, None)?,
                Plan::New("none yet".into()),
            ));
        };
        let ca = match check_ca(ca_cert, ca_key, now) {
            Ok(ca) => ca,
            Err(why) => {
                // The old CA stays trusted while it is valid: the injector
                // serves the old leaf until it re-reads its files.
                let old = still_valid(ca_cert, now).then_some(ca_cert.as_str());
                return Ok((Self::generate(&host, now, old)?, Plan::New(why)));
            }
        };
        let leaf = match (&held.cert, &held.key) {
            (Some(cert), Some(key)) => check_leaf(cert, key, ca_cert, &host, now),
            _ => Err("the injector's certificate is missing".into()),
        };
        let renewed = |why: String| -> Result<(Self, Plan), String> {
            let (cert, key) = sign_leaf(&host, &ca, now)?;
            let tls = Self {
                ca_cert: ca_cert.clone(),
                ca_key: ca_key.clone(),
                cert,
                key,
                ca_bundle: ca_cert.clone(),
            };
            Ok((tls, Plan::Renewed(why)))
        };
        match leaf {
            Ok(()) => Ok((
                Self {
                    ca_cert: ca_cert.clone(),
                    ca_key: ca_key.clone(),
                    cert: held.cert.clone().unwrap_or_default(),
                    key: held.key.clone().unwrap_or_default(),
                    ca_bundle: ca_cert.clone(),
                },
                Plan::Kept,
            )),
            Err(why) => renewed(why),
        }
    }

    /// A new CA and leaf for `host`; `old_ca` joins the bundle.
    fn generate(host: &str, now: SystemTime, old_ca: Option<&str>) -> Result<Self, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        params
            .distinguished_name
            .push(DnType::CommonName, "Trellis injector webhook CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        let (ca_cert, ca_key) = (cert.pem(), key.serialize_pem());
        let issuer = Issuer::new(params, key);
        let (leaf, leaf_key) = sign_leaf(host, &issuer, now)?;
        let mut ca_bundle = ca_cert.clone();
        if let Some(old) = old_ca {
            ca_bundle.push_str(old);
        }
        Ok(Self {
            ca_cert,
            ca_key,
            cert: leaf,
            key: leaf_key,
            ca_bundle,
        })
    }
}

fn rcgen_error(e: rcgen::Error) -> String {
    format!("cannot make the injector's certificate: {e}")
}

/// A leaf for `host` signed by `issuer`.
fn sign_leaf(
    host: &str,
    issuer: &Issuer<'_, KeyPair>,
    now: SystemTime,
) -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, host);
    params.subject_alt_names = vec![SanType::DnsName(
        host.to_owned().try_into().map_err(rcgen_error)?,
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + LEAF_VALIDITY).into();
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The DER of the first certificate in `pem`.
fn der(pem: &str) -> Result<Vec<u8>, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("the certificate is not PEM ({e})"))?;
    Ok(block.contents)
}

/// How long the certificate in `pem` has left at `now` (zero when it has
/// expired).
pub fn time_left(pem: &str, now: SystemTime) -> Result<Duration, String> {
    let der = der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    Ok(not_after.duration_since(now).unwrap_or(Duration::ZERO))
}

fn still_valid(pem: &str, now: SystemTime) -> bool {
    time_left(pem, now).is_ok_and(|left| left > Duration::ZERO)
}

fn days(d: Duration) -> u64 {
    d.as_secs() / DAY.as_secs()
}

/// The CA as an issuer, if it is a usable CA with time left.
fn check_ca(cert: &str, key: &str, now: SystemTime) -> Result<Issuer<'static, KeyPair>, String> {
    let left = time_left(cert, now).map_err(|e| format!("the CA: {e}"))?;
    if left < CA_RENEW_BEFORE {
        return Err(format!("the CA has {} days left", days(left)));
    }
    let key = KeyPair::from_pem(key).map_err(|e| format!("the CA's key does not parse: {e}"))?;
    let der = der(cert)?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("the CA does not parse: {e}"))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the CA's key does not belong to it".into());
    }
    Issuer::from_ca_cert_der(&der.into(), key).map_err(|e| format!("the CA cannot sign: {e}"))
}

/// Whether the leaf is signed by `ca`, names `host`, has its key and
/// more than [`LEAF_RENEW_BEFORE`] left.
pub fn check_leaf(
    cert: &str,
    key: &str,
    ca: &str,
    host: &str,
    now: SystemTime,
) -> Result<(), String> {
    check_leaf_with(cert, key, ca, host, now, LEAF_RENEW_BEFORE)
}

/// [`check_leaf`] with `min_left` for the time it must have left.
pub fn check_leaf_with(
    cert: &str,
    key: &str,
    ca: &str,
    host: &str,
    now: SystemTime,
    min_left: Duration,
) -> Result<(), String> {
    let left = time_left(cert, now)?;
    if left < min_left {
        return Err(format!(
            "the injector's certificate has {} days left",
            days(left)
        ));
    }
    let (leaf_der, ca_der) = (der(cert)?, der(ca)?);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der)
        .map_err(|e| format!("the injector's certificate does not parse: {e}"))?;
    // `ca` may be a bundle: any of its certificates may have signed it.
    let signed = x509_parser::pem::Pem::iter_from_buffer(ca.as_bytes())
        .flatten()
        .map(|block| block.contents)
        .chain([ca_der])
        .any(|der| {
            x509_parser::parse_x509_certificate(&der)
                .is_ok_and(|(_, issuer)| leaf.verify_signature(Some(issuer.public_key())).is_ok())
        });
    if !signed {
        return Err("the injector's certificate is not signed by the CA".to_owned());
    }
    let names_host = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(d) if *d == host))
        });
    if !names_host {
        return Err(format!("the injector's certificate does not name {host}"));
    }
    let key =
        KeyPair::from_pem(key).map_err(|e| format!("the injector's key does not parse: {e}"))?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("the injector's key does not belong to its certificate".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    const NS: &str = "trellis-system";

    fn held(tls: &WebhookTls) -> Held {
        Held {
            ca_cert: Some(tls.ca_cert.clone()),
            ca_key: Some(tls.ca_key.clone()),
            cert: Some(tls.cert.clone()),
            key: Some(tls.key.clone()),
        }
    }

    #[test]
    fn a_first_install_makes_a_ca_and_a_leaf_for_the_service_name() {
        let now = SystemTime::now();
        let (tls, plan) = WebhookTls::plan(&Held::default(), NS, now).unwrap();
        assert!(matches!(plan, Plan::New(_)), "{plan}");
        check_leaf(
            &tls.cert,
            &tls.key,
            &tls.ca_cert,
            "trellis-injector.trellis-system.svc",
            now,
        )
        .unwrap();
        assert_eq!(tls.ca_bundle, tls.ca_cert);
        // rustls accepts it for that name, as the API server's Go TLS would.
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add(der(&tls.ca_cert).unwrap().into()).unwrap();
            std::sync::Arc::new(r)
        };
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name =
            rustls_pki_types::ServerName::try_from("trellis-injector.trellis-system.svc").unwrap();
        let leaf = rustls_pki_types::CertificateDer::from(der(&tls.cert).unwrap());
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .unwrap();
    }

    #[test]
    fn a_good_certificate_is_kept_and_one_near_its_end_is_re_signed_by_the_same_ca() {
        let now = SystemTime::now();
        let (tls, _) = WebhookTls::plan(&Held::default(), NS, now).unwrap();
        let (again, plan) = WebhookTls::plan(&held(&tls), NS, now + DAY).unwrap();
        assert_eq!(plan, Plan::Kept);
        assert_eq!(again, tls);
        let late = now + LEAF_VALIDITY - 30 * DAY;
        let (renewed, plan) = WebhookTls::plan(&held(&tls), NS, late).unwrap();
        assert!(
            matches!(plan, Plan::Renewed(ref why) if why.contains("days left")),
            "{plan}"
        );
        assert_eq!(renewed.ca_cert, tls.ca_cert);
        assert_eq!(renewed.ca_bundle, tls.ca_cert);
        assert_ne!(renewed.cert, tls.cert);
        check_leaf(
            &renewed.cert,
            &renewed.key,
            &tls.ca_cert,
            &injector_host(NS),
            late,
        )
        .unwrap();
    }

    #[test]
    fn another_namespace_or_a_foreign_leaf_is_re_signed() {
        let now = SystemTime::now();
        let (tls, _) = WebhookTls::plan(&Held::default(), NS, now).unwrap();
        let (_, plan) = WebhookTls::plan(&held(&tls), "mesh", now).unwrap();
        assert!(
            matches!(plan, Plan::Renewed(ref why) if why.contains("trellis-injector.mesh.svc")),
            "{plan}"
        );
        let (other, _) = WebhookTls::plan(&Held::default(), NS, now).unwrap();
        let mut mixed = held(&tls);
        mixed.cert = Some(other.cert.clone());
        mixed.key = Some(other.key.clone());
        let (_, plan) = WebhookTls::plan(&mixed, NS, now).unwrap();
        assert!(
            matches!(plan, Plan::Renewed(ref why) if why.contains("not signed by the CA")),
            "{plan}"
        );
        let mut wrong_key = held(&tls);
        wrong_key.key = Some(other.key);
        let (_, plan) = WebhookTls::plan(&wrong_key, NS, now).unwrap();
        assert!(
            matches!(plan, Plan::Renewed(ref why) if why.contains("does not belong")),
            "{plan}"
        );
    }

    #[test]
    fn a_ca_near_its_end_is_replaced_and_stays_in_the_bundle() {
        let now = SystemTime::now();
        let (tls, _) = WebhookTls::plan(&Held::default(), NS, now).unwrap();
        let late = now + CA_VALIDITY - 100 * DAY;
        let (new, plan) = WebhookTls::plan(&held(&tls), NS, late).unwrap();
        assert!(
            matches!(plan, Plan::New(ref why) if why.contains("days left")),
            "{plan}"
        );
        assert_ne!(new.ca_cert, tls.ca_cert);
        assert_eq!(new.ca_bundle, format!("{}{}", new.ca_cert, tls.ca_cert));
        let mut garbage = held(&tls);
        garbage.ca_cert = Some("not a certificate".into());
        let (new, plan) = WebhookTls::plan(&garbage, NS, now).unwrap();
        assert!(
            matches!(plan, Plan::New(ref why) if why.contains("not PEM")),
            "{plan}"
        );
        assert_eq!(new.ca_bundle, new.ca_cert);
    }
}
