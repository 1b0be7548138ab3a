//! The load generator: HTTP/1.1 over a fixed set of keep-alive connections,
//! either at a fixed rate (open loop) or back to back (closed loop).
//!
//! Open loop avoids coordinated omission: a pacer thread hands out requests
//! at fixed intervals, round-robin over the connections, and never waits for
//! a response. Latency runs from the moment the pacer hands a request over,
//! so a request queued behind a slow response on its connection counts the
//! wait. The pacer is a plain thread because tokio's timer has 1 ms
//! granularity, coarser than the latencies measured. Its own lateness
//! against the ideal schedule is recorded apart (`pacer_lag`), not added:
//! on these VMs it is mostly the ~0.1 ms it takes a sleeping vCPU to wake,
//! which belongs to the load generator, not to the path under test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::Options;

/// Highest latency the histograms hold, in microseconds (one minute).
const MAX_LATENCY_US: u64 = 60_000_000;
/// After an error in closed loop, wait this long before the next request so
/// that a refusing target does not turn the loop into a busy spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Connections to one target, reused across phases.
pub struct LoadGen {
    target: Arc<Target>,
    conns: Vec<Conn>,
}

/// What a phase measured.
pub struct Phase {
    /// Latency of successful requests, in microseconds.
    pub latency: Histogram<u64>,
    /// Open loop: how late the pacer handed out each request against the
    /// ideal schedule, in microseconds.
    pub pacer_lag: Histogram<u64>,
    /// Open loop: from hand-over to sending, in microseconds: queueing
    /// behind earlier responses on the connection, plus waking the runtime.
    pub send_lag: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    body: Bytes,
    timeout: Duration,
}

#[derive(Default)]
struct Conn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl LoadGen {
    /// Opens the connections; fails if the target does not answer.
    pub async fn connect(
        addr: SocketAddr,
        opts: &Options,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let target = Arc::new(Target {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
            body: Bytes::from(vec![b'x'; opts.request_size]),
            timeout,
        });
        let mut conns = Vec::with_capacity(opts.connections);
        for _ in 0..opts.connections {
            let mut conn = Conn::default();
            conn.request(&target)
                .await
                .with_context(|| format!("first request to {addr} failed"))?;
            conns.push(conn);
        }
        Ok(Self { target, conns })
    }

    /// Sends `rate` requests per second for `duration` and waits for the
    /// answers.
    pub async fn open_loop(&mut self, rate: u32, duration: Duration) -> anyhow::Result<Phase> {
        ensure!(rate > 0, "the rate must be above 0");
        let interval = Duration::from_secs(1) / rate;
        // A little lead time so the first intended times are not already past.
        let start = Instant::now() + Duration::from_millis(5);
        let end = start + duration;
        // Requests still queued this long after the schedule ends fail
        // without being sent, so a hung target cannot stall the run.
        let give_up = end + self.target.timeout;
        let mut senders = Vec::with_capacity(self.conns.len());
        let mut tasks = Vec::with_capacity(self.conns.len());
        for mut conn in self.conns.drain(..) {
            let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
            senders.push(tx);
            let target = Arc::clone(&self.target);
            let mut phase = Phase::new()?;
            tasks.push(tokio::spawn(async move {
                while let Some(handed_over) = rx.recv().await {
                    let now = Instant::now();
                    phase.send_lag.saturating_record(micros(now - handed_over));
                    let result = if now > give_up {
                        Err(anyhow!(
                            "gave up: the target fell more than the timeout behind"
                        ))
                    } else {
                        conn.request(&target).await
                    };
                    match result {
                        Ok(()) => phase.success(handed_over.elapsed()),
                        Err(error) => phase.error(&error),
                    }
                }
                (conn, phase)
            }));
        }
        let pacer = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || pace(&senders, start, end, interval))
            .context("cannot start the pacer thread")?;
        let mut total = self.collect(tasks).await?;
        // The tasks end only once the pacer has dropped its senders, so this
        // join does not block.
        total.pacer_lag = pacer
            .join()
            .map_err(|_| anyhow!("the pacer thread panicked"))??;
        total.elapsed = duration;
        Ok(total)
    }

    /// Sends requests back to back on every connection for `duration`.
    pub async fn closed_loop(&mut self, duration: Duration) -> anyhow::Result<Phase> {
        let start = Instant::now();
        let end = start + duration;
        let mut tasks = Vec::with_capacity(self.conns.len());
        for mut conn in self.conns.drain(..) {
            let target = Arc::clone(&self.target);
            let mut phase = Phase::new()?;
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let sent = Instant::now();
                    match conn.request(&target).await {
                        Ok(()) => phase.success(sent.elapsed()),
                        Err(error) => {
                            phase.error(&error);
                            tokio::time::sleep(ERROR_BACKOFF).await;
                        }
                    }
                }
                (conn, phase)
            }));
        }
        let mut total = self.collect(tasks).await?;
        total.elapsed = start.elapsed();
        Ok(total)
    }

    /// Takes the connections back from the tasks and merges their figures.
    async fn collect(
        &mut self,
        tasks: Vec<tokio::task::JoinHandle<(Conn, Phase)>>,
    ) -> anyhow::Result<Phase> {
        let mut total = Phase::new()?;
        for task in tasks {
            let (conn, phase) = task.await.context("a load task failed")?;
            self.conns.push(conn);
            total.merge(phase)?;
        }
        Ok(total)
    }
}

