//! Wires the agent's long-running pieces together and runs them until shutdown.
//!
//! Each piece is one task that owns its state and hears from the others over channels:
//! the [`NodeStatusManager`] owns the Node and publishes its identity on a watch channel, the
//! [`LeaseHeartbeat`] owns the Lease and follows that identity. Pod workers, the status manager
//! for pods and the kubelet API join this list as they arrive.

use std::sync::Arc;
use std::time::Duration;

use provider_api::Provider;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{one_line, Config};
use crate::lease::LeaseHeartbeat;
use crate::events::EventSink;
use crate::node_status::NodeStatusManager;
use crate::pods::status::StatusManager;
use crate::pods::worker::WorkerContext;
use crate::pods::{manager, pleg, source};

/// How long the tasks get to finish after a shutdown signal before the agent exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors that stop the agent before it runs. Not retryable.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {path}: {reason}")]
    Client { path: String, reason: String },
    #[error("root directory {path}: {source}")]
    RootDir { path: String, source: std::io::Error },
    #[error("kubelet API: {0}")]
    Server(#[from] crate::server::ServerError),
}

/// Builds a client from the node's kubeconfig.
pub async fn client(config: &Config) -> Result<Option<kube::Client>, AgentError> {
    let Some(path) = &config.kubeconfig else { return Ok(None) };
    let fail = |reason: String| AgentError::Client { path: path.display().to_string(), reason };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(one_line(&e)))?;
    let kube_config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| fail(one_line(&e)))?;
    let client = kube::Client::try_from(kube_config).map_err(|e| fail(one_line(&e)))?;
    Ok(Some(client))
}

/// Runs the agent until `shutdown` is cancelled, then waits up to [`SHUTDOWN_GRACE`] for its
/// tasks to finish.
pub async fn run(config: Config, provider: Arc<dyn Provider>, shutdown: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.root_dir)
        .map_err(|source| AgentError::RootDir { path: config.root_dir.display().to_string(), source })?;
    let config = Arc::new(config);
    let tasks = TaskTracker::new();

    let client = client(&config).await?;
    // The kubelet API: bound before anything else runs, so a busy port or a bad certificate
    // stops the agent at once (as it stops the kubelet).
    if let Some(server) = crate::server::KubeletServer::bind(&config, client.clone(), provider.clone()).await? {
        tasks.spawn(server.run(shutdown.clone()));
    }
    match client {
        Some(client) => {
            info!(node = %config.node_name, runtime = %provider.runtime_info(), "starting");
            let (node_tx, node_rx) = watch::channel(None);
            if config.register_node {
                let manager = NodeStatusManager::new(client.clone(), config.clone(), provider.clone(), node_tx);
                tasks.spawn(manager.run(shutdown.clone()));
            } else {
                warn!("--register-node=false: not registering or updating the Node; the lease follows a Node someone else registered");
                tasks.spawn(follow_existing_node(client.clone(), config.node_name.clone(), node_tx, shutdown.clone()));
            }
            let lease = LeaseHeartbeat::new(client.clone(), config.node_name.clone(), config.node_lease_duration, config.lease_renew_interval(), node_rx);
            tasks.spawn(lease.run(shutdown.clone()));

            // Pods: source -> manager -> one worker per pod -> status manager.
            let (status_manager, status) = StatusManager::new(client.clone());
            tasks.spawn(status_manager.run(shutdown.clone()));
            let ctx = Arc::new(WorkerContext {
                provider: provider.clone(),
                client: Some(client.clone()),
                status,
                events: EventSink::start(client.clone(), &config.node_name),
                node_name: config.node_name.clone(),
                node_ip: node_ip(&config),
                pods_dir: config.root_dir.join("pods"),
                pod_logs_dir: config.pod_logs_dir.clone(),
                node_allocatable: allocatable(&config),
            });
            let (change_tx, change_rx) = mpsc::unbounded_channel();
            let (pleg_tx, pleg_rx) = mpsc::unbounded_channel();
            tasks.spawn(source::watch_pods(client, config.node_name.clone(), change_tx, shutdown.clone()));
            tasks.spawn(pleg::run(provider.clone(), pleg_tx, shutdown.clone()));
            tasks.spawn(manager::run(ctx, change_rx, pleg_rx, shutdown.clone()));
        }
        None => {
            info!(node = %config.node_name, "no --kubeconfig: running standalone, without an API server (static pods only)");
        }
    }
    tasks.close();

    shutdown.cancelled().await;
    info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait()).await.is_err() {
        warn!(grace = ?SHUTDOWN_GRACE, "tasks did not stop within the grace period; exiting anyway");
    }
    Ok(())
}

/// The IP pods get: the node's (DESIGN: the pod IP is the node IP).
fn node_ip(config: &Config) -> String {
    config.node_ip.map(|ip| ip.to_string()).unwrap_or_else(|| crate::node_status::resolve_node_ip(&config.node_name).map(|ip| ip.to_string()).unwrap_or_default())
}

/// (cpu millicores, memory bytes) of the machine, for resourceFieldRef without limits.
fn allocatable(config: &Config) -> (u64, u64) {
    match crate::machine::capacity(&config.root_dir) {
        Ok(c) => (u64::from(c.cpus) * 1000, c.memory_bytes),
        Err(_) => (1000, 0),
    }
}

/// Without registration, the lease still needs the Node's UID: poll for it.
async fn follow_existing_node(
    client: kube::Client,
    name: String,
    node_tx: watch::Sender<Option<crate::node_status::NodeRef>>,
    shutdown: CancellationToken,
) {
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    loop {
        match api.get_opt(&name).await {
            Ok(node) => {
                let node_ref = node.and_then(|n| Some(crate::node_status::NodeRef { name: name.clone(), uid: n.metadata.uid? }));
                node_tx.send_if_modified(|current| {
                    let changed = *current != node_ref;
                    *current = node_ref;
                    changed
                });
            }
            Err(e) => warn!(error = %one_line(&e), "reading node"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}
