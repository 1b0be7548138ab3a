//! Regenerates the protobuf code and fails if the checked-in copy in
//! `src/gen/` differs. The test writes the fresh code, so after editing a
//! `.proto` file, run `cargo test -p mesh-proto` once (it fails and
//! rewrites) and commit the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

const PROTOS: &[&str] = &[
    "trellis/discovery/v1/discovery.proto",
    "trellis/identity/v1/identity.proto",
];

#[test]
fn generated_code_matches_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(PROTOS, [root.join("proto")]).unwrap();
    let out = tempdir();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        // BTreeMap, not HashMap, for map fields: encoding is then
        // deterministic, so a resource's version (a hash of its bytes) only
        // changes when its content does.
        .btree_map(".")
        .emit_rerun_if_changed(false)
        .out_dir(out.path())
        .compile_fds(fds)
        .unwrap();

    let mut drifted = Vec::new();
    for name in ["trellis.discovery.v1.rs", "trellis.identity.v1.rs"] {
        let fresh = std::fs::read_to_string(out.path().join(name)).unwrap();
        let checked_in = root.join("src/gen").join(name);
        if std::fs::read_to_string(&checked_in).unwrap_or_default() != fresh {
            std::fs::write(&checked_in, fresh).unwrap();
            drifted.push(name);
        }
    }
    assert!(
        drifted.is_empty(),
        "generated code was out of date with the .proto files: {drifted:?}; \
         the test has rewritten src/gen/, commit the change"
    );
}

/// A fresh, empty directory, removed when dropped.
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("trellis-mesh-proto-codegen-")
        .tempdir()
        .unwrap()
}
