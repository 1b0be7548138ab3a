//! CPU time and peak RSS of processes, read from /proc.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context;

use super::scenario::Probe;

/// CPU seconds (user + system, all threads) each probed process has used.
pub fn sample_cpu(probes: &[Probe]) -> anyhow::Result<Vec<f64>> {
    probes
        .iter()
        .map(|probe| cpu_seconds(probe.pid, &probe.name))
        .collect()
}

/// Peak resident set size (VmHWM) of each probed process, in bytes.
pub fn sample_peak_rss(probes: &[Probe]) -> anyhow::Result<Vec<u64>> {
    probes
        .iter()
        .map(|probe| peak_rss(probe.pid, &probe.name))
        .collect()
}

/// CPU seconds (user + system, all threads) process `pid`, called `name`
/// in errors, has used.
pub fn cpu_seconds(pid: u32, name: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path, name)?;
    let ticks =
        parse_stat_cpu_ticks(&text).with_context(|| format!("cannot parse {path}: {text:?}"))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// Peak resident set size (VmHWM) of process `pid`, in bytes.
pub fn peak_rss(pid: u32, name: &str) -> anyhow::Result<u64> {
    status_kib(pid, name, "VmHWM").map(|kib| kib * 1024)
}

/// Resident set size now (VmRSS) of process `pid`, in bytes.
pub fn rss(pid: u32, name: &str) -> anyhow::Result<u64> {
    status_kib(pid, name, "VmRSS").map(|kib| kib * 1024)
}

fn status_kib(pid: u32, name: &str, key: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path, name)?;
    parse_status_kib(&text, key).with_context(|| format!("no {key} in {path}"))
}

fn read(path: &str, name: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}; has {name} exited?"))
}

/// CPU seconds the whole machine has been busy (every CPU, every process
/// and the kernel's interrupt work), from /proc/stat: with the figures of
/// the processes under test, it tells how much other work shared the
/// machine during a run.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let ticks = parse_machine_busy_ticks(&text)
        .with_context(|| format!("cannot parse the cpu line of /proc/stat: {text:.80}"))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// user + nice + system + irq + softirq + steal of the `cpu` line of
/// /proc/stat, in clock ticks (idle and iowait are not busy; guest time
/// is already in user).
fn parse_machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied();
    Some(field(0)? + field(1)? + field(2)? + field(5)? + field(6)? + field(7).unwrap_or(0))
}

/// utime + stime from the text of /proc/PID/stat, in clock ticks.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself, so count fields from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `Key:   123 kB` line of /proc/PID/status, in KiB.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// USER_HZ; 100 on every mainstream Linux, asked once to be sure.
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_sum_user_and_system_time() {
        let stat = "4242 (trellis-proxy) S 1 4242 4242 0 -1 4194560 1500 0 0 0 \
                    731 69 0 0 20 0 3 0 123456 12345678 2048 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(800));
    }

    #[test]
    fn stat_cpu_ticks_survive_odd_command_names() {
        let stat = "7 (a) b (c) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(11));
        assert_eq!(parse_stat_cpu_ticks("7 (truncated"), None);
        assert_eq!(parse_stat_cpu_ticks("7 (x) R 1 2"), None);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 9000 40 5 6 7 0 0\ncpu0 50 1 15 4500 20 2 3 3 0 0\n";
        assert_eq!(parse_machine_busy_ticks(stat), Some(150));
        assert_eq!(parse_machine_busy_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(parse_machine_busy_ticks("cpu  1 x 3 4 5 6 7\n"), None);
        assert!(machine_busy_seconds().is_ok_and(|s| s > 0.0));
    }

    #[test]
    fn status_values_are_read_in_kib() {
        let status = "Name:\thaproxy\nVmPeak:\t  20000 kB\nVmHWM:\t    9876 kB\nVmRSS:\t 9000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(9876));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn this_process_can_be_sampled() -> anyhow::Result<()> {
        let me = [Probe::loadgen()];
        assert!(sample_cpu(&me)?[0] >= 0.0);
        assert!(sample_peak_rss(&me)?[0] > 0);
        Ok(())
    }
}