impl Phase {
    fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3);
        Ok(Self {
            latency: histogram()?,
            pacer_lag: histogram()?,
            send_lag: histogram()?,
            ok: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        })
    }

    /// Requests per second that succeeded.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    fn success(&mut self, latency: Duration) {
        self.ok += 1;
        self.latency.saturating_record(micros(latency));
    }

    fn error(&mut self, error: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{error:#}"));
        }
    }

    fn merge(&mut self, other: Phase) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.pacer_lag.add(&other.pacer_lag)?;
        self.send_lag.add(&other.send_lag)?;
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }
}

impl Conn {
    /// One request and its whole response. After a failure the connection
    /// is dropped and the next request opens a new one.
    async fn request(&mut self, target: &Target) -> anyhow::Result<()> {
        let sender = self.sender.take();
        let sender = tokio::time::timeout(target.timeout, round_trip(target, sender))
            .await
            .map_err(|_| anyhow!("no response within {:?}", target.timeout))??;
        self.sender = Some(sender);
        Ok(())
    }
}

async fn round_trip(
    target: &Target,
    sender: Option<SendRequest<Full<Bytes>>>,
) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let mut sender = match sender {
        Some(sender) if !sender.is_closed() => sender,
        _ => connect(target.addr).await?,
    };
    let method = if target.body.is_empty() {
        Method::GET
    } else {
        Method::POST
    };
    let request = Request::builder()
        .method(method)
        .uri("/")
        .header(HOST, target.host.clone())
        .body(Full::new(target.body.clone()))?;
    sender.ready().await.context("connection closed")?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.context("reading the response body")?;
    }
    ensure!(status.is_success(), "response status {status}");
    Ok(sender)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Errors surface on the sender; the end of the connection is normal.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Hands a request to each connection in turn at the scheduled times, and
/// returns how late it was, in microseconds.
fn pace(
    senders: &[mpsc::UnboundedSender<Instant>],
    start: Instant,
    end: Instant,
    interval: Duration,
) -> anyhow::Result<Histogram<u64>> {
    // The default 50 µs slack would make every wake-up later still; failing
    // to lower it only costs precision.
    let _ = std::fs::write("/proc/thread-self/timerslack_ns", "1");
    let mut lag = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let mut next = start;
    let mut sent: u32 = 0;
    for conn in senders.iter().cycle() {
        if next >= end {
            break;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let handed_over = Instant::now();
        lag.saturating_record(micros(handed_over.saturating_duration_since(next)));
        if conn.send(handed_over).is_err() {
            break;
        }
        sent += 1;
        next = start + interval * sent;
    }
    Ok(lag)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
