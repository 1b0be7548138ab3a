//! Root rotation with no manual step. Every few seconds each replica
//! re-reads the CA's key store (so a follower takes the leader's steps,
//! and an operator's root) and keeps its proxies' trust bundle equal to
//! the CA's. The leader also moves a rotation on:
//!
//! 1. when the signing root has used `--root-rotate-at` of its lifetime
//!    (80 % by default), or a rotation was asked for (`meshctl ca rotate`,
//!    `POST /ca/rotate`), it makes the next root, which joins the trust
//!    bundle but signs nothing ([`Ca::prepare`]);
//! 2. once every proxy on every replica has ACKed the bundle that holds
//!    it (a [`Gate`] asks them), the next root becomes the signer, and
//!    proxies get certificates from it as they renew ([`Ca::promote`]);
//! 3. the old root leaves the bundle when every certificate it signed has
//!    expired: after the longest certificate lifetime and a margin.
//!
//! So no proxy is ever shown a certificate from a root it does not trust,
//! and no request fails for a rotation. This module does not know where
//! the replicas are: the local mode's [`LocalGate`] asks this process's
//! proxies, the Kubernetes source's gate every replica's `/debug/ca`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::ca::{Ca, CaError, CaStatus, RootInfo, root_info};
use crate::discovery::{BundleHolders, Server};

/// How often the store is re-read and a rotation moved on.
pub const TICK: Duration = Duration::from_secs(5);
/// The part of its lifetime after which a root is rotated, by default.
pub const DEFAULT_ROTATE_AT: f64 = 0.8;

/// What one replica says about its CA and its proxies: `GET /debug/ca`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The replica (its pod's name, or `local`).
    pub replica: String,
    /// Whether it leads, and so moves rotations on.
    pub leader: bool,
    /// Its roots.
    pub ca: CaStatus,
    /// The serials of the roots in the trust bundle it sends its proxies.
    pub bundle: Vec<String>,
    /// Its proxies, and those that have not applied that bundle.
    pub proxies: BundleHolders,
    /// On the leader during a rotation: why the next root does not sign
    /// yet.
    pub waiting: Option<String>,
}

impl Report {
    /// Why this replica keeps the next root `serial` from signing, if it
    /// does: it does not serve it yet, or a proxy has not applied it.
    pub fn blocks(&self, serial: &str) -> Option<String> {
        if !self.bundle.iter().any(|s| s == serial) {
            return Some(format!(
                "replica {} does not serve the next root yet",
                self.replica
            ));
        }
        let behind = &self.proxies.behind;
        (!behind.is_empty()).then(|| {
            let some: Vec<&str> = behind.iter().take(5).map(String::as_str).collect();
            format!(
                "{} of the {} proxies of replica {} have not applied the bundle with the next root: {}{}",
                behind.len(),
                self.proxies.connected,
                self.replica,
                some.join(", "),
                if behind.len() > some.len() { ", ..." } else { "" }
            )
        })
    }
}

