use super::*;
use crate::index::Key;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: reviews, namespace: bookinfo }
spec: { clusterIP: 10.96.0.10, ports: [{ name: http, port: 9080 }] }
---
apiVersion: v1
kind: Service
metadata: { name: reviews-v2, namespace: bookinfo }
spec: { clusterIP: 10.96.0.12, ports: [{ name: http, port: 9080 }] }
"#;

const ROUTE_V2: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: canary, namespace: bookinfo }
spec:
  parentRefs: [{ group: "", kind: Service, name: reviews }]
  rules:
  - backendRefs: [{ name: reviews-v2, port: 9080 }]
"#;

/// A fresh, empty directory, removed when dropped.
fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("trellis-dir-source-{name}-"))
        .tempdir()
        .unwrap()
}

fn routes(index: &Index) -> usize {
    let reviews = Key {
        namespace: "bookinfo".into(),
        name: "reviews".into(),
    };
    index
        .outbound(&reviews, "default")
        .map_or(0, |o| o.service.routes.len())
}

#[test]
fn reads_every_yaml_file_of_the_directory() {
    let tmp = tempdir("read");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yml"), ROUTE_V2).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let mut index = Index::default();
    let scan = DirSource::new(dir).scan(&mut index);
    assert!(scan.file_errors.is_empty(), "{:?}", scan.file_errors);
    assert_eq!(index.service_entries().len(), 2);
    assert_eq!(routes(&index), 1);
}

#[test]
fn broken_file_is_reported_with_line_and_keeps_its_previous_objects() {
    let tmp = tempdir("broken");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yaml"), ROUTE_V2).unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    source.scan(&mut index);
    assert_eq!(routes(&index), 1);

    // A half-saved edit: the second line's indentation is broken.
    let broken = ROUTE_V2.replace("  parentRefs:", "parentRefs:\n   - oops");
    std::fs::write(dir.join("route.yaml"), &broken).unwrap();
    let scan = source.scan(&mut index);
    assert_eq!(scan.file_errors.len(), 1, "{:?}", scan.file_errors);
    let e = &scan.file_errors[0];
    assert_eq!(e.path, dir.join("route.yaml"));
    assert!(e.line > 0, "{e}");
    assert!(e.to_string().starts_with(&format!(
        "{}:{}: ",
        dir.join("route.yaml").display(),
        e.line
    )));
    assert_eq!(routes(&index), 1, "the route of the broken file stays");

    // Removing the file removes its objects.
    std::fs::remove_file(dir.join("route.yaml")).unwrap();
    let scan = source.scan(&mut index);
    assert!(scan.file_errors.is_empty());
    assert_eq!(routes(&index), 0);
    assert!(scan.changed.services.iter().any(|k| k.name == "reviews"));
}

#[test]
fn a_grpc_route_file_is_applied_and_its_removal_removes_the_route() {
    let tmp = tempdir("grpc");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    // Shares its namespace and name with ROUTE_V2's HTTPRoute.
    let grpc = ROUTE_V2
        .replace("kind: HTTPRoute", "kind: GRPCRoute")
        .replace(
            "  - backendRefs:",
            "  - matches: [{ method: { service: pkg.Svc } }]\n    backendRefs:",
        );
    std::fs::write(dir.join("grpc.yaml"), grpc).unwrap();
    std::fs::write(dir.join("route.yaml"), ROUTE_V2).unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    let scan = source.scan(&mut index);
    assert!(scan.file_errors.is_empty(), "{:?}", scan.file_errors);
    assert!(scan.refused.is_empty(), "{:?}", scan.refused);
    assert_eq!(routes(&index), 2, "both kinds, though of one name");

    std::fs::remove_file(dir.join("grpc.yaml")).unwrap();
    let scan = source.scan(&mut index);
    assert_eq!(routes(&index), 1);
    let names: Vec<_> = scan.changed.services.iter().map(|k| &k.name).collect();
    assert_eq!(names, ["reviews"]);
}

