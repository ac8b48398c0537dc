//! Graceful node shutdown (`--shutdown-grace-period`, `--shutdown-grace-period-critical-pods`),
//! as the kubelet's node shutdown manager: on SIGTERM the node is marked not ready, regular pods
//! are stopped within (grace - critical grace), then critical pods within the critical grace,
//! each pod getting its own terminationGracePeriodSeconds capped by its phase's budget. Each pod
//! ends Failed with reason `Terminated` and a DisruptionTarget condition. The stops go through
//! the pods' workers exactly as node-pressure evictions do ([`Eviction`]); only then does the
//! agent exit.
//!
//! Without a shutdown grace (the default) none of this runs: SIGTERM stops the agent and the
//! pods outlive it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use provider_api::ContainerState;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::manager::PodSet;
use super::pleg::RuntimeCache;
use crate::config::one_line;
use crate::events::EventSink;
use crate::eviction::Eviction;

/// The kubelet's pod status reason and message for a pod stopped by a node shutdown.
pub const REASON: &str = "Terminated";
pub const MESSAGE: &str = "Pod was terminated in response to imminent node shutdown.";
/// The kubelet's reason and message for a pod refused while the node shuts down.
pub const REFUSED_REASON: &str = "NodeShutdown";
pub const REFUSED_MESSAGE: &str = "Pod was rejected as the node is shutting down.";
/// The kubelet's Ready condition message while the node shuts down (reason KubeletNotReady).
pub const NOT_READY_MESSAGE: &str = "node is shutting down";

/// The kubelet's scheduling.SystemCriticalPriority: pods at or above it are critical.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;
/// A pod without terminationGracePeriodSeconds gets the API's default, 30 s.
const DEFAULT_POD_GRACE: i64 = 30;
/// How often the stops are checked on (the runtime cache, then the API's pod status).
const POLL: Duration = Duration::from_millis(250);
/// After a phase's budget, how long its last statuses get to reach the API server: a write or
/// two (the status manager writes right after the worker's last stop).
const STATUS_SLACK: Duration = Duration::from_secs(2);

/// Whether the kubelet counts the pod as critical when the node shuts down: its priority class
/// is one of the two system classes, or its priority is at least system-critical.
pub fn is_critical(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let class = spec.and_then(|s| s.priority_class_name.as_deref());
    matches!(
        class,
        Some("system-cluster-critical" | "system-node-critical")
    ) || spec
        .and_then(|s| s.priority)
        .is_some_and(|p| p >= SYSTEM_CRITICAL_PRIORITY)
}

/// The two phases: (regular pods' budget, critical pods' budget).
pub fn budgets(grace: Duration, critical: Duration) -> (Duration, Duration) {
    (grace.saturating_sub(critical), critical.min(grace))
}

/// The grace period a pod gets in a phase with `budget`: its own, capped by the budget.
pub fn pod_grace(pod: &Pod, budget: Duration) -> Duration {
    let own = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_POD_GRACE)
        .max(0) as u64;
    Duration::from_secs(own).min(budget)
}

/// What a pod bound here after the shutdown began gets: Failed, NodeShutdown, never started
/// (the eviction path with nothing to stop).
pub fn refusal() -> Eviction {
    Eviction {
        reason: REFUSED_REASON,
        message: REFUSED_MESSAGE.into(),
        grace: Duration::ZERO,
    }
}

/// What the shutdown needs from the rest of the agent.
pub struct NodeShutdown {
    pub grace: Duration,
    pub critical_grace: Duration,
    pub node_name: String,
    /// The pods the node runs (the pod manager's set).
    pub pods: watch::Receiver<PodSet>,
    /// To the pod manager, which hands each stop to the pod's worker (the eviction path).
    pub evict: mpsc::UnboundedSender<(String, Eviction)>,
    pub runtime: RuntimeCache,
    /// Set to true first: the node status manager reports Ready=False.
    pub not_ready: watch::Sender<bool>,
    pub events: EventSink,
    /// Without an API server the stops alone are waited for.
    pub client: Option<kube::Client>,
}

impl NodeShutdown {
    /// Marks the node not ready, stops the regular pods, then the critical ones. Returns when
    /// every pod has stopped and its status is written, or when the grace period is spent.
    pub async fn run(self) {
        let (regular_budget, critical_budget) = budgets(self.grace, self.critical_grace);
        info!(grace = ?self.grace, critical = ?self.critical_grace, "node shutting down: stopping pods, regular ones first");
        self.not_ready.send_replace(true);
        self.events.normal(
            &self.node_ref(),
            "Shutdown",
            "Shutdown manager detected shutdown event".into(),
        );
        let pods = self.pods.borrow().clone();
        let (critical, regular): (Vec<_>, Vec<_>) =
            pods.into_iter().partition(|(_, pod)| is_critical(pod));
        self.stop_phase("regular", &regular, regular_budget).await;
        self.stop_phase("critical", &critical, critical_budget)
            .await;
        info!("node shutdown: pods stopped");
    }

