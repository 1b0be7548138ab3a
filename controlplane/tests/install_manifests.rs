//! The manifests in `deploy/install/` are what
//! `controlplane::install::manifests()` generates today: nothing changed,
//! missing or left over.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

const FIX: &str = "run `cargo xtask codegen` and commit the result";

fn yaml_files(dir: &Path, prefix: &str, found: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}; {FIX}", dir.display())) {
        let path = entry.unwrap().path();
        let name = format!("{prefix}{}", path.file_name().unwrap().to_string_lossy());
        if path.is_dir() {
            yaml_files(&path, &format!("{name}/"), found);
        } else if name.ends_with(".yaml") {
            found.insert(name);
        }
    }
}

#[test]
fn checked_in_install_manifests_match_the_generator() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/install");
    let manifests = controlplane::install::manifests().unwrap();

    let mut drifted = Vec::new();
    for (name, yaml) in &manifests {
        match fs::read_to_string(dir.join(name)) {
            Ok(on_disk) if on_disk == *yaml => {}
            Ok(_) => drifted.push(format!("{name} differs from the generated manifest")),
            Err(e) => drifted.push(format!("{name} cannot be read: {e}")),
        }
    }
    let expected: BTreeSet<&str> = manifests.iter().map(|(n, _)| n.as_str()).collect();
    let mut found = BTreeSet::new();
    yaml_files(&dir, "", &mut found);
    for name in found {
        if !expected.contains(name.as_str()) {
            drifted.push(format!("{name} is not generated (stale?)"));
        }
    }
    assert!(
        drifted.is_empty(),
        "deploy/install is out of date; {FIX}:\n  - {}",
        drifted.join("\n  - ")
    );
}
