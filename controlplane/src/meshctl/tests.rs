use std::collections::BTreeMap;

use super::*;
use crate::discovery::{NackStatus, TypeStatus};

fn type_status(sync: SyncState, nack: Option<&str>) -> TypeStatus {
    TypeStatus {
        wildcard: false,
        subscribed: Vec::new(),
        sent: BTreeMap::new(),
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
    let table = proxy_status_table(&[proxy]);
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
}
