#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::metadata::MetadataMap;
use x509_parser::extensions::GeneralName;

use super::store::{COMMIT_FILE, NEW_SUFFIX};
use super::*;

const HOUR: Duration = Duration::from_secs(3600);

/// A fixed "now": tests never read the clock.
fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn id(namespace: &str, service_account: &str) -> Identity {
    Identity::new(namespace, service_account).unwrap()
}

fn spiffe(namespace: &str, service_account: &str) -> String {
    id(namespace, service_account).spiffe_id(DEFAULT_TRUST_DOMAIN)
}

fn ca_at(now: SystemTime) -> (Ca, MemoryKeyStore) {
    let store = MemoryKeyStore::default();
    let ca = Ca::open_at(CaConfig::default(), Box::new(store.clone()), now).unwrap();
    (ca, store)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

/// A CSR as a proxy makes it: a fresh key, no subject, the given SANs.
fn csr_with(sans: Vec<SanType>, alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, String) {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn csr(sans: Vec<SanType>) -> String {
    csr_with(sans, &PKCS_ECDSA_P256_SHA256).1
}

fn der(pem: &str) -> Vec<u8> {
    pem::parse(pem).unwrap().into_contents()
}

/// Verifies `leaf` against `bundle` as rustls would, for both TLS client
/// and server use.
fn verify(leaf: &str, bundle: &[String], now: SystemTime) -> Result<(), webpki::Error> {
    let leaf = CertificateDer::from(der(leaf));
    let roots: Vec<CertificateDer<'_>> = bundle.iter().map(|r| der(r).into()).collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&leaf)?;
    let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap());
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            time,
            usage,
            None,
            None,
        )?;
    }
    Ok(())
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A fresh, empty directory, removed when dropped.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("trellis-ca-{name}-"))
        .tempdir()
        .unwrap()
}

// ---- identities ----

