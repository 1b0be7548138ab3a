//! The local mesh that `meshctl demo` runs, as the other commands find it
//! when given no target: the demo writes where its control plane listens
//! to a small file in the user's runtime directory once everything is
//! ready ([`announce`]), and removes it when it stops; [`find`] reads it
//! and believes it only if the control plane answers there, so a file
//! left by a killed demo is ignored.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// How long [`find`] waits for the control plane to accept a connection.
const ANSWER_WITHIN: Duration = Duration::from_millis(300);

/// A running local mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalMesh {
    /// The control plane's metrics and debug address.
    pub admin: SocketAddr,
    /// The demo's process.
    pub pid: u32,
    /// The demo's directory (mesh YAML, proxies' bootstraps, logs).
    pub dir: PathBuf,
}

/// Where a running demo says so: `$XDG_RUNTIME_DIR/trellis-demo.json`,
/// or the temporary directory's.
pub fn path() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
        .join("trellis-demo.json")
}

/// The running local mesh, if there is one whose control plane answers.
pub fn find() -> Option<LocalMesh> {
    find_at(&path())
}

fn find_at(path: &Path) -> Option<LocalMesh> {
    let text = std::fs::read(path).ok()?;
    let mesh: LocalMesh = serde_json::from_slice(&text).ok()?;
    TcpStream::connect_timeout(&mesh.admin, ANSWER_WITHIN).ok()?;
    Some(mesh)
}

/// Removes the announcement when dropped.
#[derive(Debug)]
pub struct Announcement {
    path: PathBuf,
}

/// Says that `mesh` is running, until the returned guard drops.
pub fn announce(mesh: &LocalMesh) -> anyhow::Result<Announcement> {
    announce_at(path(), mesh)
}

fn announce_at(path: PathBuf, mesh: &LocalMesh) -> anyhow::Result<Announcement> {
    let json = serde_json::to_vec_pretty(mesh).context("the local mesh does not serialize")?;
    std::fs::write(&path, json).with_context(|| {
        format!(
            "cannot write {} (where meshctl finds the demo)",
            path.display()
        )
    })?;
    Ok(Announcement { path })
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_demo_is_found_while_its_control_plane_answers_and_forgotten_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trellis-demo.json");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mesh = LocalMesh {
            admin: listener.local_addr().unwrap(),
            pid: std::process::id(),
            dir: dir.path().to_owned(),
        };
        let announced = announce_at(file.clone(), &mesh).unwrap();
        assert_eq!(find_at(&file), Some(mesh));
        // A file left by a demo that was killed: nothing answers there.
        drop(listener);
        assert_eq!(find_at(&file), None);
        drop(announced);
        assert!(!file.exists());
    }
}
