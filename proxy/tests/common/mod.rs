//! Helpers shared by the lifecycle, metrics and robustness tests: the real
//! `trellis-proxy` binary in a temporary directory, one-shot HTTP requests
//! that report failures instead of panicking, and raw socket exchanges.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod streams;

/// Upper bound for anything that should happen "soon"; only there so a
/// broken proxy fails the test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// `N` distinct free ports on loopback. The ports are released before they
/// are used, so another process could take one in between; callers that
/// start a process on them retry.
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap())
}

/// A unique, empty temporary directory, removed when dropped.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("trellis-{tag}-"))
        .tempdir()
        .unwrap()
}

/// Polls `f` until it returns `Some`, or panics with `what` after
/// [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The `x-served-by` header of the test echo server.
    pub fn served_by(&self) -> &str {
        self.headers
            .get("x-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends one request on a fresh HTTP/1.1 connection. Every failure,
/// including a response that does not finish within [`PATIENCE`], is an
/// `Err` naming where it happened.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Reply, String> {
    let fut = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        send_on(&mut send, method, path, body).await
    };
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| Err(format!("{method} {path}: no complete response in time")))
}

/// Sends one request on an existing keep-alive connection.
pub async fn send_on(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<Reply, String> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "svc")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| format!("build request: {e}"))?;
    send.ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{method} {path}: body of {}: {e}", parts.status))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The peer closed the connection (FIN).
    Closed,
    /// The connection was reset.
    Reset,
    /// Nothing more arrived within the deadline and the connection stayed
    /// open: the proxy hung.
    Hung,
}

/// Writes `bytes` to a fresh connection to `addr` and reads until the proxy
/// closes the connection or `wait` passes. Returns what was read and how
/// the read ended.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, End) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before it reads everything; a failed
    // write then shows up as a reset on the read side too.
    let _ = s.write_all(bytes).await;
    read_to_end(&mut s, wait).await
}

/// Reads from `s` until EOF, an error, or `wait` passes.
pub async fn read_to_end(s: &mut TcpStream, wait: Duration) -> (String, End) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 8192];
    let end = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break End::Hung,
            Ok(Ok(0)) => break End::Closed,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break End::Reset,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), end)
}

/// A raw TCP echo server: every byte received is sent back, and the
/// connection is closed when the client stops sending.
pub async fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// The real `trellis-proxy` binary, run from a config file in its own
/// temporary directory, with stdout and stderr captured in files there.
/// Killed, and its directory removed, when dropped.
pub struct Binary {
    child: tokio::process::Child,
    pub dir: TempDir,
    pub config: PathBuf,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
}

impl Binary {
    /// Starts the binary with `yaml`, in which `{LISTEN}` is replaced by a
    /// free loopback address, and waits until it reports ready.
    pub async fn start(tag: &str, yaml: &str, extra_args: &[&str]) -> Binary {
        // The ports are picked here and bound by the child a moment later;
        // if another process takes one in between, start again on others.
        for _ in 0..5 {
            if let Some(bin) = Self::try_start(tag, yaml, extra_args).await {
                return bin;
            }
        }
        panic!("trellis-proxy could not bind its ports in 5 attempts");
    }

    async fn try_start(tag: &str, yaml: &str, extra_args: &[&str]) -> Option<Binary> {
        let dir = temp_dir(tag);
        let [listener, admin, metrics, health] = free_addrs();
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml.replace("{LISTEN}", &listener.to_string())).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--health-addr", &health.to_string()])
            .args(["--log", "info"])
            .args(extra_args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut bin = Binary {
            child,
            dir,
            config,
            listener,
            admin,
            metrics,
            health,
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = bin.child.try_wait() {
                let log = bin.stderr();
                if log.contains("cannot listen on") {
                    return None;
                }
                panic!("trellis-proxy exited at start with {status}:\n{log}");
            }
            let ready = request(bin.health, "GET", "/healthz/ready", b"").await;
            if ready.is_ok_and(|r| r.status == StatusCode::OK) {
                // Make sure it is this process that answers, not another
                // one that took the port.
                let dump = request(bin.admin, "GET", "/config_dump", b"").await;
                if dump.is_ok_and(|d| d.body.contains(&listener.to_string())) {
                    return Some(bin);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "trellis-proxy did not become ready:\n{}",
                bin.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// Replaces the config file the way editors and ConfigMaps do: write a
    /// temporary file beside it, then rename it over the old one.
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.dir.path().join("proxy.yaml.tmp");
        std::fs::write(&tmp, text.replace("{LISTEN}", &self.listener.to_string())).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Sends SIGTERM with the `kill` command (the workspace forbids the
    /// unsafe a direct syscall would need).
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    /// `version` of the admin config dump.
    pub async fn config_version(&self) -> u64 {
        let r = request(self.admin, "GET", "/config_dump", b"")
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        json["version"].as_u64().unwrap()
    }

    /// The Prometheus text.
    pub async fn scrape(&self) -> String {
        request(self.metrics, "GET", "/metrics", b"")
            .await
            .unwrap()
            .body
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout"))
    }

    /// Everything the process wrote to stderr (its logs) so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr"))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- trellis-proxy stderr ---\n{}", self.stderr());
        }
        let _ = self.child.start_kill();
    }
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}
