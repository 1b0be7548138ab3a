//! The static config source: a YAML file, watched for changes.
//!
//! The file's directory is watched (editors and Kubernetes ConfigMaps
//! replace files by rename, which a watch on the file itself would miss),
//! and the file is also re-read every few seconds in case an event is lost.
//! A change is applied through [`Proxy::update`], the same entry point the
//! discovery client uses. A broken file is logged and leaves the current
//! config in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::ProxyConfig;
use notify::Watcher;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::Proxy;

/// How long to wait after a change event for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often the file is re-read regardless of events.
const POLL: Duration = Duration::from_secs(2);

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not a valid config.
    #[error("config file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why, with line and column for YAML errors.
        source: mesh_api::ConfigError,
    },
}

/// Reads and validates the config file.
pub fn load(path: &Path) -> Result<(ProxyConfig, String), SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let config = ProxyConfig::from_yaml(&text).map_err(|source| SourceError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok((config, text))
}

/// Applies every change of the file at `path` to `proxy`, forever.
/// `applied` is the text the proxy runs with now.
pub async fn watch(path: PathBuf, proxy: Arc<Proxy>, mut applied: String) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().map(ToOwned::to_owned);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes to our file count: reading it raises access events,
        // which would make it re-read forever, and other files in the
        // directory are none of our business. Kubernetes updates a mounted
        // ConfigMap by swapping a `..data` symlink, so those count too.
        let ours = |e: &notify::Event| {
            !e.kind.is_access()
                && e.paths.iter().any(|p| {
                    p.file_name().is_some_and(|f| {
                        Some(f) == name.as_deref() || f.as_encoded_bytes().starts_with(b"..")
                    })
                })
        };
        if event.is_ok_and(|e| ours(&e)) {
            // A full channel already holds a wake-up; one is enough.
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; polling only");
            None
        }
    };
    let mut failed: Option<String> = None;
    loop {
        tokio::select! {
            _ = rx.recv() => tokio::time::sleep(DEBOUNCE).await,
            () = tokio::time::sleep(POLL) => {}
        }
        // Drain the wake-up that arrived during the debounce.
        let _ = rx.try_recv();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                debug!(path = %path.display(), error = %e, "config file unreadable; keeping the current config");
                continue;
            }
        };
        if text == applied || failed.as_deref() == Some(text.as_str()) {
            continue;
        }
        match ProxyConfig::from_yaml(&text) {
            Ok(config) => match proxy.update(config).await {
                Ok(_) => {
                    applied = text;
                    failed = None;
                }
                Err(_) => failed = Some(text),
            },
            Err(e) => {
                warn!(path = %path.display(), error = %e, "config file is invalid; keeping the current config");
                metrics::counter!(crate::telemetry::CONFIG_UPDATES, "result" => "refused")
                    .increment(1);
                failed = Some(text);
            }
        }
    }
}
