//! The admin (15000), Prometheus (15020) and health (15021) servers.
//!
//! - admin, on localhost: `GET /config_dump` (the applied config as JSON
//!   with its version), `GET /logging` and `POST /logging?level=FILTER`;
//! - metrics: `GET /metrics` in Prometheus text format;
//! - health: `GET /healthz/live` and `GET /healthz/ready` (503 while
//!   draining, or before the first config from the control plane), and
//!   `GET /app-health/<container>/<probe>`, the app's own probes run from
//!   inside the pod for kubelet ([`crate::probe`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::probe::{self, AppProbes};
use crate::settings::Settings;
use crate::{Error, Proxy};

/// Changes the log filter; returns the new filter or why it was refused.
pub type LogReload = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

static LOG_RELOAD: OnceLock<LogReload> = OnceLock::new();

/// Registers the process's log-level switch for `/logging` (once, from
/// `main`; tests have none).
pub fn set_log_reload(f: LogReload) {
    let _ = LOG_RELOAD.set(f);
}

/// The bound admin, metrics and health listeners.
pub struct Servers {
    /// Admin address.
    pub admin_addr: SocketAddr,
    /// Metrics address.
    pub metrics_addr: SocketAddr,
    /// Health address.
    pub health_addr: SocketAddr,
    listeners: std::sync::Mutex<Option<[TcpListener; 3]>>,
    app_probes: Arc<AppProbes>,
}

type Reply = Response<Full<Bytes>>;

impl Servers {
    /// Binds the three ports.
    pub async fn bind(s: &Settings) -> Result<Self, Error> {
        let app_probes = match &s.app_probes {
            Some(json) => AppProbes::parse(json, s.pod_ip)?,
            None => AppProbes::default(),
        };
        if !app_probes.is_empty() {
            info!(
                probes = app_probes.len(),
                "running the app's probes for kubelet"
            );
        }
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::AdminBind { what, addr, source })
        };
        let admin = bind("admin", s.admin_addr).await?;
        let metrics = bind("metrics", s.metrics_addr).await?;
        let health = bind("health", s.health_addr).await?;
        let addr = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        Ok(Self {
            admin_addr: addr(&admin, s.admin_addr),
            metrics_addr: addr(&metrics, s.metrics_addr),
            health_addr: addr(&health, s.health_addr),
            listeners: std::sync::Mutex::new(Some([admin, metrics, health])),
            app_probes: Arc::new(app_probes),
        })
    }

    /// Starts serving; call once.
    pub fn spawn(&self, proxy: Arc<Proxy>, recorder: PrometheusHandle) {
        let taken = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some([admin, metrics, health]) = taken else {
            return;
        };
        let p = proxy.clone();
        tokio::spawn(serve(admin, move |req| admin_route(&p, req)));
        tokio::spawn(serve(metrics, move |req| {
            std::future::ready(match req.uri().path() {
                "/metrics" | "/stats/prometheus" => reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    recorder.render(),
                ),
                _ => not_found(),
            })
        }));
        let probes = self.app_probes.clone();
        tokio::spawn(serve(health, move |req| {
            let proxy = proxy.clone();
            let probes = probes.clone();
            async move {
                let path = req.uri().path();
                match path {
                    "/healthz/live" => text(StatusCode::OK, "live"),
                    "/healthz/ready" => match proxy.readiness() {
                        Ok(()) => text(StatusCode::OK, "ready"),
                        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
                    },
                    _ if path.starts_with(probe::PREFIX) => match probes.run(path).await {
                        Some(Ok(seen)) => text(StatusCode::OK, &seen),
                        Some(Err(why)) => {
                            debug!(probe = path, %why, "app probe failed");
                            text(StatusCode::SERVICE_UNAVAILABLE, &why)
                        }
                        None => text(StatusCode::NOT_FOUND, "no app probe at this path"),
                    },
                    _ => not_found(),
                }
            }
        }));
    }
}

fn admin_route(proxy: &Proxy, req: Request<Incoming>) -> std::future::Ready<Reply> {
    let r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let snap = proxy.snapshot();
            let dump = serde_json::json!({
                "version": snap.version,
                "config": &*snap.config,
                "ejected": snap.ejected(),
            });
            match serde_json::to_string_pretty(&dump) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/logging") => text(StatusCode::OK, "POST /logging?level=FILTER to change"),
        (&Method::POST, "/logging") => {
            let level = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "level")
                    .map(|(_, v)| v.into_owned())
            });
            match (level, LOG_RELOAD.get()) {
                (None, _) => text(StatusCode::BAD_REQUEST, "missing ?level=FILTER"),
                (_, None) => text(
                    StatusCode::NOT_IMPLEMENTED,
                    "no log control in this process",
                ),
                (Some(l), Some(f)) => match f(&l) {
                    Ok(now) => text(StatusCode::OK, &format!("log filter is now {now}")),
                    Err(e) => text(StatusCode::BAD_REQUEST, &e),
                },
            }
        }
        _ => not_found(),
    };
    std::future::ready(r)
}

async fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
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

fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "not found")
}
