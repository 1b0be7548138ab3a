//! `trellis-proxy wait`: blocks until the proxy in this pod is ready, for
//! the `postStart` hook of a classic sidecar, which holds the app's start
//! until it returns (what Istio's holdApplicationUntilProxyStarts does).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Options of `trellis-proxy wait`.
#[derive(clap::Args, Debug, Clone)]
pub struct WaitSettings {
    /// The proxy's health address.
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub health_addr: SocketAddr,
    /// How long to wait before giving up (and failing the hook, which
    /// makes kubelet restart the container).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// How often readiness is asked.
const POLL: Duration = Duration::from_millis(100);

/// Waits until `GET /healthz/ready` answers 200.
pub fn run(s: &WaitSettings) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no answer yet");
    while started.elapsed() < s.timeout {
        match ready(s.health_addr) {
            Ok(true) => return Ok(started.elapsed()),
            Ok(false) => last = "not ready yet".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(POLL);
    }
    Err(format!(
        "the proxy at {} was not ready within {:?} ({last})",
        s.health_addr, s.timeout
    ))
}

fn ready(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(
        stream,
        "GET /healthz/ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head.ends_with(b" 200"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::TcpListener;

    use super::*;

    /// A health port that answers 503 twice, then 200.
    fn health() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let status = if i < 2 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            }
        });
        addr
    }

    #[test]
    fn waits_until_the_proxy_is_ready() {
        let s = WaitSettings {
            health_addr: health(),
            timeout: Duration::from_secs(10),
        };
        assert!(run(&s).unwrap() >= POLL * 2);
    }

    #[test]
    fn gives_up_after_the_timeout_saying_why() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = WaitSettings {
            health_addr: closed,
            timeout: Duration::from_millis(300),
        };
        let error = run(&s).unwrap_err();
        assert!(error.contains("was not ready within 300ms"), "{error}");
    }
}
