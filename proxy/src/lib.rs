//! `trellis-proxy`: the Trellis data plane.
//!
//! One proxy runs beside each workload (or as a gateway). It accepts
//! connections on its listeners, detects HTTP/1.1, HTTP/2 or opaque TCP,
//! routes HTTP requests with Gateway API semantics, balances them over
//! endpoints with peak-EWMA P2C, and forwards them over pooled upstream
//! connections, recording golden-signal metrics on the way.
//!
//! The config is a [`mesh_api::ProxyConfig`]. It is compiled into a
//! [`snapshot::Snapshot`] and swapped atomically on every update
//! ([`Proxy::update`]); the file source ([`source`]) and, later, the
//! discovery client feed that one entry point.
//!
//! [`start`] is the whole proxy as a library call, used by `main` and by
//! tests.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mesh_api::ProxyConfig;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub mod admin;
pub mod authz;
pub mod balance;
pub mod body;
pub mod conn;
pub mod detect;
pub mod discovery;
pub mod filters;
pub mod http;
pub mod identity;
pub mod init;
pub mod listener;
pub mod pool;
pub mod probe;
pub mod ratelimit;
pub mod resilience;
pub mod route;
pub mod settings;
pub mod snapshot;
pub mod source;
pub mod tcp;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testutil;
pub mod tls;
pub mod wait;

use balance::Endpoint;
use listener::Listeners;
use settings::Settings;
use snapshot::{ServiceEntry, Snapshot};

/// Limits applied to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Upstream TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time a client has to send a complete HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger ones get 431.
    pub max_header_bytes: usize,
    /// How long a request to a service whose config is not loaded yet
    /// waits for it before getting 503.
    pub on_demand_timeout: Duration,
}

/// State shared by all listeners and connections of one proxy.
pub struct Shared {
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// Connection limits.
    pub limits: Limits,
    /// Whether to write JSON access logs.
    pub access_log: bool,
    /// Cached request metric handles.
    pub metrics: Arc<telemetry::RequestMetrics>,
    /// Cancelled when the proxy starts draining.
    pub drain: CancellationToken,
    /// Every listener and connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The workload identity for mutual TLS; without a certificate the
    /// proxy speaks plaintext.
    pub tls: Arc<tls::Tls>,
    passthrough: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
    /// Where requests ask for pending services, once a config source that
    /// loads them on demand is attached ([`Proxy::on_demand`]).
    demand: OnceLock<mpsc::UnboundedSender<String>>,
    /// The request copies in flight.
    pub mirrors: resilience::mirror::Mirrors,
}

impl Shared {
    /// The current config snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The loaded entry of the pending service `svc`: asks the config
    /// source for it (once per entry) and waits, at most the on-demand
    /// timeout, for a snapshot where it is loaded.
    pub async fn load(&self, svc: &ServiceEntry) -> Result<Arc<ServiceEntry>, conn::DestError> {
        let key = svc.key();
        if svc.first_demand()
            && let Some(tx) = self.demand.get()
        {
            // The receiver lives as long as the discovery client.
            let _ = tx.send(key.clone());
        }
        let mut rx = self.snapshot.subscribe();
        let ready = |s: &Arc<Snapshot>| {
            s.service_in(&svc.namespace, &svc.name)
                .is_none_or(|e| !e.pending)
        };
        let waited = self.limits.on_demand_timeout;
        let not_loaded = || conn::DestError::NotLoaded {
            service: key.clone(),
            waited,
        };
        let snap = match tokio::time::timeout(waited, rx.wait_for(ready)).await {
            Ok(Ok(snap)) => snap.clone(),
            // The sender lives in `self`; it cannot be gone.
            Ok(Err(_)) | Err(_) => return Err(not_loaded()),
        };
        snap.service_in(&svc.namespace, &svc.name)
            .cloned()
            .ok_or_else(|| conn::DestError::Removed(key.clone()))
    }

    /// A pooled endpoint for an address outside any backend.
    pub fn passthrough_endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        self.passthrough_endpoint_as(addr, telemetry::empty(), None)
    }

    /// A pooled endpoint for an address outside any backend that is a
    /// mesh workload's: `identity` is what it must prove. An address that
    /// changed hands (a pod IP reused) gets a new endpoint.
    pub fn passthrough_endpoint_as(
        &self,
        addr: SocketAddr,
        workload: Arc<str>,
        identity: Option<Arc<str>>,
    ) -> Arc<Endpoint> {
        let mut map = self.passthrough.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&addr) {
            Some(e) if e.identity == identity => e.clone(),
            _ => {
                let e = Arc::new(Endpoint::new(addr, workload).with_identity(identity));
                map.insert(addr, e.clone());
                e
            }
        }
    }
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Listeners,
    admin: admin::Servers,
    drain_timeout: Duration,
    /// Serializes updates so versions and listener changes apply in order.
    updating: tokio::sync::Mutex<()>,
    config_ready: AtomicBool,
    identity_required: AtomicBool,
}

