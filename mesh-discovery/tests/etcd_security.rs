//! TLS (with client certificates) and username/password authentication towards etcd.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Permission;
use mesh_discovery::etcd::{
    EtcdAuth, EtcdError, EtcdOptions, EtcdTls, ResourceKey, ResourceStore, ResourceWatch,
    StoreSnapshot, connect,
};
use mesh_discovery::testing::EtcdServer;
use tokio::sync::watch;

fn key(name: &str) -> ResourceKey {
    ResourceKey::new("networking.istio.io", "VirtualService", "default", name)
}

async fn wait_for_resource(
    snapshots: &mut watch::Receiver<Option<Arc<StoreSnapshot>>>,
    name: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let wanted = key(name);
    tokio::time::timeout(
        within,
        snapshots.wait_for(|s| {
            s.as_ref()
                .is_some_and(|s| s.resources.contains_key(&wanted))
        }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{name} not in a snapshot within {within:?}"))??;
    Ok(())
}

/// The error connecting with `options` gives (`Client` has no Debug, so no `expect_err`).
async fn connect_error(options: &EtcdOptions, why: &str) -> EtcdError {
    match connect(options).await {
        Ok(_) => panic!("connected although {why}"),
        Err(error) => error,
    }
}

#[tokio::test]
async fn tls_with_a_client_certificate() -> anyhow::Result<()> {
    let server = EtcdServer::start_tls().await?;
    let options = server.options("/mesh");
    assert!(server.endpoint().starts_with("https://"));

    let mut store = ResourceStore::connect(&options).await?;
    store
        .put_all(&[(key("reviews"), "v: 1".to_owned())])
        .await?;
    assert_eq!(store.list(None, None).await?.len(), 1);

    let watch = ResourceWatch::spawn(options.clone());
    let mut snapshots = watch.snapshots();
    wait_for_resource(&mut snapshots, "reviews", Duration::from_secs(5)).await?;
    store
        .put_all(&[(key("ratings"), "v: 1".to_owned())])
        .await?;
    wait_for_resource(&mut snapshots, "ratings", Duration::from_secs(1)).await?;

    // Without a client certificate etcd refuses the handshake.
    let mut no_identity = options.clone();
    no_identity.tls = Some(EtcdTls {
        cert: None,
        key: None,
        ..options.tls.clone().expect("TLS options")
    });
    assert!(connect(&no_identity).await.is_err());

    // Verified against the CA: a different name than the certificate's fails.
    let mut wrong_name = options.clone();
    if let Some(tls) = wrong_name.tls.as_mut() {
        tls.domain = Some("not-etcd.example".to_owned());
    }
    assert!(connect(&wrong_name).await.is_err());
    Ok(())
}

#[tokio::test]
async fn tls_file_problems_name_the_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "hello")?;
    let missing = dir.path().join("missing-ca.pem");
    let base = EtcdOptions::new(vec!["https://127.0.0.1:1".to_owned()], "/mesh");
    let tls = |ca: &std::path::Path| EtcdTls {
        ca: ca.to_owned(),
        cert: None,
        key: None,
        domain: None,
    };

    let error = connect_error(&base.clone().with_tls(tls(&missing)), "no such file").await;
    assert!(matches!(error, EtcdError::TlsFileRead { .. }), "{error:?}");
    assert!(error.to_string().contains("missing-ca.pem"), "{error}");

    let error = connect_error(&base.clone().with_tls(tls(&not_pem)), "not PEM").await;
    assert!(
        matches!(error, EtcdError::TlsFileInvalid { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("not-pem.txt"), "{error}");

    // https without TLS options, and TLS options with an http endpoint, are refused up front.
    let error = connect_error(&base, "https needs TLS").await;
    assert!(
        matches!(error, EtcdError::InvalidOptions { .. }),
        "{error:?}"
    );
    let plain = EtcdOptions::new(vec!["http://127.0.0.1:1".to_owned()], "/mesh");
    let error = connect_error(&plain.with_tls(tls(&not_pem)), "TLS needs https").await;
    assert!(
        matches!(error, EtcdError::InvalidOptions { .. }),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn username_and_password() -> anyhow::Result<()> {
    let mut server = EtcdServer::start().await?;
    let auth = server.enable_auth("s3cret-pass").await?;
    let options = server.options("/mesh");
    assert!(options.auth.is_some());

    let mut store = ResourceStore::connect(&options).await?;
    store
        .put_all(&[(key("reviews"), "v: 1".to_owned())])
        .await?;

    // No credentials: etcd refuses the request; a wrong password: refused at connect, and
    // the password is in neither the error nor the options' Debug.
    let mut anonymous = options.clone();
    anonymous.auth = None;
    let mut anonymous_store = ResourceStore::connect(&anonymous).await?;
    assert!(anonymous_store.list(None, None).await.is_err());
    let wrong = options.clone().with_auth(EtcdAuth {
        password: "wrong-pass".to_owned(),
        ..auth.clone()
    });
    let error = connect_error(&wrong, "wrong password").await;
    assert!(!error.to_string().contains("wrong-pass"), "{error}");
    assert!(!format!("{options:?}").contains("s3cret-pass"));

    // A user allowed only the prefix (as a proxy would be) gets as far as root.
    let mut root = server.client().await?;
    root.role_add("mesh").await?;
    root.role_grant_permission("mesh", Permission::read_write("/mesh/").with_prefix())
        .await?;
    root.user_add("proxy", "proxy-pass", None).await?;
    root.user_grant_role("proxy", "mesh").await?;
    let proxy = options.clone().with_auth(EtcdAuth {
        username: "proxy".to_owned(),
        password: "proxy-pass".to_owned(),
    });
    assert_eq!(
        ResourceStore::connect(&proxy)
            .await?
            .list(None, None)
            .await?
            .len(),
        1
    );

    let watch = ResourceWatch::spawn(proxy);
    let mut snapshots = watch.snapshots();
    wait_for_resource(&mut snapshots, "reviews", Duration::from_secs(5)).await?;

    // etcd's simple tokens die with the server: after a restart the watch must log in again.
    server.kill();
    server.restart().await?;
    let mut store = ResourceStore::connect(&options).await?;
    store
        .put_all(&[(key("after-restart"), "v: 1".to_owned())])
        .await?;
    wait_for_resource(&mut snapshots, "after-restart", Duration::from_secs(10)).await?;
    Ok(())
}