#[test]
fn spiffe_id_names_namespace_and_service_account() {
    let productpage = id("default", "productpage");
    assert_eq!(
        productpage.spiffe_id("cluster.local"),
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    assert_eq!(
        Identity::from_spiffe_id(
            "spiffe://cluster.local/ns/default/sa/productpage",
            "cluster.local"
        ),
        Ok(productpage)
    );
    assert_eq!(
        Identity::from_spiffe_id("spiffe://mesh.example/ns/a-1/sa/x.y", "mesh.example"),
        Ok(id("a-1", "x.y"))
    );
}

#[test]
fn spiffe_id_errors_name_what_is_wrong() {
    let td = "cluster.local";
    let err = |s: &str| Identity::from_spiffe_id(s, td).unwrap_err().to_string();
    assert!(
        err("https://cluster.local/ns/a/sa/b").contains("must start with spiffe://"),
        "{}",
        err("https://cluster.local/ns/a/sa/b")
    );
    let other = err("spiffe://other.example/ns/a/sa/b");
    assert!(
        other.contains("\"other.example\"") && other.contains("\"cluster.local\""),
        "{other}"
    );
    for path in [
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://cluster.local/ns//sa/b",
    ] {
        let e = err(path);
        assert!(
            e.contains("/ns/<namespace>/sa/<service-account>") || e.contains("namespace \"\""),
            "{path}: {e}"
        );
    }
    let upper = err("spiffe://cluster.local/ns/Default/sa/b");
    assert!(
        upper.contains("namespace \"Default\"") && upper.contains("lowercase"),
        "{upper}"
    );
    let dotted_ns = err("spiffe://cluster.local/ns/a.b/sa/b");
    assert!(dotted_ns.contains("namespace \"a.b\""), "{dotted_ns}");
    let dash = err("spiffe://cluster.local/ns/a/sa/-b");
    assert!(
        dash.contains("service account \"-b\"") && dash.contains("start and end"),
        "{dash}"
    );
    assert!(
        check_trust_domain("Cluster.Local")
            .unwrap_err()
            .to_string()
            .contains("trust domain")
    );
    assert!(check_trust_domain("").is_err());
    assert!(check_trust_domain("cluster.local").is_ok());
}

// ---- signing ----

#[test]
fn signs_a_workload_certificate_that_chains_to_the_root() {
    let now = t0();
    let (ca, _) = ca_at(now);
    let id = spiffe("default", "productpage");
    let (key, csr) = csr_with(vec![uri(&id)], &PKCS_ECDSA_P256_SHA256);
    let issued = ca
        .sign_at(&csr, &self::id("default", "productpage"), None, now)
        .unwrap();

    assert_eq!(issued.cert_chain_pem.len(), 1);
    assert_eq!(issued.trust_bundle_pem, ca.trust_bundle_pem_at(now));
    assert_eq!(issued.trust_bundle_pem.len(), 1);
    assert_eq!(issued.spiffe_id, id);
    assert_eq!(issued.expires, now + DEFAULT_CERT_TTL);
    verify(&issued.cert_chain_pem[0], &issued.trust_bundle_pem, now).unwrap();
    // Not yet valid before the skew allowance, no longer after expiry.
    assert!(
        verify(
            &issued.cert_chain_pem[0],
            &issued.trust_bundle_pem,
            now - CLOCK_SKEW - Duration::from_secs(1)
        )
        .is_err()
    );
    assert!(
        verify(
            &issued.cert_chain_pem[0],
            &issued.trust_bundle_pem,
            issued.expires + Duration::from_secs(1)
        )
        .is_err()
    );

    let leaf_der = der(&issued.cert_chain_pem[0]);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names, vec![GeneralName::URI(&id)]);
    assert!(sans.critical, "an empty subject needs a critical SAN");
    assert_eq!(leaf.subject().iter().count(), 0);
    assert!(!leaf.is_ca());
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(usage.digital_signature() && !usage.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(
        leaf.validity().not_before.timestamp(),
        unix(now - CLOCK_SKEW)
    );
    assert_eq!(leaf.validity().not_after.timestamp(), unix(issued.expires));
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info());
    assert_eq!(leaf.raw_serial().len(), 16);
    assert_eq!(leaf.raw_serial_as_string().replace(':', ""), issued.serial);

    let again = ca
        .sign_at(&csr, &self::id("default", "productpage"), None, now)
        .unwrap();
    assert_ne!(again.serial, issued.serial, "serials are random");
}

