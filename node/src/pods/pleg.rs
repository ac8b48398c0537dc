//! The pod lifecycle event generator: relists the provider every second, compares with the
//! previous listing, and tells the pod manager which pods had a container change state, so
//! their workers sync. The provider knows nothing about pods' Kubernetes state; this is how
//! the node learns that an instance exited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use provider_api::{ContainerState, Provider};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The kubelet's relist period.
pub const RELIST_PERIOD: Duration = Duration::from_secs(1);

/// A discriminant of the state, enough to see a change.
fn state_kind(s: &ContainerState) -> u8 {
    match s {
        ContainerState::Created => 0,
        ContainerState::Running { .. } => 1,
        ContainerState::Exited { .. } => 2,
    }
}

pub async fn run(provider: Arc<dyn Provider>, tx: mpsc::UnboundedSender<String>, shutdown: CancellationToken) {
    let mut previous: HashMap<String, (String, u8)> = HashMap::new();
    let mut tick = tokio::time::interval(RELIST_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut current = HashMap::new();
        let relist_started = tokio::time::Instant::now();
        let listed = match provider.list_containers().await {
            Ok(listed) => listed,
            // Nothing changed that anyone can know of; the relist after the runtime is back
            // reports what did.
            Err(e) => {
                tracing::debug!(error = %e, "relist skipped");
                continue;
            }
        };
        record_relist(&listed, relist_started.elapsed());
        for c in listed {
            let kind = state_kind(&c.state);
            if previous.get(&c.id).map(|(_, k)| *k) != Some(kind) {
                let _ = tx.send(c.pod_uid.clone());
            }
            current.insert(c.id, (c.pod_uid, kind));
        }
        for (id, (pod_uid, _)) in &previous {
            if !current.contains_key(id) {
                let _ = tx.send(pod_uid.clone());
            }
        }
        previous = current;
    }
}

/// `kubelet_pleg_relist_duration_seconds`, `kubelet_running_pods` and
/// `kubelet_running_containers{container_state}` from one relist.
fn record_relist(listed: &[provider_api::ContainerSummary], took: Duration) {
    let metrics = crate::metrics::kubelet();
    metrics.pleg_relist_duration.observe(took.as_secs_f64());
    let mut by_state = [0u32; 3];
    let mut running_pods = std::collections::HashSet::new();
    for c in listed {
        by_state[usize::from(state_kind(&c.state))] += 1;
        if matches!(c.state, ContainerState::Running { .. }) {
            running_pods.insert(c.pod_uid.as_str());
        }
    }
    for (state, count) in ["created", "running", "exited"].into_iter().zip(by_state) {
        metrics.running_containers.get_or_create(&crate::metrics::ContainerStateLabels { container_state: state }).set(i64::from(count));
    }
    metrics.running_pods.set(running_pods.len() as i64);
}
