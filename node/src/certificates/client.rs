//! The agent's API client and its identity: TLS bootstrap (`--bootstrap-kubeconfig`) and client
//! certificate rotation (`--rotate-certificates`).
//!
//! Bootstrap, as the kubelet's `LoadClientCert`: when `--kubeconfig` is missing, unreadable or
//! holds an expired certificate, a valid `kubelet-client-current.pem` in `--cert-dir` is used;
//! failing that, a CSR to `kubernetes.io/kube-apiserver-client-kubelet` is made with the
//! bootstrap credentials and waited for (up to an hour, the kubelet's bound). Either way
//! `--kubeconfig` is (re)written to name the server and CA of the bootstrap kubeconfig and the
//! `kubelet-client-current.pem` symlink as certificate and key. A denied or failed CSR, or one
//! not issued in time, stops the agent with one line and exit code 1 (the kubelet exits too and
//! leaves the retry to its supervisor).
//!
//! Rotation without a restart. Every task holds a clone of ONE `kube::Client` whose service is
//! [`CurrentClient`]: for each request it takes the client of the current certificate from a
//! `watch` channel and sends the request through it. [`ClientRotation`] is the only writer of
//! that channel: at a random 70-90 % of the certificate's lifetime it asks for a new one with
//! the current identity (the `selfnodeclient` auto-approval), stores it, builds a client for it
//! and sends that. Requests from then on open connections with the new certificate; the old
//! client, and its connection pool, goes away when the last request in flight on it ends (a
//! long watch keeps its connection until the API server ends it, as it was authenticated when
//! it started). Why not a rustls resolver under kube's client: kube builds its TLS config
//! itself, and idle pooled connections would keep presenting the old certificate after it
//! expires; a new client per certificate has a fresh pool.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use jiff::Timestamp;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::csr::{self, CLIENT_USAGES, KUBE_APISERVER_CLIENT_KUBELET};
use super::{random_fraction, until, CertificateError, Leaf, Pair, Store};
use crate::config::{one_line, Config};

/// Builds a client for one `kube::Config` (the agent adds its own layers here).
pub type BuildClient = fn(kube::Config) -> Result<kube::Client, String>;

/// The kubelet waits this long for its bootstrap CSR to be issued.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(3600);
/// The kubelet's certificate manager waits this long for a renewal CSR, then retries.
const ROTATION_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Retries of a failed rotation start here and double up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(128);

/// The agent's client: `None` without `--kubeconfig`. Bootstraps the credentials first when
/// `--bootstrap-kubeconfig` is given, and starts the certificate rotation tasks that are asked
/// for (client: `--rotate-certificates`; serving: `--rotate-server-certificates`) on `tasks`.
pub async fn connect(
    config: &Config,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    build: BuildClient,
) -> Result<Option<kube::Client>, CertificateError> {
    let Some(path) = &config.kubeconfig else {
        return Ok(None);
    };
    let store = Store::client(&config.cert_dir);
    if let Some(bootstrap) = &config.bootstrap_kubeconfig {
        bootstrap_if_needed(path, bootstrap, &store, &config.node_name, build).await?;
    }
    let base = kube_config(path).await?;
    let kubeconfig_error = |reason: String| CertificateError::Kubeconfig {
        path: path.clone(),
        reason,
    };
    let client = if !config.rotate_certificates || config.runonce {
        build(base).map_err(kubeconfig_error)?
    } else {
        // The store's certificate first (it is the newest after a rotation); else the
        // kubeconfig's, copied into the store so that it is rotated from there on.
        let current = match store.load_valid() {
            Some(pair) => Some(pair),
            None => import(&base, &store, path)?,
        };
        match current {
            None => {
                warn!(kubeconfig = %path.display(), "--rotate-certificates: the kubeconfig has no client certificate; nothing to rotate");
                build(base).map_err(kubeconfig_error)?
            }
            Some(current) => {
                let inner = client_for(&base, &current, build)?;
                let (tx, rx) = watch::channel(inner);
                let rotation = ClientRotation {
                    store,
                    base: base.clone(),
                    node_name: config.node_name.clone(),
                    current,
                    tx,
                    build,
                };
                tasks.spawn(rotation.run(shutdown.clone()));
                kube::Client::new(CurrentClient(rx), base.default_namespace)
            }
        }
    };
    if config.rotate_server_certificates && config.enable_server && !config.runonce {
        let serving = super::serving::ServingRotation::new(client.clone(), config);
        tasks.spawn(serving.run(shutdown.clone()));
    }
    Ok(Some(client))
}

/// The kube::Config of a kubeconfig file.
async fn kube_config(path: &Path) -> Result<kube::Config, CertificateError> {
    let fail = |reason: String| CertificateError::Kubeconfig {
        path: path.to_path_buf(),
        reason,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| fail(one_line(&e)))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| fail(one_line(&e)))
}

