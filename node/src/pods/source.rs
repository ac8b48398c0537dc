//! The API-server pod source: watches the pods bound to this node
//! (`fieldSelector=spec.nodeName=<node>`, all a Node identity may read) and tells the pod
//! manager about each change. kube's watcher relists after 410 Gone and reconnects after
//! errors; a relist also reports pods deleted while the watch was down.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A change the pod manager acts on.
#[derive(Debug)]
pub enum PodChange {
    /// Added or modified.
    Upsert(Arc<Pod>),
    /// Gone from the API server (by UID).
    Removed(String),
}

pub async fn watch_pods(
    client: kube::Client,
    node_name: String,
    tx: mpsc::UnboundedSender<PodChange>,
    shutdown: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut known: HashSet<String> = HashSet::new();
    let mut relisted: HashSet<String> = HashSet::new();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        match event {
            Ok(Event::Apply(mut pod)) | Ok(Event::InitApply(mut pod)) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                // Nothing on the node reads managedFields, and they are ~40 % of a pod object
                // in memory (every field path as nested JSON maps: ~9 KiB of ~22 for a simple
                // pod whose status this node wrote, heaptrack; docs/benchmarks.md). Dropped
                // here, before the pod is shared (`/pods` does not show them either).
                pod.metadata.managed_fields = None;
                known.insert(uid.clone());
                relisted.insert(uid);
                let _ = tx.send(PodChange::Upsert(Arc::new(pod)));
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid {
                    known.remove(&uid);
                    let _ = tx.send(PodChange::Removed(uid));
                }
            }
            Ok(Event::Init) => relisted.clear(),
            Ok(Event::InitDone) => {
                // Pods that vanished while the watch was down.
                for uid in known.difference(&relisted).cloned().collect::<Vec<_>>() {
                    known.remove(&uid);
                    let _ = tx.send(PodChange::Removed(uid));
                }
            }
            Err(e) => warn!(error = %crate::config::one_line(&e), "pod watch (retrying)"),
        }
    }
}
