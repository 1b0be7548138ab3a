//! The control plane process as a library call: the file source watching
//! its directory, the gRPC server (discovery and the CA's identity service
//! on one port), and the metrics and debug server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use notify::Watcher;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::ca::{
    Authenticator, BootstrapTokens, Ca, CaError, FileKeyStore, KeyStore, MemoryKeyStore,
    NoAuthenticator, SecretKeyStore, TokenReviewAuthenticator, TokensError,
};
use crate::discovery::{self, Server};
use crate::identity::IdentityService;
use crate::index::Index;
use crate::rotation::{LocalGate, Rotation};
use crate::serving::{self, ServingCert};
use crate::settings::{CaStore, Settings, SettingsError};
use crate::source::DirSource;
use crate::source::kubernetes::{self, KubeError, Leadership, Readiness, ReplicaGate};

/// The pause after each read of the directory: events meanwhile make one
/// more read, so a burst of writes is read at most once per pause.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often the directory is read regardless of events.
const POLL: Duration = Duration::from_secs(2);

/// A running control plane.
pub struct ControlPlane {
    /// The discovery server.
    pub server: Server,
    /// The certificate authority behind the identity service.
    pub ca: Arc<Ca>,
    /// Where the gRPC server (discovery and identity) listens.
    pub discovery_addr: SocketAddr,
    /// Where the metrics and debug server listens.
    pub admin_addr: SocketAddr,
    /// On Kubernetes, the Lease this replica competes for.
    lease: Option<LeaseHold>,
}

/// The control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A port could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}; is another control plane running?")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The config directory is unusable.
    #[error("config directory {0}: not a directory")]
    NotADirectory(String),
    /// A setting is invalid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The CA could not load or make its root.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The bootstrap tokens file is unusable.
    #[error(transparent)]
    Tokens(#[from] TokensError),
    /// The Kubernetes source could not start.
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
}

/// Opens the CA, binds the servers, reads the config directory once, and
/// serves until the process ends.
pub async fn start(settings: &Settings) -> Result<ControlPlane, StartError> {
    if let Some(dir) = &settings.config_dir
        && !dir.is_dir()
    {
        return Err(StartError::NotADirectory(dir.display().to_string()));
    }
    let client = match settings.kubernetes {
        true => Some(kubernetes::client().await?),
        false => None,
    };
    let ca = Arc::new(open_ca(settings, client.as_ref())?);
    let serving = ServingCert::new(ca.clone(), settings.discovery_names.clone())
        .map_err(|e| SettingsError::Invalid("--discovery-names", e.to_string()))?;
    let authenticator = authenticator(settings, client.as_ref())?;
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let discovery_listener = bind("discovery", settings.discovery_addr).await?;
    let admin_listener = bind("metrics and debug", settings.admin_addr).await?;
    let discovery_addr = discovery_listener
        .local_addr()
        .unwrap_or(settings.discovery_addr);
    let admin_addr = admin_listener.local_addr().unwrap_or(settings.admin_addr);

    let recorder = recorder();
    let config = discovery::Config {
        push_interval: settings.push_interval,
        ..Default::default()
    };
    let mut index = Index::default();
    index.set_trust_domain(ca.trust_domain());
    let _ = index.set_trust_bundle(ca.trust_bundle_pem());
    let server = Server::new(index, config);
    let mut lease = None;
    let rotate_at = settings.root_rotate_at;
    let (readiness, rotation) = match (&settings.config_dir, client) {
        (Some(dir), _) => {
            let mut source = DirSource::new(dir);
            report(&server.update(|index| source.scan(index)));
            tokio::spawn(watch(source, server.clone()));
            let rotation = Rotation::new(ca.clone(), server.clone(), "local", || true, rotate_at);
            tokio::spawn(rotation.clone().drive(LocalGate::new(rotation.clone())));
            (None, rotation)
        }
        (None, Some(client)) => {
            tokio::spawn(kubernetes::publish_trust_bundle(
                client.clone(),
                server.clone(),
            ));
            let (ready, stores) = kubernetes::start(
                client.clone(),
                server.clone(),
                settings
                    .namespace_selector
                    .as_deref()
                    .filter(|s| !s.trim().is_empty()),
            )
            .await?;
            let identity = replica_name();
            let leadership = Leadership::default();
            info!(%identity, lease = %format!("{}/{}", settings.namespace, kubernetes::LEASE_NAME),
                  "competing for the Lease that picks the replica that writes status");
            tokio::spawn(kubernetes::lead(
                client.clone(),
                settings.namespace.clone(),
                identity.clone(),
                leadership.clone(),
            ));
            let writer = kubernetes::ApiWriter::new(client.clone(), identity.clone());
            tokio::spawn(kubernetes::write_status(
                server.clone(),
                stores,
                leadership.clone(),
                writer,
            ));
            let leads = leadership.clone();
            let rotation = Rotation::new(
                ca.clone(),
                server.clone(),
                pod_name(),
                move || leads.is_leader(),
                rotate_at,
            );
            let gate = ReplicaGate::new(
                client.clone(),
                settings.namespace.clone(),
                settings.admin_addr.port(),
            );
            tokio::spawn(rotation.clone().drive(gate));
            lease = Some(LeaseHold {
                client,
                namespace: settings.namespace.clone(),
                identity,
                leadership,
            });
            (Some(ready), rotation)
        }
        (None, None) => unreachable!("clap requires --config-dir or --kubernetes"),
    };
    let identity = IdentityService::new(ca.clone(), authenticator);
    // Discovery and identity share the port: a proxy dials one address.
    let grpc = tonic::transport::Server::builder()
        .add_service(server.service())
        .add_service(identity.clone().service());
    let (tls, plaintext) = (serving.server_config(), settings.plaintext_discovery);
    tokio::spawn(async move {
        if let Err(e) = grpc
            .serve_with_incoming_shutdown(
                serving::incoming(discovery_listener, tls, plaintext),
                std::future::pending(),
            )
            .await
        {
            warn!(error = %e, "gRPC server (discovery, identity) stopped");
        }
    });
    let issuances = identity.issuances();
    tokio::spawn(admin(
        admin_listener,
        server.clone(),
        recorder,
        rotation,
        issuances,
        readiness,
    ));
    let source = match &settings.config_dir {
        Some(dir) => format!("directory {}", dir.display()),
        None => "the Kubernetes API".to_owned(),
    };
    info!(%discovery_addr, %admin_addr, %source,
          trust_domain = %ca.trust_domain(), plaintext_discovery = plaintext,
          "control plane serving");
    Ok(ControlPlane {
        server,
        ca,
        discovery_addr,
        admin_addr,
        lease,
    })
}

