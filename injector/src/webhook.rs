//! The admission webhook: HTTPS on 15017, AdmissionReview in and out,
//! nothing else. [`inject`] reads a review and wraps what [`mutate`]
//! decided, [`validate`](crate::validate) what mesh-api's checks found;
//! [`serve`] is the server around both.
//!
//! - `POST /inject`: AdmissionReview `admission.k8s.io/v1` or `v1beta1`
//!   (the answer carries the version the server sent). A body that is not
//!   a review, or a review without a request, gets 400 with the reason; a
//!   pod the injector cannot mesh is denied with [`mutate`]'s message,
//!   which `kubectl` shows; anything but a pod CREATE is allowed as is.
//! - `POST /validate`: the same reviews, for `trellis.dev` objects and
//!   mesh routes, answered by [`validate`](crate::validate).
//! - `GET /healthz`: 200 once serving.
//! - `GET /metrics`: Prometheus text, with
//!   `trellis_injector_admissions_total{result}` and
//!   `trellis_injector_admission_duration_seconds`.
//!
//! The serving certificate and key are PEM files, re-read when they change
//! (a rotated Secret reaches the pod's volume within a minute), so a
//! rotation never needs a restart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use kube_core::DynamicObject;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use metrics_exporter_prometheus::PrometheusHandle;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::mutate::{InjectConfig, Outcome, mutate};
use crate::validate::validate;

/// The largest review body read: pods are far smaller (the API server's
/// own object limit is 1.5 MiB, and a review holds one object).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Admissions answered, by `webhook` (`inject`, `validate`) and `result`:
/// `injected`, `skipped`, `allowed` (validated), `denied`, `ignored` (not
/// a pod CREATE, or not an object the mesh reads), `invalid` (not a
/// review).
pub const ADMISSIONS: &str = "trellis_injector_admissions_total";
/// Time from the review's last byte to the answer, in seconds, by
/// `webhook`: a histogram with [`DURATION_BUCKETS`].
pub const ADMISSION_DURATION: &str = "trellis_injector_admission_duration_seconds";
/// The histogram's buckets: an answer takes well under a millisecond, and
/// the API server gives up after `timeoutSeconds` (10).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// A body that is not an AdmissionReview the injector can answer: 400.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview is {0:?}, not admission.k8s.io/v1 or v1beta1")]
    Version(String),
}

/// What an admission came to, for the metrics and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    /// Validated and found good.
    Allowed,
    Skipped,
    Denied,
    Ignored,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Injected => "injected",
            Verdict::Allowed => "allowed",
            Verdict::Skipped => "skipped",
            Verdict::Denied => "denied",
            Verdict::Ignored => "ignored",
        }
    }
}

/// Answers one `/inject` review.
pub fn inject(
    body: &[u8],
    config: &InjectConfig,
) -> Result<(Verdict, AdmissionReview<DynamicObject>), BadReview> {
    let request = read_review(body)?;
    let (verdict, response) = answer(&request, config);
    Ok((verdict, response.into_review()))
}

/// The request of an AdmissionReview `admission.k8s.io/v1` or `v1beta1`.
pub(crate) fn read_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, BadReview> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(BadReview::Json)?;
    let version = review.types.api_version.as_str();
    if version != "admission.k8s.io/v1" && version != "admission.k8s.io/v1beta1" {
        return Err(BadReview::Version(version.to_owned()));
    }
    review.try_into().map_err(|_| BadReview::NoRequest)
}

