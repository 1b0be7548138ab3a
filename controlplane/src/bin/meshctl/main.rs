//! `meshctl`: the Trellis command line.

mod check;
mod cluster;
mod demo;
mod install;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use controlplane::discovery::ProxyStatus;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The control plane's namespace on Kubernetes.
const DEFAULT_NAMESPACE: &str = "trellis-system";

#[derive(Parser)]
#[command(name = "meshctl", version, about = "The Trellis command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    target: cluster::Target,
}

#[derive(Subcommand)]
enum Command {
    /// Run the local mesh: the control plane, bookinfo, and a proxy beside
    /// each workload, on 127.0.0.1. Ctrl-C stops everything.
    Demo(demo::Args),
    /// The proxies connected to the control plane and their sync state.
    /// Without --controlplane: the local mesh's if `meshctl demo` is
    /// running (and neither --kubeconfig nor --context is given), else
    /// those of every replica in the cluster of the current kubeconfig
    /// context, read through the API server.
    ProxyStatus {
        /// A control plane's metrics and debug address (HOST:PORT), such
        /// as the local mesh's.
        #[arg(long, env = "TRELLIS_CONTROLPLANE")]
        controlplane: Option<String>,
        /// The control plane's namespace on Kubernetes.
        #[arg(long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Adds the Trellis sidecar to the pods in YAML, as the webhook
    /// would, and prints the result (`meshctl inject app.yaml | kubectl
    /// apply -f -`): Pods, workloads' pod templates, CronJobs and Lists;
    /// other objects pass through. What happened to each workload goes
    /// to stderr.
    Inject {
        /// The YAML file, or `-` for standard input.
        file: std::path::PathBuf,
        /// The namespace of objects that name none.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The proxy image.
        #[arg(long, default_value = "trellis/proxy:dev")]
        proxy_image: String,
        /// Run the proxy as a native sidecar (Kubernetes 1.28+).
        #[arg(long)]
        native_sidecars: bool,
    },
    /// Installs Trellis on the cluster of the current kubeconfig context:
    /// the CRDs, the control plane, the injector and its webhook, each
    /// step waiting for what the next needs.
    Install(install::InstallArgs),
    /// Re-applies the install with new settings or a new version (--tag);
    /// the control plane and the injector roll one pod at a time.
    Upgrade(install::InstallArgs),
    /// Removes Trellis: the webhook first, then the control plane, the
    /// trust bundles, its namespace and RBAC (the CRDs with --crds).
    /// Meshed pods keep working until they restart.
    Uninstall(install::UninstallArgs),
    /// Checks the cluster before an install (--pre), or the install.
    Check(check::CheckArgs),
    /// The mesh's certificate authority: its roots and their rotation.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        /// A control plane's metrics and debug address (HOST:PORT), such
        /// as the local mesh's; without it, the cluster of the current
        /// kubeconfig context.
        #[arg(long, env = "TRELLIS_CONTROLPLANE", global = true)]
        controlplane: Option<String>,
        /// The control plane's namespace on Kubernetes.
        #[arg(long, default_value = DEFAULT_NAMESPACE, global = true)]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// The roots (signing, next, previous), where a rotation stands, and
    /// how many proxies of each replica hold the current trust bundle.
    Status,
    /// Starts a root rotation now: the next root joins every proxy's trust
    /// bundle, signs once they all hold it, and the old root leaves the
    /// bundle after the longest certificate lifetime. On a cluster this
    /// annotates the CA's Secret (you need to be allowed to patch it); the
    /// leading replica starts the rotation within seconds.
    Rotate {
        /// The CA's Secret on Kubernetes.
        #[arg(long, default_value = controlplane::ca::DEFAULT_CA_SECRET)]
        secret: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let target = cli.target;
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::ProxyStatus {
            controlplane,
            namespace,
        } => runtime().and_then(|rt| {
            let (proxies, identities) = rt.block_on(async {
                match or_local(controlplane, &target) {
                    Some(addr) => {
                        let proxies = fetch_proxies(&addr).await?;
                        anyhow::Ok((proxies, fetch_identities(&addr).await))
                    }
                    None => cluster::proxies(&target.client().await?, &namespace).await,
                }
            })?;
            print!(
                "{}",
                controlplane::meshctl::proxy_status_table(
                    &proxies,
                    identities.as_ref(),
                    std::time::SystemTime::now()
                )
            );
            Ok(())
        }),
        Command::Inject {
            file,
            namespace,
            proxy_image,
            native_sidecars,
        } => inject(&file, &namespace, proxy_image, native_sidecars),
        Command::Ca {
            command,
            controlplane,
            namespace,
        } => runtime().and_then(|rt| {
            rt.block_on(ca(
                &target,
                command,
                or_local(controlplane, &target),
                &namespace,
            ))
        }),
        Command::Install(args) => {
            runtime().and_then(|rt| rt.block_on(install::install(&target, &args, false)))
        }
        Command::Upgrade(args) => {
            runtime().and_then(|rt| rt.block_on(install::install(&target, &args, true)))
        }
        Command::Uninstall(args) => {
            runtime().and_then(|rt| rt.block_on(install::uninstall(&target, &args)))
        }
        Command::Check(args) => runtime().and_then(|rt| rt.block_on(check::check(&target, &args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inject(
    file: &std::path::Path,
    namespace: &str,
    proxy_image: String,
    native_sidecars: bool,
) -> anyhow::Result<()> {
    use std::io::Read as _;
    let text = if file == std::path::Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("cannot read standard input: {e}"))?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
    };
    let config = injector::InjectConfig {
        proxy_image,
        native_sidecars,
        ..injector::InjectConfig::default()
    };
    let (yaml, reports) = injector::manual::inject_yaml(&text, namespace, &config)?;
    print!("{yaml}");
    for r in reports {
        eprintln!("{}: {}", r.object, r.outcome);
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the tokio runtime: {e}"))
}

/// The control plane a command reads: `--controlplane`; else, unless
/// `--kubeconfig` or `--context` name a cluster, the local mesh `meshctl
/// demo` is running (said on stderr); else none, for the cluster of the
/// current kubeconfig context.
fn or_local(controlplane: Option<String>, target: &cluster::Target) -> Option<String> {
    if controlplane.is_some() || target.is_explicit() {
        return controlplane;
    }
    let mesh = controlplane::meshctl::local::find()?;
    eprintln!(
        "meshctl: the local mesh of `meshctl demo` (pid {}, control plane {}); --context or --kubeconfig for a cluster",
        mesh.pid, mesh.admin
    );
    Some(mesh.admin.to_string())
}

async fn ca(
    target: &cluster::Target,
    command: CaCommand,
    controlplane: Option<String>,
    namespace: &str,
) -> anyhow::Result<()> {
    match (command, controlplane) {
        (CaCommand::Status, Some(addr)) => {
            let body = fetch(&addr, "/debug/ca").await?;
            let report = serde_json::from_slice(&body).map_err(|e| {
                anyhow::anyhow!("the control plane's /debug/ca is not what meshctl reads: {e}")
            })?;
            print!("{}", controlplane::meshctl::ca_status_table(&[report]));
        }
        (CaCommand::Status, None) => {
            let reports = cluster::ca_reports(&target.client().await?, namespace).await?;
            print!("{}", controlplane::meshctl::ca_status_table(&reports));
        }
        (CaCommand::Rotate { .. }, Some(addr)) => {
            print!(
                "{}",
                String::from_utf8_lossy(&send(&addr, hyper::Method::POST, "/ca/rotate").await?)
            );
        }
        (CaCommand::Rotate { secret }, None) => {
            cluster::request_rotation(&target.client().await?, namespace, &secret).await?;
            println!(
                "rotation asked for on Secret {namespace}/{secret}: the leading control plane replica starts it within seconds; follow it with `meshctl ca status`"
            );
        }
    }
    Ok(())
}

/// The control plane's `/debug/proxies` at `controlplane` (its metrics and
/// debug address).
async fn fetch_proxies(controlplane: &str) -> anyhow::Result<Vec<ProxyStatus>> {
    let body = fetch(controlplane, "/debug/proxies").await?;
    serde_json::from_slice(&body).map_err(|e| {
        anyhow::anyhow!("the control plane's /debug/proxies is not what meshctl reads: {e}")
    })
}

/// The CA's certificate records, `None` when the control plane does not
/// serve them (an older version): the identity columns then show `?`.
async fn fetch_identities(controlplane: &str) -> Option<controlplane::identity::Identities> {
    let body = fetch(controlplane, "/debug/identities").await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// `GET path` from the control plane's debug address.
async fn fetch(controlplane: &str, path: &str) -> anyhow::Result<bytes::Bytes> {
    send(controlplane, hyper::Method::GET, path).await
}

/// `method path` on the control plane's debug address; the body of a
/// success.
async fn send(
    controlplane: &str,
    method: hyper::Method,
    path: &str,
) -> anyhow::Result<bytes::Bytes> {
    let uri: hyper::Uri = format!("http://{controlplane}{path}").parse()?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let request = hyper::Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Empty::new())?;
    let resp = client.request(request).await.map_err(|e| {
        anyhow::anyhow!("cannot reach the control plane at {controlplane}: {e}; is trellis-controlplane running?")
    })?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{method} {path}: the control plane answered {status}: {}",
        String::from_utf8_lossy(&body).trim_end()
    );
    Ok(body)
}
