//! The figures of a run: the table printed for people and the JSON written
//! for tools, with ratios to the direct path and to the best peer, computed
//! from each scenario's medians over the rounds.

use std::fmt::Write;

use serde::Serialize;

use super::Options;
use super::loadgen::Phase;
use super::scenario::{Probe, Role, Scenario};
use super::summary::{self, Summary};

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub options: Options,
    /// Per scenario, the medians over the rounds and the ratios.
    pub scenarios: Vec<Summary>,
    /// Every round's raw figures: `rounds[i]` is round i + 1, in the order
    /// the scenarios ran.
    pub rounds: Vec<Vec<Row>>,
    pub failures: Vec<Failure>,
    /// Scenarios whose peer proxy is not installed.
    pub skipped: Vec<&'static str>,
}

/// The machine the figures come from.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// /proc/loadavg when the run started: other work on a shared machine.
    pub loadavg_at_start: String,
    pub peer_versions: Vec<String>,
    pub unix_time: u64,
}

/// A scenario that could not be measured.
#[derive(Debug, Serialize)]
pub struct Failure {
    pub scenario: &'static str,
    /// From 1.
    pub round: usize,
    pub error: String,
}

/// One scenario's figures in one round.
#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub hops: u8,
    pub peer: bool,
    /// Open loop at the fixed rate.
    pub fixed_rate: PhaseReport,
    /// Closed loop, back to back.
    pub max_throughput: PhaseReport,
    /// CPU seconds per 1000 requests, summed over the proxies under test.
    pub proxy_cpu_s_per_1k_fixed_rate: Option<f64>,
    pub proxy_cpu_s_per_1k_max_throughput: Option<f64>,
    /// Peak RSS of the largest proxy process (each proxy of a pair is its
    /// own sidecar; `processes` has both).
    pub proxy_peak_rss_mb_fixed_rate: Option<f64>,
    pub proxy_peak_rss_mb_max_throughput: Option<f64>,
    pub processes: Vec<ProcessReport>,
    #[serde(skip)]
    pub(super) kind: Scenario,
}

/// The figures of one phase.
#[derive(Debug, Default, Serialize)]
pub struct PhaseReport {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Successful requests per second.
    pub rps: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Open loop: how late the pacer handed requests out (load-generator
    /// overhead, not in the latencies).
    pub pacer_lag_p50_ms: f64,
    pub pacer_lag_p99_ms: f64,
    /// Open loop: hand-over to send (queueing on the connection; in the
    /// latencies).
    pub send_lag_p50_ms: f64,
    pub send_lag_p99_ms: f64,
}

/// CPU and memory of one process.
#[derive(Debug, Serialize)]
pub struct ProcessReport {
    pub name: String,
    pub role: Role,
    pub cpu_s_fixed_rate: f64,
    pub cpu_s_per_1k_fixed_rate: Option<f64>,
    pub cpu_s_max_throughput: f64,
    pub cpu_s_per_1k_max_throughput: Option<f64>,
    pub peak_rss_mb_fixed_rate: f64,
    pub peak_rss_mb_max_throughput: f64,
}

/// A scenario relative to the direct path and to the best peer with as many
/// hops (lowest p99 at the fixed rate, highest throughput). Below 1 is better
/// for p99, above 1 for throughput.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ratios {
    pub p99_vs_direct: Option<f64>,
    pub rps_vs_direct: Option<f64>,
    pub best_p99_peer: Option<&'static str>,
    pub p99_vs_best_peer: Option<f64>,
    pub best_rps_peer: Option<&'static str>,
    pub rps_vs_best_peer: Option<f64>,
}

