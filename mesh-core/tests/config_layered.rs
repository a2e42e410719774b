//! Resources from a shared store (etcd) layered over a proxy's own files: validated like
//! files, keyed one resource per source, and the files win a conflict.

use mesh_core::config::{
    self, KeyedSource, Kind, MeshConfig, ResourceId, Source, load_layered, split_resources,
};

const BOOTSTRAP: &str = "apiVersion: mesh-proxy/v1
kind: Bootstrap
metadata: { name: client }
spec:
  workload: { name: client }
";

const REVIEWS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1, ports: { http: 19081 } }]
";

const REVIEWS_FROM_STORE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: reviews }
spec:
  hosts: [reviews]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1, ports: { http: 29999 } }]
";

const RATINGS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: ratings }
spec:
  hosts: [ratings]
  ports: [{ number: 9080, name: http }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.1, ports: { http: 19090 } }]
";

fn base(texts: &[&str]) -> MeshConfig {
    let sources: Vec<Source> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| Source::new(format!("file{i}.yaml"), *t))
        .collect();
    config::load_sources(&sources).unwrap_or_else(|e| panic!("{e}"))
}

fn id(kind: Kind, name: &str) -> ResourceId {
    ResourceId {
        kind,
        namespace: "default".into(),
        name: name.into(),
    }
}

fn keyed(kind: Kind, name: &str, text: &str) -> KeyedSource {
    KeyedSource {
        id: id(kind, name),
        source: Source::new(format!("etcd:/mesh/{kind}/default/{name}"), text),
    }
}

fn port(config: &MeshConfig, host: &str) -> Option<u16> {
    let port = config.services().lookup(host, 9080)?;
    port.endpoints.first().map(|e| e.address.port())
}

#[test]
fn overlay_resources_join_the_files() {
    let files = base(&[BOOTSTRAP, REVIEWS]);
    let layered = load_layered(&files, &[keyed(Kind::ServiceEntry, "ratings", RATINGS)])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(layered.shadowed.is_empty());
    assert_eq!(port(&layered.config, "reviews"), Some(19081));
    assert_eq!(port(&layered.config, "ratings"), Some(19090));
    assert_eq!(layered.config.resource_count(), 3);
    // The overlay's origin is its key, for /config_dump and errors.
    let ratings = &layered.config.service_entries()[1];
    assert_eq!(
        ratings.origin.file,
        "etcd:/mesh/ServiceEntry/default/ratings"
    );
}

#[test]
fn the_files_win_a_conflict() {
    let files = base(&[BOOTSTRAP, REVIEWS]);
    let layered = load_layered(
        &files,
        &[keyed(Kind::ServiceEntry, "reviews", REVIEWS_FROM_STORE)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(port(&layered.config, "reviews"), Some(19081));
    assert_eq!(
        layered.shadowed,
        vec![(
            id(Kind::ServiceEntry, "reviews"),
            "etcd:/mesh/ServiceEntry/default/reviews".to_string()
        )]
    );
}

#[test]
fn an_invalid_overlay_resource_is_named_by_its_key() {
    let files = base(&[BOOTSTRAP]);
    let bad = RATINGS.replace("number: 9080", "number: 99999");
    let errors = load_layered(
        &files,
        &[
            keyed(Kind::ServiceEntry, "reviews", REVIEWS),
            keyed(Kind::ServiceEntry, "ratings", &bad),
        ],
    )
    .expect_err("port 99999 is invalid");
    assert!(
        errors
            .iter()
            .all(|e| e.file == "etcd:/mesh/ServiceEntry/default/ratings"),
        "{errors}"
    );
}

#[test]
fn a_key_holds_exactly_its_own_resource() {
    let files = base(&[BOOTSTRAP]);
    let wrong_name = load_layered(&files, &[keyed(Kind::ServiceEntry, "details", RATINGS)])
        .expect_err("the key says details");
    assert!(
        wrong_name
            .to_string()
            .contains("must hold ServiceEntry default/details, not ServiceEntry default/ratings"),
        "{wrong_name}"
    );

    let two = format!("{RATINGS}---\n{REVIEWS}");
    let errors = load_layered(&files, &[keyed(Kind::ServiceEntry, "ratings", &two)])
        .expect_err("two resources under one key");
    assert!(
        errors.to_string().contains("one key holds one resource"),
        "{errors}"
    );

    let errors = load_layered(&files, &[keyed(Kind::ServiceEntry, "ratings", "")])
        .expect_err("an empty value");
    assert!(errors.to_string().contains("holds no resource"), "{errors}");

    let errors = load_layered(
        &files,
        &[KeyedSource {
            id: id(Kind::Bootstrap, "client"),
            source: Source::new("etcd:bootstrap", BOOTSTRAP),
        }],
    )
    .expect_err("a Bootstrap is not shared");
    assert!(
        errors.to_string().contains("belongs in that proxy's files"),
        "{errors}"
    );
}

#[test]
fn split_resources_gives_each_resource_its_own_text() {
    let text = format!("{REVIEWS}---\n# a comment only\n---\n{RATINGS}");
    let parts = split_resources(&Source::new("apply.yaml", text)).unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&ResourceId> = parts.iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        vec![
            &id(Kind::ServiceEntry, "reviews"),
            &id(Kind::ServiceEntry, "ratings")
        ]
    );
    assert!(parts[0].1.contains("19081") && !parts[0].1.contains("19090"));
    // Each part loads alone, under its own key.
    let files = base(&[BOOTSTRAP]);
    let overlay: Vec<KeyedSource> = parts
        .iter()
        .map(|(id, text)| KeyedSource {
            id: id.clone(),
            source: Source::new(format!("etcd:{}", id.name), text.clone()),
        })
        .collect();
    let layered = load_layered(&files, &overlay).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(port(&layered.config, "ratings"), Some(19090));

    // An invalid text is refused whole, before anything could be stored.
    let bad = format!(
        "{REVIEWS}---\n{}",
        RATINGS.replace("hosts: [ratings]", "hosts: []")
    );
    assert!(split_resources(&Source::new("apply.yaml", bad)).is_err());
}
