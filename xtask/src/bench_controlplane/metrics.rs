//! The control plane's own account of its pushes, from `/metrics` on its
//! admin port: `trellis_discovery_push_latency_seconds`, the time from an
//! index change to the response carrying it being queued for the proxy.
//! The exporter renders histograms as summaries, so the benchmark takes
//! `_sum` and `_count` before and after each change for the change's mean,
//! and the quantiles (over the exporter's rolling window) at the end.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The push latency histogram.
pub const PUSH_LATENCY: &str = "trellis_discovery_push_latency_seconds";
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// One label set of a summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub sum: f64,
    pub count: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// `GET /metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::time::timeout(SCRAPE_TIMEOUT, get(addr, "/metrics"))
        .await
        .with_context(|| format!("GET http://{addr}/metrics timed out"))?
}

/// A plain HTTP/1.1 GET, enough for the admin server.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the admin server at {addr}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await?;
    let text = String::from_utf8(bytes).context("the admin server's answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path}: not an HTTP response: {text:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// The summary `name` with label `type="{ty}"` in the exposition `text`.
pub fn summary(text: &str, name: &str, ty: &str) -> Summary {
    let mut out = Summary::default();
    let label = format!("type=\"{ty}\"");
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((metric, labels)) = series.split_once('{') else {
            continue;
        };
        if !labels.split(',').any(|l| l.trim_end_matches('}') == label) {
            continue;
        }
        let quantile = labels
            .split(',')
            .find_map(|l| l.trim_end_matches('}').strip_prefix("quantile="))
            .map(|q| q.trim_matches('"'));
        match (metric.strip_prefix(name), quantile) {
            (Some("_sum"), _) => out.sum = value,
            (Some("_count"), _) => out.count = value,
            (Some(""), Some("0.5")) => out.p50 = Some(value),
            (Some(""), Some("0.99")) => out.p99 = Some(value),
            (Some(""), Some("1")) => out.max = Some(value),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_read_by_type() {
        let text = "\
# TYPE trellis_discovery_push_latency_seconds summary
trellis_discovery_push_latency_seconds{type=\"Endpoints\",quantile=\"0\"} 0.001
trellis_discovery_push_latency_seconds{type=\"Endpoints\",quantile=\"0.5\"} 0.004
trellis_discovery_push_latency_seconds{type=\"Endpoints\",quantile=\"0.99\"} 0.02
trellis_discovery_push_latency_seconds{type=\"Endpoints\",quantile=\"1\"} 0.03
trellis_discovery_push_latency_seconds_sum{type=\"Endpoints\"} 4.5
trellis_discovery_push_latency_seconds_count{type=\"Endpoints\"} 1000
trellis_discovery_push_latency_seconds_sum{type=\"OutboundService\"} 1.5
trellis_discovery_push_latency_seconds_count{type=\"OutboundService\"} 10
trellis_discovery_pushes_total{type=\"Endpoints\"} 2000
";
        let s = summary(text, PUSH_LATENCY, "Endpoints");
        assert_eq!(
            s,
            Summary {
                sum: 4.5,
                count: 1000.0,
                p50: Some(0.004),
                p99: Some(0.02),
                max: Some(0.03),
            }
        );
        assert_eq!(summary(text, PUSH_LATENCY, "OutboundService").count, 10.0);
        assert_eq!(
            summary(text, PUSH_LATENCY, "ServiceIndex"),
            Summary::default()
        );
    }
}
