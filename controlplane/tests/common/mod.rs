//! The `trellis-controlplane` binary as a child process, over a config
//! directory of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use controlplane::discovery::ProxyStatus;
use mesh_proto::discovery::v1::{DiscoveryRequest, Node, TYPE_SERVICE_INDEX, WILDCARD};
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Bounds every wait, so that a hang fails the test; nothing asserts on
/// how fast anything is.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The first request of a proxy `id` of productpage in `bookinfo`: the
/// wildcard service index.
pub fn service_index_request(id: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: id.into(),
            workload: "productpage".into(),
            namespace: "bookinfo".into(),
            ..Default::default()
        }),
        type_url: TYPE_SERVICE_INDEX.into(),
        subscribe: vec![WILDCARD.into()],
        ..Default::default()
    }
}

/// A free loopback port, for a listener a test starts later (a proxy's
/// or the control plane's, named in a config written first).
///
/// It comes from below Linux's ephemeral range (32768 and up): a port the
/// kernel handed out for `:0` is free again once probed, and the next
/// outgoing connection of any test may take it as its source port before
/// the listener binds it (`AddrInUse`). Ports here are never handed out
/// that way; a per-process counter keeps this binary's tests apart, and
/// the bind probe skips ports other processes hold.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (seed + n) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// Writes `text` to `dir/name` by write-then-rename, as editors and
/// ConfigMap updates do.
pub fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

/// A fresh, empty directory under the system temp dir, removed when
/// dropped.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("trellis-{name}-"))
        .tempdir()
        .unwrap()
}

/// A fresh, empty config directory, removed when dropped. Declare it
/// before the [`ControlPlane`] that reads it, so that the process is
/// killed before its directory goes.
pub struct ConfigDir {
    path: PathBuf,
    /// Holds the config directory and the CA directory the control plane
    /// makes beside it (`<config dir>-ca`), so that both are removed.
    _parent: TempDir,
}

impl ConfigDir {
    pub fn new(name: &str) -> Self {
        let parent = temp_dir(name);
        let path = parent.path().join("config");
        std::fs::create_dir(&path).unwrap();
        Self {
            path,
            _parent: parent,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A running control plane; killed when dropped.
pub struct ControlPlane {
    child: Option<Child>,
    /// The config directory.
    pub dir: PathBuf,
    /// The discovery (gRPC) address.
    pub discovery: SocketAddr,
    /// The admin (metrics, debug) address.
    pub admin: SocketAddr,
    /// Its log lines (stderr).
    pub log: mpsc::UnboundedReceiver<String>,
}

impl ControlPlane {
    /// Starts the binary on `dir`, on free ports, accepting plaintext
    /// discovery (raw gRPC clients, proxies without roots).
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port(), free_port())
    }

    /// [`ControlPlane::start`] on the given addresses.
    pub fn start_on(dir: &Path, discovery: SocketAddr, admin: SocketAddr) -> Self {
        Self::start_with(dir, discovery, admin, &["--plaintext-discovery"])
    }

    /// Starts the binary on `dir` and the given addresses, with `extra`
    /// arguments (and TLS-only discovery unless they say otherwise).
    pub fn start_with(
        dir: &Path,
        discovery: SocketAddr,
        admin: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-controlplane"))
            .args(["--config-dir", dir.to_str().unwrap()])
            .args(extra)
            .args(["--discovery-addr", &discovery.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let stderr = tokio::process::ChildStderr::from_std(stderr).unwrap();
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self {
            child: Some(child),
            dir: dir.to_owned(),
            discovery,
            admin,
            log,
        }
    }

    /// Kills the process (SIGKILL: no goodbye to the proxies).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for a log line containing every one of `needles`.
    pub async fn log_line(&mut self, needles: &[&str]) -> String {
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.log.recv().await {
                if needles.iter().all(|n| line.contains(n)) {
                    return line;
                }
            }
            panic!("the control plane exited before logging {needles:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {needles:?}"))
    }

    /// GETs `path` from the admin server, retrying until it listens.
    pub async fn admin_get(&self, path: &str) -> String {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match http_get(self.admin, path).await {
                    Some(body) => return body,
                    None => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("GET {path} from the control plane never answered"))
    }

    /// Its `/debug/proxies`, in full.
    pub async fn proxies(&self) -> Vec<ProxyStatus> {
        serde_json::from_str(&self.admin_get("/debug/proxies?detail=true").await).unwrap()
    }
}

/// The body of `GET path` from `addr`; `None` when it cannot connect.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}
