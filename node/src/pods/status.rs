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
    /// A sender whose updates go nowhere but the returned receiver (tests, standalone).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<StatusUpdate>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
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
}

impl StatusManager {
    pub fn new(client: kube::Client) -> (Self, StatusSender) {
        let (sender, rx) = StatusSender::channel();
        (Self { api_client: client, rx, written: HashMap::new(), pending: HashMap::new(), finalize: HashSet::new() }, sender)
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(10));
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let sleep_until = retry_at.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Write what is pending before exiting, within the agent's shutdown grace.
                    self.flush().await;
                    return;
                }
                update = self.rx.recv() => match update {
                    Some(update) => self.absorb(update),
                    None => return,
                },
                _ = tokio::time::sleep_until(sleep_until), if retry_at.is_some() => {}
            }
            // Coalesce: take everything already queued before writing.
            while let Ok(update) = self.rx.try_recv() {
                self.absorb(update);
            }
            if self.flush().await {
                backoff.reset();
                retry_at = None;
            } else {
                retry_at = Some(tokio::time::Instant::now() + backoff.next());
            }
        }
    }

    fn absorb(&mut self, update: StatusUpdate) {
        match update {
            StatusUpdate::Set(key, status) => {
                if self.written.get(&key) == Some(&status) {
                    self.pending.remove(&key);
                } else {
                    self.pending.insert(key, *status);
                }
            }
            StatusUpdate::Finalize(key) => {
                self.finalize.insert(key);
            }
            StatusUpdate::Forget(key) => {
                self.pending.remove(&key);
                self.written.remove(&key);
                self.finalize.remove(&key);
            }
        }
    }

    /// Writes everything pending. Returns false when something must be retried.
    async fn flush(&mut self) -> bool {
        let mut ok = true;
        let keys: Vec<PodKey> = self.pending.keys().cloned().collect();
        for key in keys {
            let status = self.pending.remove(&key).expect("key from pending");
            let api: Api<Pod> = Api::namespaced(self.api_client.clone(), &key.namespace);
            let patch = serde_json::json!({ "metadata": { "uid": key.uid }, "status": status });
            match api.patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    debug!(pod = %format!("{}/{}", key.namespace, key.name), phase = ?status.phase, "pod status written");
                    self.written.insert(key, status);
                }
                Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => {
                    // The pod is gone, or it is another pod of the same name: nothing to write.
                    debug!(pod = %key.name, code = ae.code, "pod status not written: pod gone");
                    self.written.remove(&key);
                }
                Err(kube::Error::Api(ae)) if ae.code == 422 => {
                    // Retrying an invalid status cannot succeed; say so loudly and move on.
                    warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %ae.message, "the API server refused the pod status");
                }
                Err(e) => {
                    warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %crate::config::one_line(&e), "writing pod status");
                    self.pending.entry(key).or_insert(status);
                    ok = false;
                }
            }
        }
        let ready: Vec<PodKey> = self.finalize.iter().filter(|k| !self.pending.contains_key(*k)).cloned().collect();
        for key in ready {
            let api: Api<Pod> = Api::namespaced(self.api_client.clone(), &key.namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: Some(key.uid.clone()), resource_version: None }),
                ..Default::default()
            };
            match api.delete(&key.name, &params).await {
                Ok(_) => debug!(pod = %key.name, "pod object deleted"),
                Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => {}
                Err(e) => {
                    warn!(pod = %key.name, error = %crate::config::one_line(&e), "deleting pod object");
                    ok = false;
                    continue;
                }
            }
            self.finalize.remove(&key);
            self.written.remove(&key);
        }
        ok
    }
}
