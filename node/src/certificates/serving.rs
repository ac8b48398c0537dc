//! The kubelet API's serving certificate by CSR (`--rotate-server-certificates`, the
//! KubeletConfiguration's `serverTLSBootstrap`), as the kubelet's serving certificate manager:
//! a CSR to `kubernetes.io/kubelet-serving` for the node's name and IP, which someone approves
//! (nothing in Kubernetes approves these automatically: `kubectl certificate approve`); until it
//! is issued the self-signed certificate serves. The issued certificate goes into the
//! `kubelet-server` store in `--cert-dir`, where the API server's TLS resolver
//! (`server::tls`) picks it up at the next handshake; it is renewed at 70-90 % of its lifetime.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::csr::{self, KUBELET_SERVING, SERVING_USAGES};
use super::{random_fraction, until, Store};
use crate::config::Config;

/// The kubelet's certificate manager waits this long for a CSR, then makes a new one.
const WAIT_FOR_APPROVAL: Duration = Duration::from_secs(15 * 60);
/// Retries after an error start here and double up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(128);

/// Gets and renews the serving certificate; the only writer of the `kubelet-server` store.
pub struct ServingRotation {
    client: kube::Client,
    store: Store,
    node_name: String,
    /// The node's name and IP address: the serving certificate's SANs.
    subject_alt_names: Vec<String>,
}

impl ServingRotation {
    pub fn new(client: kube::Client, config: &Config) -> Self {
        let mut subject_alt_names = vec![config.node_name.clone()];
        let ip = config
            .node_ip
            .or_else(|| crate::node_status::resolve_node_ip(&config.node_name));
        subject_alt_names.extend(ip.map(|ip| ip.to_string()));
        Self {
            client,
            store: Store::server(&config.cert_dir),
            node_name: config.node_name.clone(),
            subject_alt_names,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut retry = RETRY_FIRST;
        loop {
            if let Some(current) = self.store.load_valid() {
                let deadline = current.leaf.rotation_deadline(random_fraction());
                info!(serial = %current.leaf.serial, not_after = %current.leaf.not_after, rotate_at = %deadline, "serving certificate rotation scheduled");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(until(deadline)) => {}
                }
            }
            let request = csr::Request {
                signer: KUBELET_SERVING,
                usages: SERVING_USAGES,
                node_name: &self.node_name,
                subject_alt_names: self.subject_alt_names.clone(),
                timeout: WAIT_FOR_APPROVAL,
                hint: " (serving certificates are approved by hand: kubectl certificate approve <name>)",
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = csr::request(self.client.clone(), &request) => result,
            };
            let saved =
                result.and_then(|(cert, key)| self.store.save(cert.as_bytes(), key.as_bytes()));
            match saved {
                Ok(pair) => {
                    retry = RETRY_FIRST;
                    info!(serial = %pair.leaf.serial, not_after = %pair.leaf.not_after, cert = %pair.path.display(), "serving certificate issued; the kubelet API serves it from the next connection");
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?retry, "getting a serving certificate failed; the current one keeps serving");
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
