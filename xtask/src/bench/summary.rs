//! Rounds to figures: each scenario's median over the rounds it completed.
//!
//! On a shared VM one scenario's maximum throughput swings by half from one
//! run to the next, so the report compares medians of interleaved rounds
//! rather than single runs, and shows the spread so the noise stays visible.

use serde::Serialize;

use super::report::{Ratios, Row};
use super::scenario::Scenario;

/// One scenario over all rounds: the median of each figure.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: &'static str,
    pub hops: u8,
    pub peer: bool,
    /// Rounds that measured the scenario; failed rounds are left out.
    pub rounds: usize,
    pub fixed_rate_p50_ms: f64,
    pub fixed_rate_p99_ms: f64,
    pub fixed_rate_p999_ms: f64,
    pub max_throughput_rps: f64,
    /// The lowest and highest maximum throughput of the rounds.
    pub max_throughput_rps_min: f64,
    pub max_throughput_rps_max: f64,
    pub proxy_cpu_s_per_1k_fixed_rate: Option<f64>,
    pub proxy_cpu_s_per_1k_max_throughput: Option<f64>,
    /// Each round starts fresh processes: the median of the rounds' peaks.
    pub proxy_peak_rss_mb_fixed_rate: Option<f64>,
    pub proxy_peak_rss_mb_max_throughput: Option<f64>,
    /// Failed requests, summed over the rounds and both phases.
    pub errors: u64,
    /// From the medians.
    pub ratios: Ratios,
    #[serde(skip)]
    pub(super) kind: Scenario,
}

/// One summary per scenario, in the order the scenarios first ran.
/// `rounds[i]` holds round i's rows.
pub fn aggregate(rounds: &[Vec<Row>]) -> Vec<Summary> {
    let mut order: Vec<Scenario> = Vec::new();
    for row in rounds.iter().flatten() {
        if !order.contains(&row.kind) {
            order.push(row.kind);
        }
    }
    order
        .into_iter()
        .filter_map(|kind| {
            let rows: Vec<&Row> = rounds.iter().flatten().filter(|r| r.kind == kind).collect();
            Summary::new(kind, &rows)
        })
        .collect()
}

impl Summary {
    /// None without rows.
    fn new(kind: Scenario, rows: &[&Row]) -> Option<Self> {
        let of = |f: fn(&Row) -> f64| median(rows.iter().map(|r| f(r)));
        let some = |f: fn(&Row) -> Option<f64>| median(rows.iter().filter_map(|r| f(r)));
        let rps = || rows.iter().map(|r| r.max_throughput.rps);
        Some(Self {
            scenario: kind.name(),
            hops: kind.hops(),
            peer: kind.is_peer(),
            rounds: rows.len(),
            fixed_rate_p50_ms: of(|r| r.fixed_rate.p50_ms)?,
            fixed_rate_p99_ms: of(|r| r.fixed_rate.p99_ms)?,
            fixed_rate_p999_ms: of(|r| r.fixed_rate.p999_ms)?,
            max_throughput_rps: median(rps())?,
            max_throughput_rps_min: rps().reduce(f64::min)?,
            max_throughput_rps_max: rps().reduce(f64::max)?,
            proxy_cpu_s_per_1k_fixed_rate: some(|r| r.proxy_cpu_s_per_1k_fixed_rate),
            proxy_cpu_s_per_1k_max_throughput: some(|r| r.proxy_cpu_s_per_1k_max_throughput),
            proxy_peak_rss_mb_fixed_rate: some(|r| r.proxy_peak_rss_mb_fixed_rate),
            proxy_peak_rss_mb_max_throughput: some(|r| r.proxy_peak_rss_mb_max_throughput),
            errors: rows
                .iter()
                .map(|r| r.fixed_rate.errors + r.max_throughput.errors)
                .sum(),
            ratios: Ratios::default(),
            kind,
        })
    }
}

/// The middle value, or the mean of the two middle values; None when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::PhaseReport;
    use super::*;

    fn phase(p99_ms: f64, rps: f64, errors: u64) -> PhaseReport {
        PhaseReport {
            p50_ms: p99_ms / 2.0,
            p99_ms,
            p999_ms: p99_ms * 2.0,
            rps,
            errors,
            ..PhaseReport::default()
        }
    }

    fn row(kind: Scenario, p99_ms: f64, rps: f64, cpu: Option<f64>) -> Row {
        let mut row = Row::new(
            kind,
            phase(p99_ms, 1000.0, 1),
            phase(1.0, rps, 0),
            Vec::new(),
        );
        row.proxy_cpu_s_per_1k_fixed_rate = cpu;
        row
    }

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([5.0]), Some(5.0));
        assert_eq!(median([]), None);
    }

    #[test]
    fn aggregate_takes_each_figure_s_median_over_the_rounds() {
        let rounds = vec![
            vec![
                row(Scenario::Direct, 0.25, 50_000.0, None),
                row(Scenario::Proxy, 0.75, 34_000.0, Some(0.375)),
            ],
            // A round where the proxy failed: its median is of two rounds.
            vec![row(Scenario::Direct, 1.0, 80_000.0, None)],
            vec![
                row(Scenario::Direct, 0.5, 60_000.0, None),
                row(Scenario::Proxy, 0.25, 53_000.0, Some(0.125)),
            ],
        ];
        let s = aggregate(&rounds);
        assert_eq!(s.len(), 2);
        let (direct, proxy) = (&s[0], &s[1]);
        assert_eq!(direct.scenario, "direct");
        assert_eq!(direct.rounds, 3);
        assert_eq!(direct.fixed_rate_p99_ms, 0.5);
        assert_eq!(direct.fixed_rate_p50_ms, 0.25);
        assert_eq!(direct.fixed_rate_p999_ms, 1.0);
        assert_eq!(direct.max_throughput_rps, 60_000.0);
        assert_eq!(direct.max_throughput_rps_min, 50_000.0);
        assert_eq!(direct.max_throughput_rps_max, 80_000.0);
        assert_eq!(direct.proxy_cpu_s_per_1k_fixed_rate, None);
        assert_eq!(direct.errors, 3);
        assert_eq!(proxy.rounds, 2);
        assert_eq!(proxy.fixed_rate_p99_ms, 0.5);
        assert_eq!(proxy.max_throughput_rps, 43_500.0);
        assert_eq!(proxy.proxy_cpu_s_per_1k_fixed_rate, Some(0.25));
    }
}