fn answer(
    request: &AdmissionRequest<DynamicObject>,
    config: &InjectConfig,
) -> (Verdict, AdmissionResponse) {
    let allowed = AdmissionResponse::from(request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    if !is_pod || request.operation != Operation::Create || request.sub_resource.is_some() {
        return (Verdict::Ignored, allowed);
    }
    let who = format!("pod {}", who(request));
    let Some(object) = &request.object else {
        return (
            Verdict::Denied,
            allowed.deny(format!("{who}: the review has no object")),
        );
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(e) => {
            return (
                Verdict::Denied,
                allowed.deny(format!("{who} cannot be read as a Pod: {e}")),
            );
        }
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    match mutate(&pod, &namespace, config) {
        Ok(Outcome::Injected(patch)) => match allowed.clone().with_patch(patch) {
            Ok(r) => {
                info!(%who, "injected");
                (Verdict::Injected, r)
            }
            Err(e) => (
                Verdict::Denied,
                allowed.deny(format!("{who}: the patch cannot be written: {e}")),
            ),
        },
        Ok(Outcome::Skipped(why)) => {
            debug!(%who, %why, "not injected");
            (Verdict::Skipped, allowed)
        }
        Err(e) => {
            warn!(%who, error = %e, "refused");
            (
                Verdict::Denied,
                allowed.deny(format!("trellis-injector cannot mesh {who}: {e}")),
            )
        }
    }
}

/// `namespace/name` of the object under review, with its `generateName`
/// prefix and `*` while it has no name yet.
pub(crate) fn who(request: &AdmissionRequest<DynamicObject>) -> String {
    let name = if request.name.is_empty() {
        request
            .object
            .as_ref()
            .and_then(|o| o.metadata.generate_name.clone())
            .map(|g| format!("{g}*"))
            .unwrap_or_default()
    } else {
        request.name.clone()
    };
    format!("{}/{name}", request.namespace.as_deref().unwrap_or(""))
}

/// The serving certificate, re-read from its files when they change.
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl Certificate {
    /// Reads the PEM chain and PKCS#8/SEC1/RSA key.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let stamp = modified(cert, key);
        let certified = read_certified(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((stamp, certified)),
        }))
    }

    /// Re-reads the files if they changed; a bad new pair is logged once
    /// and the old one kept.
    pub fn reload(&self) {
        let stamp = modified(&self.cert, &self.key);
        let seen = self.current.read().unwrap_or_else(|e| e.into_inner()).0;
        if stamp == seen {
            return;
        }
        match read_certified(&self.cert, &self.key) {
            Ok(certified) => {
                info!(cert = %self.cert.display(), "serving certificate reloaded");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (stamp, certified);
            }
            Err(e) => {
                // Said once per change of the files, not at every check.
                warn!(error = %format!("{e:#}"), "the new serving certificate is unusable; keeping the old one");
                self.current.write().unwrap_or_else(|e| e.into_inner()).0 = stamp;
            }
        }
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The later of the two files' modification times (a Secret volume
/// swaps both with one symlink).
fn modified(cert: &Path, key: &Path) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(cert).max(m(key))
}

fn read_certified(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    use anyhow::Context as _;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key_der, &provider).with_context(|| {
        format!(
            "{} and {} do not make a key pair",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// Serves `/inject`, `/healthz` and `/metrics` on `listener` with the
/// certificate until the task is dropped; fails only if TLS cannot be set
/// up at all.
pub async fn serve(
    listener: TcpListener,
    certificate: Arc<Certificate>,
    config: Arc<InjectConfig>,
    recorder: PrometheusHandle,
) -> anyhow::Result<()> {
    let mut tls =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("no TLS protocol version for the webhook: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let reloader = certificate.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        loop {
            tick.tick().await;
            reloader.reload();
        }
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let config = config.clone();
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let svc = service_fn(move |req| {
                let config = config.clone();
                let recorder = recorder.clone();
                async move { Ok::<_, Infallible>(route(req, &config, &recorder).await) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "connection error");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(
    req: Request<Incoming>,
    config: &InjectConfig,
    recorder: &PrometheusHandle,
) -> Reply {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => review(req, "inject", |body| inject(body, config)).await,
        (&Method::POST, "/validate") => review(req, "validate", validate).await,
        (_, "/inject" | "/validate") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview")
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            recorder.render(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Reads a review's body, answers it with `answer` and counts it under
/// `webhook`.
async fn review(
    req: Request<Incoming>,
    webhook: &'static str,
    answer: impl FnOnce(&[u8]) -> Result<(Verdict, AdmissionReview<DynamicObject>), BadReview>,
) -> Reply {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the review: {e}"),
            );
        }
    };
    let started = Instant::now();
    let answered = answer(&body);
    metrics::histogram!(ADMISSION_DURATION, "webhook" => webhook)
        .record(started.elapsed().as_secs_f64());
    match answered {
        Ok((verdict, review)) => {
            metrics::counter!(ADMISSIONS, "webhook" => webhook, "result" => verdict.label())
                .increment(1);
            match serde_json::to_vec(&review) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        Err(bad) => {
            metrics::counter!(ADMISSIONS, "webhook" => webhook, "result" => "invalid").increment(1);
            warn!(webhook, error = %bad, "bad admission review");
            text(StatusCode::BAD_REQUEST, &bad.to_string())
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn text(status: StatusCode, msg: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

/// The address the webhook listens on by default.
pub const DEFAULT_ADDR: &str = "0.0.0.0:15017";

/// Binds `addr`, naming it on failure.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the webhook: {e}"))
}

#[cfg(test)]
mod tests;
