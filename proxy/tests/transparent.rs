//! Transparent mode with real traffic interception: a "pod" in its own
//! network namespace, joined to this host by a veth pair, with iptables
//! rules that redirect its outbound service traffic to the proxy's outbound
//! listener and its inbound traffic to the inbound listener. The proxy
//! reads where each connection was going with `SO_ORIGINAL_DST`.
//!
//! Needs root, `ip` and `iptables`; without them the test says so and
//! passes without running (CI installs both and runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proxy::testutil::{echo_server_on, get, h1_client};

/// The service's virtual IP, routed into the pod and captured there.
const VIP: &str = "10.96.0.10";

struct Pod {
    ns: String,
    host_ip: String,
    pod_ip: String,
    children: Vec<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn missing_prerequisite() -> Option<String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables", "python3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn pod() -> Pod {
    let id = std::process::id();
    let subnet = 1 + id % 250;
    let pod = Pod {
        ns: format!("trellis-t{id}"),
        host_ip: format!("10.231.{subnet}.1"),
        pod_ip: format!("10.231.{subnet}.2"),
        children: Vec::new(),
    };
    let (ns, host_if, pod_if) = (pod.ns.as_str(), format!("tvh{id}"), format!("tvp{id}"));
    run(&["ip", "netns", "add", ns]);
    run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    run(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
    ]);
    run(&["ip", "link", "set", &pod_if, "netns", ns]);
    run(&[
        "ip",
        "addr",
        "add",
        &format!("{}/30", pod.host_ip),
        "dev",
        &host_if,
    ]);
    run(&["ip", "link", "set", &host_if, "up"]);
    run(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/30", pod.pod_ip),
        "dev",
        &pod_if,
    ]);
    run(&["ip", "-n", ns, "link", "set", &pod_if, "up"]);
    run(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &pod.host_ip,
    ]);
    let nat = |rule: &[&str]| {
        let mut args = vec!["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A"];
        args.extend_from_slice(rule);
        run(&args);
    };
    // Outbound: the app's connections to service VIPs go to 15001.
    nat(&[
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.96.0.0/16",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    // Inbound: connections to the app's port from outside go to 15006.
    nat(&[
        "PREROUTING",
        "-p",
        "tcp",
        "-i",
        &pod_if,
        "--dport",
        "9080",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    pod
}

impl Pod {
    fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_with_iptables_redirects_in_a_network_namespace() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIPPED transparent-mode namespace test: {why}");
        return;
    }
    // Made before the pod, so that it outlives the proxy that reads it.
    let config_file = tempfile::Builder::new()
        .prefix("trellis-transparent-")
        .suffix(".yaml")
        .tempfile()
        .unwrap();
    let mut pod = pod();
    // The backend of the service lives outside the pod, on the host side
    // of the veth.
    let backend = echo_server_on(format!("{}:0", pod.host_ip).parse().unwrap(), "reviews-v1").await;

    let config = format!(
        r#"
workload: {{ name: productpage, namespace: default }}
listeners:
  - {{ name: outbound, address: "0.0.0.0:15001", direction: outbound, mode: transparent }}
  - {{ name: inbound, address: "0.0.0.0:15006", direction: inbound, mode: transparent }}
services:
  - name: reviews
    addresses: [{VIP}]
    ports: [{{ port: 9080 }}]
backends:
  - {{ name: reviews, endpoints: [{{ address: "{backend}", workload: reviews-v1 }}] }}
"#
    );
    let path = config_file.path();
    std::fs::write(path, config).unwrap();
    pod.spawn(&[
        env!("CARGO_BIN_EXE_trellis-proxy"),
        "run",
        "--config",
        path.to_str().unwrap(),
        "--health-addr",
        "0.0.0.0:15021",
    ]);
    // The app in the pod, on the pod's loopback only.
    pod.spawn(&[
        "python3",
        "-m",
        "http.server",
        "9080",
        "--bind",
        "127.0.0.1",
    ]);

    let health: SocketAddr = format!("{}:15021", pod.pod_ip).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = tokio::net::TcpStream::connect(health).await {
            drop(s);
            let mut c = h1_client(health).await;
            if get(&mut c, "/healthz/ready", "pod").await.0 == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "proxy in the pod never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Outbound: the app calls the service VIP; iptables redirects the
    // connection to the proxy, which routes it by its original destination.
    let script = format!(
        "import urllib.request,sys\nr=urllib.request.urlopen('http://{VIP}:9080/reviews/1',timeout=10)\n\
         sys.stdout.write(r.headers['x-served-by']+'\\n'+r.read().decode())"
    );
    let out = pod.exec(&["python3", "-c", &script]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("reviews-v1\n"), "{stdout}");
    assert!(stdout.contains("\"path\":\"/reviews/1\""), "{stdout}");

    // Inbound: a client outside the pod connects to the pod's IP; iptables
    // sends it to the inbound listener, which forwards to the app on the
    // pod's loopback at the original port.
    // The app (python's http.server) may still be starting on a busy
    // machine: until it listens, the proxy answers 503 connection refused.
    let app: SocketAddr = format!("{}:9080", pod.pod_ip).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let mut c = h1_client(app).await;
        let (status, _, body) = get(&mut c, "/", "productpage").await;
        if status != 503 || !body.contains("Connection refused") || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing"), "{body}");

    // Both directions were counted by the proxy in the pod.
    let metrics: SocketAddr = format!("{}:15020", pod.pod_ip).parse().unwrap();
    let mut c = h1_client(metrics).await;
    let text = get(&mut c, "/metrics", "pod").await.2;
    let outbound = proxy::testutil::sample(
        &text,
        "trellis_requests_total",
        &[
            ("direction", "outbound"),
            ("destination_service", "reviews"),
            ("destination_workload", "reviews-v1"),
        ],
    );
    let inbound = proxy::testutil::sample(
        &text,
        "trellis_requests_total",
        &[("direction", "inbound"), ("response_code", "200")],
    );
    assert_eq!((outbound, inbound), (1.0, 1.0), "{text}");
}
