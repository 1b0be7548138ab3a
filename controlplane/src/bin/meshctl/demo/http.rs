//! A one-shot HTTP/1.1 GET on loopback, and reading request counts from
//! a proxy's Prometheus text.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Time limit of one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://{addr}{path}` on a new connection: the status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(REQUEST_TIMEOUT, get_inner(addr, path))
        .await
        .with_context(|| format!("GET http://{addr}{path} took over {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path}"))
}

async fn get_inner(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = send.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Requests per `destination_workload` in `trellis_requests_total` series
/// that carry every label of `filter`, split into successes (2xx) and
/// other responses.
pub fn requests_by_workload(text: &str, filter: &[(&str, &str)]) -> BTreeMap<String, Counts> {
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("trellis_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = labels.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if !filter.iter().all(|(k, v)| label(labels, k) == Some(v)) {
            continue;
        }
        let workload = label(labels, "destination_workload").unwrap_or("unknown");
        let entry = counts.entry(workload.to_owned()).or_default();
        // Counters are whole numbers carried as floats.
        let value = value as u64;
        if label(labels, "response_code").is_some_and(|c| c.starts_with('2')) {
            entry.ok += value;
        } else {
            entry.failed += value;
        }
    }
    counts
}

/// Request counts of one destination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// 2xx responses.
    pub ok: u64,
    /// Every other response.
    pub failed: u64,
}

impl Counts {
    pub fn total(self) -> u64 {
        self.ok + self.failed
    }
}

/// The value of label `name` in `a="x",b="y"`. Label values here never
/// contain quotes (workload, service and route names, numbers).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn counts_requests_per_destination_workload() {
        let text = "\
# TYPE trellis_requests_total counter
trellis_requests_total{direction=\"outbound\",source_workload=\"productpage\",destination_service=\"reviews\",destination_workload=\"reviews-v1\",route=\"reviews-split\",response_code=\"200\"} 8
trellis_requests_total{direction=\"outbound\",source_workload=\"productpage\",destination_service=\"reviews\",destination_workload=\"reviews-v2\",route=\"reviews-split\",response_code=\"200\"} 1
trellis_requests_total{direction=\"outbound\",source_workload=\"productpage\",destination_service=\"reviews\",destination_workload=\"reviews-v2\",route=\"reviews-split\",response_code=\"503\"} 2
trellis_requests_total{direction=\"outbound\",source_workload=\"productpage\",destination_service=\"details\",destination_workload=\"details\",route=\"\",response_code=\"200\"} 11
trellis_request_duration_seconds_count{direction=\"outbound\",destination_service=\"reviews\"} 11
";
        let counts = requests_by_workload(
            text,
            &[
                ("direction", "outbound"),
                ("destination_service", "reviews"),
            ],
        );
        assert_eq!(counts.len(), 2);
        assert_eq!(counts["reviews-v1"], Counts { ok: 8, failed: 0 });
        assert_eq!(counts["reviews-v2"], Counts { ok: 1, failed: 2 });
    }
}