/// This process's name in the Lease: the pod's name (`POD_NAME`, else
/// `HOSTNAME`, which Kubernetes sets to it) and a random suffix, as
/// client-go does: a container restarted in the same pod is another
/// process and must not take the Lease its predecessor held for its own.
fn replica_name() -> String {
    format!("{}_{:08x}", pod_name(), rand::random::<u32>())
}

/// The pod's name: `POD_NAME`, else `HOSTNAME`.
fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .into_iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "trellis-controlplane".to_owned())
}

/// What giving up the Lease takes.
struct LeaseHold {
    client: kube::Client,
    namespace: String,
    identity: String,
    leadership: Leadership,
}

impl ControlPlane {
    /// Stops leading, releasing the Lease, so that another replica writes
    /// status at once. The servers stop with the process.
    pub async fn stop(&self) {
        if let Some(l) = &self.lease {
            kubernetes::release(l.client.clone(), &l.namespace, &l.identity, &l.leadership).await;
        }
    }
}

/// The CA on the key store the settings choose.
fn open_ca(settings: &Settings, client: Option<&kube::Client>) -> Result<Ca, StartError> {
    let config = settings.ca_config()?;
    let store: Box<dyn KeyStore> = match (settings.ca_store()?, client) {
        (CaStore::Memory, _) => Box::new(MemoryKeyStore::default()),
        (CaStore::Dir(dir), _) => Box::new(FileKeyStore::new(dir)),
        (CaStore::Secret(namespace, name), Some(client)) => {
            Box::new(SecretKeyStore::new(client.clone(), &namespace, &name).map_err(CaError::from)?)
        }
        (CaStore::Secret(..), None) => unreachable!("a Secret store comes with --kubernetes"),
    };
    info!(
        trust_domain = %config.trust_domain,
        store = %store.describe(),
        cert_ttl = %humantime::format_duration(config.default_ttl),
        cert_max_ttl = %humantime::format_duration(config.max_ttl),
        "opening the CA"
    );
    Ok(Ca::open(config, store)?)
}

/// The bootstrap tokens, else on Kubernetes TokenReviews, else an
/// authenticator that refuses everyone.
fn authenticator(
    settings: &Settings,
    client: Option<&kube::Client>,
) -> Result<Arc<dyn Authenticator>, StartError> {
    if let (None, Some(client)) = (&settings.bootstrap_tokens, client) {
        info!(audience = %settings.token_audience, "proving identities with TokenReviews of service-account tokens");
        return Ok(Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            settings.token_audience.clone(),
        )));
    }
    let Some(path) = &settings.bootstrap_tokens else {
        warn!(
            "no --bootstrap-tokens: the CA refuses every Sign call; pass a tokens file to let proxies get certificates"
        );
        return Ok(Arc::new(NoAuthenticator));
    };
    let tokens = BootstrapTokens::from_file(path)?;
    info!(file = %path.display(), tokens = tokens.len(), "bootstrap tokens loaded");
    Ok(Arc::new(tokens))
}

