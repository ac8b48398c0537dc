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
        for c in provider.list_containers().await {
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
