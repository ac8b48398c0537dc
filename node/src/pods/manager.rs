//! The pod manager: one worker per pod UID, never two syncs of one pod at once.
//!
//! It hears pod changes from the source and container changes from the PLEG, and forwards
//! each to the pod's worker (a watch channel for the desired pod, a Notify for nudges). It
//! starts a worker for a new UID and forgets it when the worker reports that the pod is gone.
//! With [`ManagerLinks`] it also publishes the pods it holds (for the eviction manager and the
//! garbage collector) and hands evictions to the pods' workers.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info_span, Instrument};

use super::source::PodChange;
use super::worker::{PodDesire, PodWorker, WorkerContext};
use crate::eviction::Eviction;

/// The pods the node runs now, by UID: the pod manager owns this set and publishes it (on
/// [`ManagerLinks::pods`]) for the eviction manager and the garbage collector to read.
pub type PodSet = std::collections::BTreeMap<String, Arc<k8s_openapi::api::core::v1::Pod>>;

/// The pod manager's links to the eviction manager.
pub struct ManagerLinks {
    /// The pods that have a worker, by UID; replaced on every change.
    pub pods: watch::Sender<PodSet>,
    /// (pod UID, eviction) for the pod's worker to carry out.
    pub evictions: mpsc::UnboundedReceiver<(String, Eviction)>,
    /// True once a graceful node shutdown began: new pods are refused from then on.
    pub shutting_down: watch::Receiver<bool>,
}

struct WorkerHandle {
    desired: watch::Sender<PodDesire>,
    nudge: Arc<Notify>,
}

pub async fn run(
    ctx: Arc<WorkerContext>,
    changes: mpsc::UnboundedReceiver<PodChange>,
    pleg: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
) {
    run_linked(ctx, changes, pleg, None, shutdown).await
}

/// [`run`], publishing its pods and carrying out evictions through `links`.
pub async fn run_linked(
    ctx: Arc<WorkerContext>,
    mut changes: mpsc::UnboundedReceiver<PodChange>,
    mut pleg: mpsc::UnboundedReceiver<String>,
    links: Option<ManagerLinks>,
    shutdown: CancellationToken,
) {
    let (pods_tx, mut evictions, shutting_down) = match links {
        Some(l) => (Some(l.pods), Some(l.evictions), Some(l.shutting_down)),
        None => (None, None, None),
    };
    let publish = |workers: &HashMap<String, WorkerHandle>| {
        if let Some(tx) = &pods_tx {
            tx.send_replace(
                workers
                    .iter()
                    .map(|(uid, h)| (uid.clone(), h.desired.borrow().pod.clone()))
                    .collect(),
            );
        }
    };
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let tracker = TaskTracker::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    // Static pods waiting for an older version's worker to finish, by that worker's UID: one
    // pod per full name, as the kubelet's allowStaticPodStart. Dropping the senders opens the gates.
    let mut static_gates: HashMap<String, Vec<oneshot::Sender<()>>> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = changes.recv() => match change {
                None => break,
                Some(PodChange::Upsert(pod)) => {
                    // A mirror pod is the API's copy of a static pod that already has a worker.
                    if super::static_source::is_mirror(&pod) {
                        continue;
                    }
                    let Some(uid) = pod.metadata.uid.clone() else { continue };
                    match workers.get(&uid) {
                        Some(handle) => {
                            // An eviction already asked for stays asked for.
                            handle.desired.send_modify(|d| {
                                d.pod = pod;
                                d.removed = false;
                            });
                        }
                        None => {
                            let span = info_span!("pod", namespace = pod.metadata.namespace.as_deref().unwrap_or(""), name = pod.metadata.name.as_deref().unwrap_or(""), uid = %uid);
                            let pod_ref = pod.clone();
                            // As the kubelet's shutdown manager admits no pod once the node shuts down.
                            let evict = shutting_down.as_ref().filter(|s| *s.borrow()).map(|_| super::node_shutdown::refusal());
                            let (desired, rx) = watch::channel(PodDesire { pod, removed: false, evict });
                            let nudge = Arc::new(Notify::new());
                            let worker = PodWorker::new(ctx.clone(), rx, nudge.clone());
                            let done = done_tx.clone();
                            let older = workers.iter().find(|(_, h)| super::static_source::same_static_pod(&h.desired.borrow().pod, &pod_ref));
                            let gate = older.map(|(old_uid, _)| {
                                let (open, gate) = oneshot::channel::<()>();
                                static_gates.entry(old_uid.clone()).or_default().push(open);
                                gate
                            });
                            tracker.spawn(async move {
                                if let Some(gate) = gate {
                                    let _ = gate.await;
                                }
                                let uid = worker.run().await;
                                let _ = done.send(uid);
                            }.instrument(span));
                            workers.insert(uid, WorkerHandle { desired, nudge });
                        }
                    }
                    publish(&workers);
                }
                Some(PodChange::Removed(uid)) => {
                    if let Some(handle) = workers.get(&uid) {
                        handle.desired.send_modify(|d| d.removed = true);
                    }
                }
            },
            uid = pleg.recv() => {
                if let Some(handle) = uid.and_then(|uid| workers.get(&uid)) {
                    handle.nudge.notify_one();
                }
            }
            Some(uid) = done_rx.recv() => {
                workers.remove(&uid);
                static_gates.remove(&uid);
                publish(&workers);
            }
            Some((uid, eviction)) = async { evictions.as_mut()?.recv().await } => {
                if let Some(handle) = workers.get(&uid) {
                    handle.desired.send_modify(|d| d.evict = Some(eviction));
                }
            }
        }
    }
    // Shutting down: dropping the senders tells every worker to stop; instances end with the
    // agent's process (a restart picks the pods up again from the API server).
    workers.clear();
    tracker.close();
    tracker.wait().await;
}
