//! The figures of a control-plane benchmark run: the table printed for
//! people and the JSON written for tools.

use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;

use super::Options;
use crate::bench::report::Machine;

/// What the figures are compared with.
pub const ANCHOR: &str = "istiod publishes 1 vCPU and 1.5 GB of memory for 1,000 services and \
                          2,000 sidecars, and endpoint updates reaching 500 sidecars in under a second";
/// The targets.
pub const TARGET_P99_MS: f64 = 100.0;
pub const TARGET_PEAK_RSS_MB: f64 = 300.0;

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub options: Options,
    pub anchor: &'static str,
    pub mesh: MeshReport,
    /// Spawn to the first answer of the admin server, which starts after
    /// the directory has been read into the index.
    pub load_s: f64,
    /// From opening the connections until every proxy holds everything it
    /// subscribed to.
    pub sync_s: f64,
    /// Per proxy, stream start to synced.
    pub proxy_sync_p50_s: f64,
    pub proxy_sync_p99_s: f64,
    pub controlplane: ProcessReport,
    /// This process: the simulated proxies.
    pub fleet: FleetReport,
    pub endpoint_change: ChangeSummary,
    pub route_change: ChangeSummary,
    pub targets: Targets,
    /// Every change, in order.
    pub changes: Vec<ChangeRecord>,
    /// The control plane's push-latency quantiles at the end, per type,
    /// over its exporter's rolling window (about the last minute).
    pub server_push_latency_end: Vec<ServerQuantiles>,
    /// Other work on the machine while the changes were timed.
    pub others: OtherLoad,
    /// With `--kubernetes`: the cluster and what writing the mesh took.
    pub kubernetes: Option<KubeReport>,
}

/// The cluster a `--kubernetes` run wrote the mesh through.
#[derive(Debug, Serialize)]
pub struct KubeReport {
    pub server_version: String,
    pub slice_api_version: &'static str,
    /// The control plane's `--namespace-selector`; None: every namespace.
    pub namespace_selector: Option<String>,
    /// Objects in namespaces outside the mesh.
    pub outside_services: usize,
    pub outside_endpoints: usize,
    pub outside_routes: usize,
    /// Objects applied (both parts), and how long it took.
    pub objects: usize,
    pub apply_s: f64,
}

/// How much else ran on the machine while the changes were timed: on a
/// shared machine, the reason one run's tail differs from the next.
#[derive(Debug, Serialize)]
pub struct OtherLoad {
    pub changes_wall_s: f64,
    /// CPU seconds the whole machine was busy.
    pub machine_busy_cpu_s: f64,
    /// Of those, not the control plane's nor the simulated proxies'.
    pub other_cpu_s: f64,
}

/// The mesh and the fleet.
#[derive(Debug, Serialize)]
pub struct MeshReport {
    pub services: usize,
    pub endpoints: usize,
    pub routes: usize,
    pub files: usize,
    pub proxies: usize,
    pub services_per_proxy: usize,
    pub connections: usize,
    pub streams_per_connection: usize,
    /// Resources the fleet received while syncing (each proxy's service
    /// index counts every service).
    pub sync_resources: u64,
    pub sync_responses: u64,
    pub sync_mb: f64,
}

/// CPU and memory of one process.
#[derive(Debug, Default, Serialize)]
pub struct ProcessReport {
    /// VmHWM at the end of the run.
    pub peak_rss_mb: f64,
    /// VmHWM once the mesh is loaded, before any proxy connects.
    pub peak_rss_after_load_mb: f64,
    /// VmRSS once every proxy is synced, and at the end.
    pub rss_after_sync_mb: f64,
    pub rss_end_mb: f64,
    pub cpu_s_load: f64,
    pub cpu_s_sync: f64,
    /// CPU used per second while nothing changes (the file source's poll).
    pub cpu_s_per_s_idle: f64,
    pub cpu_s_changes: f64,
    pub cpu_s_per_change: f64,
    pub cpu_s_total: f64,
}

/// CPU and memory of this process, the simulated proxies, which share
/// the machine with the control plane.
#[derive(Debug, Default, Serialize)]
pub struct FleetReport {
    pub peak_rss_mb: f64,
    pub rss_after_sync_mb: f64,
    pub rss_end_mb: f64,
    /// CPU used by the end of the sync (generating the mesh included).
    pub cpu_s_sync: f64,
    pub cpu_s_total: f64,
}

/// The figures of one kind of change over all its repetitions.
#[derive(Debug, Default, Serialize)]
pub struct ChangeSummary {
    pub changes: usize,
    /// Subscribers each change must reach.
    pub affected: usize,
    /// Changes that did not reach every affected subscriber in time.
    pub incomplete: usize,
    /// Over every (change, subscriber): file write to the subscriber
    /// receiving the change.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The p99 over subscribers of each change: median and worst change.
    pub p99_per_change_median_ms: f64,
    pub p99_per_change_worst_ms: f64,
    /// The first subscriber to receive it: mostly the file watch, the
    /// re-read and the index update.
    pub first_median_ms: f64,
    /// The last minus the first subscriber: the fan-out.
    pub spread_median_ms: f64,
    /// The control plane's own figure: index update to the response
    /// queued, mean over the change's pushes (median over changes).
    pub server_push_mean_median_ms: Option<f64>,
    /// Responses the fleet received per change (all types).
    pub responses_per_change: f64,
}

