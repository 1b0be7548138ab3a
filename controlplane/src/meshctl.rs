//! `meshctl`'s commands as library code, so tests drive them directly.

use std::fmt::Write;

use crate::discovery::{ProxyStatus, SyncState};

/// Renders `meshctl proxy-status`: one line per connected proxy with its
/// workload, how many resource types are in sync, and its NACKs.
pub fn proxy_status_table(proxies: &[ProxyStatus]) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 6]> = proxies
        .iter()
        .map(|p| {
            let synced = p
                .types
                .values()
                .filter(|t| t.sync == SyncState::Synced)
                .count();
            let nacks: u64 = p.types.values().map(|t| t.nacks).sum();
            let state = if p.types.values().any(|t| t.sync == SyncState::Nacked) {
                "NACKED"
            } else if p.types.values().any(|t| t.sync == SyncState::Pending) {
                "PENDING"
            } else {
                "SYNCED"
            };
            let last_nack = p
                .types
                .iter()
                .filter_map(|(ty, t)| t.last_nack.as_ref().map(|n| format!("{ty}: {}", n.message)))
                .next_back()
                .unwrap_or_default();
            [
                p.id.clone(),
                format!("{}/{}", p.namespace, p.workload),
                state.to_owned(),
                format!("{synced}/{}", p.types.len()),
                nacks.to_string(),
                last_nack,
            ]
        })
        .collect();
    let header = [
        "PROXY",
        "WORKLOAD",
        "STATE",
        "TYPES SYNCED",
        "NACKS",
        "LAST NACK",
    ];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(header.map(str::to_owned)).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests;
