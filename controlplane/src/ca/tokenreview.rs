//! Kubernetes service-account tokens as credentials: the proxy sends its
//! pod's projected token (audience [`DEFAULT_TOKEN_AUDIENCE`]), and a
//! `TokenReview` asks the API server whether it is valid, for that
//! audience, and whose it is. The identity is the token's namespace and
//! service account, and nothing else: a token of another service account,
//! an expired one, one for another audience or one of a deleted pod proves
//! nothing.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::{AuthFuture, Authenticator, Identity, bearer_token};

/// The audience proxies' tokens are projected for. A token for the API
/// server (the default service-account token) is not accepted, so a
/// token stolen from the CA cannot be replayed to the API server, nor the
/// reverse.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "trellis-ca";

/// How long a TokenReview may take before the Sign call fails (the proxy
/// retries).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The prefix of a service account's user name in a TokenReview.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Checks service-account tokens with the API server's TokenReview.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    audience: String,
}

impl TokenReviewAuthenticator {
    /// Reviews tokens through `client`, accepting only those issued for
    /// `audience`.
    pub fn new(client: Client, audience: impl Into<String>) -> Self {
        Self {
            api: Api::all(client),
            audience: audience.into(),
        }
    }

    async fn review(&self, token: &str) -> Result<Identity, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let params = PostParams::default();
        let create = self.api.create(&params, &review);
        let reviewed = match tokio::time::timeout(REVIEW_TIMEOUT, create).await {
            Ok(Ok(reviewed)) => reviewed,
            Ok(Err(kube::Error::Api(e))) if e.code == 403 => {
                return Err(Status::internal(format!(
                    "the control plane may not create TokenReviews ({}): its ClusterRole must allow `create` on tokenreviews.authentication.k8s.io",
                    e.message
                )));
            }
            Ok(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "cannot review the token with the Kubernetes API server: {e}"
                )));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the Kubernetes API server did not review the token within {}s",
                    REVIEW_TIMEOUT.as_secs()
                )));
            }
        };
        identity_of(&reviewed.status.unwrap_or_default(), &self.audience)
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        Box::pin(async move {
            let token = bearer_token(metadata)?;
            self.review(token).await
        })
    }
}

/// The identity a TokenReview's answer proves: an authenticated service
/// account, for `audience`.
pub fn identity_of(status: &TokenReviewStatus, audience: &str) -> Result<Identity, Status> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("no reason given");
        return Err(Status::unauthenticated(format!(
            "the Kubernetes API server does not accept the token for audience {audience:?}: {why} (is it the pod's projected token for that audience, and unexpired?)"
        )));
    }
    // An authenticator that ignores audiences answers with none; such a
    // token may have been meant for anyone.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(Status::unauthenticated(format!(
            "the token is valid, but the API server does not confirm it is meant for audience {audience:?} (it answered {:?}): project the token with `audience: {audience}`",
            status.audiences.as_deref().unwrap_or_default()
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(Status::permission_denied(format!(
            "the token belongs to {username:?}, not a service account: only service-account tokens prove a workload identity"
        )));
    };
    Identity::new(namespace, service_account).map_err(|e| {
        Status::permission_denied(format!(
            "the token's service account {username:?} is not a valid identity: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::Code;

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_service_account_token_for_the_audience_proves_its_namespace_and_account() {
        let s = status(true, &["trellis-ca"], "system:serviceaccount:shop:reviews");
        let identity = identity_of(&s, "trellis-ca").unwrap();
        assert_eq!(identity, Identity::new("shop", "reviews").unwrap());
    }

    #[test]
    fn an_unauthenticated_token_is_refused_with_the_servers_reason() {
        let mut s = status(false, &[], "");
        s.error = Some("token has expired".into());
        let e = identity_of(&s, "trellis-ca").unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("token has expired"), "{}", e.message());
    }

    #[test]
    fn a_token_the_server_does_not_confirm_for_the_audience_is_refused() {
        for audiences in [&[][..], &["https://kubernetes.default.svc"][..]] {
            let s = status(true, audiences, "system:serviceaccount:shop:reviews");
            let e = identity_of(&s, "trellis-ca").unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{audiences:?}");
            assert!(e.message().contains("audience"), "{}", e.message());
        }
    }

    #[test]
    fn a_user_that_is_not_a_service_account_proves_no_workload() {
        for username in ["admin", "system:serviceaccount:shop", "system:node:n1"] {
            let s = status(true, &["trellis-ca"], username);
            let e = identity_of(&s, "trellis-ca").unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{username}");
        }
    }
}
