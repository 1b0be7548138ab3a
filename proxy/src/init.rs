//! `trellis-proxy init`: the nat rules that send a pod's TCP through its
//! proxy, installed by the injected init container before the app starts.
//!
//! - Inbound: every TCP connection to the pod goes to the inbound
//!   listener (15006), but for the proxy's own health and metrics ports
//!   and the ports excluded.
//! - Outbound: every TCP connection the pod makes goes to the outbound
//!   listener (15001), but for the proxy's own (its uid: that is how the
//!   proxy's upstream connections get out), loopback (the app talking to
//!   itself), and the CIDRs and ports excluded.
//!
//! The rules live in chains of their own (`TRELLIS_*`), reached by one
//! jump from `PREROUTING` and one from `OUTPUT`; installing them again
//! replaces the chains' contents and adds no second jump, and `--cleanup`
//! removes both. They go in with one `iptables-restore --noflush`, in the
//! backend (legacy or nft) the node's kernel already uses, since the two
//! must not be mixed in one network namespace.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// The chains, and the jumps to them.
const INBOUND: &str = "TRELLIS_INBOUND";
const IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
const OUTPUT: &str = "TRELLIS_OUTPUT";
const REDIRECT: &str = "TRELLIS_REDIRECT";
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];
/// The proxy's own inbound ports, never redirected: kubelet probes the
/// health port in plaintext from the node, Prometheus scrapes metrics.
const PROXY_PORTS: [u16; 2] = [15020, 15021];

/// Options of `trellis-proxy init`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct InitSettings {
    /// The proxy's user: its connections are not redirected.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's inbound listener.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's outbound listener.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// Inbound ports that bypass the proxy (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports that bypass the proxy (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound CIDRs that bypass the proxy (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// `legacy` or `nft`; by default, the one the kernel already has
    /// rules or tables in.
    #[arg(long, value_parser = ["legacy", "nft"])]
    pub iptables: Option<String>,
    /// Print the rules and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead.
    #[arg(long)]
    pub cleanup: bool,
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (such as 10.0.0.0/8)"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{ip:?} in {s:?} is not an IP address"))?;
    if !ip.is_ipv4() {
        return Err(format!(
            "{s:?}: only IPv4 is captured, so an IPv6 CIDR excludes nothing"
        ));
    }
    match len.parse::<u8>() {
        Ok(l) if l <= 32 => Ok(s.to_owned()),
        _ => Err(format!("{len:?} in {s:?} is not a prefix length (0 to 32)")),
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "trellis-proxy init needs the NET_ADMIN capability to change the pod's nat rules \
         (the injector grants it to the trellis-init container; a PodSecurity policy or a \
         securityContext may have dropped it)"
    )]
    NoNetAdmin,
    #[error("cannot run {program}: {source}; is iptables installed in the image?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The `iptables-restore --noflush` input that installs the rules, given
/// which jumps already exist (`iptables-save` of the nat table).
pub fn rules(s: &InitSettings, existing: &str) -> String {
    let mut r = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(r, "{text}");
    };
    line("*nat".into());
    // Declaring a chain under --noflush creates it or empties it.
    for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
        line(format!(":{chain} - [0:0]"));
    }
    for (from, to) in JUMPS {
        let jump = format!("-A {from} -p tcp -j {to}");
        if !existing.lines().any(|l| l.trim() == jump) {
            line(jump);
        }
    }
    line(format!(
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        s.inbound_port
    ));
    let mut skipped: Vec<u16> = PROXY_PORTS.to_vec();
    skipped.extend(&s.exclude_inbound_ports);
    skipped.sort_unstable();
    skipped.dedup();
    for port in skipped {
        line(format!("-A {INBOUND} -p tcp --dport {port} -j RETURN"));
    }
    line(format!("-A {INBOUND} -p tcp -j {IN_REDIRECT}"));

    line(format!(
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        s.outbound_port
    ));
    line(format!(
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
        s.proxy_uid
    ));
    line(format!("-A {OUTPUT} -o lo -j RETURN"));
    line(format!("-A {OUTPUT} -d 127.0.0.0/8 -j RETURN"));
    for cidr in &s.exclude_outbound_cidrs {
        line(format!("-A {OUTPUT} -d {cidr} -j RETURN"));
    }
    for port in &s.exclude_outbound_ports {
        line(format!("-A {OUTPUT} -p tcp --dport {port} -j RETURN"));
    }
    line(format!("-A {OUTPUT} -p tcp -j {REDIRECT}"));
    line("COMMIT".into());
    r
}

/// The `iptables-restore --noflush` input that removes the rules: the
/// jumps that exist, then the chains (emptied, then deleted).
pub fn cleanup_rules(existing: &str) -> String {
    let mut r = String::from("*nat\n");
    for (from, to) in JUMPS {
        let jump = format!("-A {from} -p tcp -j {to}");
        if existing.lines().any(|l| l.trim() == jump) {
            let _ = writeln!(r, "-D {from} -p tcp -j {to}");
        }
    }
    let chains = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];
    let present: Vec<&str> = chains
        .into_iter()
        .filter(|c| existing.lines().any(|l| l.starts_with(&format!(":{c} "))))
        .collect();
    for chain in &present {
        let _ = writeln!(r, "-F {chain}");
    }
    for chain in &present {
        let _ = writeln!(r, "-X {chain}");
    }
    r.push_str("COMMIT\n");
    r
}

