//! `meshctl`'s commands as library code, so tests drive them directly.

pub mod bookinfo;
pub mod local;

use std::fmt::Write;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::discovery::{ProxyStatus, SyncState};
use crate::identity::Identities;
use crate::rotation::Report;

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
    table(&mut out, &header, rows);
    out
}

/// Rows under `header`, in columns as wide as their widest cell.
fn table<const N: usize>(out: &mut String, header: &[&str; N], rows: Vec<[String; N]>) {
    let widths: Vec<usize> = (0..N)
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
}

/// `meshctl ca status`: the roots (as the leader, else the first replica,
/// sees them), where a rotation stands, and per replica the bundle it
/// serves and how many of its proxies have applied it.
pub fn ca_status_table(reports: &[Report]) -> String {
    let mut out = String::new();
    let Some(main) = reports.iter().find(|r| r.leader).or(reports.first()) else {
        return "no control plane replica answered\n".into();
    };
    let ca = &main.ca;
    let mut roots = vec![[
        "signer".to_owned(),
        ca.signer.serial.clone(),
        "signs certificates".to_owned(),
        ca.signer.not_after.clone(),
    ]];
    if let Some(next) = &ca.next {
        roots.push([
            "next".to_owned(),
            next.serial.clone(),
            "trusted; signs once every proxy holds it".to_owned(),
            next.not_after.clone(),
        ]);
    }
    for p in &ca.previous {
        roots.push([
            "previous".to_owned(),
            p.root.serial.clone(),
            format!("trusted until {}", p.trusted_until),
            p.root.not_after.clone(),
        ]);
    }
    table(&mut out, &["ROOT", "SERIAL", "STATE", "EXPIRES"], roots);
    let phase = match (&ca.next, ca.previous.is_empty()) {
        (Some(_), _) => "rotation: the next root is in the trust bundle, waiting for every proxy",
        (None, false) => {
            "rotation: the new root signs; the old one leaves the bundle when its certificates have expired"
        }
        (None, true) => "no rotation under way",
    };
    let _ = writeln!(out, "\n{phase}");
    if let Some(why) = &main.waiting {
        let _ = writeln!(out, "waiting: {why}");
    }
    let _ = writeln!(out);
    let rows = reports
        .iter()
        .map(|r| {
            [
                r.replica.clone(),
                if r.leader { "yes" } else { "no" }.to_owned(),
                r.bundle.len().to_string(),
                r.proxies.connected.to_string(),
                r.proxies.behind.len().to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "REPLICA",
            "LEADER",
            "ROOTS IN BUNDLE",
            "PROXIES",
            "NOT YET HOLDING IT",
        ],
        rows,
    );
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