/// One change.
#[derive(Debug, Serialize)]
pub struct ChangeRecord {
    pub kind: &'static str,
    pub index: u32,
    pub affected: usize,
    pub arrived: usize,
    pub first_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub server_push_mean_ms: Option<f64>,
    pub server_pushes: f64,
    pub responses: u64,
    /// Latencies of every subscriber reached, in ms, sorted.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

/// The targets and whether the run met them.
#[derive(Debug, Serialize)]
pub struct Targets {
    pub p99_ms: f64,
    pub peak_rss_mb: f64,
    pub p99_met: bool,
    pub peak_rss_met: bool,
}

/// Push-latency quantiles the control plane reports for one type.
#[derive(Debug, Serialize)]
pub struct ServerQuantiles {
    pub r#type: &'static str,
    pub count: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl ChangeRecord {
    pub fn new(
        kind: &'static str,
        index: u32,
        affected: usize,
        mut latencies: Vec<Duration>,
        server: (Option<f64>, f64),
        responses: u64,
    ) -> Self {
        latencies.sort();
        let ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self {
            kind,
            index,
            affected,
            arrived: ms.len(),
            first_ms: ms.first().copied().unwrap_or(f64::NAN),
            p50_ms: quantile(&ms, 0.5),
            p99_ms: quantile(&ms, 0.99),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
            server_push_mean_ms: server.0,
            server_pushes: server.1,
            responses,
            latencies_ms: ms,
        }
    }
}

impl ChangeSummary {
    pub fn new(records: &[&ChangeRecord]) -> Self {
        let Some(first) = records.first() else {
            return Self::default();
        };
        let mut all: Vec<f64> = records
            .iter()
            .flat_map(|r| r.latencies_ms.iter().copied())
            .collect();
        all.sort_by(f64::total_cmp);
        let sorted = |f: &dyn Fn(&ChangeRecord) -> f64| {
            let mut v: Vec<f64> = records.iter().map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let p99s = sorted(&|r| r.p99_ms);
        let mut server: Vec<f64> = records
            .iter()
            .filter_map(|r| r.server_push_mean_ms)
            .collect();
        server.sort_by(f64::total_cmp);
        let responses: u64 = records.iter().map(|r| r.responses).sum();
        Self {
            changes: records.len(),
            affected: first.affected,
            incomplete: records.iter().filter(|r| r.arrived < r.affected).count(),
            p50_ms: quantile(&all, 0.5),
            p99_ms: quantile(&all, 0.99),
            max_ms: all.last().copied().unwrap_or(f64::NAN),
            p99_per_change_median_ms: quantile(&p99s, 0.5),
            p99_per_change_worst_ms: p99s.last().copied().unwrap_or(f64::NAN),
            first_median_ms: quantile(&sorted(&|r| r.first_ms), 0.5),
            spread_median_ms: quantile(&sorted(&|r| r.max_ms - r.first_ms), 0.5),
            server_push_mean_median_ms: (!server.is_empty()).then(|| quantile(&server, 0.5)),
            responses_per_change: responses as f64 / records.len() as f64,
        }
    }
}

/// The nearest-rank quantile `q` of `sorted`; NaN when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: the smallest value with at least q of the values at or
    // below it.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_table(&mut t);
        t
    }