fn recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                warn!("another metrics recorder is installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Logs what a scan found wrong.
fn report(scan: &crate::source::Scan) {
    for e in &scan.file_errors {
        warn!("{e}; keeping what the file held before");
    }
    for r in &scan.refused {
        warn!("{r}");
    }
}

/// Re-reads the directory when it changes (and every few seconds, in case
/// an event is lost), applying it to the index through the server.
async fn watch(mut source: DirSource, server: Server) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads raise access events; reacting would re-read forever.
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(source.dir(), notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = watcher
        .map_err(|e| warn!(dir = %source.dir().display(), error = %e, "cannot watch; polling only"))
        .ok();
    loop {
        tokio::select! {
            _ = rx.recv() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        // Leading edge: a lone change is read at once. Events during the
        // scan and the pause after it wait in the channel and make one more
        // scan, so a burst costs a scan per DEBOUNCE. A file caught half
        // written keeps its last good objects until that next scan.
        let scan = server.update(|index| source.scan(index));
        // A file is re-read only when it changed, so each refusal is
        // logged once per edit.
        if !scan.changed.services.is_empty()
            || !scan.file_errors.is_empty()
            || !scan.refused.is_empty()
        {
            report(&scan);
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// `GET /debug/identities`: the last certificate issued to each SPIFFE ID.
fn identities(ca: &Ca, issuances: &crate::identity::Issuances) -> Response<Full<Bytes>> {
    json(serde_json::to_string_pretty(
        &issuances.snapshot(ca.trust_domain()),
    ))
}

/// `POST /ca/rotate`: a rotation starts now; the next root joins the
/// trust bundle at once and signs once every proxy holds it.
fn rotate(rotation: &Rotation, query: Option<&str>) -> Response<Full<Bytes>> {
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!(
                "POST /ca/rotate takes no parameters (got {query:?}): the old root stays trusted for --cert-max-ttl and 30 s after the next root signs\n"
            ),
        );
    }
    match rotation.start() {
        Ok(next) => reply(
            StatusCode::OK,
            "text/plain",
            format!(
                "rotation started: the next root {} ({}) is in the trust bundle; it signs once every proxy holds it, and the old root leaves the bundle after the longest certificate lifetime (see GET /debug/ca)\n",
                next.subject, next.serial
            ),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot start a rotation: {e}\n"),
        ),
    }
}

async fn admin(
    listener: TcpListener,
    server: Server,
    recorder: PrometheusHandle,
    rotation: Rotation,
    issuances: Arc<crate::identity::Issuances>,
    readiness: Option<Readiness>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (server, recorder, rotation) = (server.clone(), recorder.clone(), rotation.clone());
        let issuances = issuances.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = if req.uri().path() == "/healthz/ready" {
                    // The file source reads its directory before serving.
                    if readiness.as_ref().is_none_or(Readiness::ready) {
                        reply(StatusCode::OK, "text/plain", "ready\n")
                    } else {
                        reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "not ready: a Kubernetes watcher has not listed its kind yet\n",
                        )
                    }
                } else if req.method() == hyper::Method::POST && req.uri().path() == "/ca/rotate" {
                    // The admin port serves probes and metrics to the
                    // cluster; changing the CA is for the node itself.
                    if peer.ip().is_loopback() {
                        rotate(&rotation, req.uri().query())
                    } else {
                        reply(
                            StatusCode::FORBIDDEN,
                            "text/plain",
                            "POST /ca/rotate is accepted from loopback only: run it in the control plane's pod (kubectl exec, or kubectl port-forward)\n",
                        )
                    }
                } else if req.uri().path() == "/debug/identities" {
                    identities(rotation.ca(), &issuances)
                } else if req.uri().path() == "/debug/ca" {
                    json(serde_json::to_string_pretty(&rotation.report()))
                } else {
                    route(&server, &recorder, &req)
                };
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `GET /debug/proxies`: every proxy's sync state and counts;
/// `?detail=true` adds each subscribed name and resource version, and
/// `?id=NODE` gives one proxy in full.
fn debug_proxies(server: &Server, query: Option<&str>) -> Vec<discovery::ProxyStatus> {
    let mut detail = discovery::Detail::Summary;
    let mut id = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "detail" if value == "true" => detail = discovery::Detail::Full,
            "id" => {
                detail = discovery::Detail::Full;
                id = Some(value.into_owned());
            }
            _ => {}
        }
    }
    server.proxy_statuses(detail, |node| id.as_deref().is_none_or(|id| id == node))
}

fn json(v: serde_json::Result<String>) -> Response<Full<Bytes>> {
    match v {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn route(
    server: &Server,
    recorder: &PrometheusHandle,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            recorder.render(),
        ),
        "/debug/proxies" => json(serde_json::to_string_pretty(&debug_proxies(
            server,
            req.uri().query(),
        ))),
        "/debug/errors" => json(serde_json::to_string_pretty(&server.read(|index| {
            index
                .errors()
                .map(|(kind, key, errors)| {
                    serde_json::json!({
                        "kind": kind,
                        "object": key.to_string(),
                        "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    })
                })
                .collect::<Vec<_>>()
        }))),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}