#[test]
fn the_root_is_a_ten_year_p256_ca() {
    let now = t0();
    let (ca, _) = ca_at(now);
    let bundle = ca.trust_bundle_pem_at(now);
    let root_der = der(&bundle[0]);
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    assert!(root.is_ca());
    assert_eq!(
        root.basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .path_len_constraint,
        Some(0)
    );
    assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
    assert_eq!(root.subject(), root.issuer());
    assert_eq!(
        root.validity().not_after.timestamp(),
        unix(now + ROOT_VALIDITY)
    );
    assert_eq!(
        root.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    assert_eq!(ca.root().not_after, now + ROOT_VALIDITY);
}

#[test]
fn a_csr_for_another_identity_is_foreign_and_names_both() {
    let now = t0();
    let (ca, _) = ca_at(now);
    let caller = id("default", "productpage");
    let allowed = spiffe("default", "productpage");
    let cases = [
        (
            "another service account",
            vec![uri(&spiffe("default", "reviews"))],
            spiffe("default", "reviews"),
        ),
        (
            "another namespace",
            vec![uri(&spiffe("prod", "productpage"))],
            spiffe("prod", "productpage"),
        ),
        (
            "another trust domain",
            vec![uri("spiffe://other.example/ns/default/sa/productpage")],
            "spiffe://other.example/ns/default/sa/productpage".into(),
        ),
        (
            "an extra DNS SAN",
            vec![uri(&allowed), dns("productpage.default.svc")],
            "DNS name productpage.default.svc".into(),
        ),
        (
            "a DNS SAN alone",
            vec![dns("example.com")],
            "DNS name example.com".into(),
        ),
        (
            "an IP SAN",
            vec![uri(&allowed), SanType::IpAddress([10, 0, 0, 1].into())],
            "IP address 10.0.0.1".into(),
        ),
    ];
    for (what, sans, requested) in cases {
        let err = ca.sign_at(&csr(sans), &caller, None, now).unwrap_err();
        let SignError::Foreign {
            requested: r,
            allowed: a,
        } = &err
        else {
            panic!("{what}: {err:?}");
        };
        assert!(r.contains(&requested), "{what}: {r}");
        assert!(!r.contains(&format!("URI {allowed}")), "{what}: {r}");
        assert_eq!(a, &allowed, "{what}");
        let message = err.to_string();
        assert!(
            message.contains(&requested) && message.contains(&allowed),
            "{what}: {message}"
        );
        assert_eq!(err.reason(), "foreign");
    }
}

#[test]
fn unusable_csrs_are_bad_and_say_why() {
    let now = t0();
    let (ca, _) = ca_at(now);
    let caller = id("default", "productpage");
    let allowed = spiffe("default", "productpage");
    let bad = |csr: &str| match ca.sign_at(csr, &caller, None, now) {
        Err(SignError::BadCsr { reason }) => reason,
        other => panic!("{other:?}"),
    };

    assert!(bad("hello").contains("not PEM"), "{}", bad("hello"));
    let garbage = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![1, 2, 3]));
    assert!(bad(&garbage).contains("not a PKCS#10"), "{}", bad(&garbage));
    // A certificate is not a request.
    let cert = ca.trust_bundle_pem_at(now).remove(0);
    assert!(bad(&cert).contains("\"CERTIFICATE\""), "{}", bad(&cert));

    // One bit flipped in the signature.
    let mut tampered = der(&csr(vec![uri(&allowed)]));
    *tampered.last_mut().unwrap() ^= 1;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tampered));
    assert!(bad(&tampered).contains("signature"), "{}", bad(&tampered));

    // One bit flipped in the signed part: the SAN now names another
    // identity, and the signature no longer matches it.
    let good = der(&csr(vec![uri(&allowed)]));
    let at = good
        .windows(b"productpage".len())
        .position(|w| w == b"productpage")
        .unwrap();
    let mut altered = good.clone();
    altered[at] = b'q';
    let altered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", altered));
    assert!(bad(&altered).contains("signature"), "{}", bad(&altered));

    let none = bad(&csr(vec![]));
    assert!(
        none.contains("no subject alternative name") && none.contains(&allowed),
        "{none}"
    );
    let twice = bad(&csr(vec![uri(&allowed), uri(&allowed)]));
    assert!(twice.contains("2 times"), "{twice}");

    let p384 = csr_with(vec![uri(&allowed)], &PKCS_ECDSA_P384_SHA384).1;
    assert!(bad(&p384).contains("P-256"), "{}", bad(&p384));
}

#[test]
fn lifetimes_are_the_default_or_the_request_up_to_the_maximum() {
    let now = t0();
    let config = CaConfig {
        default_ttl: HOUR,
        max_ttl: 2 * HOUR,
        ..CaConfig::default()
    };
    let ca = Ca::open_at(config, Box::new(MemoryKeyStore::default()), now).unwrap();
    let caller = id("default", "productpage");
    let csr = csr(vec![uri(&spiffe("default", "productpage"))]);
    let expires = |ttl| ca.sign_at(&csr, &caller, ttl, now).unwrap().expires;
    assert_eq!(expires(None), now + HOUR);
    assert_eq!(expires(Some(Duration::ZERO)), now + HOUR);
    assert_eq!(expires(Some(HOUR / 2)), now + HOUR / 2);
    assert_eq!(
        expires(Some(90 * 60 * Duration::from_secs(1))),
        now + HOUR * 3 / 2
    );
    assert_eq!(expires(Some(10 * HOUR)), now + 2 * HOUR);
    assert_eq!(expires(Some(Duration::MAX)), now + 2 * HOUR);
    // Whole seconds, as the certificate holds them.
    let later = now + Duration::from_millis(1500);
    assert_eq!(
        ca.sign_at(&csr, &caller, None, later).unwrap().expires,
        now + HOUR + Duration::from_secs(1)
    );
}