    /// Stops `pods` within `budget` and waits for their stops and final statuses.
    async fn stop_phase(&self, phase: &str, pods: &[(String, Arc<Pod>)], budget: Duration) {
        if pods.is_empty() {
            return;
        }
        info!(
            phase,
            pods = pods.len(),
            ?budget,
            "node shutdown: stopping pods"
        );
        for (uid, pod) in pods {
            let eviction = Eviction {
                reason: REASON,
                message: MESSAGE.into(),
                grace: pod_grace(pod, budget),
            };
            if self.evict.send((uid.clone(), eviction)).is_err() {
                return;
            }
        }
        let deadline = Instant::now() + budget + STATUS_SLACK;
        let mut left: Vec<&(String, Arc<Pod>)> = pods.iter().collect();
        while !left.is_empty() {
            let snapshot = self.runtime.fresh().await;
            let mut still = Vec::new();
            for entry in left {
                let (uid, pod) = entry;
                // While the runtime cannot be asked the containers count as running.
                let running = snapshot.of_pod(uid).is_none_or(|l| {
                    l.iter()
                        .any(|c| matches!(c.state, ContainerState::Running { .. }))
                });
                if running || !self.status_written(pod).await {
                    still.push(entry);
                }
            }
            left = still;
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = left.iter().map(|(_, p)| pod_name(p)).collect();
                warn!(phase, pods = ?names, "node shutdown: pods not stopped (or their status not written) within the phase's grace period; going on");
                return;
            }
            tokio::time::sleep(POLL).await;
        }
        info!(phase, "node shutdown: phase done");
    }

    /// Whether the API server holds the pod's final status (or no longer holds the pod).
    /// Without an API server there is nothing to wait for.
    async fn status_written(&self, pod: &Pod) -> bool {
        let Some(client) = &self.client else {
            return true;
        };
        let (Some(ns), Some(name)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) else {
            return true;
        };
        let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), ns);
        match api.get_opt(name).await {
            Ok(None) => true,
            Ok(Some(current)) => {
                // A static pod's status is its mirror pod's (another UID); any other pod of
                // another UID is a new pod of the same name: ours is gone.
                let static_pod =
                    super::static_source::annotation(pod, super::static_source::ANNOTATION_SOURCE)
                        .is_some_and(|s| s != "api");
                if !static_pod && current.metadata.uid != pod.metadata.uid {
                    return true;
                }
                let phase = current.status.as_ref().and_then(|s| s.phase.as_deref());
                matches!(phase, Some("Failed" | "Succeeded"))
            }
            Err(e) => {
                warn!(pod = %pod_name(pod), error = %one_line(&e), "node shutdown: reading the pod");
                false
            }
        }
    }

    fn node_ref(&self) -> ObjectReference {
        // The kubelet's node reference: the UID is the node's name.
        ObjectReference {
            kind: Some("Node".into()),
            name: Some(self.node_name.clone()),
            uid: Some(self.node_name.clone()),
            ..Default::default()
        }
    }
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn critical_pods_are_the_kubelets() {
        let c = |s| is_critical(&pod(s));
        assert!(c(
            serde_json::json!({"containers": [], "priorityClassName": "system-node-critical"})
        ));
        assert!(c(
            serde_json::json!({"containers": [], "priorityClassName": "system-cluster-critical"})
        ));
        assert!(c(
            serde_json::json!({"containers": [], "priority": 2_000_000_000})
        ));
        assert!(!c(
            serde_json::json!({"containers": [], "priority": 1_999_999_999})
        ));
        assert!(!c(
            serde_json::json!({"containers": [], "priorityClassName": "high"})
        ));
        assert!(!c(serde_json::json!({"containers": []})));
    }

    #[test]
    fn each_phase_has_its_budget_and_caps_the_pods_own_grace() {
        let s = Duration::from_secs;
        assert_eq!(budgets(s(30), s(10)), (s(20), s(10)));
        assert_eq!(budgets(s(30), s(0)), (s(30), s(0)));
        assert_eq!(budgets(s(10), s(10)), (s(0), s(10)));
        let p = pod(serde_json::json!({"containers": [], "terminationGracePeriodSeconds": 5}));
        assert_eq!(pod_grace(&p, s(20)), s(5));
        assert_eq!(pod_grace(&p, s(3)), s(3));
        let default = pod(serde_json::json!({"containers": []}));
        assert_eq!(pod_grace(&default, s(60)), s(30));
        assert_eq!(pod_grace(&default, s(20)), s(20));
    }
}
