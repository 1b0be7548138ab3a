//! Listeners: bind, accept, and follow config changes.
//!
//! Listeners are reconciled against every new config: a listener whose spec
//! is unchanged keeps its socket, a new one is bound, and a removed or
//! changed one stops accepting while its open connections run on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::{Direction, Listener, ListenerMode, Protocol};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::Shared;
use crate::conn::{Conn, original_dst};

/// A listener's settings, shared by its connections.
#[derive(Debug)]
pub struct ListenerInfo {
    /// Listener name.
    pub name: Arc<str>,
    /// Outbound or inbound.
    pub direction: Direction,
    /// How destinations are found.
    pub mode: ListenerMode,
    /// Target service of a fixed listener.
    pub target: Option<String>,
    /// Declared protocol, or `Auto`.
    pub protocol: Protocol,
    /// Protocol detection timeout.
    pub detect_timeout: Duration,
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr} for listener {name:?}: {source}; is another process using the port?"
)]
pub struct BindError {
    name: String,
    addr: SocketAddr,
    source: std::io::Error,
}

/// The running listeners, by name.
#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    spec: Listener,
    local: SocketAddr,
    stop: CancellationToken,
}

impl ListenerInfo {
    fn new(l: &Listener) -> Self {
        Self {
            name: Arc::from(l.name.as_str()),
            direction: l.direction,
            mode: l.mode,
            target: l.target.clone(),
            protocol: l.protocol,
            detect_timeout: Duration::from_millis(l.detect_timeout_ms),
        }
    }

    /// True for outbound listeners.
    pub fn is_outbound(&self) -> bool {
        self.direction == Direction::Outbound
    }

    /// The `direction` metric label.
    pub fn direction_label(&self) -> &'static str {
        match self.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

impl Listeners {
    /// Makes the running listeners match `specs`. Binds all new listeners
    /// before stopping any old one; on a bind error nothing changes.
    pub async fn reconcile(
        &self,
        shared: &Arc<Shared>,
        specs: &[Listener],
    ) -> Result<(), BindError> {
        let unchanged = |l: &Listener| {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.get(&l.name).is_some_and(|r| r.spec == *l)
        };
        let mut bound = Vec::new();
        for spec in specs.iter().filter(|l| !unchanged(l)) {
            let listener = TcpListener::bind(spec.address)
                .await
                .map_err(|source| BindError {
                    name: spec.name.clone(),
                    addr: spec.address,
                    source,
                })?;
            bound.push((spec.clone(), listener));
        }
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|name, r| {
            let keep = specs.iter().any(|l| l.name == *name && l == &r.spec);
            if !keep {
                info!(listener = %name, addr = %r.local, "listener stopped");
                r.stop.cancel();
            }
            keep
        });
        for (spec, listener) in bound {
            let local = listener.local_addr().unwrap_or(spec.address);
            let stop = shared.drain.child_token();
            info!(listener = %spec.name, addr = %local, mode = ?spec.mode, direction = ?spec.direction, "listening");
            let info = Arc::new(ListenerInfo::new(&spec));
            let span = info_span!("listener", name = %spec.name);
            shared
                .tasks
                .spawn(accept(shared.clone(), info, listener, stop.clone()).instrument(span));
            running.insert(spec.name.clone(), Running { spec, local, stop });
        }
        Ok(())
    }

    /// The bound address of listener `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get(name).map(|r| r.local)
    }
}

async fn accept(
    shared: Arc<Shared>,
    info: Arc<ListenerInfo>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // Small request/response exchanges must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let orig_dst = match info.mode {
            ListenerMode::Transparent => original_dst(&stream),
            _ => None,
        };
        let conn = Arc::new(Conn {
            shared: shared.clone(),
            listener: info.clone(),
            peer,
            orig_dst,
            peer_identity: None,
        });
        shared.tasks.spawn(conn.run(stream));
    }
}
