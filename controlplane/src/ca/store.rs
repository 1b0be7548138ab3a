//! Where the CA keeps its roots: a directory of PEM files in local mode,
//! or memory in tests. (On Kubernetes, a Secret:
//! [`SecretKeyStore`](super::SecretKeyStore).)

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::KeyStore;

/// The signing root's certificate, PEM, in a [`FileKeyStore`] directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing root's private key, PKCS#8 PEM, mode 0600.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// The next root's certificate, PEM, while a rotation is under way.
pub const NEXT_CERT_FILE: &str = "next-root-cert.pem";
/// The next root's private key, PKCS#8 PEM, mode 0600.
pub const NEXT_KEY_FILE: &str = "next-root-key.pem";
/// The roots a rotation replaced and until when they stay trusted, YAML.
pub const PREVIOUS_ROOTS_FILE: &str = "previous-roots.yaml";
/// Present while a [`FileKeyStore::store`] renames its files into place;
/// a load that finds it finishes the renames.
pub(super) const COMMIT_FILE: &str = ".commit";
/// Suffix of a file being written, before it is renamed into place.
pub(super) const NEW_SUFFIX: &str = ".new";

/// The CA's roots as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct RootMaterial {
    /// The signing root's certificate, PEM.
    pub cert_pem: String,
    /// The signing root's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The root that signs after a rotation, already in the trust bundle.
    pub next: Option<NextRoot>,
    /// Roots that a rotation replaced, still in the trust bundle until
    /// their overlap ends. Their keys are not kept: they sign nothing.
    pub previous: Vec<PreviousRoot>,
}

/// The next root: trusted, not yet signing.
#[derive(Clone, PartialEq, Eq)]
pub struct NextRoot {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for NextRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextRoot")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// A replaced root that is still trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreviousRoot {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// When it leaves the trust bundle.
    #[serde(with = "rfc3339")]
    pub trusted_until: SystemTime,
}

impl std::fmt::Debug for RootMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootMaterial")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .field("next", &self.next)
            .field("previous", &self.previous)
            .finish()
    }
}

/// The key store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Only half of a root is there.
    #[error(
        "{dir} holds {present} but not {missing}: a root needs both (put the missing file there, or remove both to let the CA make a new root)"
    )]
    HalfRoot {
        /// The directory.
        dir: PathBuf,
        /// The file that is there.
        present: &'static str,
        /// The file that is not.
        missing: &'static str,
    },
    /// The previous roots file does not parse.
    #[error("{path}: {reason}")]
    Previous {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        reason: String,
    },
    /// The Kubernetes Secret could not be read or written, or is unusable.
    #[error("the CA's Secret {secret}: {reason}")]
    Kubernetes {
        /// `namespace/name`.
        secret: String,
        /// What is wrong.
        reason: String,
    },
}

/// Roots in a directory:
///
/// - [`ROOT_CERT_FILE`] (`root-cert.pem`): the signing root's certificate;
/// - [`ROOT_KEY_FILE`] (`root-key.pem`): its PKCS#8 private key, mode 0600;
/// - [`NEXT_CERT_FILE`] and [`NEXT_KEY_FILE`] (`next-root-cert.pem`,
///   `next-root-key.pem`): during a rotation, the root that signs next;
/// - [`PREVIOUS_ROOTS_FILE`] (`previous-roots.yaml`): roots a rotation
///   replaced, each with the time it leaves the trust bundle.
///
/// An operator who wants the CA to sign with a root of their own puts its
/// certificate and key in the first two files before the first start; the
/// CA makes a root only when both are missing. To move to a root of their
/// own, they put it in the next-root files: the CA then rotates to it. Each file is written to a
/// temporary name and renamed into place; a commit marker makes the set of
/// renames complete even if the process dies halfway through them.
#[derive(Debug, Clone)]
pub struct FileKeyStore {
    dir: PathBuf,
}

impl FileKeyStore {
    /// A store in `dir`, which is made (mode 0700) on the first store.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(&self, name: &str) -> impl Fn(std::io::Error) -> StoreError {
        let path = self.path(name);
        move |source| StoreError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Finishes a store that was interrupted after its files were all
    /// written, or drops the files of one interrupted before.
    fn recover(&self) -> Result<(), StoreError> {
        let committed = self.path(COMMIT_FILE).exists();
        for name in [
            PREVIOUS_ROOTS_FILE,
            NEXT_KEY_FILE,
            NEXT_CERT_FILE,
            ROOT_KEY_FILE,
            ROOT_CERT_FILE,
        ] {
            let new = self.path(&format!("{name}{NEW_SUFFIX}"));
            if !new.exists() {
                continue;
            }
            if committed {
                std::fs::rename(&new, self.path(name)).map_err(self.io(name))?;
            } else {
                std::fs::remove_file(&new).map_err(self.io(name))?;
            }
        }
        if committed {
            std::fs::remove_file(self.path(COMMIT_FILE)).map_err(self.io(COMMIT_FILE))?;
        }
        Ok(())
    }

    fn read(&self, name: &str) -> Result<String, StoreError> {
        std::fs::read_to_string(self.path(name)).map_err(self.io(name))
    }

