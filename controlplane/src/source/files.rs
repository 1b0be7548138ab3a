//! The file source: a directory of multi-document YAML files of
//! Kubernetes objects, the local-mode and test stand-in for the Kubernetes
//! API.
//!
//! Each `*.yaml` / `*.yml` file is parsed on its own. A file with any
//! broken document is reported with its path, line and reason, and the
//! objects it held at its last good read stay in force, so a half-saved
//! edit never takes routes away.
//!
//! A scan reads only the files that changed since the last one (by size,
//! modification and change time, and inode, through symlinks, so that a
//! ConfigMap volume's swap counts), parses only the documents of those
//! files whose text changed, and gives the index only the objects that
//! were added, changed or dropped: a mesh of thousands of objects is
//! parsed once, not on every edit and every poll. When several files
//! define the same object, the last file in path order wins, as in a full
//! read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_api::crd::{
    AuthorizationPolicy, DestinationPolicy, HttpFault, PeerAuthentication, RateLimitPolicy,
};
use mesh_api::k8s::{Object, parse_documents};

use crate::index::{Changed, Index, Key, Kind, Refused, key_of};

/// A file modified this recently before it was read may change again
/// within the same timestamp tick without its stamp changing, so it is
/// read again at the next scan. Filesystems that keep sub-second times
/// stamp them from the kernel's coarse clock, a tick of at most 10 ms;
/// those that keep whole seconds (or two, on FAT) get the long window.
const RACY_FINE: Duration = Duration::from_millis(20);
const RACY_COARSE: Duration = Duration::from_secs(2);

/// A directory source and the last good objects of each file.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, File>,
    /// Which files define each indexed object; the last one wins.
    owners: BTreeMap<ObjectId, BTreeSet<PathBuf>>,
}

/// One file as last read.
#[derive(Debug)]
struct File {
    /// The file's stamp when it was last read.
    stamp: Stamp,
    /// When it was last read.
    read_at: SystemTime,
    /// The documents of its last good read, in order.
    docs: Vec<Doc>,
    /// For each indexed object, the document that defines it (the last
    /// one, when several do).
    objects: BTreeMap<ObjectId, usize>,
    /// Why the last read failed, if it did.
    error: Option<FileError>,
}

/// One YAML document of a file: its text, kept to tell it unchanged at
/// the next read, and the indexed objects it defines (one, or none for an
/// empty document or a kind the index does not hold).
#[derive(Debug, Clone)]
struct Doc {
    text: String,
    objects: Vec<Object>,
}