    fn write_table(&self, t: &mut String) -> std::fmt::Result {
        let m = &self.mesh;
        let cp = &self.controlplane;
        writeln!(t)?;
        writeln!(
            t,
            "trellis-controlplane: {} services, {} endpoints, {} routes ({} files); \
             {} proxies x {} services, {} HTTP/2 connection(s) ({} stream(s) each)",
            m.services,
            m.endpoints,
            m.routes,
            m.files,
            m.proxies,
            m.services_per_proxy,
            m.connections,
            m.streams_per_connection
        )?;
        if let Some(k) = &self.kubernetes {
            writeln!(
                t,
                "through Kubernetes {} (EndpointSlices {}): {} objects applied in {:.1} s; \
                 outside the mesh {} services, {} endpoints, {} routes; namespace selector {}",
                k.server_version,
                k.slice_api_version,
                k.objects,
                k.apply_s,
                k.outside_services,
                k.outside_endpoints,
                k.outside_routes,
                k.namespace_selector
                    .as_deref()
                    .unwrap_or("none (every namespace)")
            )?;
        }
        writeln!(
            t,
            "machine: {} CPUs, {}; load average at start {}",
            self.machine.nproc, self.machine.cpu_model, self.machine.loadavg_at_start
        )?;
        writeln!(t)?;
        writeln!(
            t,
            "{:<16} {:>8} {:>7} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9} {:>10} {:>9}",
            "change",
            "changes",
            "reached",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p99/chg md",
            "p99/chg max",
            "first ms",
            "server ms",
            "resp/chg"
        )?;
        for (name, s) in [
            ("endpoint", &self.endpoint_change),
            ("route (GAMMA)", &self.route_change),
        ] {
            let reached = format!("{}/{}", s.changes - s.incomplete, s.changes);
            let server = s
                .server_push_mean_median_ms
                .map_or("-".to_owned(), |v| format!("{v:.1}"));
            writeln!(
                t,
                "{:<16} {:>8} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>10.1} {:>10.1} {:>9.1} {:>10} {:>9.0}",
                name,
                s.changes,
                reached,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.p99_per_change_median_ms,
                s.p99_per_change_worst_ms,
                s.first_median_ms,
                server,
                s.responses_per_change
            )?;
        }
        let (write, first) = match self.kubernetes {
            None => ("file write", "file watch + re-read"),
            Some(_) => ("API write (server-side apply)", "API call + watch event"),
        };
        writeln!(
            t,
            "  (latency: {write} until a subscriber receives the change, over {} \
             subscribers per change; first: the first subscriber, mostly {first} + index \
             update; server: the control plane's own index-update-to-queued mean; reached: \
             changes that reached every subscriber)",
            self.endpoint_change.affected
        )?;
        writeln!(t)?;
        writeln!(
            t,
            "load {:.2} s   sync of {} proxies {:.2} s (per proxy p50 {:.2} s, p99 {:.2} s; \
             {} responses, {} resources, {:.1} MB)",
            self.load_s,
            m.proxies,
            self.sync_s,
            self.proxy_sync_p50_s,
            self.proxy_sync_p99_s,
            m.sync_responses,
            m.sync_resources,
            m.sync_mb
        )?;
        writeln!(
            t,
            "control plane: peak RSS {:.0} MB (after load {:.0} MB; RSS synced {:.0} MB, end {:.0} MB)",
            cp.peak_rss_mb, cp.peak_rss_after_load_mb, cp.rss_after_sync_mb, cp.rss_end_mb
        )?;
        writeln!(
            t,
            "               CPU {:.2} s total: load {:.2} s, sync {:.2} s, idle {:.3} s/s, \
             changes {:.2} s ({:.3} s per change)",
            cp.cpu_s_total,
            cp.cpu_s_load,
            cp.cpu_s_sync,
            cp.cpu_s_per_s_idle,
            cp.cpu_s_changes,
            cp.cpu_s_per_change
        )?;
        writeln!(
            t,
            "simulated proxies (this process): CPU {:.2} s, peak RSS {:.0} MB",
            self.fleet.cpu_s_total, self.fleet.peak_rss_mb
        )?;
        let o = &self.others;
        writeln!(
            t,
            "other processes: {:.1} CPU-s during the {:.1} s of changes ({:.0}% of the machine)",
            o.other_cpu_s,
            o.changes_wall_s,
            100.0 * o.other_cpu_s / (o.changes_wall_s * self.machine.nproc.max(1) as f64)
        )?;
        let tick = |ok: bool| if ok { "met" } else { "MISSED" };
        let worst_p99 = self.endpoint_change.p99_ms.max(self.route_change.p99_ms);
        writeln!(
            t,
            "targets: p99 < {:.0} ms: {} ({:.1} ms); peak RSS < {:.0} MB: {} ({:.0} MB)",
            self.targets.p99_ms,
            tick(self.targets.p99_met),
            worst_p99,
            self.targets.peak_rss_mb,
            tick(self.targets.peak_rss_met),
            cp.peak_rss_mb
        )?;
        writeln!(t, "anchor: {ANCHOR}")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn a_change_summary_pools_subscribers_and_counts_misses() {
        let ms = |v: &[u64]| v.iter().map(|m| Duration::from_millis(*m)).collect();
        let a = ChangeRecord::new("endpoint", 0, 3, ms(&[30, 10, 20]), (Some(5.0), 3.0), 3);
        let b = ChangeRecord::new("endpoint", 1, 3, ms(&[40, 50]), (None, 0.0), 2);
        assert_eq!(a.first_ms, 10.0);
        assert_eq!(a.max_ms, 30.0);
        let s = ChangeSummary::new(&[&a, &b]);
        assert_eq!(s.incomplete, 1);
        assert_eq!(s.p50_ms, 30.0);
        assert_eq!(s.max_ms, 50.0);
        assert_eq!(s.p99_per_change_worst_ms, 50.0);
        assert_eq!(s.server_push_mean_median_ms, Some(5.0));
        assert_eq!(s.responses_per_change, 2.5);
    }
}
