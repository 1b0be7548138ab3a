//! `meshctl`: the Trellis command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controlplane::discovery::ProxyStatus;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Default control plane metrics and debug address.
const DEFAULT_CONTROLPLANE: &str = "127.0.0.1:15014";

#[derive(Parser)]
#[command(name = "meshctl", version, about = "The Trellis command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The proxies connected to the control plane and their sync state.
    ProxyStatus {
        /// The control plane's metrics and debug address.
        #[arg(long, env = "TRELLIS_CONTROLPLANE", default_value = DEFAULT_CONTROLPLANE)]
        controlplane: String,
    },
}

fn main() -> ExitCode {
    let Command::ProxyStatus { controlplane } = Cli::parse().command;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(proxy_status(&controlplane)) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn proxy_status(controlplane: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = format!("http://{controlplane}/debug/proxies").parse()?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let resp = client.get(uri).await.map_err(|e| {
        anyhow::anyhow!("cannot reach the control plane at {controlplane}: {e}; is trellis-controlplane running?")
    })?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "control plane answered {status}");
    let proxies: Vec<ProxyStatus> = serde_json::from_slice(&body)?;
    Ok(controlplane::meshctl::proxy_status_table(&proxies))
}
