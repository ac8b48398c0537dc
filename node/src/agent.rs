//! Wires the agent's long-running pieces together and runs them until shutdown.
//!
//! Each piece is one task that owns its state and hears from the others over channels:
//! the [`NodeStatusManager`] owns the Node and publishes its identity on a watch channel, the
//! [`LeaseHeartbeat`] owns the Lease and follows that identity. Pod workers, the status manager
//! for pods and the kubelet API join this list as they arrive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use provider_api::Provider;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{one_line, Config};
use crate::events::EventSink;
use crate::lease::LeaseHeartbeat;
use crate::node_status::NodeStatusManager;
use crate::pods::mirror::MirrorManager;
use crate::pods::static_source::{self, MergeOutputs, StaticSet};
use crate::pods::status::{PodKey, StatusManager, StatusSender};
use crate::pods::worker::WorkerContext;
use crate::pods::{manager, pleg, source};

/// How long the tasks get to finish after a shutdown signal before the agent exits anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Raises the open-file soft limit to the hard limit, as Go does for every program since Go
/// 1.19 (the kubelet included): the agent holds a descriptor per kubelet API connection, per
/// pod-port connection, per container log and per pod socket, and the usual soft default of
/// 1024 is the hard cap's afterthought, not a budget. Returns (before, after) soft limits, or
/// the error of getrlimit/setrlimit (the agent then runs with the limit it was given).
pub fn raise_open_file_limit() -> std::io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit through a valid pointer to our own struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit(2) reads one rlimit through a valid pointer to our own struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// Errors that stop the agent before it runs. Not retryable.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("kubeconfig {path}: {reason}")]
    Client { path: String, reason: String },
    #[error("root directory {path}: {source}")]
    RootDir {
        path: String,
        source: std::io::Error,
    },
    #[error("kubelet API: {0}")]
    Server(#[from] crate::server::ServerError),
    /// TLS bootstrap failed (CSR denied, failed or not issued in time; bad bootstrap
    /// credentials), or the certificate store cannot be used.
    #[error(transparent)]
    Certificates(#[from] crate::certificates::CertificateError),
    /// `--runonce`: some static pods did not succeed (the summary on stdout names them).
    #[error("run-once: {failed} of {total} static pods did not succeed")]
    RunOnceFailed { failed: usize, total: usize },
    /// `--runonce`: a shutdown signal came before the static pods finished.
    #[error("run-once: interrupted before the static pods finished")]
    RunOnceInterrupted,
}

/// Builds a client from the node's kubeconfig as it is (no bootstrap, no rotation: the agent
/// itself uses `certificates::client::connect`).
pub async fn client(config: &Config) -> Result<Option<kube::Client>, AgentError> {
    let Some(path) = &config.kubeconfig else {
        return Ok(None);
    };
    let fail = |reason: String| AgentError::Client {
        path: path.display().to_string(),
        reason,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(one_line(&e)))?;
    let kube_config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| fail(one_line(&e)))?;
    build_client(kube_config).map(Some).map_err(fail)
}

/// A client for one kube::Config, counted in the agent's metrics (for the kubeconfig's
/// credentials, and again for each rotated client certificate).
fn build_client(kube_config: kube::Config) -> Result<kube::Client, String> {
    let host = kube_config
        .cluster_url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(kube_config).map_err(|e| one_line(&e))?;
    Ok(builder
        .with_layer(&crate::metrics::CountApiRequests::new(&host))
        .build())
}