impl Report {
    pub fn new(
        machine: Machine,
        options: Options,
        rounds: Vec<Vec<Row>>,
        failures: Vec<Failure>,
        skipped: Vec<&'static str>,
    ) -> Self {
        let mut scenarios = summary::aggregate(&rounds);
        let keys: Vec<_> = scenarios
            .iter()
            .map(|s| Key {
                scenario: s.kind,
                p99_ms: s.fixed_rate_p99_ms,
                rps: s.max_throughput_rps,
            })
            .collect();
        for (summary, ratios) in scenarios.iter_mut().zip(ratios(&keys)) {
            summary.ratios = ratios;
        }
        Self {
            machine,
            options,
            scenarios,
            rounds,
            failures,
            skipped,
        }
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let o = &self.options;
        let rounds = match o.repeat {
            1 => "1 round".to_owned(),
            n => format!("median of {n} interleaved rounds"),
        };
        let _ = writeln!(
            out,
            "\n{} req/s open loop and closed loop, {} connections, {} B responses, \
             {} s phases, {rounds}; {} cores, kernel {}",
            o.rate,
            o.connections,
            o.body_size,
            o.duration_s,
            self.machine.nproc,
            self.machine.kernel
        );
        let headers = [
            [
                "scenario",
                "p50 ms",
                "p99 ms",
                "p99.9",
                "max rps",
                "rps range",
                "cpu/1k",
                "cpu/1k",
                "rss MB",
                "p99",
                "rps",
                "p99",
                "rps",
                "errors",
            ],
            [
                "", "", "", "", "", "", "@rate", "@max", "@rate", "/direct", "/direct", "/peer",
                "/peer", "",
            ],
        ];
        for header in headers {
            out += &line(header.map(str::to_owned));
        }
        for s in &self.scenarios {
            let r = &s.ratios;
            out += &line([
                s.scenario.to_owned(),
                format!("{:.3}", s.fixed_rate_p50_ms),
                format!("{:.3}", s.fixed_rate_p99_ms),
                format!("{:.3}", s.fixed_rate_p999_ms),
                format!("{:.0}", s.max_throughput_rps),
                format!(
                    "{:.1}-{:.1}k",
                    s.max_throughput_rps_min / 1000.0,
                    s.max_throughput_rps_max / 1000.0
                ),
                cell(s.proxy_cpu_s_per_1k_fixed_rate, 3),
                cell(s.proxy_cpu_s_per_1k_max_throughput, 3),
                cell(s.proxy_peak_rss_mb_fixed_rate, 1),
                cell(r.p99_vs_direct, 2),
                cell(r.rps_vs_direct, 2),
                cell(r.p99_vs_best_peer, 2),
                cell(r.rps_vs_best_peer, 2),
                s.errors.to_string(),
            ]);
        }
        for failure in &self.failures {
            // The whole error, with the log's tail, was printed when it happened.
            let first_line = failure.error.lines().next().unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<13} failed in round {}: {first_line}",
                failure.scenario, failure.round
            );
        }
        let _ = writeln!(
            out,
            "figures: medians over the rounds each scenario completed, ratios from the medians; \
             rps range: lowest-highest max rps of the rounds;\n\
             cpu/1k: proxy CPU seconds per 1000 requests (a pair's proxies summed); \
             rss: peak RSS of the largest proxy process at the fixed rate,\n\
             median of the rounds (fresh processes each round); errors: summed over the rounds and phases;\n\
             peer: the best installed peer with as many hops (lowest p99, highest rps)."
        );
        out
    }
}

impl Row {
    pub fn new(
        scenario: Scenario,
        fixed_rate: PhaseReport,
        max_throughput: PhaseReport,
        processes: Vec<ProcessReport>,
    ) -> Self {
        let proxies: Vec<_> = processes.iter().filter(|p| p.role == Role::Proxy).collect();
        let sum = |f: fn(&ProcessReport) -> Option<f64>| -> Option<f64> {
            proxies
                .iter()
                .map(|p| f(p))
                .sum::<Option<f64>>()
                .filter(|_| !proxies.is_empty())
        };
        let max = |f: fn(&ProcessReport) -> f64| -> Option<f64> {
            proxies.iter().map(|p| f(p)).reduce(f64::max)
        };
        Self {
            scenario: scenario.name(),
            hops: scenario.hops(),
            peer: scenario.is_peer(),
            proxy_cpu_s_per_1k_fixed_rate: sum(|p| p.cpu_s_per_1k_fixed_rate),
            proxy_cpu_s_per_1k_max_throughput: sum(|p| p.cpu_s_per_1k_max_throughput),
            proxy_peak_rss_mb_fixed_rate: max(|p| p.peak_rss_mb_fixed_rate),
            proxy_peak_rss_mb_max_throughput: max(|p| p.peak_rss_mb_max_throughput),
            fixed_rate,
            max_throughput,
            processes,
            kind: scenario,
        }
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        format!(
            "{}: p99 {:.3} ms at {:.0} req/s, max {:.0} req/s, {} errors",
            self.scenario,
            self.fixed_rate.p99_ms,
            self.fixed_rate.rps,
            self.max_throughput.rps,
            self.fixed_rate.errors + self.max_throughput.errors
        )
    }
}

impl PhaseReport {
    pub fn from_phase(phase: &Phase) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        let latency = &phase.latency;
        Self {
            requests: phase.ok,
            errors: phase.errors,
            first_error: phase.first_error.clone(),
            rps: phase.rate(),
            mean_ms: latency.mean() / 1000.0,
            p50_ms: ms(latency.value_at_quantile(0.5)),
            p90_ms: ms(latency.value_at_quantile(0.9)),
            p99_ms: ms(latency.value_at_quantile(0.99)),
            p999_ms: ms(latency.value_at_quantile(0.999)),
            max_ms: ms(latency.max()),
            pacer_lag_p50_ms: ms(phase.pacer_lag.value_at_quantile(0.5)),
            pacer_lag_p99_ms: ms(phase.pacer_lag.value_at_quantile(0.99)),
            send_lag_p50_ms: ms(phase.send_lag.value_at_quantile(0.5)),
            send_lag_p99_ms: ms(phase.send_lag.value_at_quantile(0.99)),
        }
    }
}

