#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::ca::{CaConfig, MemoryKeyStore, RETIRE_MARGIN};
use crate::discovery::Config;
use crate::index::Index;

/// A gate that says what the test tells it to.
#[derive(Default)]
struct FakeGate {
    open: AtomicBool,
}

impl Gate for FakeGate {
    async fn check(&self, serial: &str) -> Result<(), String> {
        match self.open.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err(format!("proxy a has not applied {serial}")),
        }
    }
}

fn replica(store: &MemoryKeyStore, leader: bool, now: SystemTime) -> Rotation {
    let ca = Ca::open_at(CaConfig::default(), Box::new(store.clone()), now).unwrap();
    let server = Server::new(Index::default(), Config::default());
    Rotation::new(
        Arc::new(ca),
        server,
        if leader { "a" } else { "b" },
        move || leader,
        0.8,
    )
}

fn served(rotation: &Rotation) -> Vec<String> {
    rotation.report().bundle
}

#[tokio::test]
async fn the_leader_rotates_at_80_percent_once_the_gate_opens_and_the_old_root_retires() {
    let store = MemoryKeyStore::default();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let leader = replica(&store, true, start);
    let follower = replica(&store, false, start);
    let gate = FakeGate::default();
    let old = leader.ca().root();
    let life = old.not_after.duration_since(old.not_before).unwrap();

    // Early in the root's life nothing happens.
    leader.step(&gate, start).await;
    assert!(leader.ca().next_root().is_none());
    assert_eq!(served(&leader), vec![old.serial.clone()]);

    // At 80 % the next root joins the bundle, but the gate is shut.
    let due = old.not_before + life.mul_f64(0.8) + Duration::from_secs(1);
    leader.step(&gate, due).await;
    let next = leader.ca().next_root().expect("a next root");
    assert_eq!(
        leader.ca().root().serial,
        old.serial,
        "the old root still signs"
    );
    assert_eq!(served(&leader), [old.serial.clone(), next.serial.clone()]);
    // The gate is asked from the next round on.
    assert!(leader.report().waiting.is_none());
    leader.step(&gate, due).await;
    let report = leader.report();
    assert!(
        report.waiting.unwrap().contains("has not applied"),
        "{:?}",
        leader.report()
    );
    // The follower takes the step from the store, and never makes one.
    follower.step(&gate, due).await;
    assert_eq!(served(&follower), served(&leader));
    assert!(follower.report().waiting.is_none());

    // The gate opens: the next root signs; the old one stays trusted.
    gate.open.store(true, Ordering::Relaxed);
    leader.step(&gate, due).await;
    assert_eq!(leader.ca().root().serial, next.serial);
    assert!(leader.report().waiting.is_none());
    assert_eq!(served(&leader), [next.serial.clone(), old.serial.clone()]);
    follower.step(&gate, due).await;
    assert_eq!(follower.ca().root().serial, next.serial);

    // After the longest certificate lifetime, only the new root.
    let retired = due + CaConfig::default().max_ttl + RETIRE_MARGIN;
    for r in [&leader, &follower] {
        r.step(&gate, retired).await;
        assert_eq!(served(r), vec![next.serial.clone()]);
        assert!(r.report_at(retired).ca.previous.is_empty());
    }
    // And the new root, young, is not rotated again.
    leader.step(&gate, retired).await;
    assert!(leader.ca().next_root().is_none());
}

#[tokio::test]
async fn a_follower_never_starts_a_rotation_even_when_due() {
    let store = MemoryKeyStore::default();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let follower = replica(&store, false, start);
    let root = follower.ca().root();
    let late = root.not_after - Duration::from_secs(60);
    follower.step(&FakeGate::default(), late).await;
    assert!(follower.ca().next_root().is_none());
    assert_eq!(served(&follower), [root.serial]);
}

#[tokio::test]
async fn a_started_rotation_waits_for_the_gate_and_without_proxies_the_local_gate_is_open() {
    let store = MemoryKeyStore::default();
    let now = SystemTime::now();
    let local = replica(&store, true, now);
    let next = local.start().unwrap();
    assert_eq!(served(&local).len(), 2, "in the bundle at once");
    let gate = LocalGate::new(local.clone());
    // Nobody is connected, so nobody is behind.
    assert_eq!(gate.check(&next.serial).await, Ok(()));
    local.step(&gate, now).await;
    assert_eq!(local.ca().root().serial, next.serial);
}

#[test]
fn a_replica_blocks_when_it_does_not_serve_the_root_or_a_proxy_is_behind() {
    let mut report = Report {
        replica: "cp-0".into(),
        bundle: vec!["aa".into()],
        ..Report::default()
    };
    let e = report.blocks("bb").unwrap();
    assert!(
        e.contains("replica cp-0 does not serve the next root"),
        "{e}"
    );
    report.bundle.push("bb".into());
    assert_eq!(report.blocks("bb"), None);
    report.proxies = BundleHolders {
        connected: 9,
        behind: (0..7).map(|i| format!("ns/pod-{i}")).collect(),
    };
    let e = report.blocks("bb").unwrap();
    assert!(e.starts_with("7 of the 9 proxies of replica cp-0"), "{e}");
    assert!(e.contains("ns/pod-0, ") && e.ends_with(", ..."), "{e}");
}

#[test]
fn rotate_at_is_a_percentage_strictly_inside_the_lifetime() {
    assert_eq!(parse_rotate_at("80%"), Ok(0.8));
    assert_eq!(parse_rotate_at("0.5"), Ok(0.5));
    for bad in ["0%", "100%", "1.5", "eighty"] {
        let e = parse_rotate_at(bad).unwrap_err();
        assert!(e.contains(bad), "{e}");
    }
}
