//! The guest memory guard: Wasm guests live in the agent's own process, so guests that
//! together outgrow the node would take the agent (and every pod) down with them in the
//! kernel's OOM killer. Two lines keep the host alive, as a kubelet's `kubepods` cgroup and
//! eviction manager do for containers:
//! 1. the provider's ceiling ([`ceiling`], capacity less `--system-reserved` and
//!    `--kube-reserved`, the size the kubelet gives the `kubepods` cgroup): a growth past it is
//!    refused at once and the guest asking for it is OOMKilled (`provider_wasmtime::memory`);
//! 2. before that, every [`GUEST_CHECK_EVERY`] the eviction manager compares what the guests
//!    hold together ([`guest_total`], unlimited ones included) with the node's allocatable
//!    memory (the ceiling less the `memory.available` hard eviction threshold) and, over it,
//!    runs a housekeeping pass at once: allocatableMemory.available (the ceiling less the
//!    total) is below its threshold, MemoryPressure goes True and the worst offender in the
//!    kubelet's ranking ([`super::rank`]) is evicted.
//!
//! The margin between the two is the hard eviction threshold (100Mi by default): the guard
//! evicts before the ceiling bites, unless a guest grows faster than one check interval.

use std::time::Duration;

use provider_api::{ContainerState, ContainerSummary};

use crate::config::Reserved;

/// How often the guard compares the guests' memory with allocatable. A guest can grow by
/// gigabytes in the default 10 s housekeeping interval; a second is ten times tighter and costs
/// one walk of the provider's in-memory container list.
pub const GUEST_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The provider's ceiling for all guests together: `capacity − system_reserved −
/// kube_reserved`, the kubelet's `kubepods` cgroup limit (the hard eviction threshold is left
/// as room for the eviction manager to act first).
pub fn ceiling(capacity_memory: u64, system: &Reserved, kube: &Reserved) -> u64 {
    capacity_memory
        .saturating_sub(system.memory)
        .saturating_sub(kube.memory)
}

/// Bytes the running containers' guests hold together, as the provider counts them (every
/// linear memory and table of every store: instances, execs, requests).
pub fn guest_total(containers: &[ContainerSummary]) -> u64 {
    containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Running { .. }))
        .map(|c| c.usage.memory_bytes)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use provider_api::ContainerUsage;
    use std::time::SystemTime;

    fn container(memory_bytes: u64, running: bool) -> ContainerSummary {
        let state = if running {
            ContainerState::Running {
                started_at: SystemTime::UNIX_EPOCH,
            }
        } else {
            ContainerState::Exited {
                started_at: None,
                finished_at: SystemTime::UNIX_EPOCH,
                exit_code: 0,
                reason: provider_api::ExitReason::Completed,
                message: None,
            }
        };
        ContainerSummary {
            id: "c".into(),
            pod_uid: "u".into(),
            name: "c".into(),
            attempt: 0,
            image_digest: String::new(),
            state,
            usage: ContainerUsage {
                cpu_nanos: 0,
                memory_bytes,
            },
            annotations: Default::default(),
        }
    }

    #[test]
    fn running_guests_count_together() {
        assert_eq!(
            guest_total(&[
                container(10, true),
                container(5, true),
                container(100, false)
            ]),
            15
        );
    }

    #[test]
    fn the_ceiling_is_capacity_less_reservations() {
        let system = Reserved {
            memory: 1 << 30,
            ..Default::default()
        };
        let kube = Reserved {
            memory: 512 << 20,
            ..Default::default()
        };
        assert_eq!(
            ceiling(8 << 30, &system, &kube),
            (8 << 30) - (1 << 30) - (512 << 20)
        );
        assert_eq!(ceiling(1 << 30, &system, &kube), 0);
    }
}