    /// Writes `name` + [`NEW_SUFFIX`] with `mode`, flushed to disk.
    fn write_new(&self, name: &str, mode: u32, text: &str) -> Result<(), StoreError> {
        let path = self.path(&format!("{name}{NEW_SUFFIX}"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(self.io(name))?;
        // An existing file keeps its mode through `open`; set it again.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(self.io(name))?;
        file.write_all(text.as_bytes()).map_err(self.io(name))?;
        file.sync_all().map_err(self.io(name))
    }

    /// A certificate file and its key file: both, or neither.
    fn pair(
        &self,
        cert: &'static str,
        key: &'static str,
    ) -> Result<Option<(String, String)>, StoreError> {
        match (self.path(cert).exists(), self.path(key).exists()) {
            (false, false) => return Ok(None),
            (true, false) => {
                return Err(StoreError::HalfRoot {
                    dir: self.dir.clone(),
                    present: cert,
                    missing: key,
                });
            }
            (false, true) => {
                return Err(StoreError::HalfRoot {
                    dir: self.dir.clone(),
                    present: key,
                    missing: cert,
                });
            }
            (true, true) => {}
        }
        let key_path = self.path(key);
        if let Ok(meta) = std::fs::metadata(&key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            warn!(
                file = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the CA key is readable by others than its owner; chmod 600 it"
            );
        }
        Ok(Some((self.read(cert)?, self.read(key)?)))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })
    }
}

impl KeyStore for FileKeyStore {
    fn load(&self) -> Result<Option<RootMaterial>, StoreError> {
        if !self.dir.is_dir() {
            return Ok(None);
        }
        self.recover()?;
        let Some((cert_pem, key_pem)) = self.pair(ROOT_CERT_FILE, ROOT_KEY_FILE)? else {
            return Ok(None);
        };
        let next = self
            .pair(NEXT_CERT_FILE, NEXT_KEY_FILE)?
            .map(|(cert_pem, key_pem)| NextRoot { cert_pem, key_pem });
        let previous = if self.path(PREVIOUS_ROOTS_FILE).exists() {
            let text = self.read(PREVIOUS_ROOTS_FILE)?;
            parse_previous(&text).map_err(|reason| StoreError::Previous {
                path: self.path(PREVIOUS_ROOTS_FILE),
                reason,
            })?
        } else {
            Vec::new()
        };
        Ok(Some(RootMaterial {
            cert_pem,
            key_pem,
            next,
            previous,
        }))
    }

    fn store(&self, material: &RootMaterial) -> Result<(), StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })?;
        // Leftovers of an interrupted store must not be committed with
        // this one.
        self.recover()?;
        let previous =
            format_previous(&material.previous).map_err(|reason| StoreError::Previous {
                path: self.path(PREVIOUS_ROOTS_FILE),
                reason,
            })?;
        self.write_new(PREVIOUS_ROOTS_FILE, 0o644, &previous)?;
        if let Some(next) = &material.next {
            self.write_new(NEXT_KEY_FILE, 0o600, &next.key_pem)?;
            self.write_new(NEXT_CERT_FILE, 0o644, &next.cert_pem)?;
        }
        self.write_new(ROOT_KEY_FILE, 0o600, &material.key_pem)?;
        self.write_new(ROOT_CERT_FILE, 0o644, &material.cert_pem)?;
        self.sync_dir()?;
        std::fs::File::create(self.path(COMMIT_FILE)).map_err(self.io(COMMIT_FILE))?;
        self.sync_dir()?;
        self.recover()?;
        // After a promotion the next root is the signer: its files go.
        // Dying before this leaves it there twice, which a load ignores.
        if material.next.is_none() {
            for name in [NEXT_CERT_FILE, NEXT_KEY_FILE] {
                match std::fs::remove_file(self.path(name)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(self.io(name)(e));
                    }
                    _ => {}
                }
            }
        }
        self.sync_dir()
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// The layout of [`PREVIOUS_ROOTS_FILE`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PreviousRoots {
    previous_roots: Vec<PreviousRoot>,
}

/// The text of [`PREVIOUS_ROOTS_FILE`] listing `previous`.
pub(super) fn format_previous(previous: &[PreviousRoot]) -> Result<String, String> {
    serde_yaml::to_string(&PreviousRoots {
        previous_roots: previous.to_vec(),
    })
    .map_err(|e| e.to_string())
}

/// `previous` from the text of [`PREVIOUS_ROOTS_FILE`].
pub(super) fn parse_previous(text: &str) -> Result<Vec<PreviousRoot>, String> {
    serde_yaml::from_str::<PreviousRoots>(text)
        .map(|p| p.previous_roots)
        .map_err(|e| match e.location() {
            Some(at) => format!("line {}: {e}", at.line()),
            None => e.to_string(),
        })
}

/// Roots in memory, for tests and for a control plane that need not keep
/// its root across restarts. Clones share the material, so a test can
/// open a second CA on the same store as a restart would.
#[derive(Debug, Clone, Default)]
pub struct MemoryKeyStore {
    material: Arc<Mutex<Option<RootMaterial>>>,
}

impl MemoryKeyStore {
    /// What is stored.
    pub fn material(&self) -> Option<RootMaterial> {
        // Only whole values are ever stored, so a poisoned lock holds one.
        self.material
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl KeyStore for MemoryKeyStore {
    fn load(&self) -> Result<Option<RootMaterial>, StoreError> {
        Ok(self.material())
    }

    fn store(&self, material: &RootMaterial) -> Result<(), StoreError> {
        *self.material.lock().unwrap_or_else(PoisonError::into_inner) = Some(material.clone());
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// RFC 3339 times in whole seconds, so the file reads well.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 time such as 2030-01-01T00:00:00Z: {e}"
            ))
        })
    }
}