/// `base` with the identity replaced by `pair` (its dated file, certificate and key in one).
fn client_for(
    base: &kube::Config,
    pair: &Pair,
    build: BuildClient,
) -> Result<kube::Client, CertificateError> {
    let mut config = base.clone();
    let file = pair.path.display().to_string();
    config.auth_info.client_certificate = Some(file.clone());
    config.auth_info.client_key = Some(file);
    config.auth_info.client_certificate_data = None;
    config.auth_info.client_key_data = None;
    build(config).map_err(|reason| CertificateError::File {
        path: pair.path.clone(),
        reason,
    })
}

/// (certificate, private key), PEM.
type IdentityPem = (Vec<u8>, Vec<u8>);

/// The client certificate and key a kube::Config names, PEM: `None` when it has none.
fn identity_pem(config: &kube::Config) -> Result<Option<IdentityPem>, String> {
    let auth = &config.auth_info;
    let read = |file: &Option<String>, data: Option<&str>| -> Result<Option<Vec<u8>>, String> {
        if let Some(data) = data {
            return base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map(Some)
                .map_err(|e| format!("base64: {e}"));
        }
        match file {
            Some(file) => std::fs::read(file)
                .map(Some)
                .map_err(|e| format!("{file}: {e}")),
            None => Ok(None),
        }
    };
    use secrecy::ExposeSecret;
    let cert = read(
        &auth.client_certificate,
        auth.client_certificate_data.as_deref(),
    )?;
    let key = read(
        &auth.client_key,
        auth.client_key_data.as_ref().map(|k| k.expose_secret()),
    )?;
    Ok(cert.zip(key))
}

/// Whether the kubeconfig at `path` can be used as it is: it parses, and its client
/// certificate (if it has one) is valid now. Token credentials count as usable.
async fn usable(path: &Path) -> Result<(), String> {
    let config = kube_config(path).await.map_err(|e| e.to_string())?;
    let Some((cert, _)) = identity_pem(&config)? else {
        return Ok(());
    };
    let leaf = rustls_pki_types::pem::PemObject::pem_slice_iter(&cert)
        .next()
        .and_then(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.ok())
        .and_then(|c| Leaf::from_der(&c).ok())
        .ok_or("its client certificate cannot be read")?;
    if !leaf.valid_at(Timestamp::now()) {
        return Err(format!(
            "its client certificate is valid from {} to {} only",
            leaf.not_before, leaf.not_after
        ));
    }
    Ok(())
}

/// TLS bootstrap (see the module doc).
async fn bootstrap_if_needed(
    kubeconfig: &Path,
    bootstrap: &Path,
    store: &Store,
    node_name: &str,
    build: BuildClient,
) -> Result<(), CertificateError> {
    let why = match usable(kubeconfig).await {
        Ok(()) => {
            info!(kubeconfig = %kubeconfig.display(), "the kubeconfig is usable; no TLS bootstrap needed");
            return Ok(());
        }
        Err(why) => why,
    };
    let bootstrap_kubeconfig =
        Kubeconfig::read_from(bootstrap).map_err(|e| CertificateError::Kubeconfig {
            path: bootstrap.into(),
            reason: one_line(&e),
        })?;
    let cluster =
        current_cluster(&bootstrap_kubeconfig).ok_or_else(|| CertificateError::Kubeconfig {
            path: bootstrap.into(),
            reason: "it names no cluster".into(),
        })?;
    if let Some(pair) = store.load_valid() {
        info!(kubeconfig = %kubeconfig.display(), cert = %pair.path.display(), "the kubeconfig is not usable ({why}); writing one for the stored client certificate");
        return write_kubeconfig(kubeconfig, cluster, &store.current_path());
    }
    info!(kubeconfig = %kubeconfig.display(), bootstrap = %bootstrap.display(), "TLS bootstrap: the kubeconfig is not usable ({why}); requesting a client certificate with the bootstrap kubeconfig");
    let client =
        build(kube_config(bootstrap).await?).map_err(|reason| CertificateError::Kubeconfig {
            path: bootstrap.into(),
            reason,
        })?;
    let request = csr::Request {
        signer: KUBE_APISERVER_CLIENT_KUBELET,
        usages: CLIENT_USAGES,
        node_name,
        subject_alt_names: Vec::new(),
        timeout: BOOTSTRAP_TIMEOUT,
        hint: "",
    };
    let (cert, key) = csr::request(client, &request).await?;
    let pair = store.save(cert.as_bytes(), key.as_bytes())?;
    write_kubeconfig(kubeconfig, cluster, &store.current_path())?;
    info!(kubeconfig = %kubeconfig.display(), cert = %pair.path.display(), serial = %pair.leaf.serial, not_after = %pair.leaf.not_after, "TLS bootstrap done: wrote the client certificate and the kubeconfig");
    Ok(())
}

/// The cluster of the kubeconfig's current context (or its only cluster).
fn current_cluster(kubeconfig: &Kubeconfig) -> Option<&kube::config::Cluster> {
    let by_context = kubeconfig.current_context.as_ref().and_then(|current| {
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| &c.name == current)?
            .context
            .as_ref()?;
        kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)?
            .cluster
            .as_ref()
    });
    by_context.or_else(|| kubeconfig.clusters.first()?.cluster.as_ref())
}

