//! `cargo xtask codegen`: writes the generated files that are checked in.
//!
//! The generators live in the library crates, so that each crate's drift
//! test can compare its checked-in files with a fresh run; this module only
//! writes them.

use std::fs;
use std::path::Path;

use anyhow::Context;

/// Regenerates every checked-in generated file.
pub fn run() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask's manifest directory has no parent")?;
    let crds = mesh_api::crd::manifests().context("rendering the CRDs as YAML")?;
    write_dir(&root.join("deploy/crds"), &crds)?;
    let install =
        controlplane::install::manifests().context("rendering the install manifests as YAML")?;
    write_dir(&root.join("deploy/install"), &install)
}

/// Writes `manifests` (relative path, text) under `dir`, and removes YAML
/// files there that none of them is any more.
fn write_dir(dir: &Path, manifests: &[(String, String)]) -> anyhow::Result<()> {
    for (name, yaml) in manifests {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // Unchanged files keep their modification time.
        if fs::read_to_string(&path).ok().as_deref() == Some(yaml.as_str()) {
            continue;
        }
        fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(current) = dirs.pop() {
        let entries =
            fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let stale = path.extension().is_some_and(|e| e == "yaml")
                && !manifests.iter().any(|(name, _)| dir.join(name) == path);
            if stale {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                println!("removed stale {}", path.display());
            }
        }
    }
    Ok(())
}
