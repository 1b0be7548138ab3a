//! The cluster's binaries: Debian's packages for everything Debian ships
//! (etcd, containerd, runc, the CNI plugins, iptables), and Kubernetes
//! 1.20.2 built from Debian bookworm's `kubernetes` source package, which
//! carries its Go dependencies in `vendor/`.
//!
//! The build runs once into `<cache>/k8s-1.20.2-b2/bin/`; the source tree and
//! Go's build cache are removed after a build that succeeded, so the cache
//! holds only the six binaries (about 300 MB).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use super::Layout;
use super::sh::{self, run_logged};

/// Debian's source package version of Kubernetes 1.20.2 in bookworm.
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The directory `apt-get source` unpacks it into.
const SOURCE_DIR: &str = "kubernetes-1.20.5+really1.20.2";
/// What `/version` must answer.
const GIT_VERSION: &str = "v1.20.2";
/// Upstream's release date of 1.20.2, for `buildDate`.
const BUILD_DATE: &str = "2021-01-13T13:20:00Z";

/// The binaries built from the source, in build order (the API server
/// first: it is the longest, and the others reuse much of its build cache).
pub const BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// Debian packages the cluster runs on, with a file each provides.
const RUN_PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "/usr/bin/etcd"),
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("iptables", "/usr/sbin/iptables"),
    ("iproute2", "/usr/bin/ip"),
    ("conntrack", "/usr/sbin/conntrack"),
    ("curl", "/usr/bin/curl"),
    ("gcc", "/usr/bin/gcc"),
    ("libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"),
];
/// Debian packages the Kubernetes build needs.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("golang-go", "/usr/bin/go"),
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    ("make", "/usr/bin/make"),
    ("rsync", "/usr/bin/rsync"),
];

/// Installs whatever of Debian's packages is missing, then builds the
/// Kubernetes binaries unless the cache has them.
pub fn ensure(layout: &Layout) -> anyhow::Result<()> {
    let built = BINARIES.iter().all(|b| layout.bin.join(b).is_file());
    let mut wanted: Vec<&str> = missing(RUN_PACKAGES);
    if !built {
        wanted.extend(missing(BUILD_PACKAGES));
    }
    install(&wanted)?;
    if built {
        return Ok(());
    }
    build(layout)?;
    remove_older_builds(layout);
    Ok(())
}

