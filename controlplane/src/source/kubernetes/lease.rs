//! Leadership among the control plane's replicas: a
//! `coordination.k8s.io/v1` Lease ([`LEASE_NAME`] in the control plane's
//! namespace). Every replica watches, indexes, serves discovery and signs;
//! only the holder of the Lease writes status and Events, so that two
//! replicas never argue over an object.
//!
//! The holder renews the Lease every third of its duration. Another
//! replica takes it over when its record has not changed for a whole
//! duration, measured on its own clock from when it saw the record change
//! (as client-go does), so that clock skew between nodes does not matter.
//! Every write carries the resourceVersion it read: of two replicas that
//! try at once, one gets a conflict and stays a follower. A holder that
//! cannot renew for a whole duration stops leading before another replica
//! may take over. On shutdown the holder releases the Lease, so that the
//! other replica takes over at its next check instead of after a
//! duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ca::MANAGED_BY_LABEL;

/// The Lease the replicas compete for.
pub const LEASE_NAME: &str = "trellis-controlplane-leader";
/// How long a Lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a follower checks the Lease.
const RETRY: Duration = Duration::from_secs(2);
/// How long giving the Lease up on shutdown may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether this replica leads. Cheap to clone and to read.
#[derive(Debug, Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// This replica holds the Lease.
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// A leadership that no Lease changes, for tests.
    #[cfg(test)]
    pub(crate) fn fixed(leader: bool) -> Self {
        Self(Arc::new(AtomicBool::new(leader)))
    }

    pub(crate) fn set(&self, leader: bool) -> bool {
        self.0.swap(leader, Ordering::AcqRel)
    }
}

/// The Lease as one replica sees it, and since when it has not changed.
struct Seen {
    holder: Option<String>,
    resource_version: Option<String>,
    renew_time: Option<MicroTime>,
    since: Instant,
}

/// Competes for the Lease as `identity` (the pod's name) until the
/// process ends, keeping `leadership` current.
pub async fn lead(client: Client, namespace: String, identity: String, leadership: Leadership) {
    let api = Api::<Lease>::namespaced(client, &namespace);
    let mut seen: Option<Seen> = None;
    let mut renewed: Option<Instant> = None;
    let mut failing: Option<String> = None;
    loop {
        let outcome = round(&api, &namespace, &identity, &mut seen).await;
        let leads = match outcome {
            Ok(leads) => {
                if failing.take().is_some() {
                    info!(lease = LEASE_NAME, "the Lease is reachable again");
                }
                if leads {
                    renewed = Some(Instant::now());
                }
                leads
            }
            Err(error) => {
                let error = error.to_string();
                if failing.as_ref() != Some(&error) {
                    warn!(lease = LEASE_NAME, %namespace, %error, "cannot read or renew the Lease; retrying");
                    failing = Some(error);
                }
                // Still the leader until the last renewal runs out, a
                // margin before any other replica may take over.
                leadership.is_leader()
                    && renewed.is_some_and(|at| at.elapsed() < LEASE_DURATION - RETRY)
            }
        };
        if leadership.set(leads) != leads {
            match leads {
                true => {
                    info!(lease = LEASE_NAME, %identity, "leading: this replica writes status and events")
                }
                false => {
                    info!(lease = LEASE_NAME, %identity, "following: another replica writes status and events")
                }
            }
        }
        let pause = if leads { LEASE_DURATION / 3 } else { RETRY };
        tokio::time::sleep(pause).await;
    }
}

/// Reads the Lease and renews, takes or leaves it. Returns whether this
/// replica holds it afterwards.
async fn round(
    api: &Api<Lease>,
    namespace: &str,
    identity: &str,
    seen: &mut Option<Seen>,
) -> Result<bool, kube::Error> {
    let Some(lease) = api.get_opt(LEASE_NAME).await? else {
        let lease = record(None, identity, 0, namespace, None);
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let now = Instant::now();
    let changed = seen.as_ref().is_none_or(|s| {
        s.holder != spec.holder_identity
            || s.renew_time != spec.renew_time
            || s.resource_version != lease.metadata.resource_version
    });
    if changed {
        *seen = Some(Seen {
            holder: spec.holder_identity.clone(),
            resource_version: lease.metadata.resource_version.clone(),
            renew_time: spec.renew_time.clone(),
            since: now,
        });
    }
    let since = seen.as_ref().map_or(now, |s| s.since);
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(LEASE_DURATION, Duration::from_secs);
    let mine = holder == Some(identity);
    if !mine && holder.is_some() && now.duration_since(since) < duration {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    let acquired = if mine { spec.acquire_time } else { None };
    let next = record(Some(&lease), identity, transitions, namespace, acquired);
    match api.replace(LEASE_NAME, &PostParams::default(), &next).await {
        Ok(_) => {
            if !mine {
                info!(
                    lease = LEASE_NAME,
                    previous = holder.unwrap_or("nobody"),
                    "took over the Lease"
                );
            }
            Ok(true)
        }
        // Another replica wrote first; its record is read next round.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The Lease held by `identity`, renewed now and acquired at `acquired`
/// (else now), replacing `current` (its resourceVersion guards the
/// write).
fn record(
    current: Option<&Lease>,
    identity: &str,
    transitions: i32,
    namespace: &str,
    acquired: Option<MicroTime>,
) -> Lease {
    let now = MicroTime(Timestamp::now());
    let metadata = match current {
        Some(lease) => lease.metadata.clone(),
        None => ObjectMeta {
            name: Some(LEASE_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_BY_LABEL.to_owned(), "trellis".to_owned())].into()),
            ..Default::default()
        },
    };
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }),
    }
}

/// Gives the Lease up if this replica holds it, so that another takes
/// over at once. Best effort, and bounded so as not to hold up the
/// shutdown: at worst the Lease runs out.
pub async fn release(client: Client, namespace: &str, identity: &str, leadership: &Leadership) {
    if !leadership.set(false) {
        return;
    }
    let give_up = give_up(client, namespace, identity);
    if tokio::time::timeout(RELEASE_TIMEOUT, give_up)
        .await
        .is_err()
    {
        warn!(
            lease = LEASE_NAME,
            "the API server did not answer in time; the Lease runs out in {}s",
            LEASE_DURATION.as_secs()
        );
    }
}

async fn give_up(client: Client, namespace: &str, identity: &str) {
    let api = Api::<Lease>::namespaced(client, namespace);
    let Ok(Some(mut lease)) = api.get_opt(LEASE_NAME).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(lease = LEASE_NAME, "released the Lease"),
        Err(error) => {
            warn!(lease = LEASE_NAME, %error, "cannot release the Lease; it runs out in {}s", LEASE_DURATION.as_secs())
        }
    }
}
