//! The pod status manager: the only writer of pod status to the API server.
//!
//! Workers send the status they computed; the manager keeps the latest per pod (so a burst of
//! changes becomes one write), skips writes that would change nothing, merge-patches
//! `pods/<name>/status`, and retries failures with backoff. When a worker has stopped a deleted
//! pod's containers it asks for [`StatusUpdate::Finalize`]: the manager writes the last status,
//! then deletes the pod object (grace 0, UID precondition), as the kubelet does.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::Api;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;

/// Which pod a status is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What workers send.
#[derive(Debug)]
pub enum StatusUpdate {
    /// The pod's status as it should be now.
    Set(PodKey, Box<PodStatus>),
    /// The pod's containers have stopped and it was deleted: remove the API object.
    Finalize(PodKey),
    /// Forget the pod without touching the API (it is already gone).
    Forget(PodKey),
    /// The pod is a static pod: its status goes to its mirror pod (same namespace and name,
    /// this UID), or waits while it has none (`None`).
    Mirror(PodKey, Option<String>),
}

/// Handle for workers.
#[derive(Clone)]
pub struct StatusSender(mpsc::UnboundedSender<StatusUpdate>);

impl StatusSender {
    pub fn set(&self, key: PodKey, status: PodStatus) {
        let _ = self.0.send(StatusUpdate::Set(key, Box::new(status)));
    }
    pub fn finalize(&self, key: PodKey) {
        let _ = self.0.send(StatusUpdate::Finalize(key));
    }
    pub fn forget(&self, key: PodKey) {
        let _ = self.0.send(StatusUpdate::Forget(key));
    }
    /// `key` is a static pod whose status the mirror pod `mirror_uid` carries (none yet: `None`).
    pub fn mirror(&self, key: PodKey, mirror_uid: Option<String>) {
        let _ = self.0.send(StatusUpdate::Mirror(key, mirror_uid));
    }
    /// A sender whose updates go nowhere but the returned receiver (tests, standalone).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<StatusUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
}

/// How many writes may be in flight at once. One per pod at most, so a pod's updates land in
/// order; a bound so a burst of pod starts cannot flood the API server (whose default limit
/// for mutating requests is 200 in flight across all clients).
const MAX_IN_FLIGHT: usize = 16;

/// What one API call did.
enum Outcome {
    Written(PodStatus),
    Gone,
    Deleted,
    /// Retry later (the API server was unreachable or overloaded); carries the status that
    /// was not written, if the call was a status write.
    Retry(Option<PodStatus>),
}

/// Owns what has been written for each pod.
pub struct StatusManager {
    api_client: kube::Client,
    rx: mpsc::UnboundedReceiver<StatusUpdate>,
    /// What the API server holds, as far as we know (after our last successful write).
    written: HashMap<PodKey, PodStatus>,
    /// Latest wanted status not yet written.
    pending: HashMap<PodKey, PodStatus>,
    /// Pods to delete once their last status is written.
    finalize: HashSet<PodKey>,
    /// Pods with a write in flight.
    in_flight: HashSet<PodKey>,
    /// Static pods (by their UID): the UID of the mirror pod their status is written to.
    mirrors: HashMap<String, Option<String>>,
    /// A static pod's latest status, written again to a new mirror pod.
    static_latest: HashMap<String, PodStatus>,
}