/// Tells whether every proxy trusts the next root.
pub trait Gate: Send + Sync + 'static {
    /// `Ok` when every proxy the mesh knows has applied a trust bundle
    /// holding the root `serial`; otherwise why not.
    fn check(&self, serial: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// The gate of a single control plane: its own proxies.
pub struct LocalGate {
    rotation: Rotation,
}

impl LocalGate {
    /// Asks `rotation`'s own proxies.
    pub fn new(rotation: Rotation) -> Self {
        Self { rotation }
    }
}

impl Gate for LocalGate {
    async fn check(&self, serial: &str) -> Result<(), String> {
        match self.rotation.report().blocks(serial) {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }
}

/// The rotation state of one replica, shared by its driver and its
/// `/debug/ca`.
#[derive(Clone)]
pub struct Rotation {
    ca: Arc<Ca>,
    server: Server,
    replica: String,
    leader: Arc<dyn Fn() -> bool + Send + Sync>,
    rotate_at: f64,
    waiting: Arc<Mutex<Option<String>>>,
}

impl Rotation {
    /// The rotation of `ca`'s roots for `server`'s proxies, by the replica
    /// named `replica`, which leads when `leader` says so; roots rotate at
    /// `rotate_at` (a fraction) of their lifetime.
    pub fn new(
        ca: Arc<Ca>,
        server: Server,
        replica: impl Into<String>,
        leader: impl Fn() -> bool + Send + Sync + 'static,
        rotate_at: f64,
    ) -> Self {
        Self {
            ca,
            server,
            replica: replica.into(),
            leader: Arc::new(leader),
            rotate_at,
            waiting: Arc::default(),
        }
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// This replica's report.
    pub fn report(&self) -> Report {
        self.report_at(SystemTime::now())
    }

    /// [`Rotation::report`] at `now`.
    pub fn report_at(&self, now: SystemTime) -> Report {
        let bundle = self.server.read(|index| {
            index
                .trust_bundle()
                .iter()
                .map(|pem| root_info(pem).map_or_else(|e| format!("unparsable: {e}"), |i| i.serial))
                .collect()
        });
        Report {
            replica: self.replica.clone(),
            leader: (self.leader)(),
            ca: self.ca.status_at(now),
            bundle,
            proxies: self.server.trust_bundle_holders(),
            waiting: self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Starts a rotation now (`POST /ca/rotate`): the next root joins the
    /// bundle at once; the leader's driver makes it sign when every proxy
    /// holds it. Returns the next root.
    pub fn start(&self) -> Result<RootInfo, CaError> {
        let next = self.ca.prepare()?;
        self.publish();
        Ok(next)
    }

    /// Runs forever, a step every [`TICK`].
    pub async fn drive(self, gate: impl Gate) {
        loop {
            tokio::time::sleep(TICK).await;
            self.step(&gate, SystemTime::now()).await;
        }
    }

    /// One round: reload, move a rotation on if leading, publish the
    /// bundle.
    pub async fn step(&self, gate: &impl Gate, now: SystemTime) {
        if let Err(e) = self.ca.reload_at(now) {
            warn!(error = %e, "cannot re-read the CA's roots; keeping those in use");
        }
        if (self.leader)() {
            self.lead(gate, now).await;
        } else {
            self.set_waiting(None);
        }
        self.publish_at(now);
    }

    async fn lead(&self, gate: &impl Gate, now: SystemTime) {
        let Some(next) = self.ca.next_root() else {
            self.set_waiting(None);
            let why = match self.ca.rotation_requested() {
                Some(asked) => Some(format!("a rotation was asked for ({asked})")),
                None => self.ca.rotation_due_at(self.rotate_at, now).then(|| {
                    format!(
                        "the root has used {:.0}% of its lifetime",
                        self.rotate_at * 100.0
                    )
                }),
            };
            if let Some(why) = why {
                match self.ca.prepare_at(now) {
                    Ok(next) => info!(%why, next = %next.serial, "CA root rotation started"),
                    Err(e) => {
                        warn!(%why, error = %e, "cannot start the CA root rotation; retrying")
                    }
                }
            }
            return;
        };
        // This replica serves the next root before any replica is asked.
        self.publish_at(now);
        match gate.check(&next.serial).await {
            Ok(()) => match self.ca.promote_at(now) {
                Ok(root) => {
                    self.set_waiting(None);
                    info!(serial = %root.serial, "every proxy holds the next root: it signs now");
                }
                Err(e) => warn!(error = %e, "cannot make the next root the signer; retrying"),
            },
            Err(why) => self.set_waiting(Some(why)),
        }
    }

    fn set_waiting(&self, why: Option<String>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if *waiting != why {
            if let Some(why) = &why {
                info!(%why, "the next CA root does not sign yet");
            }
            *waiting = why;
        }
    }

    fn publish(&self) {
        self.publish_at(SystemTime::now());
    }

    /// The CA's bundle at `now` into the index (an unchanged bundle pushes
    /// nothing).
    fn publish_at(&self, now: SystemTime) {
        let bundle = self.ca.trust_bundle_pem_at(now);
        self.server.update(|index| index.set_trust_bundle(bundle));
    }
}

/// `80%` or `0.8` as a fraction strictly between 0 and 1.
pub fn parse_rotate_at(text: &str) -> Result<f64, String> {
    let value = match text.trim().strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.trim().parse::<f64>(),
    }
    .map_err(|e| format!("{text:?} is not a percentage such as 80%: {e}"))?;
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(format!(
            "{text:?}: a root must rotate after some of its lifetime and before its end: between 0% and 100%, such as 80%"
        ))
    }
}

#[cfg(test)]
mod tests;
