//! The CA's roots in a Kubernetes Secret (`trellis-system/trellis-ca` by
//! default), with the same keys as the files of a
//! [`FileKeyStore`](super::FileKeyStore): `root-cert.pem`, `root-key.pem`,
//! during a rotation `next-root-cert.pem` and `next-root-key.pem`, and
//! `previous-roots.yaml`.
//!
//! The annotation [`ROTATE_ANNOTATION`] on the Secret asks the leader to
//! start a rotation now (`meshctl ca rotate` sets it); the store that
//! starts it drops the annotation.
//!
//! Replicas that start together agree on one root: each creates the
//! Secret only if it is absent, and the one whose create conflicts adopts
//! the winner's root. An operator who wants the CA to sign with a root of
//! their own creates the Secret first (`kubectl create secret generic
//! trellis-ca --from-file=root-cert.pem --from-file=root-key.pem`). A store
//! replaces the Secret only if it has not changed since it was read, so
//! two replicas cannot overwrite each other's rotation unseen.
//!
//! [`KeyStore`] is synchronous (the CA calls it under its locks, rarely);
//! this store runs its API calls on the Tokio runtime it was made on,
//! which must be multi-threaded.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::store::{format_previous, parse_previous};
use super::{
    KeyStore, NEXT_CERT_FILE, NEXT_KEY_FILE, NextRoot, PREVIOUS_ROOTS_FILE, ROOT_CERT_FILE,
    ROOT_KEY_FILE, RootMaterial, StoreError,
};

/// The default name of the CA's Secret.
pub const DEFAULT_CA_SECRET: &str = "trellis-ca";

/// The annotation on the CA's Secret that asks for a root rotation; its
/// value says when it was asked (for logs only).
pub const ROTATE_ANNOTATION: &str = "trellis.dev/rotate-root";

/// The label that marks the objects Trellis manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Roots in a Secret.
pub struct SecretKeyStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
    runtime: Handle,
    /// The Secret's `resourceVersion` when last read or written: a store
    /// replaces only that version.
    version: Mutex<Option<String>>,
    /// The [`ROTATE_ANNOTATION`] of the Secret when last read.
    requested: Mutex<Option<String>>,
}

