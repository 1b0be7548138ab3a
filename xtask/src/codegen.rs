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
    crds(&root.join("deploy/crds"))
}

/// Writes `mesh_api::crd::manifests()` to `dir`, and removes YAML files
/// there that no CRD produces any more.
fn crds(dir: &Path) -> anyhow::Result<()> {
    let manifests = mesh_api::crd::manifests().context("rendering the CRDs as YAML")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, yaml) in &manifests {
        let path = dir.join(name);
        // Unchanged files keep their modification time.
        if fs::read_to_string(&path).ok().as_deref() == Some(yaml.as_str()) {
            continue;
        }
        fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let stale = path.extension().is_some_and(|e| e == "yaml")
            && !manifests
                .iter()
                .any(|(name, _)| path.file_name().is_some_and(|f| f == name.as_str()));
        if stale {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            println!("removed stale {}", path.display());
        }
    }
    Ok(())
}
