//! The cluster's network, kept on this machine: pods on the harness bridge
//! in 198.18.0.0/24 (the bridge's own address is the CNI gateway and the
//! node IP), Services in 198.19.0.0/24 routed onto the bridge, the rest of
//! 198.18.0.0/15 unreachable, and nothing forwarded between the bridge and
//! any other interface.
//!
//! Before `up` changes anything it records a [`Snapshot`] of what it and
//! the components it starts may touch (links, routes, network namespaces,
//! iptables rules, sysctls, mounts, cgroups); `down` undoes the
//! differences and fails, naming them, if any are left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::sh;

/// The harness bridge.
pub const BRIDGE: &str = "trellis0";
/// The bridge's address: CNI gateway, node IP, API server and DNS endpoint.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Pods' addresses.
pub const POD_CIDR: &str = "198.18.0.0/24";
/// The controller manager's cluster CIDR; the node gets POD_CIDR from it.
pub const CLUSTER_CIDR: &str = "198.18.0.0/16";
/// ClusterIPs.
pub const SERVICE_CIDR: &str = "198.19.0.0/24";
/// The `kubernetes` Service.
pub const API_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The `kube-dns` Service: the kubelet's `clusterDNS`.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// Everything the harness may address; what no route above covers is
/// unreachable.
pub const HARNESS_RANGE: &str = "198.18.0.0/15";
/// The API server's port on NODE_IP.
pub const API_PORT: u16 = 6443;
/// The filter chain that keeps pod traffic on the bridge.
const CHAIN: &str = "TRELLIS-CLUSTER";

/// Sysctls `up` sets or the kubelet and kube-proxy may set (kernel
/// tunables, conntrack, route_localnet); `down` puts back what it found.
const SYSCTLS: &[&str] = &[
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv4/conf/default/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/bridge/bridge-nf-call-arptables",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
];

const IPTABLES_TABLES: &[&str] = &["filter", "nat", "mangle", "raw"];
const IPTABLES: &[&str] = &["iptables", "ip6tables"];

/// What the machine looked like, in the parts the harness touches.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub links: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub netns: BTreeSet<String>,
    /// `"iptables nat"` → its rules as `iptables -S` prints them.
    pub iptables: BTreeMap<String, BTreeSet<String>>,
    /// `/proc/sys` path → value.
    pub sysctls: BTreeMap<String, String>,
    pub mounts: BTreeSet<String>,
    /// cgroup directories named `kubepods` (the kubelet's).
    pub cgroups: BTreeSet<String>,
}

impl Snapshot {
    pub fn take() -> anyhow::Result<Self> {
        let links = sh::output(Command::new("ip").args(["-o", "link", "show"]))?
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or("").to_owned())
            .collect();
        let mut routes = BTreeSet::new();
        for family in ["-4", "-6"] {
            let text =
                sh::output(Command::new("ip").args([family, "route", "show", "table", "all"]))
                    .unwrap_or_default();
            routes.extend(text.lines().map(normalize_route));
        }
        let netns = sh::output(Command::new("ip").args(["netns", "list"]))?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        let mut iptables = BTreeMap::new();
        for bin in IPTABLES {
            for table in IPTABLES_TABLES {
                if let Ok(text) = sh::output(Command::new(bin).args(["-w", "-t", table, "-S"])) {
                    iptables.insert(
                        format!("{bin} {table}"),
                        text.lines().map(str::to_owned).collect(),
                    );
                }
            }
        }
        let mut sysctls = BTreeMap::new();
        let mut paths: Vec<String> = SYSCTLS.iter().map(|s| s.to_string()).collect();
        for link in &links {
            paths.push(format!("net/ipv4/conf/{link}/forwarding"));
        }
        for path in paths {
            if let Ok(value) = std::fs::read_to_string(Path::new("/proc/sys").join(&path)) {
                sysctls.insert(path, value.trim().to_owned());
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .map(str::to_owned)
            .collect();
        Ok(Self {
            links,
            routes,
            netns,
            iptables,
            sysctls,
            mounts,
            cgroups: kubepods_cgroups(),
        })
    }

    /// What differs from `before`, one line each; empty when clean.
    pub fn differences(&self, before: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let mut sets = |what: &str, now: &BTreeSet<String>, then: &BTreeSet<String>| {
            for extra in now.difference(then) {
                out.push(format!("{what} left behind: {extra}"));
            }
            for gone in then.difference(now) {
                out.push(format!("{what} missing since before up: {gone}"));
            }
        };
        sets("link", &self.links, &before.links);
        sets("route", &self.routes, &before.routes);
        sets("network namespace", &self.netns, &before.netns);
        sets("mount", &self.mounts, &before.mounts);
        sets("cgroup", &self.cgroups, &before.cgroups);
        let empty = BTreeSet::new();
        for (table, rules) in &self.iptables {
            let then = before.iptables.get(table).unwrap_or(&empty);
            sets(&format!("{table} rule"), rules, then);
        }
        for (path, value) in &before.sysctls {
            let now = std::fs::read_to_string(Path::new("/proc/sys").join(path))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default();
            if &now != value && !now.is_empty() {
                out.push(format!("sysctl {path} is {now}, was {value}"));
            }
        }
        out
    }
}

/// IPv6 routes learnt from router adverts carry a countdown; drop it.
fn normalize_route(line: &str) -> String {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    if let Some(i) = words.iter().position(|w| *w == "expires") {
        words.drain(i..(i + 2).min(words.len()));
    }
    words.join(" ")
}

/// The kubelet's cgroup directories in every hierarchy.
pub fn kubepods_cgroups() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for h in hierarchies.flatten() {
        let path = h.path();
        if path.join("kubepods").is_dir() {
            out.insert(path.join("kubepods").display().to_string());
        }
        if path.join("kubepods.slice").is_dir() {
            out.insert(path.join("kubepods.slice").display().to_string());
        }
    }
    if Path::new("/sys/fs/cgroup/kubepods").is_dir() {
        out.insert("/sys/fs/cgroup/kubepods".into());
    }
    out
}

