//! The file source: a directory of multi-document YAML files of
//! Kubernetes objects, the local-mode and test stand-in for the Kubernetes
//! API.
//!
//! Each `*.yaml` / `*.yml` file is parsed on its own. A file with any
//! broken document is reported with its path, line and reason, and the
//! objects it held at its last good read stay in force, so a half-saved
//! edit never takes routes away. After each scan the index gets every kind
//! wholesale through [`Index::reset`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use mesh_api::k8s::{Object, parse_documents};

use crate::index::{Changed, Index, Refused};

/// A directory source and the last good objects of each file.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Vec<Object>>,
}

/// A file that could not be used; its previous objects stay in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// Line in the file, from 1; 0 when the whole file is unreadable.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.reason)
        } else {
            write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
        }
    }
}

impl std::error::Error for FileError {}

/// The outcome of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    /// Broken files.
    pub file_errors: Vec<FileError>,
    /// Objects the index refused (they keep their last good version).
    pub refused: Vec<Refused>,
    /// Services whose config may have changed.
    pub changed: Changed,
}

impl DirSource {
    /// A source over `dir`; nothing is read until [`DirSource::scan`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again and brings `index` in line with it.
    pub fn scan(&mut self, index: &mut Index) -> Scan {
        let mut scan = Scan::default();
        let paths = match yaml_files(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                // An unreadable directory changes nothing.
                scan.file_errors.push(FileError {
                    path: self.dir.clone(),
                    line: 0,
                    reason: format!("cannot read the directory: {e}"),
                });
                return scan;
            }
        };
        self.files.retain(|p, _| paths.contains(p));
        for path in paths {
            match read_file(&path) {
                Ok(objects) => {
                    self.files.insert(path, objects);
                }
                Err(e) => scan.file_errors.push(e),
            }
        }
        self.sync(index, &mut scan);
        scan
    }

    fn sync(&self, index: &mut Index, scan: &mut Scan) {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut routes = Vec::new();
        let mut policies = Vec::new();
        for obj in self.files.values().flatten().cloned() {
            match obj {
                Object::Service(o) => services.push(o),
                Object::EndpointSlice(o) => slices.push(o),
                Object::HttpRoute(o) => routes.push(o),
                Object::DestinationPolicy(o) => policies.push(o),
                // Read and validated, but not indexed yet: identity and
                // policy kinds arrive with the identity issue, GRPCRoute
                // with the resilience work.
                Object::Pod(_)
                | Object::ServiceAccount(_)
                | Object::GrpcRoute(_)
                | Object::PeerAuthentication(_)
                | Object::AuthorizationPolicy(_) => {}
            }
        }
        let mut merge = |(changed, refused): (Changed, Vec<Refused>)| {
            scan.changed.services.extend(changed.services);
            scan.refused.extend(refused);
        };
        // Services first, so that routes and slices find them.
        merge(index.reset(services));
        merge(index.reset(slices));
        merge(index.reset(routes));
        merge(index.reset(policies));
    }
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Parses one file; any broken document makes the whole file an error, so
/// that its previous objects stay together.
fn read_file(path: &Path) -> Result<Vec<Object>, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: path.to_owned(),
        line: 0,
        reason: format!("cannot read: {e}"),
    })?;
    parse_documents(&text)
        .into_iter()
        .map(|r| {
            r.map_err(|e| FileError {
                path: path.to_owned(),
                line: e.line,
                reason: e.reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