/// What tells a changed file from an unchanged one without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// An indexed object's identity: kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectId {
    /// In the order the index is fed: Services first, so that routes and
    /// slices find them.
    rank: u8,
    key: Key,
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
            owners: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads what changed in the directory and brings `index` in line with
    /// it. Every broken file is reported, changed or not.
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
        // The objects whose winning definition may have changed.
        let mut touched = BTreeSet::new();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !paths.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some(file) = self.files.remove(&path) {
                self.disown(&path, &file, &mut touched);
            }
        }
        for path in paths {
            self.refresh(path, &mut touched);
        }
        for file in self.files.values() {
            scan.file_errors.extend(file.error.clone());
        }
        self.sync(index, touched, &mut scan);
        scan
    }

    /// Reads `path` again if it changed since the last read.
    fn refresh(&mut self, path: PathBuf, touched: &mut BTreeSet<ObjectId>) {
        let stamp = match Stamp::of(&path) {
            Ok(stamp) => stamp,
            Err(e) => {
                // Gone between the listing and now, or unreadable: like a
                // broken file, it keeps what it held.
                let error = FileError {
                    path: path.clone(),
                    line: 0,
                    reason: format!("cannot read: {e}"),
                };
                if let Some(file) = self.files.get_mut(&path) {
                    file.error = Some(error);
                } else {
                    self.files.insert(path, File::broken(error));
                }
                return;
            }
        };
        if self.files.get(&path).is_some_and(|f| f.is_current(stamp)) {
            return;
        }
        let read_at = SystemTime::now();
        let old = self.files.remove(&path);
        let docs = read_file(&path)
            .and_then(|text| parse(&path, &text, old.as_ref().map_or(&[][..], |f| &f.docs)));
        match docs {
            Ok(docs) => {
                let file = File::new(stamp, read_at, docs);
                self.own(&path, old.as_ref(), &file, touched);
                self.files.insert(path, file);
            }
            Err(error) => {
                let mut file = old.unwrap_or_else(|| File::broken(error.clone()));
                file.stamp = stamp;
                file.read_at = read_at;
                file.error = Some(error);
                self.files.insert(path, file);
            }
        }
    }

    /// Records that `new`, read from `path`, replaces `old`, and marks
    /// the objects whose definition in it changed.
    fn own(
        &mut self,
        path: &Path,
        old: Option<&File>,
        new: &File,
        touched: &mut BTreeSet<ObjectId>,
    ) {
        if let Some(old) = old {
            for id in old.objects.keys() {
                if new.objects.contains_key(id) {
                    continue;
                }
                if let Some(paths) = self.owners.get_mut(id) {
                    paths.remove(path);
                    if paths.is_empty() {
                        self.owners.remove(id);
                    }
                }
                touched.insert(id.clone());
            }
        }
        for id in new.objects.keys() {
            let same = old.is_some_and(|old| old.object(id) == new.object(id));
            if !same {
                self.owners
                    .entry(id.clone())
                    .or_default()
                    .insert(path.to_owned());
                touched.insert(id.clone());
            }
        }
    }

    /// Forgets that `file`, at `path`, defines its objects.
    fn disown(&mut self, path: &Path, file: &File, touched: &mut BTreeSet<ObjectId>) {
        for id in file.objects.keys() {
            if let Some(paths) = self.owners.get_mut(id) {
                paths.remove(path);
                if paths.is_empty() {
                    self.owners.remove(id);
                }
            }
            touched.insert(id.clone());
        }
    }

    /// Gives the index the winning definition of each touched object, or
    /// deletes it when no file defines it any more.
    fn sync(&self, index: &mut Index, touched: BTreeSet<ObjectId>, scan: &mut Scan) {
        for id in touched {
            let winner = self
                .owners
                .get(&id)
                .and_then(|paths| paths.last())
                .and_then(|path| self.files.get(path))
                .and_then(|file| file.object(&id));
            let result = match winner {
                Some(object) => apply(index, object.clone()),
                None => Ok(id.delete(index)),
            };
            match result {
                Ok(changed) => scan.changed.services.extend(changed.services),
                Err(refused) => scan.refused.push(refused),
            }
        }
    }
}

/// Applies an indexed object.
fn apply(index: &mut Index, object: Object) -> Result<Changed, Refused> {
    match object {
        Object::Service(o) => index.apply(o),
        Object::EndpointSlice(o) => index.apply(o),
        Object::HttpRoute(o) => index.apply(o),
        Object::DestinationPolicy(o) => index.apply(o),
        Object::Pod(o) => index.apply(o),
        Object::PeerAuthentication(o) => index.apply(o),
        Object::AuthorizationPolicy(o) => index.apply(o),
        Object::RateLimitPolicy(o) => index.apply(o),
        Object::GrpcRoute(o) => index.apply(o),
        Object::HttpFault(o) => index.apply(o),
        // `ObjectId::of` lets only the kinds above in.
        Object::ServiceAccount(_) => Ok(Changed::default()),
    }
}

impl ObjectId {
    /// The identity of an object the index holds; `None` for the kind
    /// that is read and validated but not indexed (ServiceAccounts:
    /// identities come from the Pods' service account names).
    fn of(object: &Object) -> Option<ObjectId> {
        let rank = match object {
            Object::Service(_) => 0,
            Object::EndpointSlice(_) => 1,
            Object::HttpRoute(_) => 2,
            Object::DestinationPolicy(_) => 3,
            Object::Pod(_) => 4,
            Object::PeerAuthentication(_) => 5,
            Object::AuthorizationPolicy(_) => 6,
            Object::RateLimitPolicy(_) => 7,
            Object::GrpcRoute(_) => 8,
            Object::HttpFault(_) => 9,
            Object::ServiceAccount(_) => return None,
        };
        Some(ObjectId {
            rank,
            key: key_of(object.meta()),
        })
    }

    fn delete(&self, index: &mut Index) -> Changed {
        fn delete<K: Kind>(index: &mut Index, key: &Key) -> Changed {
            index.delete::<K>(key)
        }
        match self.rank {
            0 => delete::<Service>(index, &self.key),
            1 => delete::<EndpointSlice>(index, &self.key),
            2 => delete::<HttpRoute>(index, &self.key),
            3 => delete::<DestinationPolicy>(index, &self.key),
            4 => delete::<Pod>(index, &self.key),
            5 => delete::<PeerAuthentication>(index, &self.key),
            6 => delete::<AuthorizationPolicy>(index, &self.key),
            7 => delete::<RateLimitPolicy>(index, &self.key),
            8 => delete::<GrpcRoute>(index, &self.key),
            _ => delete::<HttpFault>(index, &self.key),
        }
    }
}

