//! `ResourceStore` (the CLI's apply/get/delete) against a real etcd.

use mesh_discovery::etcd::{EtcdError, EtcdOptions, ResourceKey, ResourceStore};
use mesh_discovery::testing::EtcdServer;

fn key(kind: &str, name: &str) -> ResourceKey {
    ResourceKey::new("networking.istio.io", kind, "default", name)
}

#[tokio::test]
async fn put_all_list_and_delete() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut store = ResourceStore::connect(&server.options("/mesh")).await?;

    let reviews = key("VirtualService", "reviews");
    let ratings = key("VirtualService", "ratings");
    let reviews_rule = key("DestinationRule", "reviews");
    store
        .put_all(&[
            (
                reviews.clone(),
                "kind: VirtualService\nname: reviews\n".to_owned(),
            ),
            (
                ratings.clone(),
                "kind: VirtualService\nname: ratings\n".to_owned(),
            ),
            (
                reviews_rule.clone(),
                "kind: DestinationRule\nname: reviews\n".to_owned(),
            ),
        ])
        .await?;

    // A key of another shape under the prefix, and one under a longer prefix, are not listed.
    let mut client = server.client().await?;
    client.put("/mesh/not-a-resource", "x", None).await?;
    client
        .put(
            "/mesh2/networking.istio.io/VirtualService/default/other",
            "x",
            None,
        )
        .await?;

    let all = store.list(None, None).await?;
    let keys: Vec<_> = all.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(
        keys,
        vec![reviews_rule.clone(), ratings.clone(), reviews.clone()]
    );
    assert_eq!(all[2].1, "kind: VirtualService\nname: reviews\n");

    let services = store.list(Some("virtualservice"), None).await?;
    assert_eq!(
        services
            .iter()
            .map(|(key, _)| key.clone())
            .collect::<Vec<_>>(),
        vec![ratings.clone(), reviews.clone()]
    );
    let one = store.list(Some("VirtualService"), Some("reviews")).await?;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0, reviews);
    assert!(store.list(Some("Gateway"), None).await?.is_empty());

    assert!(store.delete(&ratings).await?);
    assert!(!store.delete(&ratings).await?);
    assert_eq!(store.list(Some("VirtualService"), None).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn put_all_is_one_transaction_and_checks_keys_first() -> anyhow::Result<()> {
    let server = EtcdServer::start().await?;
    let mut store = ResourceStore::connect(&server.options("/mesh/")).await?;
    let mut client = server.client().await?;
    let before = client.get("/", None).await?;
    let revision_before = before.header().map_or(0, |h| h.revision());

    store
        .put_all(&[
            (key("VirtualService", "a"), "a".to_owned()),
            (key("VirtualService", "b"), "b".to_owned()),
        ])
        .await?;
    let after = client.get("/", None).await?;
    // One transaction is one revision, whatever it writes.
    assert_eq!(
        after.header().map_or(0, |h| h.revision()),
        revision_before + 1
    );

    // A bad key anywhere writes nothing.
    let bad = store
        .put_all(&[
            (key("VirtualService", "c"), "c".to_owned()),
            (key("VirtualService", "d/e"), "d".to_owned()),
        ])
        .await;
    match bad {
        Err(EtcdError::InvalidKey { key, .. }) => {
            assert_eq!(key, "networking.istio.io/VirtualService/default/d/e")
        }
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    let twice = store
        .put_all(&[
            (key("VirtualService", "c"), "c".to_owned()),
            (key("VirtualService", "c"), "c2".to_owned()),
        ])
        .await;
    assert!(
        matches!(twice, Err(EtcdError::InvalidKey { .. })),
        "{twice:?}"
    );
    assert_eq!(store.list(None, None).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_is_an_error_naming_the_endpoint() -> anyhow::Result<()> {
    let port = mesh_discovery::testing::free_loopback_port()?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = EtcdOptions::new(vec![endpoint.clone()], "/mesh")
        .with_connect_timeout(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let error = ResourceStore::connect(&options)
        .await
        .expect_err("nothing listens there");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let message = error.to_string();
    assert_eq!(message.matches(&endpoint).count(), 1, "{message}");
    Ok(())
}
