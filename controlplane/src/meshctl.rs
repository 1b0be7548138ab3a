//! `meshctl`'s commands as library code, so tests drive them directly.

pub mod bookinfo;

use std::fmt::Write;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::discovery::{ProxyStatus, SyncState};
use crate::identity::Identities;

/// Renders `meshctl proxy-status`: one line per connected proxy with its
/// workload, how many resource types are in sync, its NACKs, and its
/// identity with the time its certificate has left (from the CA's
/// records in `identities`, at `now`).
pub fn proxy_status_table(
    proxies: &[ProxyStatus],
    identities: Option<&Identities>,
    now: SystemTime,
) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 8]> = proxies
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
            let (identity, expires) = identity(p, identities, now);
            [
                p.id.clone(),
                format!("{}/{}", p.namespace, p.workload),
                state.to_owned(),
                format!("{synced}/{}", p.types.len()),
                nacks.to_string(),
                identity,
                expires,
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
        "IDENTITY",
        "CERT EXPIRES IN",
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

/// The proxy's SPIFFE ID and how long its certificate has left: `-`
/// when the CA issued it nothing (a proxy without identity: plaintext).
fn identity(p: &ProxyStatus, identities: Option<&Identities>, now: SystemTime) -> (String, String) {
    let Some(identities) = identities else {
        return ("?".into(), "?".into());
    };
    let id = format!(
        "spiffe://{}/ns/{}/sa/{}",
        identities.trust_domain, p.namespace, p.service_account
    );
    match identities.certificates.get(&id) {
        None => ("-".into(), "-".into()),
        Some(cert) => {
            let expires = UNIX_EPOCH
                + Duration::from_secs(u64::try_from(cert.expires_unix_seconds).unwrap_or(0));
            let left = match expires.duration_since(now) {
                // Whole seconds, as `23h 59m 58s`.
                Ok(d) => humantime::format_duration(Duration::from_secs(d.as_secs())).to_string(),
                Err(_) => "EXPIRED".into(),
            };
            (id, left)
        }
    }
}

#[cfg(test)]
mod tests;
