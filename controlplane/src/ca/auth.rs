//! Who is asking: an [`Authenticator`] turns the credential a proxy sends
//! (`authorization: Bearer <token>` metadata) into the [`Identity`] it
//! proves. Local mode uses [`BootstrapTokens`] from a file; Kubernetes
//! service-account tokens (TokenReview) come later behind the same trait.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::{Deserialize, Deserializer};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::{Identity, check_name};

/// What [`Authenticator::authenticate`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, Status>> + Send + 'a>>;

/// Proves who a caller is from its request metadata.
///
/// Asynchronous, because checking a Kubernetes token is a call to the API
/// server. Errors are gRPC statuses, `Unauthenticated` for a missing or
/// unknown credential, with a message the caller can act on.
pub trait Authenticator: Send + Sync {
    /// The identity the credential in `metadata` proves.
    fn authenticate<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a>;
}

/// The bearer token of `authorization: Bearer <token>` metadata.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated(
            "no credential: send the workload's token as `authorization: Bearer <token>` metadata",
        )
    })?;
    let value = value.to_str().map_err(|_| {
        Status::unauthenticated("the authorization metadata is not printable ASCII")
    })?;
    // The scheme is case-insensitive (RFC 9110, section 11.1).
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
        })?;
    if token.is_empty() {
        return Err(Status::unauthenticated(
            "the authorization metadata holds an empty bearer token",
        ));
    }
    Ok(token)
}

/// Refuses everyone: the authenticator of a control plane that was given
/// no way to check credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAuthenticator;

impl Authenticator for NoAuthenticator {
    fn authenticate<'a>(&'a self, _: &'a MetadataMap) -> AuthFuture<'a> {
        Box::pin(std::future::ready(Err(Status::unauthenticated(
            "this control plane checks no credentials, so it signs nothing: start it with --bootstrap-tokens FILE (local mode) to let proxies get certificates",
        ))))
    }
}

/// Bootstrap tokens for local mode, each naming the identity it proves.
/// The file is YAML:
///
/// ```yaml
/// tokens:
///   - token: 3f9c1a...        # any printable ASCII without spaces
///     namespace: default
///     serviceAccount: productpage
/// ```
pub struct BootstrapTokens {
    path: PathBuf,
    tokens: Vec<(Vec<u8>, Identity)>,
}

/// A bootstrap tokens file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be read.
    #[error("bootstrap tokens {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It does not parse, or an entry is invalid.
    #[error("bootstrap tokens {path}{}: {reason}", .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, when known.
        line: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// Two entries share a token, so it would prove two identities.
    #[error(
        "bootstrap tokens {path}: tokens[{second}] has the same token as tokens[{first}]; each token must be unique"
    )]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// The first entry's index.
        first: usize,
        /// The repeating entry's index.
        second: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    #[serde(deserialize_with = "token")]
    token: String,
    #[serde(deserialize_with = "namespace")]
    namespace: String,
    #[serde(deserialize_with = "service_account")]
    service_account: String,
}

// Checking while deserializing, rather than after, lets serde_yaml put
// the value's line in the error.
fn token<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let token = String::deserialize(d)?;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(serde::de::Error::custom(
            "a token must be non-empty printable ASCII without spaces",
        ));
    }
    Ok(token)
}

fn namespace<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    check_name("namespace", &name, 63, false).map_err(serde::de::Error::custom)?;
    Ok(name)
}

fn service_account<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    check_name("service account", &name, 253, true).map_err(serde::de::Error::custom)?;
    Ok(name)
}

impl BootstrapTokens {
    /// Reads and checks a tokens file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokensError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a tokens file; `path` names it in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Self, TokensError> {
        let path = path.as_ref().to_path_buf();
        let file: File = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|at| at.line());
            let mut reason = e.to_string();
            if let Some(at) = e.location() {
                reason = reason.replacen(
                    &format!(" at line {} column {}", at.line(), at.column()),
                    "",
                    1,
                );
            }
            TokensError::Parse {
                path: path.clone(),
                line,
                reason,
            }
        })?;
        let mut tokens: Vec<(Vec<u8>, Identity)> = Vec::with_capacity(file.tokens.len());
        for (second, entry) in file.tokens.into_iter().enumerate() {
            if let Some(first) = tokens
                .iter()
                .position(|(t, _)| t.as_slice() == entry.token.as_bytes())
            {
                return Err(TokensError::Duplicate {
                    path,
                    first,
                    second,
                });
            }
            tokens.push((
                entry.token.into_bytes(),
                Identity {
                    namespace: entry.namespace,
                    service_account: entry.service_account,
                },
            ));
        }
        Ok(Self { path, tokens })
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The identity `token` proves. Every token is compared, each in
    /// constant time, so the time taken tells nothing of how much of a
    /// guess was right.
    pub fn identity(&self, token: &str) -> Option<&Identity> {
        let mut found = None;
        for (candidate, identity) in &self.tokens {
            if bool::from(candidate.as_slice().ct_eq(token.as_bytes())) {
                found = Some(identity);
            }
        }
        found
    }
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("path", &self.path)
            .field(
                "identities",
                &self.tokens.iter().map(|(_, id)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        let result = bearer_token(metadata).and_then(|token| {
            self.identity(token).cloned().ok_or_else(|| {
                Status::unauthenticated(format!(
                    "unknown bootstrap token: it is not in {}",
                    self.path.display()
                ))
            })
        });
        Box::pin(std::future::ready(result))
    }
}