#[test]
fn a_certificate_never_outlives_its_root() {
    let now = t0();
    // An operator's root with an hour left.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "operator root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = (now - HOUR).into();
    params.not_after = (now + HOUR).into();
    let cert = params.self_signed(&key).unwrap();
    let store = MemoryKeyStore::default();
    store
        .store(&RootMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            next: None,
            previous: vec![],
        })
        .unwrap();
    let ca = Ca::open_at(CaConfig::default(), Box::new(store), now).unwrap();
    let issued = ca
        .sign_at(
            &csr(vec![uri(&spiffe("default", "productpage"))]),
            &id("default", "productpage"),
            None,
            now,
        )
        .unwrap();
    assert_eq!(issued.expires, now + HOUR);
    assert_eq!(issued.trust_bundle_pem, vec![cert.pem()]);
    verify(&issued.cert_chain_pem[0], &issued.trust_bundle_pem, now).unwrap();
}

// ---- rotation ----

#[test]
fn a_rotation_trusts_the_next_root_first_signs_with_it_later_and_retires_the_old_one() {
    let now = t0();
    let (ca, store) = ca_at(now);
    let caller = id("default", "productpage");
    let csr = csr(vec![uri(&spiffe("default", "productpage"))]);
    let old_root = ca.trust_bundle_pem_at(now);
    let old_leaf = ca.sign_at(&csr, &caller, None, now).unwrap();

    // Prepared: the next root is trusted, but the old one still signs.
    let prepared = now + HOUR;
    let next = ca.prepare_at(prepared).unwrap();
    assert_eq!(ca.next_root().unwrap(), next);
    let bundle = ca.trust_bundle_pem_at(prepared);
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle[0], old_root[0], "the signer first, then the next");
    let leaf = ca.sign_at(&csr, &caller, None, prepared).unwrap();
    assert_eq!(leaf.trust_bundle_pem, bundle);
    verify(&leaf.cert_chain_pem[0], &old_root, prepared).unwrap();
    // Preparing again changes nothing; it is persisted.
    assert_eq!(ca.prepare_at(prepared).unwrap(), next);
    assert_eq!(ca.trust_bundle_pem_at(prepared), bundle);
    let material = store.material().unwrap();
    assert_eq!(material.next.as_ref().unwrap().cert_pem, bundle[1]);
    let restarted = Ca::open_at(CaConfig::default(), Box::new(store.clone()), prepared).unwrap();
    assert_eq!(restarted.next_root().unwrap(), next);
    assert_eq!(restarted.trust_bundle_pem_at(prepared), bundle);

    // Promoted: new leaves come from the next root only; the old root
    // stays trusted for the longest certificate lifetime and a margin.
    let promoted = prepared + HOUR;
    let root = ca.promote_at(promoted).unwrap();
    assert_eq!(root.serial, next.serial);
    assert_eq!(ca.root().serial, next.serial);
    assert!(ca.next_root().is_none());
    let new_root = vec![bundle[1].clone()];
    let overlap_bundle = ca.trust_bundle_pem_at(promoted);
    assert_eq!(
        overlap_bundle,
        vec![new_root[0].clone(), old_root[0].clone()]
    );
    let new_leaf = ca.sign_at(&csr, &caller, None, promoted).unwrap();
    verify(&new_leaf.cert_chain_pem[0], &new_root, promoted).unwrap();
    assert!(verify(&new_leaf.cert_chain_pem[0], &old_root, promoted).is_err());
    verify(&old_leaf.cert_chain_pem[0], &overlap_bundle, promoted).unwrap();
    let material = store.material().unwrap();
    assert_eq!(material.cert_pem, new_root[0]);
    assert!(material.next.is_none());
    let end = promoted + DEFAULT_CERT_TTL + RETIRE_MARGIN;
    assert_eq!(material.previous[0].trusted_until, end);
    assert!(matches!(ca.promote_at(promoted), Err(CaError::NoNextRoot)));

    // Retired: only the new root.
    assert_eq!(
        ca.trust_bundle_pem_at(end - Duration::from_secs(1)),
        overlap_bundle
    );
    assert_eq!(ca.trust_bundle_pem_at(end), new_root);
    let restarted = Ca::open_at(CaConfig::default(), Box::new(store), end).unwrap();
    assert_eq!(restarted.trust_bundle_pem_at(end), new_root);
    assert!(restarted.status_at(end).previous.is_empty());
}

