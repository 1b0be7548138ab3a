//! `cargo xtask images`: OCI image archives of the project's release
//! binaries, built without Docker and without pulling anything. Each image
//! is one layer: the binary, exactly the shared libraries `ldd` says it
//! loads, `/etc/passwd` with its non-root user, and `/tmp`.
//!
//! An archive is an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) that also carries Docker's `manifest.json` naming
//! the same blobs, so `ctr images import`, `docker load` and `kind load
//! image-archive` all take it. The harness builds its own two images the
//! same way: the pod sandbox (`pause`, a few lines of C linked statically)
//! and a toolbox (Debian's static busybox) for test clients.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder, SCHEMA_VERSION,
};
use sha2::{Digest, Sha256};

use crate::cluster::Layout;

/// The tag of the project's images.
pub const TAG: &str = "dev";

/// Options of `cargo xtask images`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the archives.
    #[arg(long, default_value = "target/images")]
    pub out: PathBuf,
    /// Use the release binaries as they are (no cargo build).
    #[arg(long)]
    pub no_build: bool,
}

/// One of the project's images.
struct Product {
    /// Image name (`trellis/<name>:dev`) and archive name.
    name: &'static str,
    package: &'static str,
    binary: &'static str,
    description: &'static str,
    uid: u32,
    ports: &'static [u16],
    /// Default arguments.
    cmd: &'static [&'static str],
    /// Carries Debian's iptables (both backends), which `trellis-proxy
    /// init` runs.
    iptables: bool,
}

/// The project's images.
const PRODUCTS: &[Product] = &[
    Product {
        name: "proxy",
        package: "proxy",
        binary: "trellis-proxy",
        description: "Trellis sidecar proxy",
        // The capture rules exempt the proxy's own UID.
        uid: 1337,
        ports: &[15001, 15006, 15020, 15021],
        cmd: &[],
        iptables: true,
    },
    Product {
        name: "controlplane",
        package: "controlplane",
        binary: "trellis-controlplane",
        description: "Trellis control plane: discovery, CA",
        uid: 65532,
        ports: &[15012, 15014],
        cmd: &[],
        iptables: false,
    },
    Product {
        name: "injector",
        package: "injector",
        binary: "trellis-injector",
        description: "Trellis sidecar injector: the mutating admission webhook",
        uid: 65532,
        ports: &[15017],
        cmd: &[],
        iptables: false,
    },
    Product {
        name: "bookinfo",
        package: "bookinfo",
        binary: "bookinfo",
        description: "The bookinfo demo app: productpage, details, reviews, ratings",
        uid: 65532,
        ports: &[9080],
        // The subcommand picks the service; alone it says which there are.
        cmd: &["--help"],
        iptables: false,
    },
];

/// What goes into an image's single layer.
#[derive(Default)]
struct Rootfs {
    /// Image path → (content, mode).
    files: BTreeMap<String, (Vec<u8>, u32)>,
    /// Image path → link target.
    links: BTreeMap<String, String>,
    /// Directories with their modes (parents of files are added as 0755).
    dirs: BTreeMap<String, u32>,
}

/// An image to write.
struct Image {
    /// Repository, for example `trellis/proxy`.
    repository: String,
    tag: String,
    rootfs: Rootfs,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    ports: Vec<u16>,
    labels: HashMap<String, String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::workspace_root()?;
    let out = root.join(&args.out);
    let archives = build_products(&root, &out, !args.no_build)?;
    for archive in archives {
        println!("{}", archive.display());
    }
    Ok(())
}

/// Builds the release binaries (unless `build` is false) and writes one
/// archive per product into `out`.
pub fn build_products(root: &Path, out: &Path, build: bool) -> anyhow::Result<Vec<PathBuf>> {
    if build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root)
            .args(["build", "--release", "--locked", "--bins"]);
        for product in PRODUCTS {
            cmd.args(["-p", product.package]);
        }
        println!(
            "images: cargo build --release of {}",
            PRODUCTS
                .iter()
                .map(|p| p.binary)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let status = cmd.status().context("cannot run cargo")?;
        if !status.success() {
            bail!("the release build failed ({status})");
        }
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    std::fs::create_dir_all(out)?;
    let mut archives = Vec::new();
    for product in PRODUCTS {
        let binary = target.join("release").join(product.binary);
        if !binary.is_file() {
            bail!(
                "{} is missing: build it with cargo build --release -p {}",
                binary.display(),
                product.package
            );
        }
        let mut rootfs = Rootfs::default();
        rootfs.add_dynamic_binary(&binary, &format!("/usr/local/bin/{}", product.binary))?;
        rootfs.add_base(product.uid, "trellis");
        if product.iptables {
            rootfs.add_iptables()?;
        }
        let image = Image {
            repository: format!("trellis/{}", product.name),
            tag: TAG.into(),
            rootfs,
            user: format!("{0}:{0}", product.uid),
            entrypoint: vec![format!("/usr/local/bin/{}", product.binary)],
            cmd: product.cmd.iter().map(|a| a.to_string()).collect(),
            ports: product.ports.to_vec(),
            labels: labels(product.name, product.description),
        };
        let archive = out.join(format!("{}.tar", product.name));
        image.write(&archive)?;
        archives.push(archive);
    }
    Ok(archives)
}