/// Runs the agent until `shutdown` is cancelled, then waits up to [`SHUTDOWN_GRACE`] for its
/// tasks to finish.
/// `node_shutdown`: with `--shutdown-grace-period`, cancelled on SIGTERM: the agent then stops
/// its pods ([`crate::pods::node_shutdown`]) and cancels `shutdown` itself.
/// `runtime`: who answers for the provider when it is a runtime process apart from the agent
/// (`None` while it cannot be reached); its changes are Node Events and wake the node status.
pub async fn run(
    config: Config,
    provider: Arc<dyn Provider>,
    runtime: Option<watch::Receiver<Option<provider_remote::RuntimeIdentity>>>,
    shutdown: CancellationToken,
    node_shutdown: Option<CancellationToken>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.root_dir).map_err(|source| AgentError::RootDir {
        path: config.root_dir.display().to_string(),
        source,
    })?;
    let config = Arc::new(config);
    let tasks = TaskTracker::new();
    // A graceful node shutdown ends the agent once its pods have stopped.
    let agent_stop = shutdown.clone();
    // Run-once ends the agent itself when its pods are done.
    let shutdown = shutdown.child_token();
    // Ready=False while the node shuts down gracefully (node status reads it).
    let (not_ready_tx, not_ready_rx) = watch::channel(false);
    let shutting_down = not_ready_rx.clone();
    let node_shutdown = node_shutdown.filter(|_| !config.runonce);
    let mut run_once_outcome = None;

    // TLS bootstrap when asked and needed, then the one client every task shares; it follows
    // the rotated client certificate with --rotate-certificates (certificates::client).
    let client =
        crate::certificates::client::connect(&config, &tasks, &shutdown, build_client).await?;
    // Pods gone while the agent was down: their containers (a runtime process kept them
    // running), then their directories, before any worker makes new ones.
    if let Some(keep) = crate::pods::volumes::pods_to_keep(&config, client.as_ref()).await {
        remove_orphaned_sandboxes(provider.as_ref(), &keep).await;
        crate::pods::volumes::remove_orphaned_pod_dirs(&config, &keep).await;
    }
    // The kubelet API: bound before anything else runs, so a busy port or a bad certificate
    // stops the agent at once (as it stops the kubelet).
    let mut pods_view = crate::server::pods::PodsViewSender::disabled();
    // The runtime cache: the PLEG lists the provider, every other reader reads the snapshot.
    let (runtime_cache, runtime_publisher) = pleg::runtime_cache();
    if let Some(server) = crate::server::KubeletServer::bind(
        &config,
        client.clone(),
        provider.clone(),
        runtime_cache.clone(),
    )
    .await?
    {
        pods_view = server.pods_sender();
        tasks.spawn(server.run(shutdown.clone()));
    }
    match client {
        Some(client) if !config.runonce => {
            info!(node = %config.node_name, runtime = %provider.runtime_info(), "starting");
            let (node_tx, node_rx) = watch::channel(None);
            let node_rx_for_mirrors = node_rx.clone();
            // The eviction manager owns the pressure conditions; node status reports them.
            let (pressure_tx, pressure_rx) = watch::channel(crate::eviction::Pressure::default());
            // Admission reads them too (the kubelet's eviction admit handler).
            let pressure_for_admission = pressure_rx.clone();
            if config.register_node {
                let mut manager = NodeStatusManager::new(
                    client.clone(),
                    config.clone(),
                    provider.clone(),
                    node_tx,
                )
                .with_pressure(pressure_rx)
                .with_shutting_down(not_ready_rx);
                if let Some(runtime) = &runtime {
                    manager = manager.with_runtime_changes(runtime.clone());
                }
                tasks.spawn(manager.run(shutdown.clone()));
            } else {
                warn!("--register-node=false: not registering or updating the Node; the lease follows a Node someone else registered");
                tasks.spawn(follow_existing_node(
                    client.clone(),
                    config.node_name.clone(),
                    node_tx,
                    shutdown.clone(),
                ));
            }
            let lease = LeaseHeartbeat::new(
                client.clone(),
                config.node_name.clone(),
                config.node_lease_duration,
                config.lease_renew_interval(),
                node_rx,
            );
            tasks.spawn(lease.run(shutdown.clone()));

            // Pods: source -> manager -> one worker per pod -> status manager.
            let (status_manager, status) = StatusManager::new(client.clone());
            tasks.spawn(status_manager.run(shutdown.clone()));
            let events = EventSink::start(client.clone(), &config.node_name);
            if let Some(runtime) = runtime {
                tasks.spawn(crate::runtime::report(
                    runtime,
                    events.clone(),
                    config.node_name.clone(),
                    shutdown.clone(),
                ));
            }
            let ctx = worker_context(
                &config,
                &provider,
                runtime_cache.clone(),
                Some(client.clone()),
                status.clone(),
                events.clone(),
                pods_view.clone(),
                pressure_for_admission,
            );
            let (change_tx, change_rx) = mpsc::unbounded_channel();
            let (pleg_tx, pleg_rx) = mpsc::unbounded_channel();
            let (api_tx, api_rx) = mpsc::unbounded_channel();
            let (mirror_tx, mirror_rx) = mpsc::unbounded_channel();
            tasks.spawn(source::watch_pods(
                client.clone(),
                config.node_name.clone(),
                api_tx,
                shutdown.clone(),
            ));
            let mirrors = MirrorManager::new(client.clone(), node_rx_for_mirrors, status.clone());
            tasks.spawn(mirrors.run(mirror_rx, shutdown.clone()));
            let outputs = MergeOutputs {
                pods: change_tx,
                mirrors: Some(mirror_tx),
                status: Some(status),
                statics: watch::channel(None).0,
                runonce: false,
            };
            let static_rx = spawn_static_sources(&tasks, &config, &events, &shutdown);
            tasks.spawn(static_source::merge(
                Some(api_rx),
                static_rx.1,
                static_rx.0,
                outputs,
                shutdown.clone(),
            ));
            tasks.spawn(pleg::run(
                provider.clone(),
                runtime_publisher,
                pleg_tx,
                shutdown.clone(),
            ));
            // Eviction and garbage collection see the manager's pods; evictions go back through it.
            let (pods_tx, pods_rx) = watch::channel(crate::pods::manager::PodSet::new());
            let (evict_tx, evict_rx) = mpsc::unbounded_channel();
            let (gc, gc_handle) = crate::gc::GarbageCollector::new(
                config.clone(),
                provider.clone(),
                runtime_cache.clone(),
                events.clone(),
                Some(pods_rx.clone()),
            );
            tasks.spawn(gc.run(shutdown.clone()));
            if let Some(trigger) = node_shutdown {
                let graceful = crate::pods::node_shutdown::NodeShutdown {
                    grace: config.shutdown_grace_period,
                    critical_grace: config.shutdown_grace_period_critical_pods,
                    node_name: config.node_name.clone(),
                    pods: pods_rx.clone(),
                    evict: evict_tx.clone(),
                    runtime: runtime_cache.clone(),
                    not_ready: not_ready_tx,
                    events: events.clone(),
                    client: Some(client.clone()),
                };
                tasks.spawn(graceful_node_shutdown(
                    graceful,
                    trigger,
                    agent_stop,
                    shutdown.clone(),
                ));
            }
            let links = crate::eviction::EvictionLinks {
                pods: pods_rx,
                evict: evict_tx,
                pressure: pressure_tx,
                gc: Some(gc_handle),
            };
            let eviction = crate::eviction::EvictionManager::new(
                config.clone(),
                provider.clone(),
                runtime_cache.clone(),
                events.clone(),
                links,
            );
            tasks.spawn(eviction.run(shutdown.clone()));
            let links = manager::ManagerLinks {
                pods: pods_tx,
                evictions: evict_rx,
                shutting_down: shutting_down.clone(),
            };
            tasks.spawn(manager::run_linked(
                ctx,
                change_rx,
                pleg_rx,
                Some(links),
                shutdown.clone(),
            ));
        }
        _ => {
            if config.runonce {
                info!(node = %config.node_name, "--runonce: running the static pods once, without the API server");
            } else {
                info!(node = %config.node_name, "no --kubeconfig: running standalone, without an API server (static pods only)");
            }
            // Pod status stays on the node.
            let (status, status_rx) = StatusSender::channel();
            let (latest_tx, latest_rx) = watch::channel(HashMap::new());
            tasks.spawn(static_source::local_status(status_rx, latest_tx));
            let events = EventSink::disabled();
            let ctx = worker_context(
                &config,
                &provider,
                runtime_cache.clone(),
                None,
                status,
                events.clone(),
                pods_view.clone(),
                // No eviction manager without an API server: never any pressure to refuse for.
                watch::channel(crate::eviction::Pressure::default()).1,
            );
            let (change_tx, change_rx) = mpsc::unbounded_channel();
            let (pleg_tx, pleg_rx) = mpsc::unbounded_channel();
            let (statics_tx, statics_rx) = watch::channel(None);
            let outputs = MergeOutputs {
                pods: change_tx,
                mirrors: None,
                status: None,
                statics: statics_tx,
                runonce: config.runonce,
            };
            let static_rx = spawn_static_sources(&tasks, &config, &events, &shutdown);
            tasks.spawn(static_source::merge(
                None,
                static_rx.1,
                static_rx.0,
                outputs,
                shutdown.clone(),
            ));
            tasks.spawn(pleg::run(
                provider.clone(),
                runtime_publisher,
                pleg_tx,
                shutdown.clone(),
            ));
            // The node shutdown (if any) stops pods through the manager as evictions do.
            let (pods_tx, pods_rx) = watch::channel(crate::pods::manager::PodSet::new());
            let (evict_tx, evict_rx) = mpsc::unbounded_channel();
            if let Some(trigger) = node_shutdown {
                let graceful = crate::pods::node_shutdown::NodeShutdown {
                    grace: config.shutdown_grace_period,
                    critical_grace: config.shutdown_grace_period_critical_pods,
                    node_name: config.node_name.clone(),
                    pods: pods_rx,
                    evict: evict_tx,
                    runtime: runtime_cache.clone(),
                    not_ready: not_ready_tx,
                    events: events.clone(),
                    client: None,
                };
                tasks.spawn(graceful_node_shutdown(
                    graceful,
                    trigger,
                    agent_stop,
                    shutdown.clone(),
                ));
            }
            let links = manager::ManagerLinks {
                pods: pods_tx,
                evictions: evict_rx,
                shutting_down: shutting_down.clone(),
            };
            tasks.spawn(manager::run_linked(
                ctx,
                change_rx,
                pleg_rx,
                Some(links),
                shutdown.clone(),
            ));
            // Images and dead containers are collected without an API server too (static pods
            // are critical: there is nothing to evict, and no Node to report pressure on).
            if !config.runonce {
                let (gc, _) = crate::gc::GarbageCollector::new(
                    config.clone(),
                    provider.clone(),
                    runtime_cache.clone(),
                    events.clone(),
                    None,
                );
                tasks.spawn(gc.run(shutdown.clone()));
            }
            if config.runonce {
                run_once_outcome = Some(tokio::spawn(run_once(
                    statics_rx,
                    latest_rx,
                    shutdown.clone(),
                )));
            }
        }
    }
    tasks.close();

    shutdown.cancelled().await;
    info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "tasks did not stop within the grace period; exiting anyway");
    }
    match run_once_outcome {
        Some(outcome) => outcome.await.unwrap_or(Err(AgentError::RunOnceInterrupted)),
        None => Ok(()),
    }
}