#[test]
fn a_rotation_is_due_at_its_part_of_the_root_lifetime() {
    let now = t0();
    let (ca, _) = ca_at(now);
    let root = ca.root();
    let life = root.not_after.duration_since(root.not_before).unwrap();
    let at = |f: f64| root.not_before + life.mul_f64(f);
    assert!(!ca.rotation_due_at(0.8, now));
    assert!(!ca.rotation_due_at(0.8, at(0.79)));
    assert!(ca.rotation_due_at(0.8, at(0.8) + Duration::from_secs(1)));
    assert!(ca.rotation_due_at(0.5, at(0.6)));
}

#[test]
fn another_replicas_steps_are_taken_on_reload() {
    let now = t0();
    let (leader, store) = ca_at(now);
    let follower = Ca::open_at(CaConfig::default(), Box::new(store.clone()), now).unwrap();
    assert!(!follower.reload_at(now).unwrap(), "nothing changed");
    let next = leader.prepare_at(now).unwrap();
    assert!(follower.reload_at(now).unwrap());
    assert_eq!(follower.next_root().unwrap(), next);
    assert_eq!(
        follower.trust_bundle_pem_at(now),
        leader.trust_bundle_pem_at(now)
    );
    leader.promote_at(now).unwrap();
    assert!(follower.reload_at(now).unwrap());
    assert_eq!(follower.root().serial, next.serial);
    assert_eq!(follower.status_at(now), leader.status_at(now));
    assert_eq!(follower.status_at(now).previous.len(), 1);
}

#[test]
fn a_second_rotation_drops_roots_whose_overlap_ended() {
    let now = t0();
    let config = CaConfig {
        max_ttl: HOUR,
        ..CaConfig::default()
    };
    let store = MemoryKeyStore::default();
    let ca = Ca::open_at(config, Box::new(store.clone()), now).unwrap();
    let first = ca.trust_bundle_pem_at(now);
    ca.prepare_at(now).unwrap();
    ca.promote_at(now).unwrap();
    let second = ca.trust_bundle_pem_at(now)[0].clone();
    // Still within the first overlap: three roots while the third is next.
    let later = now + HOUR / 2;
    ca.prepare_at(later).unwrap();
    ca.promote_at(later).unwrap();
    let bundle = ca.trust_bundle_pem_at(later);
    assert_eq!(bundle.len(), 3);
    assert_eq!(bundle[1], second);
    assert_eq!(bundle[2], first[0]);
    // After the first overlap: the first root is gone, also from the store
    // at the next rotation.
    let much_later = now + 2 * HOUR;
    ca.prepare_at(much_later).unwrap();
    assert_eq!(store.material().unwrap().previous.len(), 0);
    ca.promote_at(much_later).unwrap();
    let bundle = ca.trust_bundle_pem_at(much_later);
    assert_eq!(bundle.len(), 2);
    assert!(!bundle.contains(&first[0]) && !bundle.contains(&second));
    assert_eq!(store.material().unwrap().previous.len(), 1);
}

// ---- key stores ----

