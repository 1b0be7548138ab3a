//! Protocol detection from a connection's first bytes.
//!
//! The client's first bytes decide: the HTTP/2 connection preface means
//! h2c with prior knowledge, a method token and a space mean HTTP/1.x, and
//! anything else is opaque TCP. A client that sends nothing within the
//! timeout is talking to a server-speaks-first protocol (SMTP, MySQL), which
//! is opaque TCP too; one that sent the start of a method is slow, not
//! silent, and is waited for up to the header-read timeout. The bytes read are replayed to whichever handler takes
//! the connection through [`Rewind`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else.
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token we wait for before calling a connection TCP.
const MAX_METHOD: usize = 24;

/// Reads from `io` until the protocol is known, or the peer closes.
/// Silence for `silence` means a server-speaks-first protocol: opaque TCP.
/// Once the peer has sent bytes that may still begin an HTTP request (`G`,
/// then nothing), it is not silent: it gets until `head` (the header-read
/// timeout) from the start to finish its method, so that a slow client's
/// request is still handled as HTTP (hop-by-hop headers stripped, HTTP
/// policies applied, counted) rather than passed through as bytes. A peer
/// that has not by then is refused with `TimedOut`. Returns the protocol
/// and the bytes read.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    silence: Duration,
    head: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let start = tokio::time::Instant::now();
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        let deadline = start
            + if buf.is_empty() {
                silence
            } else {
                head.max(silence)
            };
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) if buf.is_empty() => return Ok((Detected::Tcp, buf.freeze())),
            Err(_elapsed) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client sent {} bytes of what may be an HTTP request and no more within the header-read timeout ({head:?})",
                        buf.len()
                    ),
                ));
            }
            Ok(Ok(0)) => return Ok((classify(&buf).unwrap_or(Detected::Tcp), buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `None` while more bytes could change the answer.
fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b' ' if i > 0 => return Some(Detected::Http1),
            b'A'..=b'Z' | b'-' | b'_' => {}
            _ => return Some(Detected::Tcp),
        }
    }
    (buf.len() > MAX_METHOD).then_some(Detected::Tcp)
}

pin_project_lite::pin_project! {
    /// An IO that first yields bytes already read from the inner IO.
    #[derive(Debug)]
    pub struct Rewind<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// The inner IO.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Detected::Tcp),
            "TLS"
        );
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Tcp));
        assert_eq!(classify(b" GET"), Some(Detected::Tcp));
        assert_eq!(classify(&[b'A'; 40]), Some(Detected::Tcp));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_means_tcp_after_the_timeout() {
        let (mut client, _server) = tokio::io::duplex(64);
        let (d, bytes) = detect(
            &mut client,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!((d, bytes.len()), (Detected::Tcp, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_method_waits_for_the_head_timeout_not_the_silence_one() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        let client = tokio::spawn(async move {
            b.write_all(b"G").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            b.write_all(b"ET / HTTP/1.1\r\n").await.unwrap();
            b
        });
        let (d, prefix) = detect(&mut a, Duration::from_secs(1), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!((d, &prefix[..4]), (Detected::Http1, &b"GET "[..]));
        let _b = client.await.unwrap();

        // One that never finishes its method is refused at the head timeout.
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GE").await.unwrap();
        let began = tokio::time::Instant::now();
        let err = detect(&mut a, Duration::from_secs(1), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(began.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (d, prefix) = detect(&mut a, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(d, Detected::Http1);
        b.write_all(b"rest").await.unwrap();
        drop(b);
        let mut all = String::new();
        Rewind::new(prefix, a)
            .read_to_string(&mut all)
            .await
            .unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\nrest");
    }
}
