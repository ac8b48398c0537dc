//! Image pulls through containerd as a hostile image reference or registry would exercise
//! them: pull secrets and the registry CA, plain http only for registries named insecure, Wasm
//! artifacts refused, and removal. Real containerd, real registries (the local cluster's plain
//! one and its TLS one with htpasswd).

mod common;

use common::{busybox_image, busybox_image_with, cluster_var, connect, start_containerd, Cleanup};
use provider_api::{Provider, ProviderError, RegistryAuth};
use provider_containerd::ProviderOptions;

struct Env {
    options: ProviderOptions,
    _cleanup: Cleanup,
    _containerd: Option<common::OwnContainerd>,
    _work: common::TempDir,
}

fn env(test: &str, insecure: Vec<String>, ca_pem: Option<&str>) -> Env {
    let (socket, containerd) = start_containerd();
    let work = std::env::temp_dir().join(format!("ctd-img-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let namespace = format!("images-{test}-{}", std::process::id());
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = insecure;
    if let Some(path) = ca_pem {
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(path).expect("the registry CA");
        options.registries.extra_ca_certificates =
            rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.expect("a PEM certificate").as_ref().to_vec())
                .collect();
    }
    Env {
        _cleanup: Cleanup(options.clone()),
        options,
        _containerd: containerd,
        _work: common::TempDir(work),
    }
}

fn var(name: &str) -> String {
    cluster_var(name).unwrap_or_else(|| {
        panic!("{name}: set LOCAL_CLUSTER_DIR to a local cluster (its env file names it)")
    })
}

/// A pull from the TLS registry needs the pod's pull secret: without it the registry refuses
/// (401) and nothing is stored; with it the image is pulled, trusting the cluster CA only as
/// configured.
#[tokio::test]
async fn pull_secret_and_registry_ca() {
    let secure = var("SECURE_REGISTRY");
    let (user, password, ca) = (
        var("SECURE_REGISTRY_USER"),
        var("SECURE_REGISTRY_PASSWORD"),
        var("SECURE_REGISTRY_CA"),
    );
    let image = busybox_image_with(
        &secure,
        &["--user", &format!("{user}:{password}"), "--cacert", &ca],
    );
    let env = env("secret", vec![], Some(&ca));
    let p = connect(&env.options).await;
    let refused = p.pull_image(&image, &[]).await;
    assert!(
        matches!(&refused, Err(ProviderError::Pull(m)) if m.to_lowercase().contains("authorized")),
        "a pull without the secret: {refused:?}"
    );
    assert!(p.image_status(&image).await.is_none());
    let wrong = RegistryAuth {
        registry: secure.clone(),
        username: user.clone(),
        password: "not-the-password".into(),
    };
    assert!(matches!(
        p.pull_image(&image, &[wrong]).await,
        Err(ProviderError::Pull(_))
    ));
    let auth = RegistryAuth {
        registry: secure.clone(),
        username: user,
        password,
    };
    let info = p
        .pull_image(&image, &[auth])
        .await
        .expect("a pull with the secret");
    assert_eq!(
        p.image_status(&image).await.map(|i| i.digest),
        Some(info.digest)
    );
}

/// Without the registry CA configured, the TLS registry's certificate is not trusted.
#[tokio::test]
async fn registry_ca_is_required_for_tls() {
    let secure = var("SECURE_REGISTRY");
    let env = env("noca", vec![], None);
    let p = connect(&env.options).await;
    let auth = RegistryAuth {
        registry: secure.clone(),
        username: var("SECURE_REGISTRY_USER"),
        password: var("SECURE_REGISTRY_PASSWORD"),
    };
    let pulled = p.pull_image(&format!("{secure}/busybox:1"), &[auth]).await;
    assert!(matches!(pulled, Err(ProviderError::Pull(_))), "{pulled:?}");
}

/// A registry not named insecure is spoken to over https only, loopback or not: an image
/// reference cannot reach the node's plain-http ports.
#[tokio::test]
async fn plain_http_only_for_registries_named_insecure() {
    let registry = var("REGISTRY");
    let image = busybox_image(&registry);
    let env = env("plain", vec![], None);
    let p = connect(&env.options).await;
    let pulled = p.pull_image(&image, &[]).await;
    assert!(matches!(pulled, Err(ProviderError::Pull(_))), "{pulled:?}");
    assert!(p.image_status(&image).await.is_none());
}

/// A Wasm artifact is not a container image: refused as UnsupportedImage, nothing stored.
#[tokio::test]
async fn wasm_artifact_is_refused() {
    let registry = var("REGISTRY");
    let work = std::env::temp_dir().join(format!("ctd-wasm-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    // The smallest core module: the header.
    let module = work.join("empty.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let image = format!("{registry}/conformance-wasm/empty:1");
    let pushed = std::process::Command::new(common::workspace_root().join("deploy/push-wasm"))
        .arg(&module)
        .arg(&image)
        .output()
        .expect("push-wasm runs");
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let _ = std::fs::remove_dir_all(&work);
    let env = env("wasm", vec![registry], None);
    let p = connect(&env.options).await;
    let pulled = p.pull_image(&image, &[]).await;
    assert!(
        matches!(pulled, Err(ProviderError::UnsupportedImage(_))),
        "{pulled:?}"
    );
    assert!(p.image_status(&image).await.is_none());
    let bad = p.pull_image("Not A Reference", &[]).await;
    assert!(
        matches!(bad, Err(ProviderError::InvalidImageName(_))),
        "{bad:?}"
    );
}

/// remove_image removes the image record; it is no longer present or listed, and a
/// container cannot be made from it.
#[tokio::test]
async fn remove_image() {
    let registry = var("REGISTRY");
    let image = busybox_image(&registry);
    let env = env("remove", vec![registry], None);
    let p = connect(&env.options).await;
    let info = p.pull_image(&image, &[]).await.expect("pull");
    assert!(info.size > 0);
    assert_eq!(p.remove_image(&image).await.expect("remove"), info.size);
    assert!(p.image_status(&image).await.is_none());
    assert!(p
        .list_images()
        .await
        .iter()
        .all(|i| i.digest != info.digest));
    assert!(matches!(
        p.remove_image(&image).await,
        Err(ProviderError::NotFound(_))
    ));
}