#[test]
fn file_store_round_trips_and_protects_the_key() {
    let tmp = temp_dir("round-trip");
    let dir = tmp.path();
    let store = FileKeyStore::new(dir.join("ca"));
    assert!(
        store.load().unwrap().is_none(),
        "a missing directory is empty"
    );
    let material = RootMaterial {
        cert_pem: "cert\n".into(),
        key_pem: "key\n".into(),
        next: None,
        previous: vec![PreviousRoot {
            cert_pem: "old\n".into(),
            trusted_until: t0(),
        }],
    };
    store.store(&material).unwrap();
    assert_eq!(store.load().unwrap(), Some(material.clone()));
    let mode = |name: &str| {
        std::fs::metadata(dir.join("ca").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(ROOT_KEY_FILE), 0o600);
    assert_eq!(mode(""), 0o700);
    assert_eq!(
        std::fs::read_to_string(dir.join("ca").join(ROOT_CERT_FILE)).unwrap(),
        "cert\n"
    );
    // Nothing left behind but the three files.
    let mut names: Vec<_> = std::fs::read_dir(dir.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [PREVIOUS_ROOTS_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE]);
    // Debug output never shows the key.
    assert!(!format!("{material:?}").contains("key\\n"));
}

#[test]
fn file_store_finishes_a_committed_store_and_drops_an_unfinished_one() {
    let tmp = temp_dir("recover");
    let dir = tmp.path();
    let store = FileKeyStore::new(dir);
    let old = RootMaterial {
        cert_pem: "old cert\n".into(),
        key_pem: "old key\n".into(),
        next: None,
        previous: vec![],
    };
    store.store(&old).unwrap();
    let new_file = |name: &str, text: &str| {
        std::fs::write(dir.join(format!("{name}{NEW_SUFFIX}")), text).unwrap();
    };
    // Died while writing: the old root stays.
    new_file(ROOT_KEY_FILE, "new key\n");
    assert_eq!(store.load().unwrap(), Some(old.clone()));
    assert!(!dir.join(format!("{ROOT_KEY_FILE}{NEW_SUFFIX}")).exists());
    // Died after committing, with the key renamed and the cert not yet.
    new_file(ROOT_CERT_FILE, "new cert\n");
    std::fs::write(dir.join(ROOT_KEY_FILE), "new key\n").unwrap();
    std::fs::write(dir.join(COMMIT_FILE), "").unwrap();
    let loaded = store.load().unwrap().unwrap();
    assert_eq!(
        (loaded.cert_pem.as_str(), loaded.key_pem.as_str()),
        ("new cert\n", "new key\n")
    );
    assert!(!dir.join(COMMIT_FILE).exists());
}

#[test]
fn a_file_store_root_is_made_once_and_reused_across_restarts() {
    let tmp = temp_dir("restart");
    let dir = tmp.path();
    let open = |now| Ca::open_at(CaConfig::default(), Box::new(FileKeyStore::new(dir)), now);
    let first = open(t0()).unwrap();
    let bundle = first.trust_bundle_pem_at(t0());
    let leaf = first
        .sign_at(
            &csr(vec![uri(&spiffe("default", "productpage"))]),
            &id("default", "productpage"),
            None,
            t0(),
        )
        .unwrap();
    drop(first);
    let later = t0() + HOUR;
    let second = open(later).unwrap();
    assert_eq!(second.trust_bundle_pem_at(later), bundle);
    verify(
        &leaf.cert_chain_pem[0],
        &second.trust_bundle_pem_at(later),
        later,
    )
    .unwrap();

    // Each step of a rotation is kept across a restart too, and the next
    // root's files go when it becomes the signer.
    second.prepare_at(later).unwrap();
    let prepared = second.trust_bundle_pem_at(later);
    assert_eq!(prepared.len(), 2);
    assert!(dir.join(NEXT_CERT_FILE).exists() && dir.join(NEXT_KEY_FILE).exists());
    assert_eq!(
        std::fs::metadata(dir.join(NEXT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(open(later).unwrap().trust_bundle_pem_at(later), prepared);
    second.promote_at(later).unwrap();
    let rotated = second.trust_bundle_pem_at(later);
    drop(second);
    assert!(!dir.join(NEXT_CERT_FILE).exists() && !dir.join(NEXT_KEY_FILE).exists());
    let third = open(later).unwrap();
    assert_eq!(third.trust_bundle_pem_at(later), rotated);
    assert_eq!(
        third.root().subject,
        root_info(&prepared[1]).unwrap().subject
    );
}

#[test]
fn an_operator_root_in_the_directory_is_used() {
    let tmp = temp_dir("operator");
    let dir = tmp.path();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Example Corp mesh root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(ROOT_CERT_FILE), cert.pem()).unwrap();
    std::fs::write(dir.join(ROOT_KEY_FILE), key.serialize_pem()).unwrap();

    let ca = Ca::open_at(CaConfig::default(), Box::new(FileKeyStore::new(dir)), t0()).unwrap();
    assert_eq!(ca.trust_bundle_pem_at(t0()), vec![cert.pem()]);
    assert!(ca.root().subject.contains("Example Corp mesh root"));
    let issued = ca
        .sign_at(
            &csr(vec![uri(&spiffe("default", "productpage"))]),
            &id("default", "productpage"),
            None,
            t0(),
        )
        .unwrap();
    verify(&issued.cert_chain_pem[0], &[cert.pem()], t0()).unwrap();
    // Left as the operator wrote it.
    assert_eq!(
        std::fs::read_to_string(dir.join(ROOT_CERT_FILE)).unwrap(),
        cert.pem()
    );
}

#[test]
fn unusable_roots_are_refused_with_the_reason() {
    let tmp = temp_dir("unusable");
    let dir = tmp.path();
    let open = |now| {
        Ca::open_at(CaConfig::default(), Box::new(FileKeyStore::new(dir)), now)
            .unwrap_err()
            .to_string()
    };
    let generated = |f: &dyn Fn(&mut CertificateParams)| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        f(&mut params);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    };
    let put = |cert: &str, key: &str| {
        std::fs::write(dir.join(ROOT_CERT_FILE), cert).unwrap();
        std::fs::write(dir.join(ROOT_KEY_FILE), key).unwrap();
    };

    // Half a root: the missing file is named, nothing is overwritten.
    let (cert, key) = generated(&|_| {});
    std::fs::write(dir.join(ROOT_CERT_FILE), &cert).unwrap();
    let half = open(t0());
    assert!(
        half.contains("root-cert.pem") && half.contains("not root-key.pem"),
        "{half}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(ROOT_CERT_FILE)).unwrap(),
        cert
    );

    // Another root's key.
    let (_, other_key) = generated(&|_| {});
    put(&cert, &other_key);
    let e = open(t0());
    assert!(e.contains("does not belong to the certificate"), "{e}");

    put(&cert, "not a key");
    let e = open(t0());
    assert!(e.contains("private key does not parse"), "{e}");

    let (leaf, leaf_key) = generated(&|p| p.is_ca = IsCa::NoCa);
    put(&leaf, &leaf_key);
    let e = open(t0());
    assert!(e.contains("not a CA"), "{e}");

    let (expired, expired_key) = generated(&|p| {
        p.not_before = (t0() - 2 * HOUR).into();
        p.not_after = (t0() - HOUR).into();
    });
    put(&expired, &expired_key);
    let e = open(t0());
    assert!(
        e.contains("expired") && e.contains(&dir.display().to_string()),
        "{e}"
    );

    put(&cert, &key);
    Ca::open_at(CaConfig::default(), Box::new(FileKeyStore::new(dir)), t0()).unwrap();
}

// ---- bootstrap tokens ----

const TOKENS: &str = "\
tokens:
  - token: s3cret-productpage
    namespace: default
    serviceAccount: productpage
  - token: s3cret-reviews
    namespace: default
    serviceAccount: reviews
";

fn metadata(authorization: Option<&str>) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    if let Some(value) = authorization {
        metadata.insert("authorization", value.parse().unwrap());
    }
    metadata
}

#[tokio::test]
async fn bootstrap_tokens_prove_their_identity() {
    let tokens = BootstrapTokens::parse(TOKENS, "tokens.yaml").unwrap();
    assert_eq!(tokens.len(), 2);
    let auth = |value: Option<&str>| {
        let metadata = metadata(value);
        let tokens = &tokens;
        async move { tokens.authenticate(&metadata).await }
    };
    assert_eq!(
        auth(Some("Bearer s3cret-reviews")).await.unwrap(),
        id("default", "reviews")
    );
    assert_eq!(
        auth(Some("bearer s3cret-productpage")).await.unwrap(),
        id("default", "productpage")
    );

    for (value, message) in [
        (None, "no credential"),
        (Some("Basic abc"), "must be `Bearer <token>`"),
        (Some("Bearer"), "must be `Bearer <token>`"),
        (Some("Bearer "), "empty bearer token"),
        (Some("Bearer s3cret"), "unknown bootstrap token"),
        (
            Some("Bearer s3cret-reviews-and-more"),
            "unknown bootstrap token",
        ),
    ] {
        let status = auth(value).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{value:?}");
        assert!(
            status.message().contains(message),
            "{value:?}: {}",
            status.message()
        );
        assert!(
            !status.message().contains("s3cret"),
            "tokens are not echoed"
        );
    }
    assert!(
        auth(Some("Bearer nope"))
            .await
            .unwrap_err()
            .message()
            .contains("tokens.yaml")
    );
    assert!(!format!("{tokens:?}").contains("s3cret"));
}

#[tokio::test]
async fn without_tokens_everyone_is_told_how_to_configure_them() {
    let status = NoAuthenticator
        .authenticate(&metadata(Some("Bearer anything")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("--bootstrap-tokens"),
        "{}",
        status.message()
    );
}

#[test]
fn bad_tokens_files_name_file_and_line() {
    let err = |text: &str| {
        BootstrapTokens::parse(text, "/etc/trellis/tokens.yaml")
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            "tokens:\n  - token: a\n    namespace: default\n",
            "tokens.yaml:2:",
            "missing field `serviceAccount`",
        ),
        (
            "tokens:\n  - token: a\n    namespace: default\n    serviceAccount: x\n    role: admin\n",
            "tokens.yaml:5:",
            "unknown field `role`",
        ),
        (
            // An invalid value is reported at its entry's line, with its path.
            "tokens:\n  - token: a\n    namespace: Default\n    serviceAccount: x\n",
            "tokens.yaml:2: tokens[0]:",
            "namespace \"Default\"",
        ),
        (
            "tokens:\n  - token: a\n    namespace: default\n    serviceAccount: x\n  - token: \"two words\"\n    namespace: default\n    serviceAccount: y\n",
            "tokens.yaml:5: tokens[1]:",
            "without spaces",
        ),
        ("tokens: [\n", "tokens.yaml:2:", ""),
        ("token: []\n", "tokens.yaml:1:", "unknown field `token`"),
    ];
    for (text, at, what) in cases {
        let e = err(text);
        assert!(e.contains(at) && e.contains(what), "{text:?}: {e}");
        assert!(!e.contains(" at line "), "the line is said once: {e}");
    }
    let dup = err(
        "tokens:\n  - {token: a, namespace: x, serviceAccount: x}\n  - {token: b, namespace: y, serviceAccount: y}\n  - {token: a, namespace: z, serviceAccount: z}\n",
    );
    assert!(
        dup.contains("tokens[2] has the same token as tokens[0]"),
        "{dup}"
    );
    let missing = BootstrapTokens::from_file("/nonexistent/tokens.yaml")
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/tokens.yaml"), "{missing}");
}