#[test]
fn invalid_objects_are_refused_by_the_index_with_their_fields() {
    let tmp = tempdir("invalid");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(
        dir.join("route.yaml"),
        ROUTE_V2.replace("{ name: reviews-v2, port: 9080 }", "{ name: reviews-v2 }"),
    )
    .unwrap();
    let mut index = Index::default();
    let scan = DirSource::new(dir).scan(&mut index);
    assert!(scan.file_errors.is_empty());
    assert_eq!(scan.refused.len(), 1);
    assert!(
        scan.refused[0]
            .to_string()
            .contains("spec.rules[0].backendRefs[0].port: required"),
        "{}",
        scan.refused[0]
    );
}

#[test]
fn unknown_kind_names_file_and_line() {
    let tmp = tempdir("unknown");
    let dir = tmp.path();
    std::fs::write(
        dir.join("x.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: x }\n",
    )
    .unwrap();
    let scan = DirSource::new(dir).scan(&mut Index::default());
    assert_eq!(scan.file_errors.len(), 1);
    assert_eq!(scan.file_errors[0].line, 2, "{}", scan.file_errors[0]);
    assert!(
        scan.file_errors[0].reason.contains("ConfigMap"),
        "{}",
        scan.file_errors[0]
    );
}

fn weight(index: &Index) -> Option<u32> {
    let reviews = Key {
        namespace: "bookinfo".into(),
        name: "reviews".into(),
    };
    let o = index.outbound(&reviews, "default")?;
    Some(o.service.routes.first()?.rules[0].backend_refs[0].weight)
}

fn weighted(w: u32) -> String {
    ROUTE_V2.replace(
        "{ name: reviews-v2, port: 9080 }",
        &format!("{{ name: reviews-v2, port: 9080, weight: {w} }}"),
    )
}

#[test]
fn a_scan_gives_the_index_only_what_changed() {
    let tmp = tempdir("delta");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yaml"), weighted(1)).unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    let first = source.scan(&mut index);
    assert_eq!(first.changed.services.len(), 2);

    let again = source.scan(&mut index);
    assert!(again.changed.services.is_empty(), "{:?}", again.changed);

    // Rewritten at once with the same size: still seen (the stamp or the
    // racy-read rule catches it).
    std::fs::write(dir.join("route.yaml"), weighted(2)).unwrap();
    let scan = source.scan(&mut index);
    assert_eq!(weight(&index), Some(2));
    let names: Vec<_> = scan.changed.services.iter().map(|k| &k.name).collect();
    assert_eq!(names, ["reviews"], "only the route's service");
}

#[test]
fn the_last_file_to_define_an_object_wins_and_the_next_takes_over() {
    let tmp = tempdir("owners");
    let dir = tmp.path();
    std::fs::write(dir.join("a-mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("b-route.yaml"), weighted(1)).unwrap();
    std::fs::write(dir.join("c-route.yaml"), weighted(3)).unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    source.scan(&mut index);
    assert_eq!(weight(&index), Some(3));

    // Editing the losing file changes nothing.
    std::fs::write(dir.join("b-route.yaml"), weighted(2)).unwrap();
    let scan = source.scan(&mut index);
    assert!(scan.changed.services.is_empty(), "{:?}", scan.changed);
    assert_eq!(weight(&index), Some(3));

    // Removing the winner hands the object to the other file.
    std::fs::remove_file(dir.join("c-route.yaml")).unwrap();
    source.scan(&mut index);
    assert_eq!(weight(&index), Some(2));
    std::fs::remove_file(dir.join("b-route.yaml")).unwrap();
    source.scan(&mut index);
    assert_eq!(weight(&index), None);
}

#[test]
fn a_broken_file_is_reported_on_every_scan_until_fixed() {
    let tmp = tempdir("still-broken");
    let dir = tmp.path();
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yaml"), "kind: [").unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    for _ in 0..2 {
        let scan = source.scan(&mut index);
        assert_eq!(scan.file_errors.len(), 1, "{:?}", scan.file_errors);
    }
    std::fs::write(dir.join("route.yaml"), weighted(4)).unwrap();
    let scan = source.scan(&mut index);
    assert!(scan.file_errors.is_empty());
    assert_eq!(weight(&index), Some(4));
}

#[test]
fn a_file_is_current_only_when_its_stamp_is_unchanged_and_settled() {
    let stamp = |mtime: i64, len: u64| Stamp {
        dev: 1,
        ino: 2,
        len,
        mtime: (mtime, 0),
        ctime: (mtime, 0),
    };
    let fine = |mtime: i64, nanos: i64| Stamp {
        mtime: (mtime, nanos),
        ..stamp(mtime, 10)
    };
    let at = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let file = File {
        stamp: stamp(1_000, 10),
        read_at: at(1_010),
        docs: Vec::new(),
        objects: BTreeMap::new(),
        error: None,
    };
    assert!(file.is_current(stamp(1_000, 10)));
    assert!(!file.is_current(stamp(1_000, 11)));
    assert!(!file.is_current(stamp(1_001, 10)));
    // Read within the racy window after the write: read again. Whole
    // seconds mean a coarse filesystem, with a window of seconds.
    let racy = File {
        read_at: at(1_001),
        ..file
    };
    assert!(!racy.is_current(stamp(1_000, 10)));
    let fine_racy = File {
        stamp: fine(1_000, 900_000_000),
        ..racy
    };
    assert!(fine_racy.is_current(fine(1_000, 900_000_000)));
    let just_written = File {
        stamp: fine(1_000, 999_990_000),
        ..fine_racy
    };
    assert!(!just_written.is_current(fine(1_000, 999_990_000)));
}

#[test]
fn only_changed_documents_reach_the_index_and_errors_keep_file_lines() {
    let tmp = tempdir("documents");
    let dir = tmp.path();
    let three = |ip: &str| {
        format!(
            "{MESH}---\napiVersion: v1\nkind: Service\nmetadata: {{ name: ratings, namespace: bookinfo }}\n\
             spec: {{ clusterIP: {ip}, ports: [{{ name: http, port: 9080 }}] }}\n"
        )
    };
    std::fs::write(dir.join("mesh.yaml"), three("10.96.0.20")).unwrap();
    let mut source = DirSource::new(dir);
    let mut index = Index::default();
    assert_eq!(source.scan(&mut index).changed.services.len(), 3);

    std::fs::write(dir.join("mesh.yaml"), three("10.96.0.21")).unwrap();
    let scan = source.scan(&mut index);
    let names: Vec<_> = scan.changed.services.iter().map(|k| &k.name).collect();
    assert_eq!(names, ["ratings"]);

    // Line 3 of the last document is broken; its line in the file counts
    // the documents before it.
    let text = three("10.96.0.21");
    let last = text.rfind("---").unwrap();
    let broken = format!("{}---\napiVersion: v1\nkind: [\n", &text[..last]);
    std::fs::write(dir.join("mesh.yaml"), &broken).unwrap();
    let scan = source.scan(&mut index);
    assert_eq!(scan.file_errors.len(), 1, "{:?}", scan.file_errors);
    let whole = mesh_api::k8s::parse_documents(&broken);
    let expected = whole.iter().find_map(|r| r.as_ref().err()).unwrap().line;
    assert_eq!(
        scan.file_errors[0].line, expected,
        "{}",
        scan.file_errors[0]
    );
    assert_eq!(
        index.service_entries().len(),
        3,
        "the last good objects stay"
    );
}

#[test]
fn documents_split_as_parse_documents_does() {
    let text = "# head\n---\na: 1\n--- # second\nb: 2\n---x: not a separator\n---\n";
    let docs = documents(text);
    let lines: Vec<_> = docs.iter().map(|(line, _)| *line).collect();
    assert_eq!(lines, [1, 2, 4, 7]);
    assert_eq!(docs.iter().map(|(_, d)| *d).collect::<String>(), text);
    assert!(docs[2].1.starts_with("--- # second\nb: 2\n---x"));
}
