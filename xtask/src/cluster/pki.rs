//! The cluster's certificates and kubeconfigs: one CA signs the API
//! server's and the kubelet's serving certificates and a client
//! certificate per component; the service-account key pair signs tokens.
//! Made once per cluster directory (rcgen, ECDSA P-256).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

use super::net;

/// The node's name, in its kubelet certificate and the Node object.
pub const NODE_NAME: &str = "trellis";

/// A client identity: file stem, common name, organization (group).
struct Client {
    stem: &'static str,
    cn: &'static str,
    org: Option<&'static str>,
}

/// Every component that talks to the API server, and the admin user.
const CLIENTS: &[Client] = &[
    Client {
        stem: "admin",
        cn: "trellis-admin",
        org: Some("system:masters"),
    },
    Client {
        stem: "controller-manager",
        cn: "system:kube-controller-manager",
        org: None,
    },
    Client {
        stem: "scheduler",
        cn: "system:kube-scheduler",
        org: None,
    },
    Client {
        stem: "kube-proxy",
        cn: "system:kube-proxy",
        org: None,
    },
    Client {
        stem: "kubelet",
        cn: "system:node:trellis",
        org: Some("system:nodes"),
    },
    // The API server calling kubelets (logs, exec, port-forward).
    Client {
        stem: "apiserver-kubelet-client",
        cn: "kube-apiserver-kubelet-client",
        org: Some("system:masters"),
    },
];

/// Where the certificates live.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(state: &Path) -> Self {
        Self {
            dir: state.join("pki"),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.crt"))
    }

    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }

    /// The kubeconfig of a client identity (see [`CLIENTS`]).
    pub fn kubeconfig(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.kubeconfig"))
    }

    /// Makes everything unless a complete set is there.
    pub fn ensure(&self) -> anyhow::Result<()> {
        let complete = self.ca().is_file()
            && self.key("sa").is_file()
            && ["apiserver", "kubelet-serving"]
                .iter()
                .chain(CLIENTS.iter().map(|c| &c.stem))
                .all(|s| self.cert(s).is_file() && self.key(s).is_file())
            && CLIENTS.iter().all(|c| self.kubeconfig(c.stem).is_file());
        if complete {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, "trellis-cluster-ca");
        let ca_cert = ca.self_signed(&ca_key)?;
        self.write(&self.ca(), &ca_cert.pem())?;
        self.write(&self.key("ca"), &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let api_sans = vec![
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
            "localhost".into(),
            net::NODE_IP.to_string(),
            net::API_SERVICE_IP.to_string(),
            "127.0.0.1".into(),
        ];
        self.leaf(
            "apiserver",
            "kube-apiserver",
            None,
            api_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        )?;
        self.leaf(
            "kubelet-serving",
            NODE_NAME,
            None,
            vec![NODE_NAME.into(), net::NODE_IP.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        )?;
        for client in CLIENTS {
            self.leaf(
                client.stem,
                client.cn,
                client.org,
                vec![],
                ExtendedKeyUsagePurpose::ClientAuth,
                &issuer,
            )?;
            self.write(&self.kubeconfig(client.stem), &self.kubeconfig_text(client))?;
        }
        let sa = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        self.write(&self.key("sa"), &sa.serialize_pem())?;
        self.write(&self.dir.join("sa.pub"), &sa.public_key_pem())?;
        Ok(())
    }

    fn leaf(
        &self,
        stem: &str,
        cn: &str,
        org: Option<&str>,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        issuer: &Issuer<'_, KeyPair>,
    ) -> anyhow::Result<()> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(org) = org {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, issuer)?;
        self.write(&self.cert(stem), &cert.pem())?;
        self.write(&self.key(stem), &key.serialize_pem())
    }

    fn kubeconfig_text(&self, client: &Client) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: trellis\n  cluster:\n    server: https://{}:{}\n    certificate-authority: {}\nusers:\n- name: {}\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: trellis\n  context:\n    cluster: trellis\n    user: {}\ncurrent-context: trellis\n",
            net::NODE_IP,
            net::API_PORT,
            self.ca().display(),
            client.stem,
            self.cert(client.stem).display(),
            self.key(client.stem).display(),
            client.stem,
        )
    }

    fn write(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        Ok(())
    }
}