/// Checks that the kernel has what the cluster needs, naming what is
/// missing.
pub fn preflight() -> anyhow::Result<()> {
    let filesystems = std::fs::read_to_string("/proc/filesystems")?;
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"))
    {
        bail!(
            "the kernel has no overlay filesystem (not in /proc/filesystems): containerd's overlayfs snapshotter needs it"
        );
    }
    if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
        // A module may provide it; try once.
        sh::try_run(Command::new("modprobe").arg("br_netfilter"));
        if !Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() {
            bail!(
                "the kernel has no bridge netfilter (/proc/sys/net/bridge/bridge-nf-call-iptables is missing, and modprobe br_netfilter did not add it): Service traffic between pods on one bridge needs it"
            );
        }
    }
    if !Path::new("/dev/kmsg").exists() {
        bail!("/dev/kmsg is missing: the kubelet's OOM watcher reads it");
    }
    let cgroups = std::fs::read_to_string("/proc/self/mountinfo")?;
    if !cgroups.contains(" - cgroup ") && !cgroups.contains(" - cgroup2 ") {
        bail!(
            "no cgroup filesystem is mounted under /sys/fs/cgroup: the kubelet and runc need one"
        );
    }
    sh::output(Command::new("iptables").args(["-w", "-t", "nat", "-S"]))
        .context("iptables cannot read the nat table: kube-proxy needs it")?;
    Ok(())
}

/// Makes the bridge, the routes, the forwarding guard and the sysctls.
pub fn setup(before: &Snapshot) -> anyhow::Result<()> {
    // The live state, not `before`: after a crashed `up`, `before` is the
    // machine as it was before that one, and the bridge may already exist.
    let bridge_exists = sh::try_run(Command::new("ip").args(["link", "show", "dev", BRIDGE]));
    if !bridge_exists {
        sh::run(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))
            .context("cannot create the harness bridge (does the kernel have bridge support?)")?;
    }
    sh::try_run(Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE]));
    sh::run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    sh::run(Command::new("ip").args([
        "route",
        "replace",
        SERVICE_CIDR,
        "dev",
        BRIDGE,
        "src",
        &NODE_IP.to_string(),
    ]))?;
    sh::run(Command::new("ip").args(["route", "replace", "unreachable", HARNESS_RANGE]))?;
    // Pod traffic stays between pods and the node: accepted on the bridge,
    // dropped towards (or from) any other interface.
    if !sh::try_run(Command::new("iptables").args(["-w", "-t", "filter", "-S", CHAIN])) {
        sh::run(Command::new("iptables").args(["-w", "-t", "filter", "-N", CHAIN]))?;
        let rules: [&[&str]; 3] = [
            &["-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"],
            &["-i", BRIDGE, "-j", "DROP"],
            &["-o", BRIDGE, "-j", "DROP"],
        ];
        for rule in rules {
            sh::run(
                Command::new("iptables")
                    .args(["-w", "-t", "filter", "-A", CHAIN])
                    .args(rule),
            )?;
        }
        sh::run(
            Command::new("iptables")
                .args(["-w", "-t", "filter", "-I", "FORWARD", "1", "-j", CHAIN]),
        )?;
    }
    write_sysctl("net/bridge/bridge-nf-call-iptables", "1")?;
    write_sysctl("net/ipv4/ip_forward", "1")?;
    // ip_forward turns forwarding on for every interface; only the bridge
    // should forward what it receives.
    for link in &before.links {
        if link != BRIDGE {
            let path = format!("net/ipv4/conf/{link}/forwarding");
            if Path::new("/proc/sys").join(&path).exists() {
                write_sysctl(&path, "0")?;
            }
        }
    }
    Ok(())
}