/// The labels people expect on an image (OCI annotations' names).
fn labels(title: &str, description: &str) -> HashMap<String, String> {
    [
        ("org.opencontainers.image.title", title),
        ("org.opencontainers.image.description", description),
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        ),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
        ("org.opencontainers.image.vendor", "Trellis"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The harness's own images in the cache: the sandbox and the toolbox.
pub fn harness_archives(layout: &Layout) -> Vec<PathBuf> {
    vec![
        layout.images.join("pause.tar"),
        layout.images.join("busybox.tar"),
    ]
}

/// Builds the harness's images unless the cache has them.
pub fn harness_images(layout: &Layout) -> anyhow::Result<()> {
    std::fs::create_dir_all(&layout.images)?;
    let work = tempfile::tempdir()?;
    let pause = layout.images.join("pause.tar");
    if !pause.is_file() {
        let source = work.path().join("pause.c");
        std::fs::write(&source, PAUSE_C)?;
        let binary = work.path().join("pause");
        crate::cluster::sh::run(
            Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(&binary)
                .arg(&source),
        )
        .context("cannot build the pause binary (gcc -static; are gcc and libc6-dev installed?)")?;
        let mut rootfs = Rootfs::default();
        rootfs.add_file("/pause", std::fs::read(&binary)?, 0o755);
        Image {
            repository: "trellis/pause".into(),
            tag: "3.2".into(),
            rootfs,
            user: "65535:65535".into(),
            entrypoint: vec!["/pause".into()],
            cmd: vec![],
            ports: vec![],
            labels: labels("pause", "Pod sandbox of the Trellis test cluster"),
        }
        .write(&pause)?;
    }
    let busybox = layout.images.join("busybox.tar");
    if !busybox.is_file() {
        let download = || {
            crate::cluster::sh::run(Command::new("apt-get").current_dir(work.path()).args([
                "download",
                "-qq",
                "busybox-static",
            ]))
        };
        if download().is_err() {
            // The package lists may be stale or missing on a new machine.
            crate::cluster::sh::run(Command::new("apt-get").args(["update", "-qq"]))?;
            download().context("cannot download Debian's busybox-static")?;
        }
        let deb = std::fs::read_dir(work.path())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let unpacked = work.path().join("busybox");
        crate::cluster::sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        let binary = unpacked.join("bin/busybox");
        let applets = crate::cluster::sh::output(Command::new(&binary).arg("--list"))?;
        let mut rootfs = Rootfs::default();
        rootfs.add_file("/bin/busybox", std::fs::read(&binary)?, 0o755);
        for applet in applets
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "busybox")
        {
            rootfs
                .links
                .insert(format!("/bin/{applet}"), "busybox".into());
        }
        rootfs.add_base(65532, "toolbox");
        Image {
            repository: "trellis/busybox".into(),
            tag: TAG.into(),
            rootfs,
            user: "65532:65532".into(),
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
            ports: vec![],
            labels: labels(
                "busybox",
                "Debian's static busybox: the test cluster's toolbox",
            ),
        }
        .write(&busybox)?;
    }
    Ok(())
}

/// Imports archives into the cluster's containerd, for the kubelet.
pub fn import(layout: &Layout, archives: &[PathBuf]) -> anyhow::Result<()> {
    for archive in archives {
        crate::cluster::sh::run(layout.ctr().args(["images", "import"]).arg(archive))
            .with_context(|| format!("cannot import {}", archive.display()))?;
    }
    Ok(())
}

/// The pod sandbox: exits on SIGINT/SIGTERM, reaps children, else sleeps.
const PAUSE_C: &str = r#"#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    struct sigaction action = {0};
    action.sa_handler = stop;
    sigaction(SIGINT, &action, 0);
    sigaction(SIGTERM, &action, 0);
    action.sa_handler = reap;
    action.sa_flags = SA_NOCLDSTOP;
    sigaction(SIGCHLD, &action, 0);
    for (;;) pause();
}
"#;