/// Writes the node's kubeconfig, as the kubelet does after bootstrap: the bootstrap cluster,
/// and `cert` as certificate and key (the current-symlink, so rotations need no rewrite).
fn write_kubeconfig(
    path: &Path,
    cluster: &kube::config::Cluster,
    cert: &Path,
) -> Result<(), CertificateError> {
    let cluster = serde_json::to_value(cluster).map_err(|e| CertificateError::Kubeconfig {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let cert = cert.display().to_string();
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": cluster}],
        "users": [{"name": "default-auth", "user": {"client-certificate": cert, "client-key": cert}}],
        "contexts": [{"name": "default-context", "context": {"cluster": "default-cluster", "user": "default-auth"}}],
        "current-context": "default-context",
    });
    let text = serde_yaml::to_string(&kubeconfig).map_err(|e| CertificateError::Kubeconfig {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CertificateError::File {
            path: dir.into(),
            reason: e.to_string(),
        })?;
    }
    super::write_private(path, text.as_bytes())
}

/// Copies the kubeconfig's client certificate into the store; `None` when it has none.
fn import(
    base: &kube::Config,
    store: &Store,
    kubeconfig: &Path,
) -> Result<Option<Pair>, CertificateError> {
    let fail = |reason: String| CertificateError::Kubeconfig {
        path: kubeconfig.into(),
        reason,
    };
    let Some((cert, key)) = identity_pem(base).map_err(fail)? else {
        return Ok(None);
    };
    store.save(&cert, &key).map(Some)
}

/// The service under the agent's one client: each request goes through the client of the
/// current certificate (see the module doc).
#[derive(Clone)]
pub struct CurrentClient(watch::Receiver<kube::Client>);

impl tower_service::Service<http::Request<kube::client::Body>> for CurrentClient {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the inner client's business: its own buffer waits in `send`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let client = self.0.borrow().clone();
        Box::pin(async move { client.send(request).await })
    }
}

/// Rotates the client certificate (see the module doc). The only writer of the client store
/// and of the current-client channel.
pub struct ClientRotation {
    store: Store,
    base: kube::Config,
    node_name: String,
    current: Pair,
    tx: watch::Sender<kube::Client>,
    build: BuildClient,
}

impl ClientRotation {
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let deadline = self.current.leaf.rotation_deadline(random_fraction());
            info!(serial = %self.current.leaf.serial, not_after = %self.current.leaf.not_after, rotate_at = %deadline, "client certificate rotation scheduled");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(until(deadline)) => {}
            }
            let mut retry = RETRY_FIRST;
            loop {
                let result = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    result = self.rotate() => result,
                };
                match result {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(error = %e, retry_in = ?retry, not_after = %self.current.leaf.not_after, "rotating the client certificate failed; the current one stays in use");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    async fn rotate(&mut self) -> Result<(), CertificateError> {
        let client = self.tx.borrow().clone();
        let request = csr::Request {
            signer: KUBE_APISERVER_CLIENT_KUBELET,
            usages: CLIENT_USAGES,
            node_name: &self.node_name,
            subject_alt_names: Vec::new(),
            timeout: ROTATION_TIMEOUT,
            hint: "",
        };
        let (cert, key) = csr::request(client, &request).await?;
        let pair = self.store.save(cert.as_bytes(), key.as_bytes())?;
        let inner = client_for(&self.base, &pair, self.build)?;
        self.tx.send_replace(inner);
        info!(
            old_serial = %self.current.leaf.serial,
            serial = %pair.leaf.serial,
            not_after = %pair.leaf.not_after,
            cert = %pair.path.display(),
            "rotated the client certificate; new API connections use it"
        );
        self.current = pair;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_kubeconfig_reads_back_with_the_bootstrap_cluster() {
        let dir = std::env::temp_dir().join(format!(
            "wasm-kubelet-kubeconfig-test-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bootstrap = dir.join("bootstrap.kubeconfig");
        std::fs::write(
            &bootstrap,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster: {server: https://10.0.0.9}\n- name: local\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: /ca.crt\nusers:\n- name: b\n  user: {token: abcdef.0123456789abcdef}\ncontexts:\n- name: c\n  context: {cluster: local, user: b}\ncurrent-context: c\n",
        )
        .unwrap();
        let kubeconfig = Kubeconfig::read_from(&bootstrap).unwrap();
        let cluster = current_cluster(&kubeconfig).unwrap();
        let out = dir.join("sub/node.kubeconfig");
        write_kubeconfig(&out, cluster, &dir.join("pki/kubelet-client-current.pem")).unwrap();
        let written = Kubeconfig::read_from(&out).unwrap();
        let cluster = current_cluster(&written).unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/ca.crt"));
        let user = written.auth_infos[0].auth_info.as_ref().unwrap();
        let cert = dir
            .join("pki/kubelet-client-current.pem")
            .display()
            .to_string();
        assert_eq!(user.client_certificate.as_deref(), Some(cert.as_str()));
        assert_eq!(user.client_key.as_deref(), Some(cert.as_str()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