impl File {
    fn broken(error: FileError) -> File {
        File {
            // Never equal to a real stamp: read again at the next scan.
            stamp: Stamp {
                dev: u64::MAX,
                ino: u64::MAX,
                len: u64::MAX,
                mtime: (i64::MIN, 0),
                ctime: (i64::MIN, 0),
            },
            read_at: SystemTime::UNIX_EPOCH,
            docs: Vec::new(),
            objects: BTreeMap::new(),
            error: Some(error),
        }
    }

    /// A file read without errors.
    fn new(stamp: Stamp, read_at: SystemTime, docs: Vec<Doc>) -> File {
        let mut objects = BTreeMap::new();
        for (i, doc) in docs.iter().enumerate() {
            for object in &doc.objects {
                if let Some(id) = ObjectId::of(object) {
                    objects.insert(id, i);
                }
            }
        }
        File {
            stamp,
            read_at,
            docs,
            objects,
            error: None,
        }
    }

    /// The file's definition of object `id`.
    fn object(&self, id: &ObjectId) -> Option<&Object> {
        let doc = self.docs.get(*self.objects.get(id)?)?;
        doc.objects
            .iter()
            .rev()
            .find(|o| ObjectId::of(o).as_ref() == Some(id))
    }

    /// Whether the last read saw what the file holds now: the stamp is
    /// unchanged, and the file was not modified so shortly before the read
    /// that a later write could have kept the stamp.
    fn is_current(&self, stamp: Stamp) -> bool {
        let modified = SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(stamp.mtime.0).unwrap_or(0),
                u32::try_from(stamp.mtime.1).unwrap_or(0),
            );
        // A whole-second time on a fine filesystem is rare (1 in 10^9) and
        // only costs a read.
        let racy = if stamp.mtime.1 == 0 {
            RACY_COARSE
        } else {
            RACY_FINE
        };
        self.stamp == stamp && modified + racy < self.read_at
    }
}

impl Stamp {
    /// The stamp of the file `path` names, through symlinks.
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
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

/// Reads one file.
fn read_file(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| FileError {
        path: path.to_owned(),
        line: 0,
        reason: format!("cannot read: {e}"),
    })
}

/// Parses the documents of `text`, reusing those of `old` (the file's
/// previous documents) whose text is unchanged; any broken document makes
/// the whole file an error, so that its previous objects stay together.
fn parse(path: &Path, text: &str, old: &[Doc]) -> Result<Vec<Doc>, FileError> {
    let known: HashMap<&str, &Doc> = old.iter().map(|d| (d.text.as_str(), d)).collect();
    documents(text)
        .into_iter()
        .map(|(first_line, doc)| {
            if let Some(known) = known.get(doc) {
                return Ok((*known).clone());
            }
            let objects = parse_documents(doc)
                .into_iter()
                .filter_map(|r| match r {
                    Ok(o) => ObjectId::of(&o).map(|_| Ok(o)),
                    Err(e) => Some(Err(FileError {
                        path: path.to_owned(),
                        line: first_line + e.line - 1,
                        reason: e.reason,
                    })),
                })
                .collect::<Result<_, _>>()?;
            Ok(Doc {
                text: doc.to_owned(),
                objects,
            })
        })
        .collect()
}

/// Splits `text` into its YAML documents, each with the line it starts on
/// (from 1), as `mesh_api::k8s::parse_documents` does: at lines that are
/// `---` alone or followed by whitespace, the separator going with the
/// document after it. Parsing a document on its own then gives what
/// parsing it within the whole text does.
fn documents(text: &str) -> Vec<(usize, &str)> {
    let is_separator = |line: &str| {
        line.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    let mut docs = Vec::new();
    let (mut start, mut first_line, mut offset) = (0, 1, 0);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) && offset > start {
            docs.push((first_line, &text[start..offset]));
            start = offset;
            first_line = i + 1;
        }
        offset += line.len();
    }
    docs.push((first_line, &text[start..]));
    docs
}

#[cfg(test)]
mod tests;