impl Rootfs {
    fn add_file(&mut self, path: &str, content: Vec<u8>, mode: u32) {
        self.files.insert(path.to_owned(), (content, mode));
    }

    /// A dynamically linked binary and every shared library it loads, at
    /// the paths the loader looks for them.
    fn add_dynamic_binary(&mut self, binary: &Path, at: &str) -> anyhow::Result<()> {
        self.add_file(at, std::fs::read(binary)?, 0o755);
        let ldd = crate::cluster::sh::output(Command::new("ldd").arg(binary))?;
        for library in shared_libraries(&ldd) {
            let content = std::fs::read(&library).with_context(|| {
                format!("cannot read {library}, which {} loads", binary.display())
            })?;
            self.add_file(&library, content, 0o755);
        }
        Ok(())
    }

    /// Debian's iptables for `trellis-proxy init`: both multi-call
    /// binaries (legacy and nft), the names the init calls them by, and
    /// the match and target extensions they load at run time (dlopen, so
    /// not in `ldd`'s list) with the libraries those need.
    fn add_iptables(&mut self) -> anyhow::Result<()> {
        let mut extensions = None;
        for backend in ["legacy", "nft"] {
            let multi = format!("/usr/sbin/xtables-{backend}-multi");
            if !Path::new(&multi).is_file() {
                bail!(
                    "{multi} is missing: the proxy image carries iptables for trellis-proxy init (apt-get install iptables)"
                );
            }
            self.add_dynamic_binary(Path::new(&multi), &multi)?;
            for tool in ["iptables", "iptables-save", "iptables-restore"] {
                for family in ["", "6"] {
                    let name = tool.replacen("ip", &format!("ip{family}"), 1).replacen(
                        "tables",
                        &format!("tables-{backend}"),
                        1,
                    );
                    self.links.insert(
                        format!("/usr/sbin/{name}"),
                        format!("xtables-{backend}-multi"),
                    );
                }
            }
            let ldd = crate::cluster::sh::output(Command::new("ldd").arg(&multi))?;
            extensions = extensions.or_else(|| {
                shared_libraries(&ldd)
                    .into_iter()
                    .find(|l| l.contains("/libxtables.so"))
                    .and_then(|l| Some(Path::new(&l).parent()?.join("xtables")))
            });
        }
        let dir = extensions.context("the iptables binaries do not load libxtables")?;
        // ldd may name /lib on a merged-/usr host, but libxtables looks
        // for its extensions where it was built to (/usr/lib/...), and the
        // image has no /lib -> /usr/lib link: the real path is that one.
        let dir = std::fs::canonicalize(&dir)
            .with_context(|| format!("the iptables extensions {} are missing", dir.display()))?;
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list the iptables extensions in {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                let at = path.display().to_string();
                self.add_dynamic_binary(&path, &at)?;
            }
        }
        Ok(())
    }

    /// `/etc/passwd` and `/etc/group` with root and the image's user, an
    /// nsswitch.conf, and a world-writable `/tmp`.
    fn add_base(&mut self, uid: u32, user: &str) {
        self.add_file(
            "/etc/passwd",
            format!("root:x:0:0:root:/root:/sbin/nologin\n{user}:x:{uid}:{uid}:{user}:/home/{user}:/sbin/nologin\n").into_bytes(),
            0o644,
        );
        self.add_file(
            "/etc/group",
            format!("root:x:0:\n{user}:x:{uid}:\n").into_bytes(),
            0o644,
        );
        self.add_file("/etc/nsswitch.conf", b"hosts: files dns\n".to_vec(), 0o644);
        self.dirs.insert("/tmp".into(), 0o1777);
        self.dirs.insert(format!("/home/{user}"), 0o755);
    }

    /// The layer: a tar with fixed owners and times, so the same inputs
    /// give the same digest.
    fn tar(&self) -> anyhow::Result<Vec<u8>> {
        let mut dirs: BTreeMap<String, u32> = BTreeMap::new();
        let parents = self
            .files
            .keys()
            .chain(self.links.keys())
            .chain(self.dirs.keys());
        for path in parents {
            let mut parent = Path::new(path).parent();
            while let Some(dir) = parent {
                let text = dir.display().to_string();
                if text != "/" {
                    dirs.entry(text).or_insert(0o755);
                }
                parent = dir.parent();
            }
        }
        dirs.extend(self.dirs.iter().map(|(k, v)| (k.clone(), *v)));
        let mut builder = tar::Builder::new(Vec::new());
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(size);
            h
        };
        for (dir, mode) in &dirs {
            let mut h = header(tar::EntryType::Directory, *mode, 0);
            builder.append_data(
                &mut h,
                format!("{}/", dir.trim_start_matches('/')),
                std::io::empty(),
            )?;
        }
        for (path, (content, mode)) in &self.files {
            let mut h = header(tar::EntryType::Regular, *mode, content.len() as u64);
            builder.append_data(&mut h, path.trim_start_matches('/'), content.as_slice())?;
        }
        for (path, target) in &self.links {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            builder.append_link(&mut h, path.trim_start_matches('/'), target)?;
        }
        Ok(builder.into_inner()?)
    }
}