/// Installs (or with `--cleanup` removes) the rules, or prints them with
/// `--dry-run`.
pub fn run(s: &InitSettings) -> Result<(), InitError> {
    if s.dry_run {
        // Nothing is read either: the rules as a fresh pod gets them.
        let text = if s.cleanup {
            cleanup_rules(&rules(s, ""))
        } else {
            rules(s, "")
        };
        print!("{text}");
        return Ok(());
    }
    if !has_net_admin() {
        return Err(InitError::NoNetAdmin);
    }
    let backend = match s.iptables.as_deref() {
        Some(b) => b.to_owned(),
        None => detect_backend(),
    };
    let save = format!("iptables-{backend}-save");
    let restore = format!("iptables-{backend}-restore");
    let existing = output(&save, &["-t", "nat"], None)?;
    let input = if s.cleanup {
        cleanup_rules(&existing)
    } else {
        rules(s, &existing)
    };
    output(&restore, &["--noflush"], Some(&input))?;
    let what = if s.cleanup { "removed" } else { "installed" };
    eprintln!("trellis-proxy init: nat rules {what} with iptables-{backend}");
    Ok(())
}

/// `legacy` when the kernel has legacy tables (`ip_tables` loaded, as on
/// a node whose kube-proxy uses legacy iptables), else `nft`.
fn detect_backend() -> String {
    let legacy_rules = Command::new("iptables-legacy-save")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("-A "))
        });
    let legacy_tables = std::fs::read_to_string("/proc/net/ip_tables_names")
        .is_ok_and(|names| !names.trim().is_empty());
    if legacy_rules || legacy_tables {
        "legacy".into()
    } else {
        "nft".into()
    }
}

/// Whether this process has CAP_NET_ADMIN (bit 12 of CapEff).
fn has_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

fn output(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
    let spawn_error = |source| InitError::Spawn {
        program: program.into(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if !out.status.success() {
        return Err(InitError::Failed {
            program: program.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn settings(args: &[&str]) -> InitSettings {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            init: InitSettings,
        }
        let args = ["init"].iter().chain(args);
        <Cli as clap::Parser>::try_parse_from(args).unwrap().init
    }

    #[test]
    fn the_rules_capture_tcp_but_the_proxy_s_own_loopback_and_exclusions() {
        let s = settings(&[
            "--exclude-inbound-ports=22,15020",
            "--exclude-outbound-ports=3306",
            "--exclude-outbound-cidrs=169.254.0.0/16",
        ]);
        let text = rules(&s, "");
        let expected = "\
*nat
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_REDIRECT - [0:0]
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN
-A TRELLIS_INBOUND -p tcp --dport 15021 -j RETURN
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A TRELLIS_OUTPUT -o lo -j RETURN
-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN
-A TRELLIS_OUTPUT -d 169.254.0.0/16 -j RETURN
-A TRELLIS_OUTPUT -p tcp --dport 3306 -j RETURN
-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT
COMMIT
";
        assert_eq!(text, expected);
    }

    #[test]
    fn installing_again_adds_no_second_jump_and_cleanup_removes_what_is_there() {
        let s = settings(&[]);
        let saved = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                     :TRELLIS_INBOUND - [0:0]\n:TRELLIS_OUTPUT - [0:0]\n\
                     -A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
                     -A OUTPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n";
        let again = rules(&s, saved);
        assert!(!again.contains("-A PREROUTING"), "{again}");
        assert!(!again.contains("-A OUTPUT"), "{again}");
        assert!(
            again.contains(":TRELLIS_INBOUND - [0:0]"),
            "the chain is emptied"
        );
        assert_eq!(
            cleanup_rules(saved),
            "*nat\n-D PREROUTING -p tcp -j TRELLIS_INBOUND\n-D OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
             -F TRELLIS_INBOUND\n-F TRELLIS_OUTPUT\n-X TRELLIS_INBOUND\n-X TRELLIS_OUTPUT\nCOMMIT\n"
        );
        assert_eq!(cleanup_rules(""), "*nat\nCOMMIT\n", "nothing to remove");
    }

    #[test]
    fn a_bad_exclusion_is_refused_naming_it() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            init: InitSettings,
        }
        let error = |arg: &str| {
            <Cli as clap::Parser>::try_parse_from(["init", arg])
                .unwrap_err()
                .to_string()
        };
        assert!(error("--exclude-outbound-cidrs=10.0.0.0/40").contains("not a prefix length"));
        assert!(error("--exclude-outbound-cidrs=10.0.0.0").contains("is not a CIDR"));
        assert!(error("--exclude-outbound-cidrs=fd00::/8").contains("only IPv4"));
        assert!(error("--exclude-inbound-ports=99999").contains("99999"));
    }
}