/// Waits for `trigger` (SIGTERM with --shutdown-grace-period), stops the node's pods, then
/// stops the agent (`agent_stop`). Ends quietly when the agent stops first.
async fn graceful_node_shutdown(
    graceful: crate::pods::node_shutdown::NodeShutdown,
    trigger: CancellationToken,
    agent_stop: CancellationToken,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = trigger.cancelled() => {}
    }
    tokio::select! {
        // A second signal (main.rs) stops the agent at once.
        _ = shutdown.cancelled() => warn!("node shutdown interrupted; pods left as they are"),
        _ = graceful.run() => {}
    }
    agent_stop.cancel();
}

/// Starts the static pod sources that are configured. Returns how many there are and where
/// they send their sets.
fn spawn_static_sources(
    tasks: &TaskTracker,
    config: &Config,
    events: &EventSink,
    shutdown: &CancellationToken,
) -> (usize, mpsc::UnboundedReceiver<StaticSet>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut count = 0;
    if let Some(path) = &config.pod_manifest_path {
        count += 1;
        info!(path = %path.display(), every = ?config.file_check_frequency, "static pods from the manifest path");
        tasks.spawn(static_source::watch_dir(
            path.clone(),
            config.node_name.clone(),
            config.file_check_frequency,
            events.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(url) = &config.manifest_url {
        count += 1;
        info!(%url, every = ?config.http_check_frequency, "static pods from the manifest URL");
        tasks.spawn(static_source::watch_url(
            url.clone(),
            config.manifest_url_header.clone(),
            config.node_name.clone(),
            config.http_check_frequency,
            events.clone(),
            tx,
            shutdown.clone(),
        ));
    }
    (count, rx)
}

/// `--runonce`: waits for the static sources' first sets, then for every static pod to finish;
/// prints `<pod> <phase> exit=<code>` per pod on stdout and ends the agent.
async fn run_once(
    mut statics: watch::Receiver<Option<Vec<Arc<Pod>>>>,
    mut statuses: watch::Receiver<HashMap<String, (PodKey, PodStatus)>>,
    stop: CancellationToken,
) -> Result<(), AgentError> {
    let outcome = async {
        let pods = loop {
            if let Some(pods) = statics.borrow_and_update().clone() {
                break pods;
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(AgentError::RunOnceInterrupted),
                changed = statics.changed() => if changed.is_err() { return Err(AgentError::RunOnceInterrupted) },
            }
        };
        if pods.is_empty() {
            println!("no static pods to run");
            return Ok(());
        }
        info!(pods = pods.len(), "run-once: waiting for the static pods to finish");
        loop {
            let finished: Option<Vec<(String, PodStatus)>> = {
                let latest = statuses.borrow_and_update();
                pods.iter()
                    .map(|pod| {
                        let (key, status) = latest.get(pod.metadata.uid.as_deref()?)?;
                        matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")).then(|| (key.name.clone(), status.clone()))
                    })
                    .collect()
            };
            if let Some(finished) = finished {
                let failed = finished.iter().filter(|(_, s)| s.phase.as_deref() != Some("Succeeded")).count();
                for (name, status) in &finished {
                    println!("{}", static_source::summary_line(name, status));
                }
                return if failed == 0 { Ok(()) } else { Err(AgentError::RunOnceFailed { failed, total: finished.len() }) };
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(AgentError::RunOnceInterrupted),
                changed = statuses.changed() => if changed.is_err() { return Err(AgentError::RunOnceInterrupted) },
            }
        }
    }
    .await;
    stop.cancel();
    outcome
}

/// What every pod worker shares; `client` is None without an API server.
// Each argument is one of the agent's long-lived parts, wired here once.
#[allow(clippy::too_many_arguments)]
fn worker_context(
    config: &Config,
    provider: &Arc<dyn Provider>,
    runtime: crate::pods::pleg::RuntimeCache,
    client: Option<kube::Client>,
    status: StatusSender,
    events: EventSink,
    pods_view: crate::server::pods::PodsViewSender,
    pressure: watch::Receiver<crate::eviction::Pressure>,
) -> Arc<WorkerContext> {
    let allocatable = allocatable(config);
    Arc::new(WorkerContext {
        provider: provider.clone(),
        runtime,
        pods_view,
        runtime_classes: client.clone().map_or_else(
            crate::runtime::classes::RuntimeClasses::none,
            crate::runtime::classes::RuntimeClasses::watch,
        ),
        client,
        status,
        events,
        node_name: config.node_name.clone(),
        node_ip: node_ip(config),
        pods_dir: crate::pods::layout::pods_dir(&config.root_dir),
        pod_logs_dir: config.pod_logs_dir.clone(),
        node_allocatable: (allocatable.milli_cpu, allocatable.memory_bytes),
        admission: crate::pods::admission::Ledger::spawn(allocatable, config.max_pods),
        sync_frequency: config.sync_frequency,
        host_ports: Default::default(),
        pressure,
    })
}

/// The IP pods get: the node's (DESIGN: the pod IP is the node IP).
fn node_ip(config: &Config) -> String {
    config.node_ip.map(|ip| ip.to_string()).unwrap_or_else(|| {
        crate::node_status::resolve_node_ip(&config.node_name)
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    })
}

/// Node allocatable, for admission and for resourceFieldRef without limits. A machine that
/// cannot be measured counts as one core and no memory (the Node status names the error).
fn allocatable(config: &Config) -> crate::machine::Allocatable {
    let capacity = crate::machine::capacity(&config.root_dir).unwrap_or(crate::machine::Capacity {
        cpus: 1,
        memory_bytes: 0,
        ephemeral_storage_bytes: 0,
    });
    crate::machine::Allocatable::compute(
        &capacity,
        &config.system_reserved,
        &config.kube_reserved,
        &config.eviction_hard,
    )
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
                let node_ref = node.and_then(|n| {
                    Some(crate::node_status::NodeRef {
                        name: name.clone(),
                        uid: n.metadata.uid?,
                    })
                });
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

/// Stops and forgets the runtime's sandboxes of pods this node no longer has (deleted while no
/// agent ran), as the kubelet's pod cleanup kills orphaned pods. Their grace period is gone with
/// their API objects: 2 s.
async fn remove_orphaned_sandboxes(
    provider: &dyn Provider,
    keep: &std::collections::HashSet<String>,
) {
    let Ok(sandboxes) = provider.list_pod_sandboxes().await else {
        return;
    };
    for sandbox in sandboxes.into_iter().filter(|s| !keep.contains(&s.pod_uid)) {
        info!(pod = %format!("{}/{}", sandbox.namespace, sandbox.name), uid = %sandbox.pod_uid, "stopping the containers of a pod gone while the agent was down");
        if let Err(e) = provider
            .remove_pod_sandbox(&sandbox.pod_uid, Duration::from_secs(2))
            .await
        {
            warn!(uid = %sandbox.pod_uid, error = %e, "removing an orphaned pod's sandbox");
        }
    }
}