impl ProcessReport {
    /// `fixed_rate` and `max_throughput` are (CPU seconds, requests) of each
    /// phase; `rss` the peak RSS in bytes after each.
    pub fn new(
        probe: &Probe,
        fixed_rate: (f64, u64),
        max_throughput: (f64, u64),
        rss: (u64, u64),
    ) -> Self {
        let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        Self {
            name: probe.name.clone(),
            role: probe.role,
            cpu_s_fixed_rate: fixed_rate.0,
            cpu_s_per_1k_fixed_rate: per_1k(fixed_rate),
            cpu_s_max_throughput: max_throughput.0,
            cpu_s_per_1k_max_throughput: per_1k(max_throughput),
            peak_rss_mb_fixed_rate: mb(rss.0),
            peak_rss_mb_max_throughput: mb(rss.1),
        }
    }
}

impl Machine {
    pub fn probe(peer_versions: Vec<String>) -> Self {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|text| text.trim().to_owned())
                .unwrap_or_default()
        };
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model,
            loadavg_at_start: read("/proc/loadavg"),
            peer_versions,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// What the ratios are computed from.
struct Key {
    scenario: Scenario,
    p99_ms: f64,
    rps: f64,
}

fn ratios(keys: &[Key]) -> Vec<Ratios> {
    let direct = keys.iter().find(|k| k.scenario == Scenario::Direct);
    keys.iter()
        .map(|key| {
            let peers = || {
                keys.iter()
                    .filter(|k| k.scenario.is_peer() && k.scenario.hops() == key.scenario.hops())
            };
            let best_p99 = peers().min_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
            let best_rps = peers().max_by(|a, b| a.rps.total_cmp(&b.rps));
            Ratios {
                p99_vs_direct: direct.and_then(|d| ratio(key.p99_ms, d.p99_ms)),
                rps_vs_direct: direct.and_then(|d| ratio(key.rps, d.rps)),
                best_p99_peer: best_p99.map(|p| p.scenario.name()),
                p99_vs_best_peer: best_p99.and_then(|p| ratio(key.p99_ms, p.p99_ms)),
                best_rps_peer: best_rps.map(|p| p.scenario.name()),
                rps_vs_best_peer: best_rps.and_then(|p| ratio(key.rps, p.rps)),
            }
        })
        .collect()
}

fn ratio(value: f64, reference: f64) -> Option<f64> {
    (reference > 0.0).then(|| value / reference)
}

fn per_1k((cpu_s, requests): (f64, u64)) -> Option<f64> {
    (requests > 0).then(|| cpu_s * 1000.0 / requests as f64)
}

/// One line of the table: the scenario left-aligned, the figures right.
fn line(cells: [String; 14]) -> String {
    const WIDTHS: [usize; 14] = [13, 7, 7, 7, 8, 11, 8, 8, 7, 8, 8, 8, 8, 6];
    let mut out = format!("{:<w$}", cells[0], w = WIDTHS[0]);
    for (cell, width) in cells.iter().zip(WIDTHS).skip(1) {
        let _ = write!(out, " {cell:>width$}");
    }
    out + "\n"
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scenario: Scenario, p99_ms: f64, rps: f64) -> Key {
        Key {
            scenario,
            p99_ms,
            rps,
        }
    }

    #[test]
    fn ratios_compare_with_direct_and_the_best_peer_of_equal_hops() {
        let keys = [
            key(Scenario::Direct, 0.25, 80_000.0),
            key(Scenario::Proxy, 0.5, 20_000.0),
            key(Scenario::Haproxy, 0.4, 36_000.0),
            key(Scenario::Nginx, 0.3, 30_000.0),
            key(Scenario::ProxyPair, 1.0, 10_000.0),
            key(Scenario::HaproxyPair, 0.5, 25_000.0),
        ];
        let r = ratios(&keys);
        assert_eq!(r[0].p99_vs_direct, Some(1.0));
        assert_eq!(r[0].best_p99_peer, None);
        assert_eq!(r[0].p99_vs_best_peer, None);
        assert_eq!(r[1].p99_vs_direct, Some(2.0));
        assert_eq!(r[1].rps_vs_direct, Some(0.25));
        // The best p99 and the best throughput may come from different peers.
        assert_eq!(r[1].best_p99_peer, Some("nginx"));
        assert_eq!(r[1].p99_vs_best_peer, Some(0.5 / 0.3));
        assert_eq!(r[1].best_rps_peer, Some("haproxy"));
        assert_eq!(r[1].rps_vs_best_peer, Some(20_000.0 / 36_000.0));
        // A pair compares with the peer pair, not a single hop.
        assert_eq!(r[4].best_p99_peer, Some("haproxy-pair"));
        assert_eq!(r[4].p99_vs_best_peer, Some(2.0));
        assert_eq!(r[4].rps_vs_best_peer, Some(0.4));
    }

    #[test]
    fn ratios_are_absent_without_a_reference() {
        let r = ratios(&[key(Scenario::Proxy, 0.5, 20_000.0)]);
        assert_eq!(r[0], Ratios::default());
        assert_eq!(ratio(1.0, 0.0), None);
    }

    #[test]
    fn cpu_per_1000_requests() {
        assert_eq!(per_1k((2.0, 10_000)), Some(0.2));
        assert_eq!(per_1k((2.0, 0)), None);
        assert_eq!(cell(None, 2), "-");
        assert_eq!(cell(Some(1.23456), 2), "1.23");
    }
}