/// The libraries in `ldd`'s output: `name => /path (addr)` and the loader
/// on a line of its own.
fn shared_libraries(ldd: &str) -> BTreeSet<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

impl Image {
    fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }

    /// Writes the archive.
    fn write(&self, archive: &Path) -> anyhow::Result<()> {
        let layer_tar = self.rootfs.tar()?;
        let diff_id = sha256(&layer_tar);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&layer_tar)?;
        let layer = gz.finish()?;

        let mut config = ConfigBuilder::default()
            .user(self.user.clone())
            .env(vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ])
            .labels(self.labels.clone())
            .working_dir("/".to_owned());
        if !self.entrypoint.is_empty() {
            config = config.entrypoint(self.entrypoint.clone());
        }
        if !self.cmd.is_empty() {
            config = config.cmd(self.cmd.clone());
        }
        if !self.ports.is_empty() {
            config = config.exposed_ports(
                self.ports
                    .iter()
                    .map(|p| format!("{p}/tcp"))
                    .collect::<Vec<_>>(),
            );
        }
        let config = ImageConfigurationBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(config.build()?)
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff_id])
                    .build()?,
            )
            .build()?;
        let config_json = serde_json::to_vec(&config)?;

        let layer_desc = Descriptor::new(
            MediaType::ImageLayerGzip,
            layer.len() as u64,
            digest(&layer)?,
        );
        let config_desc = Descriptor::new(
            MediaType::ImageConfig,
            config_json.len() as u64,
            digest(&config_json)?,
        );
        let manifest = ImageManifestBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageManifest)
            .config(config_desc)
            .layers(vec![layer_desc])
            .build()?;
        let manifest_json = serde_json::to_vec(&manifest)?;
        let mut manifest_desc = Descriptor::new(
            MediaType::ImageManifest,
            manifest_json.len() as u64,
            digest(&manifest_json)?,
        );
        manifest_desc.set_annotations(Some(HashMap::from([
            (
                "io.containerd.image.name".to_owned(),
                format!("docker.io/{}", self.reference()),
            ),
            (
                "org.opencontainers.image.ref.name".to_owned(),
                self.tag.clone(),
            ),
        ])));
        let index = ImageIndexBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![manifest_desc])
            .build()?;
        let layout = OciLayoutBuilder::default()
            .image_layout_version("1.0.0")
            .build()?;
        let blob = |bytes: &[u8]| format!("blobs/sha256/{}", hex(&Sha256::digest(bytes)));
        // Docker's format beside OCI's: `docker load` reads this one.
        let docker = serde_json::json!([{
            "Config": blob(&config_json),
            "RepoTags": [self.reference()],
            "Layers": [blob(&layer)],
        }]);

        let mut out = tar::Builder::new(Vec::new());
        let mut add = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_size(bytes.len() as u64);
            out.append_data(&mut h, name, bytes)?;
            Ok(())
        };
        add("oci-layout", &serde_json::to_vec(&layout)?)?;
        add("index.json", &serde_json::to_vec(&index)?)?;
        add("manifest.json", &serde_json::to_vec(&docker)?)?;
        add(&blob(&layer), &layer)?;
        add(&blob(&config_json), &config_json)?;
        add(&blob(&manifest_json), &manifest_json)?;
        let bytes = out.into_inner()?;
        let partial = archive.with_extension("tar.partial");
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, archive)?;
        Ok(())
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn digest(bytes: &[u8]) -> anyhow::Result<oci_spec::image::Digest> {
    Ok(sha256(bytes).parse()?)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI installs iptables; the proxy image must hold what `trellis-proxy
    /// init` runs, loads and links.
    #[test]
    fn the_proxy_image_carries_both_iptables_backends_and_their_extensions() {
        let mut rootfs = Rootfs::default();
        rootfs.add_iptables().unwrap();
        for backend in ["legacy", "nft"] {
            let multi = format!("/usr/sbin/xtables-{backend}-multi");
            assert!(rootfs.files.contains_key(&multi), "{multi}");
            for tool in ["save", "restore"] {
                let link = format!("/usr/sbin/iptables-{backend}-{tool}");
                assert_eq!(rootfs.links[&link], format!("xtables-{backend}-multi"));
            }
            assert!(
                rootfs
                    .links
                    .contains_key(&format!("/usr/sbin/ip6tables-{backend}"))
            );
        }
        // The rules' REDIRECT target and owner match, loaded at run time.
        for ext in ["libxt_REDIRECT.so", "libxt_owner.so", "libxt_tcp.so"] {
            assert!(
                rootfs
                    .files
                    .keys()
                    .any(|f| f.ends_with(&format!("/xtables/{ext}"))),
                "{ext}"
            );
        }
        assert!(rootfs.files.keys().any(|f| f.contains("/libnftnl.so")));
    }

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs: Vec<String> = shared_libraries(ldd).into_iter().collect();
        assert_eq!(
            libs,
            vec![
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn an_archive_is_an_oci_layout_and_a_docker_archive_of_the_same_blobs() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut rootfs = Rootfs::default();
        rootfs.add_file("/bin/hello", b"#!/bin/sh\necho hi\n".to_vec(), 0o755);
        rootfs.add_base(65532, "app");
        let image = Image {
            repository: "trellis/test".into(),
            tag: "dev".into(),
            rootfs,
            user: "65532:65532".into(),
            entrypoint: vec!["/bin/hello".into()],
            cmd: vec![],
            ports: vec![9080],
            labels: labels("test", "a test image"),
        };
        let path = dir.path().join("test.tar");
        image.write(&path)?;
        let mut names = BTreeMap::new();
        let mut archive = tar::Archive::new(std::fs::File::open(&path)?);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes)?;
            names.insert(entry.path()?.display().to_string(), bytes);
        }
        let index: oci_spec::image::ImageIndex = serde_json::from_slice(&names["index.json"])?;
        let manifest_desc = &index.manifests()[0];
        let name = manifest_desc
            .annotations()
            .as_ref()
            .map(|a| a["io.containerd.image.name"].clone());
        assert_eq!(name.as_deref(), Some("docker.io/trellis/test:dev"));
        // Every blob is named by its own digest.
        for (name, bytes) in &names {
            if let Some(hexdigest) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(hex(&Sha256::digest(bytes)), hexdigest, "{name}");
            }
        }
        let manifest_blob = format!("blobs/sha256/{}", manifest_desc.digest().digest());
        let manifest: oci_spec::image::ImageManifest =
            serde_json::from_slice(&names[&manifest_blob])?;
        let config_blob = format!("blobs/sha256/{}", manifest.config().digest().digest());
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(&names[&config_blob])?;
        assert_eq!(
            config
                .config()
                .as_ref()
                .and_then(|c| c.user().clone())
                .as_deref(),
            Some("65532:65532")
        );
        let docker: serde_json::Value = serde_json::from_slice(&names["manifest.json"])?;
        assert_eq!(docker[0]["Config"], config_blob);
        assert_eq!(docker[0]["RepoTags"][0], "trellis/test:dev");
        // The layer holds the file with its mode, and /tmp is sticky.
        let layer_blob = format!("blobs/sha256/{}", manifest.layers()[0].digest().digest());
        let layer = flate2::read::GzDecoder::new(names[&layer_blob].as_slice());
        let mut modes = BTreeMap::new();
        for entry in tar::Archive::new(layer).entries()? {
            let entry = entry?;
            modes.insert(entry.path()?.display().to_string(), entry.header().mode()?);
        }
        assert_eq!(modes.get("bin/hello"), Some(&0o755));
        assert_eq!(modes.get("tmp/"), Some(&0o1777));
        Ok(())
    }
}