impl SecretKeyStore {
    /// A store in the Secret `namespace/name`, calling the API on the
    /// current Tokio runtime. Fails outside a multi-threaded runtime.
    pub fn new(client: Client, namespace: &str, name: &str) -> Result<Self, StoreError> {
        let runtime = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
            .ok_or_else(|| StoreError::Kubernetes {
                secret: format!("{namespace}/{name}"),
                reason: "the Secret key store needs a multi-threaded Tokio runtime".into(),
            })?;
        Ok(Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            runtime,
            version: Mutex::new(None),
            requested: Mutex::new(None),
        })
    }

    /// Runs `future` to completion on the store's runtime from the
    /// synchronous [`KeyStore`] methods.
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        tokio::task::block_in_place(|| self.runtime.block_on(future))
    }

    fn error(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Kubernetes {
            secret: format!("{}/{}", self.namespace, self.name),
            reason: reason.to_string(),
        }
    }

    fn api_error(&self, verb: &str, e: &kube::Error) -> StoreError {
        match e {
            kube::Error::Api(status) if status.code == 403 => self.error(format!(
                "may not {verb} it ({}): the control plane's Role in {} must allow get, create and update on this Secret",
                status.message, self.namespace
            )),
            e => self.error(format!("cannot {verb} it: {e}")),
        }
    }

    fn remember(&self, secret: &Secret) {
        *self.version.lock().unwrap_or_else(PoisonError::into_inner) =
            secret.metadata.resource_version.clone();
        *self
            .requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROTATE_ANNOTATION))
            .cloned();
    }

    fn secret(&self, material: &RootMaterial) -> Result<Secret, StoreError> {
        let previous = format_previous(&material.previous).map_err(|e| self.error(e))?;
        let next = material.next.as_ref();
        let data = [
            (ROOT_CERT_FILE, Some(material.cert_pem.as_str())),
            (ROOT_KEY_FILE, Some(material.key_pem.as_str())),
            (NEXT_CERT_FILE, next.map(|n| n.cert_pem.as_str())),
            (NEXT_KEY_FILE, next.map(|n| n.key_pem.as_str())),
            (PREVIOUS_ROOTS_FILE, Some(previous.as_str())),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect();
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    "trellis".to_owned(),
                )])),
                resource_version: self
                    .version
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data),
            ..Default::default()
        })
    }

    /// The material a Secret holds.
    fn material(&self, secret: &Secret) -> Result<RootMaterial, StoreError> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let text = |key: &str| -> Result<Option<String>, StoreError> {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.0.clone())
                        .map_err(|_| self.error(format!("its key {key} is not UTF-8 text (PEM)")))
                })
                .transpose()
        };
        let pair = |cert: &str, key: &str| -> Result<Option<(String, String)>, StoreError> {
            match (text(cert)?, text(key)?) {
                (Some(cert), Some(key)) => Ok(Some((cert, key))),
                (None, None) => Ok(None),
                (c, _) => {
                    let (present, missing) = if c.is_some() {
                        (cert, key)
                    } else {
                        (key, cert)
                    };
                    Err(self.error(format!(
                        "it has {present} but no {missing}: a root needs both (add the missing key, or remove {present}{})",
                        if cert == ROOT_CERT_FILE {
                            " and let the CA make a new root by deleting the Secret"
                        } else {
                            ""
                        }
                    )))
                }
            }
        };
        let Some((cert_pem, key_pem)) = pair(ROOT_CERT_FILE, ROOT_KEY_FILE)? else {
            return Err(self.error(format!(
                "it has no {ROOT_CERT_FILE} and {ROOT_KEY_FILE}: a root needs both (add them, or delete the Secret to let the CA make a new root)"
            )));
        };
        let next = pair(NEXT_CERT_FILE, NEXT_KEY_FILE)?
            .map(|(cert_pem, key_pem)| NextRoot { cert_pem, key_pem });
        let previous = match text(PREVIOUS_ROOTS_FILE)? {
            Some(yaml) if !yaml.trim().is_empty() => parse_previous(&yaml)
                .map_err(|reason| self.error(format!("{PREVIOUS_ROOTS_FILE}: {reason}")))?,
            _ => Vec::new(),
        };
        Ok(RootMaterial {
            cert_pem,
            key_pem,
            next,
            previous,
        })
    }
}

impl KeyStore for SecretKeyStore {
    fn load(&self) -> Result<Option<RootMaterial>, StoreError> {
        let secret = self
            .block_on(self.api.get_opt(&self.name))
            .map_err(|e| self.api_error("read", &e))?;
        let Some(secret) = secret else {
            return Ok(None);
        };
        self.remember(&secret);
        self.material(&secret).map(Some)
    }

    fn create(&self, material: &RootMaterial) -> Result<Option<RootMaterial>, StoreError> {
        let mut secret = self.secret(material)?;
        secret.metadata.resource_version = None;
        match self.block_on(self.api.create(&PostParams::default(), &secret)) {
            Ok(created) => {
                self.remember(&created);
                Ok(None)
            }
            // Another replica made its root first: use that one.
            Err(kube::Error::Api(status)) if status.code == 409 => match self.load()? {
                Some(theirs) => Ok(Some(theirs)),
                None => Err(self.error("it was created and deleted again while the CA started")),
            },
            Err(e) => Err(self.api_error("create", &e)),
        }
    }

