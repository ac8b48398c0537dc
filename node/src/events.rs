//! Kubernetes Events from the node, with the kubelet's reasons (Pulling, Pulled, Created,
//! Started, Killing, BackOff, Failed, ...). Workers hand events to [`EventSink`] and never wait
//! for the API server: one task publishes them in order, and drops what it cannot deliver
//! after logging it (an Event is best-effort, as in the kubelet).
//!
//! Events are core/v1, as the kubelet writes them: the Node authorizer's `system:node` role may
//! create and patch those, not `events.k8s.io` ones. A repeat of the same reason and message for
//! the same object within [`AGGREGATE_FOR`] bumps the first event's count instead of adding one,
//! like the kubelet's event correlator.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::mpsc;
use tracing::debug;

/// How many events may wait for the API server before new ones are dropped; a burst of pod
/// starts produces a handful per pod.
const EVENT_QUEUE: usize = 1024;
/// Repeats within this window are counted on one Event (the kubelet's correlator uses 10 min).
const AGGREGATE_FOR: Duration = Duration::from_secs(600);

struct Pending {
    object: ObjectReference,
    warning: bool,
    reason: String,
    message: String,
}

/// A cheap handle for emitting events; clone it into every worker.
#[derive(Clone)]
pub struct EventSink {
    tx: Option<mpsc::Sender<Pending>>,
}

impl EventSink {
    /// Starts the publishing task. The source is `kubelet` on this node, as the kubelet's own.
    pub fn start(client: kube::Client, node_name: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>(EVENT_QUEUE);
        tokio::spawn(publish(client, node_name.to_string(), rx));
        Self { tx: Some(tx) }
    }

    /// A sink that drops everything (standalone mode, unit tests).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    pub fn normal(&self, object: &ObjectReference, reason: &str, message: String) {
        self.emit(object, false, reason, message);
    }

    pub fn warning(&self, object: &ObjectReference, reason: &str, message: String) {
        self.emit(object, true, reason, message);
    }

    fn emit(&self, object: &ObjectReference, warning: bool, reason: &str, message: String) {
        let Some(tx) = &self.tx else { return };
        let pending = Pending {
            object: object.clone(),
            warning,
            reason: reason.into(),
            message,
        };
        if tx.try_send(pending).is_err() {
            debug!(reason, "event queue full; event dropped");
        }
    }
}

/// Key of the aggregation cache: the object, the field, the reason and the message.
type Key = (String, Option<String>, String, String);

async fn publish(client: kube::Client, node_name: String, mut rx: mpsc::Receiver<Pending>) {
    // (namespace, event name, count, first seen)
    let mut seen: HashMap<Key, (String, String, i32, Instant)> = HashMap::new();
    while let Some(p) = rx.recv().await {
        seen.retain(|_, v| v.3.elapsed() < AGGREGATE_FOR);
        let namespace = p
            .object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        let key: Key = (
            p.object.uid.clone().unwrap_or_default(),
            p.object.field_path.clone(),
            p.reason.clone(),
            p.message.clone(),
        );
        let now = Utc::now();
        let result = match seen.get_mut(&key) {
            Some((ns, name, count, _)) => {
                *count += 1;
                let patch = serde_json::json!({ "count": *count, "lastTimestamp": Time(now) });
                let api: Api<Event> = Api::namespaced(client.clone(), ns);
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
            None => {
                let name = format!(
                    "{}.{:x}",
                    p.object.name.as_deref().unwrap_or("node"),
                    now.timestamp_nanos_opt().unwrap_or_default()
                );
                let event = Event {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    involved_object: p.object.clone(),
                    reason: Some(p.reason.clone()),
                    message: Some(p.message.clone()),
                    type_: Some(if p.warning { "Warning" } else { "Normal" }.into()),
                    source: Some(EventSource {
                        component: Some("kubelet".into()),
                        host: Some(node_name.clone()),
                    }),
                    first_timestamp: Some(Time(now)),
                    last_timestamp: Some(Time(now)),
                    event_time: None::<MicroTime>,
                    count: Some(1),
                    reporting_component: Some("kubelet".into()),
                    reporting_instance: Some(node_name.clone()),
                    ..Default::default()
                };
                let created = api.create(&PostParams::default(), &event).await.map(|_| ());
                if created.is_ok() {
                    seen.insert(key, (namespace, name, 1, Instant::now()));
                }
                created
            }
        };
        if let Err(e) = result {
            debug!(reason = %p.reason, error = %crate::config::one_line(&e), "event not recorded");
        }
    }
}