/// The proxy could not start or apply a config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config breaks a rule.
    #[error(transparent)]
    Config(#[from] mesh_api::ConfigError),
    /// A route could not be compiled.
    #[error(transparent)]
    Route(#[from] route::RouteError),
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    /// The control plane address is not usable.
    #[error(transparent)]
    Discovery(#[from] discovery::AddrError),
    /// A token would go to an unverified control plane.
    #[error(
        "--token-file needs --discovery-roots: the token is sent only over TLS to a control plane whose certificate the proxy verified"
    )]
    TokenWithoutTls,
    /// `TRELLIS_APP_PROBES` cannot be run.
    #[error(transparent)]
    AppProbes(#[from] probe::ProbeConfigError),
    /// An admin, metrics or health port could not bind.
    #[error("cannot listen on {addr} for the {what} server: {source}")]
    AdminBind {
        /// Which server.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Starts a proxy with `config`: binds its listeners and the admin, metrics
/// and health servers, and returns once all are accepting.
pub async fn start(settings: Settings, config: ProxyConfig) -> Result<Arc<Proxy>, Error> {
    config
        .validate()
        .map_err(|e| Error::Config(mesh_api::ConfigError::Invalid(e)))?;
    let recorder = telemetry::recorder();
    let snapshot = Arc::new(Snapshot::build(config, &HashSet::new(), None, 1)?);
    let shared = Arc::new(Shared {
        snapshot: watch::channel(snapshot.clone()).0,
        limits: settings.limits(),
        access_log: settings.access_log,
        metrics: Default::default(),
        drain: CancellationToken::new(),
        tasks: TaskTracker::new(),
        tls: tls::Tls::new(),
        passthrough: Mutex::default(),
        demand: OnceLock::new(),
        mirrors: resilience::mirror::Mirrors::default(),
    });
    let listeners = Listeners::default();
    listeners
        .reconcile(&shared, &snapshot.config.listeners)
        .await?;
    let admin = admin::Servers::bind(&settings).await?;
    let proxy = Arc::new(Proxy {
        shared,
        listeners,
        admin,
        drain_timeout: settings.drain_timeout,
        updating: Default::default(),
        config_ready: AtomicBool::new(true),
        identity_required: AtomicBool::new(false),
    });
    proxy.admin.spawn(proxy.clone(), recorder.clone());
    tokio::spawn(telemetry::upkeep(recorder));
    tokio::spawn(expire_idle(proxy.shared.clone()));
    metrics::counter!(telemetry::CONFIG_UPDATES, "result" => "ok").increment(1);
    info!(version = 1, "config applied");
    Ok(proxy)
}

/// Closes pooled upstream connections past their idle timeout, every
/// [`pool::IDLE_SWEEP`], until the proxy drains.
async fn expire_idle(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(pool::IDLE_SWEEP);
    loop {
        tokio::select! {
            () = shared.drain.cancelled() => return,
            _ = tick.tick() => {}
        }
        shared.snapshot().expire_idle();
        let passthrough: Vec<Arc<Endpoint>> = shared
            .passthrough
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for e in passthrough {
            e.pool.expire_idle();
        }
    }
}

/// Starts a proxy fed by the control plane at `discovery` (`host:port`):
/// `bootstrap` gives its listeners and local services, the discovery
/// client adds the mesh, and with `settings.token_file` the identity
/// client gets and renews its certificate from the CA (readiness waits for
/// it).
pub async fn start_discovered(
    settings: Settings,
    bootstrap: ProxyConfig,
    discovery: &str,
) -> Result<Arc<Proxy>, Error> {
    let node = discovery::node(&settings, &bootstrap);
    if settings.token_file.is_some() && settings.discovery_roots.is_none() {
        return Err(Error::TokenWithoutTls);
    }
    let proxy = start(settings.clone(), bootstrap.clone()).await?;
    let dialer = match &settings.discovery_roots {
        Some(roots) => discovery::Dialer::tls(
            discovery,
            roots,
            settings.discovery_server_name.as_deref(),
            proxy.tls().clone(),
        )?,
        None => {
            warn!("no --discovery-roots: talking to the control plane in plaintext");
            discovery::Dialer::plaintext(discovery)?
        }
    };
    let client = discovery::Client::new(dialer.clone(), node.clone(), bootstrap, proxy.clone())?;
    match &settings.token_file {
        Some(token_file) => {
            let id = identity::spiffe_id(
                &settings.trust_domain,
                &node.namespace,
                &settings.service_account,
            );
            proxy.require_identity();
            let identity =
                identity::Client::new(dialer, token_file.clone(), id, proxy.tls().clone());
            tokio::spawn(identity.run());
        }
        None => warn!("no --token-file: this proxy has no workload identity and speaks plaintext"),
    }
    tokio::spawn(client.run());
    Ok(proxy)
}

impl Proxy {
    /// Applies a new config atomically. Requests in flight finish on the
    /// config they started with; new requests see the new one. An invalid
    /// config is refused and the current one stays.
    pub async fn update(&self, config: ProxyConfig) -> Result<u64, Error> {
        self.update_with_pending(config, &HashSet::new()).await
    }

    /// [`update`](Self::update) for a source that loads services on
    /// demand: the services named in `pending` (`namespace/name`) are known
    /// by address and port only, and a request to one of them waits for
    /// the source to load it.
    pub async fn update_with_pending(
        &self,
        config: ProxyConfig,
        pending: &HashSet<String>,
    ) -> Result<u64, Error> {
        let _serial = self.updating.lock().await;
        let result = self.apply(config, pending).await;
        let label = if result.is_ok() { "ok" } else { "refused" };
        metrics::counter!(telemetry::CONFIG_UPDATES, "result" => label).increment(1);
        match &result {
            Ok(v) => info!(version = v, "config applied"),
            Err(e) => warn!(error = %e, "config refused; keeping the current one"),
        }
        result
    }

    async fn apply(&self, config: ProxyConfig, pending: &HashSet<String>) -> Result<u64, Error> {
        config
            .validate_pending(pending)
            .map_err(|e| Error::Config(mesh_api::ConfigError::Invalid(e)))?;
        let current = self.shared.snapshot();
        let version = current.version + 1;
        let next = Snapshot::build(config, pending, Some(&current), version)?;
        self.listeners
            .reconcile(&self.shared, &next.config.listeners)
            .await?;
        self.shared.snapshot.send_replace(Arc::new(next));
        Ok(version)
    }

    /// Attaches a source that loads services on demand: returns the
    /// channel on which requests name (`namespace/name`) the pending
    /// services they wait for. `None` if one is attached already.
    pub fn on_demand(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.demand.set(tx).ok().map(|()| rx)
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
    }

    /// The bound address of listener `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.local_addr(name)
    }

    /// The admin server's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.admin_addr
    }

    /// The Prometheus metrics server's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.admin.metrics_addr
    }

    /// The health server's address.
    pub fn health_addr(&self) -> SocketAddr {
        self.admin.health_addr
    }

    /// True while the proxy has its config and is not draining.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Ready, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.shared.drain.is_cancelled() {
            Err("draining")
        } else if !self.config_ready.load(Ordering::Relaxed) {
            Err("waiting for the first config from the control plane")
        } else if self.identity_required.load(Ordering::Relaxed) && !self.shared.tls.is_ready() {
            Err("waiting for a workload certificate from the CA")
        } else {
            Ok(())
        }
    }

    /// Makes readiness wait for a workload certificate (and trust bundle):
    /// a proxy with an identity does not take traffic it cannot secure.
    pub fn require_identity(&self) {
        self.identity_required.store(true, Ordering::Relaxed);
    }

    /// The proxy's workload identity (certificate, trust bundle).
    pub fn tls(&self) -> &Arc<tls::Tls> {
        &self.shared.tls
    }

    /// Marks whether the proxy has the config it needs to serve: a
    /// discovery source clears this at start and sets it on the first
    /// service index, so that the pod is not sent traffic before then.
    pub fn set_config_ready(&self, ready: bool) {
        self.config_ready.store(ready, Ordering::Relaxed);
    }

    /// Drains: stops accepting, lets in-flight requests finish (HTTP/1
    /// connections close after their current request, HTTP/2 ones get
    /// GOAWAY), and returns when all connections are done or the drain
    /// timeout passes. Returns whether everything finished in time.
    pub async fn shutdown(&self) -> bool {
        info!(timeout = ?self.drain_timeout, "draining");
        self.shared.drain.cancel();
        self.shared.tasks.close();
        let done = tokio::time::timeout(self.drain_timeout, self.shared.tasks.wait())
            .await
            .is_ok();
        if done {
            info!("drained");
        } else {
            warn!(
                open = self.shared.tasks.len(),
                "drain timeout passed with connections still open"
            );
        }
        done
    }
}