/// Removes the cache's other builds of Kubernetes (older revisions),
/// which nothing uses any more.
fn remove_older_builds(layout: &Layout) {
    let (Some(cache), Some(current)) = (layout.k8s.parent(), layout.k8s.file_name()) else {
        return;
    };
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name != current && name.to_string_lossy().starts_with("k8s-") {
            println!(
                "cluster: removing the older build {}",
                entry.path().display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn missing(packages: &[(&'static str, &str)]) -> Vec<&'static str> {
    packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(name, _)| *name)
        .collect()
}

/// `apt-get install` of `packages`, after one `apt-get update`.
pub fn install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    println!("cluster: apt-get install {}", packages.join(" "));
    sh::run(Command::new("apt-get").args(["update", "-qq"]))?;
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn build(layout: &Layout) -> anyhow::Result<()> {
    let work = layout.k8s.join("build");
    std::fs::create_dir_all(&work)?;
    let log = work.join("build.log");
    let started = Instant::now();
    println!(
        "cluster: building Kubernetes {GIT_VERSION} from Debian's source package (once; about 5 minutes on 2 cores), log in {}",
        log.display()
    );
    // GOPATH mode: the tree must sit at its import path, and the go tool
    // must see it there (a symlink would resolve outside GOPATH, and then
    // vendor/ is ignored).
    let gopath = work.join("gopath");
    let source = gopath.join("src/k8s.io/kubernetes");
    if std::fs::symlink_metadata(&source).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&source)?;
    }
    if !source.join("vendor").is_dir() {
        let fetched = fetch_source(&work, &log)?;
        std::fs::create_dir_all(source.parent().context("no parent")?)?;
        if source.exists() {
            std::fs::remove_dir_all(&source)?;
        }
        std::fs::rename(&fetched, &source)?;
    }
    patch_reflect2(&source)?;
    let go = |cmd: &mut Command| {
        cmd.current_dir(&source)
            .env("PWD", &source)
            .env("GOPATH", &gopath)
            .env("GOCACHE", work.join("gocache"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0");
    };
    let openapi = source.join("pkg/generated/openapi/zz_generated.openapi.go");
    if !openapi.is_file() {
        let mut make = Command::new("make");
        make.arg("gen_openapi");
        go(&mut make);
        run_logged("make gen_openapi", &mut make, &log)?;
    }
    let ldflags = ldflags();
    let staging = layout.k8s.join("bin.partial");
    std::fs::create_dir_all(&staging)?;
    for binary in BINARIES {
        let out = staging.join(binary);
        if out.is_file() {
            continue;
        }
        let step = Instant::now();
        let mut cmd = Command::new("go");
        cmd.args(["build", "-o"])
            .arg(&out)
            .args(["-ldflags", &ldflags])
            .arg(format!("./cmd/{binary}"));
        go(&mut cmd);
        run_logged(&format!("go build ./cmd/{binary}"), &mut cmd, &log)?;
        println!("cluster: built {binary} in {:.0?}", step.elapsed());
    }
    if layout.bin.exists() {
        std::fs::remove_dir_all(&layout.bin)?;
    }
    std::fs::rename(&staging, &layout.bin)?;
    std::fs::remove_dir_all(&work)
        .with_context(|| format!("cannot remove the build tree {}", work.display()))?;
    println!(
        "cluster: Kubernetes built in {:.0?} into {}",
        started.elapsed(),
        layout.bin.display()
    );
    Ok(())
}

/// `apt-get source` with a temporary `deb-src` twin of each of the
/// machine's own `deb` entries, so it uses the mirror the machine is set
/// up with. The entry is removed again whatever happens.
fn fetch_source(work: &Path, log: &Path) -> anyhow::Result<PathBuf> {
    let source = work.join(SOURCE_DIR);
    if source.join("vendor").is_dir() {
        return Ok(source);
    }
    let list = Path::new("/etc/apt/sources.list.d/trellis-k8s-src.sources");
    std::fs::write(list, deb_src_entries()?)
        .with_context(|| format!("cannot write {}", list.display()))?;
    let fetched = (|| {
        run_logged(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
            log,
        )?;
        run_logged(
            "apt-get source kubernetes",
            Command::new("apt-get")
                .current_dir(work)
                .args(["source", "-qq"])
                .arg(format!("kubernetes={SOURCE_VERSION}")),
            log,
        )
    })();
    let removed = std::fs::remove_file(list);
    fetched?;
    removed?;
    if !source.join("vendor").is_dir() {
        bail!(
            "apt-get source unpacked no {} with a vendor/ directory in {}",
            SOURCE_DIR,
            work.display()
        );
    }
    Ok(source)
}

/// The machine's `deb` entries (deb822 `.sources` files and one-line
/// `sources.list` entries) as `deb-src` entries in deb822 form.
fn deb_src_entries() -> anyhow::Result<String> {
    let mut out = String::new();
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sources"))
        .collect();
    files.sort();
    for file in files {
        for stanza in std::fs::read_to_string(&file)?.split("\n\n") {
            let is_deb = stanza
                .lines()
                .any(|l| l.trim() == "Types: deb" || l.trim() == "Types: deb deb-src");
            if is_deb {
                for line in stanza.lines() {
                    if line.starts_with("Types:") {
                        out.push_str("Types: deb-src\n");
                    } else {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                out.push('\n');
            }
        }
    }
    if let Ok(list) = std::fs::read_to_string("/etc/apt/sources.list") {
        for line in list.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("deb ") else {
                continue;
            };
            let mut words = rest.split_whitespace().filter(|w| !w.starts_with('['));
            if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                let components: Vec<&str> = words.collect();
                out.push_str(&format!(
                    "Types: deb-src\nURIs: {uri}\nSuites: {suite}\nComponents: {}\n\n",
                    components.join(" ")
                ));
            }
        }
    }
    if out.is_empty() {
        bail!("no apt `deb` entries found to derive a deb-src entry from");
    }
    Ok(out)
}

/// reflect2 v1.0.1 (vendored) declares `reflect.mapiterinit` as returning
/// the iterator; since Go 1.18 the runtime fills a caller-allocated one,
/// and the old declaration crashes the API server on the first custom
/// resource it stores. The caller's iterator must also have the runtime's
/// full layout (v1.0.1 declares only its first two fields, and the
/// runtime writes past them: the API server crashes on the first watch
/// event of a custom resource with labels). reflect2 v1.0.2 made both
/// changes.
fn patch_reflect2(source: &Path) -> anyhow::Result<()> {
    let dir = source.join("vendor/github.com/modern-go/reflect2");
    let edits = [
        (
            "unsafe_link.go",
            "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter",
            "func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)",
        ),
        (
            "unsafe_map.go",
            "\treturn &UnsafeMapIterator{\n\t\thiter:      mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj)),",
            "\tvar it hiter\n\tmapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)\n\treturn &UnsafeMapIterator{\n\t\thiter:      &it,",
        ),
        (
            "unsafe_link.go",
            "\tvalue unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).\n\t// rest fields are ignored\n}",
            "\tvalue unsafe.Pointer // Must be in second position (see cmd/internal/gc/range.go).\n\t// The rest of the runtime's hiter (Go 1.18+), which mapiterinit fills.\n\tt           unsafe.Pointer\n\th           unsafe.Pointer\n\tbuckets     unsafe.Pointer\n\tbptr        unsafe.Pointer\n\toverflow    *[]unsafe.Pointer\n\toldoverflow *[]unsafe.Pointer\n\tstartBucket uintptr\n\toffset      uint8\n\twrapped     bool\n\tB           uint8\n\ti           uint8\n\tbucket      uintptr\n\tcheckBucket uintptr\n}",
        ),
    ];
    for (file, old, new) in edits {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if text.contains(new) {
            continue;
        }
        if !text.contains(old) {
            bail!(
                "{} does not have the code the reflect2 fix replaces; is this Kubernetes {GIT_VERSION}?",
                path.display()
            );
        }
        std::fs::write(&path, text.replacen(old, new, 1))?;
    }
    Ok(())
}

/// Version stamps (read back by `/version` and `--version`) and no symbols.
fn ldflags() -> String {
    let mut flags = String::from("-s -w");
    for package in ["component-base/version", "client-go/pkg/version"] {
        let p = format!("k8s.io/kubernetes/vendor/k8s.io/{package}");
        for (name, value) in [
            ("gitVersion", GIT_VERSION),
            ("gitMajor", "1"),
            ("gitMinor", "20"),
            ("gitTreeState", "clean"),
            ("buildDate", BUILD_DATE),
        ] {
            flags.push_str(&format!(" -X {p}.{name}={value}"));
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldflags_stamp_both_version_packages() {
        let flags = ldflags();
        assert!(flags.contains(
            "-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion=v1.20.2"
        ));
        assert!(
            flags.contains("-X k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version.gitMinor=20")
        );
    }
}