    fn store(&self, material: &RootMaterial) -> Result<(), StoreError> {
        let secret = self.secret(material)?;
        if secret.metadata.resource_version.is_none() {
            return self.create(material).and_then(|theirs| match theirs {
                None => Ok(()),
                Some(_) => Err(self.error("another replica created it meanwhile; not overwritten")),
            });
        }
        match self.block_on(
            self.api
                .replace(&self.name, &PostParams::default(), &secret),
        ) {
            Ok(replaced) => {
                self.remember(&replaced);
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Err(self.error(
                "it changed since the CA read it (another replica rotated?); not overwritten: the CA reloads it",
            )),
            Err(e) => Err(self.api_error("update", &e)),
        }
    }

    fn describe(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    fn rotation_requested(&self) -> Option<String> {
        self.requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A store whose client points nowhere: only its conversions run.
    fn store() -> SecretKeyStore {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        SecretKeyStore::new(
            Client::try_from(config).unwrap(),
            "trellis-system",
            "trellis-ca",
        )
        .unwrap()
    }

    fn material() -> RootMaterial {
        RootMaterial {
            cert_pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\n...\n".into(),
            next: None,
            previous: vec![super::super::PreviousRoot {
                cert_pem: "old".into(),
                trusted_until: std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(2_000_000_000),
            }],
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_secret_holds_what_the_files_would_and_reads_back_the_same() {
        let store = store();
        let secret = store.secret(&material()).unwrap();
        let data = secret.data.clone().unwrap();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            [PREVIOUS_ROOTS_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE]
        );
        assert_eq!(store.material(&secret).unwrap(), material());

        // During a rotation, the next root's two keys too.
        let mut rotating = material();
        rotating.next = Some(NextRoot {
            cert_pem: "next cert".into(),
            key_pem: "next key".into(),
        });
        let secret = store.secret(&rotating).unwrap();
        assert_eq!(
            secret
                .data
                .as_ref()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            [
                NEXT_CERT_FILE,
                NEXT_KEY_FILE,
                PREVIOUS_ROOTS_FILE,
                ROOT_CERT_FILE,
                ROOT_KEY_FILE
            ]
        );
        assert_eq!(store.material(&secret).unwrap(), rotating);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rotation_request_is_read_from_the_annotation_and_not_written_back() {
        let store = store();
        let mut secret = store.secret(&material()).unwrap();
        assert_eq!(store.rotation_requested(), None);
        secret.metadata.annotations = Some(BTreeMap::from([(
            ROTATE_ANNOTATION.to_owned(),
            "2026-12-03T18:00:00Z".to_owned(),
        )]));
        store.remember(&secret);
        assert_eq!(
            store.rotation_requested().as_deref(),
            Some("2026-12-03T18:00:00Z")
        );
        // What the store writes next has no annotations: the request is
        // answered by that write.
        assert_eq!(
            store.secret(&material()).unwrap().metadata.annotations,
            None
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn half_a_next_root_is_refused_naming_both_keys() {
        let store = store();
        let mut secret = store.secret(&material()).unwrap();
        secret
            .data
            .as_mut()
            .unwrap()
            .insert(NEXT_CERT_FILE.into(), ByteString(b"next".to_vec()));
        let e = store.material(&secret).unwrap_err().to_string();
        assert!(
            e.contains("next-root-cert.pem but no next-root-key.pem"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_secret_with_half_a_root_is_refused_naming_the_missing_key() {
        let store = store();
        let mut secret = store.secret(&material()).unwrap();
        secret.data.as_mut().unwrap().remove(ROOT_KEY_FILE);
        let e = store.material(&secret).unwrap_err().to_string();
        assert!(e.contains("trellis-system/trellis-ca"), "{e}");
        assert!(e.contains("root-cert.pem but no root-key.pem"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_operator_secret_without_previous_roots_is_a_root_with_none() {
        let store = store();
        let mut secret = store.secret(&material()).unwrap();
        secret.data.as_mut().unwrap().remove(PREVIOUS_ROOTS_FILE);
        assert!(store.material(&secret).unwrap().previous.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_single_threaded_runtime_is_refused_rather_than_deadlocked() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let e = SecretKeyStore::new(client, "trellis-system", "trellis-ca")
            .err()
            .unwrap();
        assert!(e.to_string().contains("multi-threaded"), "{e}");
    }
}