/// Removes what `setup` and the components added since `before`: the
/// bridge, routes, network namespaces, iptables rules and chains, and puts
/// the sysctls back.
pub fn teardown(before: &Snapshot) -> anyhow::Result<()> {
    let now = Snapshot::take()?;
    for ns in now.netns.difference(&before.netns) {
        sh::try_run(Command::new("ip").args(["netns", "delete", ns]));
    }
    if !before.links.contains(BRIDGE) {
        sh::try_run(Command::new("ip").args(["link", "delete", BRIDGE]));
    }
    sh::try_run(Command::new("ip").args(["route", "delete", "unreachable", HARNESS_RANGE]));
    sh::try_run(Command::new("ip").args(["route", "delete", SERVICE_CIDR]));
    let mut errors = Vec::new();
    for (table, rules) in &now.iptables {
        let empty = BTreeSet::new();
        let then = before.iptables.get(table).unwrap_or(&empty);
        if let Some(script) = iptables_undo(table, rules, then) {
            let (bin, _) = table.split_once(' ').unwrap_or((table, ""));
            let restore = format!("{bin}-restore");
            if let Err(err) = restore_iptables(&restore, &script) {
                errors.push(format!("{table}: {err:#}"));
            }
        }
    }
    // ip_forward first: writing it resets every interface's forwarding.
    let mut sysctls: Vec<(&String, &String)> = before.sysctls.iter().collect();
    sysctls.sort_by_key(|(path, _)| *path != "net/ipv4/ip_forward");
    for (path, value) in sysctls {
        let current =
            std::fs::read_to_string(Path::new("/proc/sys").join(path)).unwrap_or_default();
        let exists = Path::new("/proc/sys").join(path).exists();
        if current.trim() != value
            && exists
            && let Err(err) = write_sysctl(path, value)
        {
            errors.push(format!("{err:#}"));
        }
    }
    if !errors.is_empty() {
        bail!("cannot undo every network change: {}", errors.join("; "));
    }
    Ok(())
}

/// An `iptables-restore --noflush` script that deletes the rules added
/// since `then` (in every chain) and then the chains added since `then`.
fn iptables_undo(table: &str, now: &BTreeSet<String>, then: &BTreeSet<String>) -> Option<String> {
    let name = table.split_once(' ').map(|(_, t)| t).unwrap_or(table);
    let added_rules: Vec<&String> = now
        .difference(then)
        .filter(|l| l.starts_with("-A "))
        .collect();
    let added_chains: Vec<&str> = now
        .difference(then)
        .filter_map(|l| l.strip_prefix("-N "))
        .collect();
    if added_rules.is_empty() && added_chains.is_empty() {
        return None;
    }
    let mut script = format!("*{name}\n");
    for rule in &added_rules {
        let chain = rule.split_whitespace().nth(1).unwrap_or("");
        // Rules inside chains that go away are flushed with them.
        if !added_chains.contains(&chain) {
            script.push_str(&format!("-D {}\n", &rule[3..]));
        }
    }
    for chain in &added_chains {
        script.push_str(&format!("-F {chain}\n"));
    }
    for chain in &added_chains {
        script.push_str(&format!("-X {chain}\n"));
    }
    script.push_str("COMMIT\n");
    Some(script)
}

fn restore_iptables(bin: &str, script: &str) -> anyhow::Result<()> {
    sh::run_with_input(Command::new(bin).args(["-w", "--noflush"]), script)
        .with_context(|| format!("the script was:\n{script}"))
}

fn write_sysctl(path: &str, value: &str) -> anyhow::Result<()> {
    let file = Path::new("/proc/sys").join(path);
    std::fs::write(&file, value)
        .with_context(|| format!("cannot set {} to {value}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_undo_script_deletes_added_rules_and_chains_only() {
        let then: BTreeSet<String> = ["-P FORWARD ACCEPT", "-A FORWARD -j OLD"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut now = then.clone();
        for rule in [
            "-N KUBE-SERVICES",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A KUBE-SERVICES -d 198.19.0.1/32 -j KUBE-SVC-X",
        ] {
            now.insert(rule.to_string());
        }
        let script = iptables_undo("iptables nat", &now, &then).expect("changes");
        assert_eq!(
            script,
            "*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-F KUBE-SERVICES\n-X KUBE-SERVICES\nCOMMIT\n"
        );
        assert_eq!(iptables_undo("iptables nat", &then, &then), None);
    }

    #[test]
    fn route_countdowns_are_ignored() {
        assert_eq!(
            normalize_route(
                "2001:db8::/64 dev eth0 proto ra metric 100 expires 86380sec pref medium"
            ),
            "2001:db8::/64 dev eth0 proto ra metric 100 pref medium"
        );
    }

    #[test]
    fn differences_name_what_is_left() {
        let before = Snapshot::default();
        let mut after = Snapshot::default();
        after.links.insert(BRIDGE.to_string());
        after.netns.insert("cni-1234".to_string());
        let diff = after.differences(&before);
        assert_eq!(
            diff,
            vec![
                "link left behind: trellis0".to_string(),
                "network namespace left behind: cni-1234".to_string()
            ]
        );
    }
}
