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

fn tempdir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("trellis-dir-source-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
    let dir = tempdir("read");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yml"), ROUTE_V2).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let mut index = Index::default();
    let scan = DirSource::new(&dir).scan(&mut index);
    assert!(scan.file_errors.is_empty(), "{:?}", scan.file_errors);
    assert_eq!(index.service_entries().len(), 2);
    assert_eq!(routes(&index), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn broken_file_is_reported_with_line_and_keeps_its_previous_objects() {
    let dir = tempdir("broken");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(dir.join("route.yaml"), ROUTE_V2).unwrap();
    let mut source = DirSource::new(&dir);
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
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_objects_are_refused_by_the_index_with_their_fields() {
    let dir = tempdir("invalid");
    std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
    std::fs::write(
        dir.join("route.yaml"),
        ROUTE_V2.replace("{ name: reviews-v2, port: 9080 }", "{ name: reviews-v2 }"),
    )
    .unwrap();
    let mut index = Index::default();
    let scan = DirSource::new(&dir).scan(&mut index);
    assert!(scan.file_errors.is_empty());
    assert_eq!(scan.refused.len(), 1);
    assert!(
        scan.refused[0]
            .to_string()
            .contains("spec.rules[0].backendRefs[0].port: required"),
        "{}",
        scan.refused[0]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_kind_names_file_and_line() {
    let dir = tempdir("unknown");
    std::fs::write(
        dir.join("x.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: { name: x }\n",
    )
    .unwrap();
    let scan = DirSource::new(&dir).scan(&mut Index::default());
    assert_eq!(scan.file_errors.len(), 1);
    assert_eq!(scan.file_errors[0].line, 2, "{}", scan.file_errors[0]);
    assert!(
        scan.file_errors[0].reason.contains("ConfigMap"),
        "{}",
        scan.file_errors[0]
    );
    std::fs::remove_dir_all(dir).unwrap();
}
