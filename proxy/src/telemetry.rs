//! Golden-signal metrics and access logs.
//!
//! Metrics go through the `metrics` facade into a Prometheus recorder that is
//! installed once per process. Looking up a labelled metric in the recorder
//! hashes and allocates its key, which is too slow for every request, so
//! request metrics are cached here by label set and recorded through
//! handles.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests handled, by the full label set.
pub const REQUESTS_TOTAL: &str = "trellis_requests_total";
/// Request duration from the first request byte to the last response byte.
pub const REQUEST_DURATION: &str = "trellis_request_duration_seconds";
/// Request body size in bytes.
pub const REQUEST_BYTES: &str = "trellis_request_bytes";
/// Response body size in bytes.
pub const RESPONSE_BYTES: &str = "trellis_response_bytes";
/// Opaque TCP connections opened.
pub const TCP_OPENED: &str = "trellis_tcp_connections_opened_total";
/// Opaque TCP connections closed.
pub const TCP_CLOSED: &str = "trellis_tcp_connections_closed_total";
/// Bytes sent by the client of an opaque TCP connection.
pub const TCP_SENT: &str = "trellis_tcp_sent_bytes_total";
/// Bytes sent back to the client of an opaque TCP connection.
pub const TCP_RECEIVED: &str = "trellis_tcp_received_bytes_total";
/// Config versions applied or refused.
pub const CONFIG_UPDATES: &str = "trellis_config_updates_total";
/// Downstream connections accepted, by listener and detected protocol.
pub const CONNECTIONS: &str = "trellis_downstream_connections_total";

/// `response_flags`: the upstream did not answer in time (a route's
/// request or backend timeout, or a gRPC deadline). Envoy's letters.
pub const FLAG_UPSTREAM_TIMEOUT: &str = "UT";
/// `response_flags`: no route of the service matched the request.
pub const FLAG_NO_ROUTE: &str = "NR";
/// `response_flags`: the connection to the upstream failed.
pub const FLAG_UPSTREAM_FAILURE: &str = "UF";
/// `response_flags`: a circuit-breaker limit refused the request.
pub const FLAG_OVERFLOW: &str = "UO";
/// `response_flags`: the backend had no endpoint to send to.
pub const FLAG_NO_HEALTHY_UPSTREAM: &str = "UH";
/// `response_flags`: an HTTPFault delayed the request.
pub const FLAG_DELAY_INJECTED: &str = "DI";
/// `response_flags`: an HTTPFault aborted the request.
pub const FLAG_FAULT_INJECTED: &str = "FI";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SIZE_BUCKETS: &[f64] = &[
    0.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("unknown"));
static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

/// The label value for a peer the proxy cannot identify, shared so that
/// requests do not allocate it.
pub fn unknown() -> Arc<str> {
    UNKNOWN.clone()
}

/// The empty label value, shared.
pub fn empty() -> Arc<str> {
    EMPTY.clone()
}

/// Installs the process-wide Prometheus recorder, once, and returns its
/// handle. Later calls return the same handle, so several proxies in one
/// test process share it.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION.into()),
                    DURATION_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Suffix("_bytes".into()),
                        SIZE_BUCKETS,
                    )
                });
            // The bucket lists are constants and not empty, the only way
            // `set_buckets_for_metric` fails.
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// Drains histogram samples into their buckets now and then so memory stays
/// flat between scrapes.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(REQUESTS_TOTAL, "HTTP and gRPC requests handled");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from the request's first byte to the response's last byte"
    );
    describe_histogram!(REQUEST_BYTES, Unit::Bytes, "Request body size");
    describe_histogram!(RESPONSE_BYTES, Unit::Bytes, "Response body size");
    describe_counter!(TCP_OPENED, "Opaque TCP connections opened");
    describe_counter!(TCP_CLOSED, "Opaque TCP connections closed");
    describe_counter!(
        TCP_SENT,
        Unit::Bytes,
        "Bytes from client to server on opaque TCP"
    );
    describe_counter!(
        TCP_RECEIVED,
        Unit::Bytes,
        "Bytes from server to client on opaque TCP"
    );
    describe_counter!(
        CONFIG_UPDATES,
        "Config versions applied (result=ok) or refused"
    );
    describe_gauge!("trellis_build_info", "Proxy version");
    describe_counter!(CONNECTIONS, "Downstream connections accepted");
}

/// The labels of a request that are known before the response: who calls
/// whom over which route. The strings are shared with the config snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dims {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The calling workload.
    pub source_workload: Arc<str>,
    /// The calling workload's namespace.
    pub source_namespace: Arc<str>,
    /// The service addressed.
    pub destination_service: Arc<str>,
    /// The route that matched, or empty.
    pub route: Arc<str>,
    /// Whether the hop was mutual TLS.
    pub tls: bool,
    /// The caller's SPIFFE ID: the mTLS peer's inbound, the proxy's own
    /// outbound; `unknown` without mTLS.
    pub source_principal: Arc<str>,
}

#[derive(PartialEq, Eq, Hash)]
struct Key {
    dims: Dims,
    destination_workload: Arc<str>,
    status: u16,
    grpc_status: Option<u16>,
    flags: &'static str,
}

struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Caches metric handles by label set. The map is hashed with FxHash: the
/// keys are our own label values, so SipHash's flooding resistance buys
/// nothing and costs a visible share of each request.
#[derive(Default)]
pub struct RequestMetrics {
    cache: Mutex<HashMap<Key, Arc<Handles>, rustc_hash::FxBuildHasher>>,
}

impl RequestMetrics {
    fn handles(&self, key: Key) -> Arc<Handles> {
        // A poisoned lock only means another request panicked while holding
        // it; the map itself is always consistent.
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = cache.get(&key) {
            return h.clone();
        }
        let grpc = key.grpc_status.map(|s| s.to_string()).unwrap_or_default();
        let labels = [
            ("direction", key.dims.direction.to_owned()),
            ("source_workload", key.dims.source_workload.to_string()),
            ("source_namespace", key.dims.source_namespace.to_string()),
            (
                "destination_service",
                key.dims.destination_service.to_string(),
            ),
            ("destination_workload", key.destination_workload.to_string()),
            ("route", key.dims.route.to_string()),
            ("response_code", key.status.to_string()),
            ("grpc_status", grpc),
            ("tls", key.dims.tls.to_string()),
            ("source_principal", key.dims.source_principal.to_string()),
            ("response_flags", key.flags.to_owned()),
        ];
        let h = Arc::new(Handles {
            requests: metrics::counter!(REQUESTS_TOTAL, &labels),
            duration: metrics::histogram!(REQUEST_DURATION, &labels),
            request_bytes: metrics::histogram!(REQUEST_BYTES, &labels),
            response_bytes: metrics::histogram!(RESPONSE_BYTES, &labels),
        });
        cache.insert(key, h.clone());
        h
    }
}

/// Fields of the JSON access log that only exist when it is on.
#[derive(Debug)]
pub struct AccessFields {
    /// Request method.
    pub method: http::Method,
    /// Request path and query.
    pub path: String,
    /// Authority or Host.
    pub authority: String,
    /// Downstream peer address.
    pub peer: std::net::SocketAddr,
    /// Protocol version of the downstream request.
    pub version: http::Version,
}

/// One request's telemetry, recorded when it is dropped: at the end of the
/// response body, or earlier if the client goes away.
pub struct RequestRecord {
    start: Instant,
    metrics: Arc<RequestMetrics>,
    dims: Dims,
    /// The workload behind the chosen endpoint.
    pub destination_workload: Arc<str>,
    /// The upstream address, for the access log.
    pub upstream: Option<std::net::SocketAddr>,
    /// Response status.
    pub status: u16,
    /// gRPC status from the trailers (or trailers-only headers).
    pub grpc_status: Option<u16>,
    /// Request body bytes, counted while the body streams upstream.
    pub request_bytes: Arc<AtomicU64>,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Why the proxy answered as it did, Envoy-style (`UT`, `NR`, ...);
    /// empty for a response the upstream gave.
    pub flags: &'static str,
    access: Option<Box<AccessFields>>,
}

impl RequestRecord {
    /// Marks the hop as mutual TLS (the `tls` label).
    pub fn set_tls(&mut self, tls: bool) {
        self.dims.tls = tls;
    }

    /// Starts a record; `access` is `Some` when access logging is on.
    pub fn new(
        metrics: Arc<RequestMetrics>,
        dims: Dims,
        start: Instant,
        access: Option<Box<AccessFields>>,
    ) -> Self {
        Self {
            start,
            metrics,
            dims,
            destination_workload: empty(),
            upstream: None,
            status: 0,
            grpc_status: None,
            request_bytes: Arc::new(AtomicU64::new(0)),
            response_bytes: 0,
            flags: "",
            access,
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let h = self.metrics.handles(Key {
            dims: self.dims.clone(),
            destination_workload: self.destination_workload.clone(),
            status: self.status,
            grpc_status: self.grpc_status,
            flags: self.flags,
        });
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        h.requests.increment(1);
        h.duration.record(elapsed.as_secs_f64());
        h.request_bytes.record(request_bytes as f64);
        h.response_bytes.record(self.response_bytes as f64);
        if let Some(a) = &self.access {
            let line = serde_json::json!({
                "timestamp": humantime_now(),
                "direction": self.dims.direction,
                "method": a.method.as_str(),
                "path": a.path,
                "authority": a.authority,
                "protocol": format!("{:?}", a.version),
                "response_code": self.status,
                "grpc_status": self.grpc_status,
                "response_flags": self.flags,
                "duration_ms": elapsed.as_secs_f64() * 1000.0,
                "bytes_received": request_bytes,
                "bytes_sent": self.response_bytes,
                "downstream_peer": a.peer.to_string(),
                "upstream_host": self.upstream.map(|u| u.to_string()),
                "destination_service": &*self.dims.destination_service,
                "destination_workload": &*self.destination_workload,
                "route": &*self.dims.route,
                "source_workload": &*self.dims.source_workload,
            });
            let mut out = std::io::stdout().lock();
            // An access log line that cannot be written (closed stdout) is
            // dropped; the request itself already completed.
            let _ = writeln!(out, "{line}");
        }
    }
}

fn humantime_now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
