use std::collections::BTreeMap;

use super::*;
use crate::discovery::{NackStatus, TypeStatus};

fn type_status(sync: SyncState, nack: Option<&str>) -> TypeStatus {
    TypeStatus {
        wildcard: false,
        subscribed: Vec::new(),
        subscribed_count: 0,
        sent: BTreeMap::new(),
        sent_count: 0,
        last_nonce: None,
        acked_nonce: None,
        sync,
        nacks: u64::from(nack.is_some()),
        last_nack: nack.map(|m| NackStatus {
            nonce: "7".into(),
            code: 3,
            message: m.into(),
        }),
    }
}

#[test]
fn nacked_proxy_shows_its_reason() {
    let proxy = ProxyStatus {
        id: "reviews-v2-abc".into(),
        workload: "reviews-v2".into(),
        namespace: "bookinfo".into(),
        service_account: "bookinfo-reviews".into(),
        stream: 3,
        types: BTreeMap::from([
            (
                "ServiceIndex".to_owned(),
                type_status(SyncState::Synced, None),
            ),
            (
                "OutboundService".to_owned(),
                type_status(SyncState::Nacked, Some("route r: invalid regex")),
            ),
        ]),
    };
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let identities = crate::identity::Identities {
        trust_domain: "cluster.local".into(),
        certificates: BTreeMap::from([(
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews".to_owned(),
            crate::identity::IssuedCert {
                serial: "ab".into(),
                expires_unix_seconds: 1_000_000 + 3600 + 61,
            },
        )]),
    };
    let table = proxy_status_table(std::slice::from_ref(&proxy), Some(&identities), now);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PROXY"), "{table}");
    assert!(
        lines[1].starts_with("reviews-v2-abc  bookinfo/reviews-v2  NACKED"),
        "{table}"
    );
    assert!(lines[1].contains("1/2"), "{table}");
    assert!(
        lines[1].ends_with("OutboundService: route r: invalid regex"),
        "{table}"
    );
    assert!(
        lines[1].contains("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews  1h 1m 1s"),
        "{table}"
    );
    // Without CA records the identity is unknown; with no certificate the
    // proxy has none.
    let unknown = proxy_status_table(std::slice::from_ref(&proxy), None, now);
    let row: Vec<&str> = unknown.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5..7], ["?", "?"], "{unknown}");
    let none = proxy_status_table(&[proxy], Some(&crate::identity::Identities::default()), now);
    let row: Vec<&str> = none.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5..7], ["-", "-"], "{none}");
}

#[test]
fn ca_status_shows_the_leaders_roots_the_phase_and_each_replica() {
    use crate::ca::{CaStatus, RootSummary};
    use crate::discovery::BundleHolders;
    let root = |serial: &str| RootSummary {
        serial: serial.into(),
        subject: format!("CN=Trellis root CA cluster.local {serial}"),
        not_after: "2036-12-01T00:00:00Z".into(),
    };
    let ca = CaStatus {
        signer: root("aa01"),
        next: Some(root("bb02")),
        previous: Vec::new(),
    };
    let reports = [
        Report {
            replica: "cp-1".into(),
            leader: false,
            ca: CaStatus::default(),
            bundle: vec!["aa01".into()],
            proxies: BundleHolders {
                connected: 3,
                behind: vec!["ns/a".into()],
            },
            waiting: None,
        },
        Report {
            replica: "cp-0".into(),
            leader: true,
            ca,
            bundle: vec!["aa01".into(), "bb02".into()],
            proxies: BundleHolders {
                connected: 4,
                behind: Vec::new(),
            },
            waiting: Some("replica cp-1 does not serve the next root yet".into()),
        },
    ];
    let out = ca_status_table(&reports);
    let line = |start: &str| {
        out.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start} line in\n{out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        line("signer").starts_with("signer aa01 signs certificates"),
        "{out}"
    );
    assert!(line("next").starts_with("next bb02 trusted;"), "{out}");
    assert!(out.contains("waiting for every proxy"), "{out}");
    assert!(line("waiting:").contains("cp-1 does not serve"), "{out}");
    assert_eq!(line("cp-0"), "cp-0 yes 2 4 0");
    assert_eq!(line("cp-1"), "cp-1 no 1 3 1");
    assert_eq!(ca_status_table(&[]), "no control plane replica answered\n");
}