impl StatusManager {
    pub fn new(client: kube::Client) -> (Self, StatusSender) {
        let (sender, rx) = StatusSender::channel();
        let manager = Self {
            api_client: client,
            rx,
            written: HashMap::new(),
            pending: HashMap::new(),
            finalize: HashSet::new(),
            in_flight: HashSet::new(),
            mirrors: HashMap::new(),
            static_latest: HashMap::new(),
        };
        (manager, sender)
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut writes: JoinSet<(PodKey, Outcome)> = JoinSet::new();
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut draining = false;
        loop {
            if retry_at.is_none_or(|at| at <= tokio::time::Instant::now()) {
                retry_at = None;
                self.start_writes(&mut writes);
            }
            if draining && writes.is_empty() {
                return;
            }
            let sleep_until =
                retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled(), if !draining => {
                    // Write what is pending before exiting, within the agent's shutdown grace.
                    draining = true;
                    retry_at = None;
                }
                update = self.rx.recv(), if !draining => match update {
                    Some(update) => self.absorb(update),
                    None => draining = true,
                },
                Some(done) = writes.join_next(), if !writes.is_empty() => {
                    let Ok((key, outcome)) = done else { continue };
                    self.in_flight.remove(&key);
                    match outcome {
                        Outcome::Written(status) => {
                            backoff.reset();
                            self.written.insert(key, status);
                        }
                        Outcome::Gone => {
                            self.written.remove(&key);
                        }
                        Outcome::Deleted => {
                            self.finalize.remove(&key);
                            self.written.remove(&key);
                        }
                        Outcome::Retry(status) => {
                            if let Some(status) = status {
                                // Unless a newer status arrived meanwhile, write this one again.
                                self.pending.entry(key).or_insert(status);
                            }
                            retry_at = Some(tokio::time::Instant::now() + backoff.next());
                            if draining {
                                return; // no retries while shutting down
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(sleep_until), if retry_at.is_some() => {}
            }
            // Coalesce: take everything already queued before writing.
            while let Ok(update) = self.rx.try_recv() {
                self.absorb(update);
            }
        }
    }

    fn absorb(&mut self, update: StatusUpdate) {
        match update {
            StatusUpdate::Set(key, status) => {
                if self.mirrors.contains_key(&key.uid) {
                    self.static_latest
                        .insert(key.uid.clone(), (*status).clone());
                }
                if self.written.get(&key) == Some(&status) {
                    self.pending.remove(&key);
                } else {
                    self.pending.insert(key, *status);
                }
            }
            StatusUpdate::Finalize(key) => {
                self.finalize.insert(key);
            }
            StatusUpdate::Mirror(key, mirror_uid) => {
                // A new mirror pod has no status yet: write the latest one to it.
                if mirror_uid.is_some() && self.mirrors.get(&key.uid) != Some(&mirror_uid) {
                    self.written.remove(&key);
                    if let Some(status) = self.static_latest.get(&key.uid) {
                        self.pending
                            .entry(key.clone())
                            .or_insert_with(|| status.clone());
                    }
                }
                self.mirrors.insert(key.uid, mirror_uid);
            }
            StatusUpdate::Forget(key) => {
                self.mirrors.remove(&key.uid);
                self.static_latest.remove(&key.uid);
                self.pending.remove(&key);
                self.written.remove(&key);
                self.finalize.remove(&key);
            }
        }
    }

    /// Starts writes for pods without one in flight, up to [`MAX_IN_FLIGHT`]: pending statuses
    /// first, then deletions of finalized pods whose last status is written.
    fn start_writes(&mut self, writes: &mut JoinSet<(PodKey, Outcome)>) {
        let ready: Vec<PodKey> = self
            .pending
            .keys()
            .filter(|k| !self.in_flight.contains(*k))
            // A static pod without a mirror pod yet: its status waits for one.
            .filter(|k| !matches!(self.mirrors.get(&k.uid), Some(None)))
            .cloned()
            .collect();
        for key in ready {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                return;
            }
            let status = self.pending.remove(&key).expect("key from pending");
            self.in_flight.insert(key.clone());
            let target = match self.mirrors.get(&key.uid) {
                Some(Some(mirror_uid)) => mirror_uid.clone(),
                _ => key.uid.clone(),
            };
            writes.spawn(write_status(self.api_client.clone(), key, target, status));
        }
        let deletable: Vec<PodKey> = self
            .finalize
            .iter()
            .filter(|k| !self.pending.contains_key(*k) && !self.in_flight.contains(*k))
            .cloned()
            .collect();
        for key in deletable {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                return;
            }
            self.in_flight.insert(key.clone());
            writes.spawn(delete_pod(self.api_client.clone(), key));
        }
    }
}

/// Writes `status` to the pod `key` names, whose UID is `target` (a static pod's mirror has
/// its own UID).
async fn write_status(
    client: kube::Client,
    key: PodKey,
    target: String,
    status: PodStatus,
) -> (PodKey, Outcome) {
    let api: Api<Pod> = Api::namespaced(client, &key.namespace);
    // The UID makes the write a precondition: never update a new pod of the same name.
    let patch = serde_json::json!({ "metadata": { "uid": target }, "status": status });
    let outcome = match api
        .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            debug!(pod = %format!("{}/{}", key.namespace, key.name), phase = ?status.phase, "pod status written");
            Outcome::Written(status)
        }
        Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => {
            debug!(pod = %key.name, code = ae.code, "pod status not written: pod gone");
            Outcome::Gone
        }
        Err(kube::Error::Api(ae)) if ae.code == 422 => {
            // Retrying an invalid status cannot succeed; say so loudly and move on.
            warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %ae.message, "the API server refused the pod status");
            Outcome::Gone
        }
        Err(e) => {
            warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %crate::config::one_line(&e), "writing pod status");
            return (key, Outcome::Retry(Some(status)));
        }
    };
    (key, outcome)
}

async fn delete_pod(client: kube::Client, key: PodKey) -> (PodKey, Outcome) {
    let api: Api<Pod> = Api::namespaced(client, &key.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(key.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let outcome = match api.delete(&key.name, &params).await {
        Ok(_) => {
            debug!(pod = %key.name, "pod object deleted");
            Outcome::Deleted
        }
        Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => Outcome::Deleted,
        Err(e) => {
            warn!(pod = %key.name, error = %crate::config::one_line(&e), "deleting pod object");
            Outcome::Retry(None)
        }
    };
    (key, outcome)
}
