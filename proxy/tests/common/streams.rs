//! Long-lived streams for tests: a gRPC echo server and client over raw
//! hyper (no generated code), and a WebSocket echo server.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, channel::Channel};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// A gRPC-framed message: compressed flag, big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// A gRPC echo server: each request message comes back as a response
/// message as soon as it arrives, then `grpc-status: 0` trailers.
pub async fn grpc_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    assert_eq!(req.headers()["content-type"], "application/grpc");
                    assert_eq!(req.headers()["te"], "trailers");
                    let (mut tx, body) = Channel::<Bytes, hyper::Error>::new(4);
                    let mut incoming = req.into_body();
                    tokio::spawn(async move {
                        while let Some(Ok(frame)) = incoming.frame().await {
                            if let Ok(data) = frame.into_data() {
                                tx.send_data(data).await.unwrap();
                            }
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        tx.send_trailers(trailers).await.unwrap();
                    });
                    let resp = Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

pub async fn grpc_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Channel<Bytes, std::convert::Infallible>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

pub fn grpc_request(
    body: Channel<Bytes, std::convert::Infallible>,
) -> Request<Channel<Bytes, std::convert::Infallible>> {
    Request::post("http://svc/echo.Echo/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// A WebSocket server that sends every text or binary message back.
pub async fn websocket_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    addr
}
