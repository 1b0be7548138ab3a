//! The upstream server every scenario ends at: HTTP/1.1 with keep-alive on
//! one thread, answering every request with the same body. It runs as a child
//! process (`xtask bench-server`) so that its CPU is not the load generator's.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves until stdin closes, which happens when the parent exits, even if it
/// is killed.
pub fn serve(addr: SocketAddr, body_size: usize) -> anyhow::Result<()> {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        // The parent reads this line to learn the port.
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{}", listener.local_addr()?)?;
        stdout.flush()?;
        let body = Bytes::from(vec![b'x'; body_size]);
        loop {
            let (stream, _) = listener.accept().await.context("accept failed")?;
            stream.set_nodelay(true)?;
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| respond(request, body.clone()));
                // Clients closing their connections is the normal end.
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn respond(
    request: Request<hyper::body::Incoming>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the request body fully so the connection stays reusable.
    let _ = request.into_body().collect().await;
    Ok(Response::new(Full::new(body)))
}
