//! Node-pressure eviction: the only owner of the node's pressure state.
//!
//! Start at [`EvictionManager::run`]. Every `--housekeeping-interval` it measures the eviction
//! signals (memory.available from /proc/meminfo `MemAvailable`; allocatableMemory.available,
//! the pods' memory against their ceiling, capacity less the reserved memory, with a threshold
//! derived from each hard memory.available one, as the kubelet enforcing node allocatable on
//! pods; nodefs.available and
//! nodefs.inodesFree by statvfs of `--root-dir`, imagefs.* by statvfs of the provider's image
//! store, pid.available), feeds them to the [`thresholds::ThresholdTracker`] (hard and soft
//! thresholds, grace periods, minimum reclaim, the pressure transition period) and publishes
//! the MemoryPressure / DiskPressure / PIDPressure conditions on a watch channel that
//! [`crate::node_status`] reports. Then, as the kubelet:
//! 1. pods over their local-storage limits (an emptyDir `sizeLimit`, a container's
//!    `ephemeral-storage` limit) are evicted;
//! 2. when a threshold has been met for its grace period, an `EvictionThresholdMet` Event is
//!    recorded on the Node; disk pressure first reclaims node-level resources (unused images
//!    and dead containers, through [`crate::gc`]) and stops there if that was enough;
//! 3. otherwise the pods are ranked ([`rank`]) and the first one is evicted, at most one per
//!    interval: the request goes to the pod's worker (the one owner of its lifecycle), which
//!    stops its containers within the grace period and reports phase Failed, reason Evicted.
//!    The manager then waits (up to 30 s, the kubelet's pod clean-up timeout) for the pod's
//!    containers to stop before it measures again, so one shortage never evicts two pods.
//!
//! Beside the signals, every second the [`guests`] guard compares what the pods' containers hold
//! together with the node's allocatable memory; over it, it runs a housekeeping pass at once
//! (the kubelet's memory threshold notifier), which raises MemoryPressure through
//! allocatableMemory.available and evicts; it evicts the worst offender itself only when that
//! pass did not (no hard memory.available threshold). The Wasm guests live in one process of
//! the node's: see that module.
//!
//! While a pressure condition holds, new pods are refused at admission
//! ([`crate::pods::admission::pressure`], the kubelet's eviction admit handler).

pub mod guests;
pub mod rank;
pub mod thresholds;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use provider_api::{ContainerState, Provider};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, EvictionSignal};
use crate::events::EventSink;
use crate::gc::GcHandle;
use crate::machine;
use crate::pods::manager::PodSet;
use crate::pods::pleg::RuntimeSnapshot;
use crate::pods::static_source::{ANNOTATION_MIRROR, ANNOTATION_SOURCE};
use crate::quantity;
use rank::{Candidate, ContainerUse, Resource};
use thresholds::{Observation, Observations, PressureCondition, Threshold, ThresholdTracker};

/// The kubelet's grace period for a hard eviction (`immediateEvictionGracePeriodSeconds`).
const HARD_EVICTION_GRACE: Duration = Duration::from_secs(1);
/// How long the manager waits for an evicted pod's containers to stop (the kubelet's
/// `podCleanupTimeout`).
const POD_CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
const POD_CLEANUP_POLL: Duration = Duration::from_millis(200);
/// Pods at or above this priority are system-critical and never evicted (`SystemCriticalPriority`).
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// An eviction, for the pod's worker to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The pod's status reason and the event's reason: `Evicted` (node pressure), or
    /// `Terminated` (graceful node shutdown, [`crate::pods::node_shutdown`]).
    pub reason: &'static str,
    /// The pod's status message and the event's message.
    pub message: String,
    /// How long the containers get to stop.
    pub grace: Duration,
}

/// The pressure conditions as the eviction manager decided them: `Some(detail)` when true.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub pid: Option<String>,
}

/// What the eviction manager hears from and tells the rest of the agent.
pub struct EvictionLinks {
    pub pods: watch::Receiver<PodSet>,
    /// (pod UID, eviction) to the pod manager, which hands it to the pod's worker.
    pub evict: mpsc::UnboundedSender<(String, Eviction)>,
    pub pressure: watch::Sender<Pressure>,
    pub gc: Option<GcHandle>,
}

pub struct EvictionManager {
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    /// What the provider runs (the PLEG's snapshot).
    runtime: crate::pods::pleg::RuntimeCache,
    events: EventSink,
    links: EvictionLinks,
    thresholds: Vec<Threshold>,
    tracker: ThresholdTracker,
    evicted: HashSet<String>,
}

/// Every configured threshold, hard ones first, then one `allocatableMemory.available`
/// threshold for each hard `memory.available` one (the kubelet's `addAllocatableThresholds`,
/// which it adds when node allocatable is enforced on pods, its default).
pub fn thresholds(config: &Config) -> Vec<Threshold> {
    let hard = config.eviction_hard.iter().map(|t| (t, true));
    let soft = config.eviction_soft.iter().map(|t| (t, false));
    let allocatable: Vec<Threshold> = config
        .eviction_hard
        .iter()
        .filter(|t| t.signal == EvictionSignal::MemoryAvailable)
        .map(|t| Threshold {
            signal: EvictionSignal::AllocatableMemoryAvailable,
            value: t.limit,
            grace: Duration::ZERO,
            hard: true,
            min_reclaim: config
                .eviction_minimum_reclaim
                .get(&EvictionSignal::MemoryAvailable)
                .copied(),
        })
        .collect();
    hard.chain(soft)
        .map(|(t, hard)| Threshold {
            signal: t.signal,
            value: t.limit,
            grace: if hard {
                Duration::ZERO
            } else {
                config
                    .eviction_soft_grace_period
                    .get(&t.signal)
                    .copied()
                    .unwrap_or_default()
            },
            hard,
            min_reclaim: config.eviction_minimum_reclaim.get(&t.signal).copied(),
        })
        .chain(allocatable)
        .collect()
}

impl EvictionManager {
    pub fn new(
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        runtime: crate::pods::pleg::RuntimeCache,
        events: EventSink,
        links: EvictionLinks,
    ) -> Self {
        let thresholds = thresholds(&config);
        Self {
            config,
            provider,
            runtime,
            events,
            links,
            thresholds,
            tracker: ThresholdTracker::default(),
            evicted: HashSet::new(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(thresholds = self.thresholds.len(), every = ?self.config.housekeeping_interval, "eviction manager started");
        let mut tick = tokio::time::interval(self.config.housekeeping_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut guard = tokio::time::interval(guests::GUEST_CHECK_EVERY);
        guard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => true,
                _ = guard.tick() => false,
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = async { if full { self.synchronize().await; } else { self.guard_guests().await } } => {}
            }
        }
    }

    fn node_ref(&self) -> ObjectReference {
        // The kubelet's node reference: the UID is the node's name.
        ObjectReference {
            kind: Some("Node".into()),
            name: Some(self.config.node_name.clone()),
            uid: Some(self.config.node_name.clone()),
            ..Default::default()
        }
    }

    /// One housekeeping pass; true when it evicted a pod.
    async fn synchronize(&mut self) -> bool {
        let observations = match self.observe().await {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "measuring the eviction signals");
                return false;
            }
        };
        let decision = self.tracker.observe(
            &self.thresholds,
            &observations,
            self.config.eviction_pressure_transition_period,
            Instant::now(),
        );
        self.publish(&decision.conditions);

        let snapshot = self.runtime.latest();
        if snapshot.containers.is_none() {
            // Nothing is known about what runs while the runtime cannot be asked.
            return false;
        }
        let pods = self.links.pods.borrow().clone();
        let active = self.active_pods(&snapshot);

        // Local storage limits are enforced whatever the node's pressure (as the kubelet's
        // localStorageEviction); a pod evicted for them ends this pass.
        if let Some((uid, message)) = self.local_storage_violation(&active).await {
            self.evict(&uid, message, Duration::ZERO).await;
            return true;
        }

        let Some(&index) = decision
            .act_on
            .iter()
            .min_by_key(|i| eviction_priority(self.thresholds[**i].signal))
        else {
            return false;
        };
        let threshold = self.thresholds[index].clone();
        let resource = resource_of(threshold.signal);
        info!(
            signal = threshold.signal.as_str(),
            "eviction threshold met; reclaiming {}",
            resource.as_str()
        );
        self.events.warning(
            &self.node_ref(),
            "EvictionThresholdMet",
            format!("Attempting to reclaim {}", resource.as_str()),
        );

        if resource == Resource::EphemeralStorage {
            if let Some(gc) = &self.links.gc {
                let freed = gc.reclaim().await;
                let after = self
                    .observe()
                    .await
                    .ok()
                    .and_then(|o| o.get(&threshold.signal).copied());
                info!(
                    freed_bytes = freed,
                    "node-level reclaim (unused images, dead containers)"
                );
                if after.is_some_and(|o| !threshold.met(o, true)) {
                    info!(
                        signal = threshold.signal.as_str(),
                        "node-level reclaim relieved the pressure; no pod evicted"
                    );
                    return false;
                }
            }
        }

        let mut candidates = self.candidates(&active, resource, &snapshot).await;
        rank::rank(&mut candidates, resource);
        let Some(victim) = candidates.first() else {
            warn!(
                signal = threshold.signal.as_str(),
                "eviction threshold met but no pod can be evicted"
            );
            return false;
        };
        let observed = observations.get(&threshold.signal).copied();
        let quantities = observed.map(|o| {
            (
                thresholds::show(threshold.signal, threshold.quantity(o.capacity)),
                thresholds::show(threshold.signal, o.available),
            )
        });
        let message = rank::message(resource, quantities, victim);
        let grace = if threshold.hard {
            HARD_EVICTION_GRACE
        } else {
            let own = pods
                .get(&victim.uid)
                .map_or(Duration::from_secs(30), |p| pod_grace(p));
            if self.config.eviction_max_pod_grace_period.is_zero() {
                own
            } else {
                own.min(self.config.eviction_max_pod_grace_period)
            }
        };
        info!(pod = %victim.name, usage = victim.usage(), request = victim.request(), "evicting");
        let uid = victim.uid.clone();
        self.evict(&uid, message, grace).await;
        true
    }

    /// The running pods not already being evicted.
    fn active_pods(&mut self, snapshot: &RuntimeSnapshot) -> Vec<Arc<Pod>> {
        let pods = self.links.pods.borrow().clone();
        self.evicted.retain(|uid| pods.contains_key(uid));
        pods.iter()
            .filter(|(uid, _)| !self.evicted.contains(*uid))
            .filter(|(uid, _)| {
                snapshot
                    .of_pod(uid)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| matches!(c.state, ContainerState::Running { .. }))
            })
            .map(|(_, pod)| pod.clone())
            .collect()
    }

    /// The guest memory guard ([`guests`]): guests together over allocatable memory evict the
    /// worst offender (memory ranking, the hard grace period), one per check.
    async fn guard_guests(&mut self) {
        let snapshot = self.runtime.latest();
        let Some(containers) = snapshot.containers.as_ref() else {
            return;
        };
        let total = guests::guest_total(containers);
        if total == 0 {
            return;
        }
        let Ok(capacity) = machine::capacity(&self.config.root_dir) else {
            return;
        };
        let allocatable = machine::Allocatable::compute(
            &capacity,
            &self.config.system_reserved,
            &self.config.kube_reserved,
            &self.config.eviction_hard,
        )
        .memory_bytes;
        if total <= allocatable {
            return;
        }
        // As the kubelet's memory threshold notifier, crossing allocatable runs a housekeeping
        // pass at once: allocatableMemory.available raises MemoryPressure and the pass evicts
        // in the kubelet's ranking. The guard evicts by itself only when that pass did not (no
        // hard memory.available threshold, so no allocatable signal either).
        if self.synchronize().await {
            return;
        }
        let snapshot = self.runtime.latest();
        let Some(containers) = snapshot.containers.as_ref() else {
            return;
        };
        let total = guests::guest_total(containers);
        if total <= allocatable {
            return;
        }
        let active = self.active_pods(&snapshot);
        let mut candidates = self.candidates(&active, Resource::Memory, &snapshot).await;
        rank::rank(&mut candidates, Resource::Memory);
        let Some(victim) = candidates.first() else {
            warn!(
                guests_bytes = total,
                allocatable_bytes = allocatable,
                "the guests hold more than the node's allocatable memory but no pod can be evicted"
            );
            return;
        };
        let quantities = (
            thresholds::binary_quantity(allocatable),
            thresholds::binary_quantity(allocatable.saturating_sub(total)),
        );
        let message = rank::message(Resource::Memory, Some(quantities), victim);
        warn!(pod = %victim.name, usage = victim.usage(), guests_bytes = total, allocatable_bytes = allocatable, "the guests together hold more than the node's allocatable memory; evicting the worst offender");
        self.events.warning(
            &self.node_ref(),
            "EvictionThresholdMet",
            "Attempting to reclaim memory".to_string(),
        );
        let uid = victim.uid.clone();
        self.evict(&uid, message, HARD_EVICTION_GRACE).await;
    }

    /// Sends the eviction to the pod's worker and waits for its containers to stop.
    async fn evict(&mut self, uid: &str, message: String, grace: Duration) {
        self.evicted.insert(uid.to_string());
        if self
            .links
            .evict
            .send((
                uid.to_string(),
                Eviction {
                    reason: "Evicted",
                    message,
                    grace,
                },
            ))
            .is_err()
        {
            return;
        }
        let deadline = Instant::now() + grace + POD_CLEANUP_TIMEOUT;
        while Instant::now() < deadline {
            // While the runtime cannot be asked the containers count as running.
            let running = self.runtime.fresh().await.of_pod(uid).is_none_or(|l| {
                l.iter()
                    .any(|c| matches!(c.state, ContainerState::Running { .. }))
            });
            if !running {
                debug!(uid, "evicted pod's containers stopped");
                return;
            }
            tokio::time::sleep(POD_CLEANUP_POLL).await;
        }
        warn!(
            uid,
            "evicted pod's containers still run after the clean-up timeout"
        );
    }

    /// Publishes the conditions when they changed, with the kubelet's Node events.
    fn publish(&self, conditions: &BTreeMap<PressureCondition, String>) {
        let pressure = Pressure {
            memory: conditions.get(&PressureCondition::MemoryPressure).cloned(),
            disk: conditions.get(&PressureCondition::DiskPressure).cloned(),
            pid: conditions.get(&PressureCondition::PIDPressure).cloned(),
        };
        let before = self.links.pressure.borrow().clone();
        let node = self.node_ref();
        let changes = [
            (
                before.memory.is_some(),
                pressure.memory.is_some(),
                "NodeHasInsufficientMemory",
                "NodeHasSufficientMemory",
            ),
            (
                before.disk.is_some(),
                pressure.disk.is_some(),
                "NodeHasDiskPressure",
                "NodeHasNoDiskPressure",
            ),
            (
                before.pid.is_some(),
                pressure.pid.is_some(),
                "NodeHasInsufficientPID",
                "NodeHasSufficientPID",
            ),
        ];
        for (was, is, on, off) in changes {
            if was != is {
                let reason = if is { on } else { off };
                info!(condition = reason, "node pressure changed");
                self.events.normal(
                    &node,
                    reason,
                    format!("Node {} status is now: {reason}", self.config.node_name),
                );
            }
        }
        self.links.pressure.send_if_modified(|current| {
            let changed = *current != pressure;
            *current = pressure.clone();
            changed
        });
    }

    /// Measures every signal a threshold names (and memory and nodefs always).
    async fn observe(&self) -> Result<Observations, machine::MeasureError> {
        let root = &self.config.root_dir;
        let capacity = machine::capacity(root)?;
        let available = machine::available(root)?;
        let mut o = Observations::new();
        o.insert(
            EvictionSignal::MemoryAvailable,
            Observation {
                available: available.memory_bytes,
                capacity: capacity.memory_bytes,
            },
        );
        o.insert(
            EvictionSignal::NodefsAvailable,
            Observation {
                available: available.nodefs_bytes,
                capacity: capacity.ephemeral_storage_bytes,
            },
        );
        o.insert(
            EvictionSignal::NodefsInodesFree,
            Observation {
                available: available.nodefs_inodes,
                capacity: available.nodefs_inodes_total,
            },
        );
        o.insert(
            EvictionSignal::PidAvailable,
            Observation {
                available: available.pids,
                capacity: available.pids_max,
            },
        );
        // The pods' memory against their ceiling (the kubelet's pods cgroup: capacity less the
        // reserved memory): known while the runtime can be asked.
        if let Some(containers) = self.runtime.latest().containers.as_ref() {
            let ceiling = guests::ceiling(
                capacity.memory_bytes,
                &self.config.system_reserved,
                &self.config.kube_reserved,
            );
            o.insert(
                EvictionSignal::AllocatableMemoryAvailable,
                Observation {
                    available: ceiling.saturating_sub(guests::guest_total(containers)),
                    capacity: ceiling,
                },
            );
        }
        // The image filesystem is where the provider keeps images; without one, nodefs.
        let image_dir = self
            .provider
            .image_fs()
            .await
            .map(|fs| fs.path)
            .unwrap_or_else(|| root.clone());
        let (image_capacity, image_available) = match (
            machine::capacity(&image_dir),
            machine::available(&image_dir),
        ) {
            (Ok(c), Ok(a)) => (c, a),
            _ => (capacity, available),
        };
        o.insert(
            EvictionSignal::ImagefsAvailable,
            Observation {
                available: image_available.nodefs_bytes,
                capacity: image_capacity.ephemeral_storage_bytes,
            },
        );
        o.insert(
            EvictionSignal::ImagefsInodesFree,
            Observation {
                available: image_available.nodefs_inodes,
                capacity: image_available.nodefs_inodes_total,
            },
        );
        Ok(o)
    }

    /// Each pod with its use of `resource`.
    async fn candidates(
        &self,
        active: &[Arc<Pod>],
        resource: Resource,
        snapshot: &RuntimeSnapshot,
    ) -> Vec<Candidate> {
        let mut candidates = Vec::with_capacity(active.len());
        for pod in active {
            let storage = if resource == Resource::Pids {
                None
            } else {
                Some(self.storage_usage(pod).await)
            };
            candidates.push(self.candidate(pod, resource, snapshot, storage));
        }
        candidates
    }

    /// A pod with its use of `resource` (`storage`: its disk and emptyDir use, unless pids).
    fn candidate(
        &self,
        pod: &Pod,
        resource: Resource,
        snapshot: &RuntimeSnapshot,
        storage: Option<StorageUsage>,
    ) -> Candidate {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let containers = snapshot.of_pod(&uid).unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let request_of = |c: &k8s_openapi::api::core::v1::Container, what: &str| -> u64 {
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(what))
                .and_then(|q| quantity::bytes(&q.0).ok())
                .unwrap_or(0)
        };
        let uses = spec
            .containers
            .iter()
            .map(|c| {
                let usage = match resource {
                    Resource::Memory => containers
                        .iter()
                        .filter(|s| {
                            s.name == c.name && matches!(s.state, ContainerState::Running { .. })
                        })
                        .map(|s| s.usage.memory_bytes)
                        .sum(),
                    Resource::EphemeralStorage => storage
                        .as_ref()
                        .and_then(|s| s.containers.get(&c.name).copied())
                        .unwrap_or(0),
                    Resource::Pids => 0,
                };
                let request = match resource {
                    Resource::Memory => request_of(c, "memory"),
                    Resource::EphemeralStorage => request_of(c, "ephemeral-storage"),
                    Resource::Pids => 0,
                };
                ContainerUse {
                    name: c.name.clone(),
                    usage,
                    request,
                }
            })
            .collect();
        Candidate {
            uid,
            name: format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                pod.metadata.name.as_deref().unwrap_or("")
            ),
            priority: spec.priority.unwrap_or(0),
            critical: is_critical(pod),
            containers: uses,
            // A memory-medium emptyDir is memory (tmpfs), a disk one is ephemeral storage.
            pod_usage: storage.map_or(0, |s| {
                s.volumes
                    .values()
                    .filter(|(_, memory)| *memory == (resource == Resource::Memory))
                    .map(|(bytes, _)| bytes)
                    .sum()
            }),
        }
    }

    /// Bytes a pod holds on the node's disk: each container's logs, each emptyDir volume. The
    /// walks (a guest's tree can be large) run on a blocking thread, off the runtime's workers.
    async fn storage_usage(&self, pod: &Pod) -> StorageUsage {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let logs = crate::pods::layout::pod_log_dir(
            &self.config.pod_logs_dir,
            pod.metadata.namespace.as_deref().unwrap_or("default"),
            pod.metadata.name.as_deref().unwrap_or(""),
            uid,
        );
        let spec = pod.spec.clone().unwrap_or_default();
        let containers: Vec<(String, PathBuf)> = spec
            .containers
            .iter()
            .map(|c| (c.name.clone(), logs.join(&c.name)))
            .collect();
        let volumes: Vec<(String, PathBuf, bool)> = spec
            .volumes
            .iter()
            .flatten()
            .filter(|v| v.empty_dir.is_some())
            .map(|v| {
                let memory =
                    v.empty_dir.as_ref().and_then(|e| e.medium.as_deref()) == Some("Memory");
                (
                    v.name.clone(),
                    empty_dir_path(&self.config.root_dir, uid, &v.name),
                    memory,
                )
            })
            .collect();
        let measure = move || StorageUsage {
            containers: containers
                .into_iter()
                .map(|(name, path)| (name, disk_usage(&path)))
                .collect(),
            volumes: volumes
                .into_iter()
                .map(|(name, path, memory)| (name, (disk_usage(&path), memory)))
                .collect(),
        };
        tokio::task::spawn_blocking(measure)
            .await
            .unwrap_or_default()
    }

    /// The first active pod over a local-storage limit, with the kubelet's message.
    async fn local_storage_violation(&self, active: &[Arc<Pod>]) -> Option<(String, String)> {
        for pod in active.iter().filter(|p| !is_critical(p)) {
            let spec = pod.spec.clone().unwrap_or_default();
            let limited = spec
                .volumes
                .iter()
                .flatten()
                .any(|v| v.empty_dir.as_ref().is_some_and(|e| e.size_limit.is_some()))
                || spec
                    .containers
                    .iter()
                    .any(|c| limit_of(c, "ephemeral-storage").is_some());
            if !limited {
                continue;
            }
            let usage = self.storage_usage(pod).await;
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            for v in spec.volumes.iter().flatten() {
                let Some(limit) = v.empty_dir.as_ref().and_then(|e| e.size_limit.as_ref()) else {
                    continue;
                };
                let Ok(bytes) = quantity::bytes(&limit.0) else {
                    continue;
                };
                // Memory-medium ones too: their sizeLimit bounds the tmpfs usage.
                if usage.volumes.get(&v.name).map_or(0, |(b, _)| *b) > bytes {
                    return Some((
                        uid,
                        format!(
                            "Usage of EmptyDir volume \"{}\" exceeds the limit \"{}\".",
                            v.name, limit.0
                        ),
                    ));
                }
            }
            for c in &spec.containers {
                let Some((text, bytes)) = limit_of(c, "ephemeral-storage") else {
                    continue;
                };
                if usage.containers.get(&c.name).copied().unwrap_or(0) > bytes {
                    return Some((
                        uid,
                        format!(
                            "Container {} exceeded its local ephemeral storage limit \"{text}\".",
                            c.name
                        ),
                    ));
                }
            }
            let limits: Option<Vec<(String, u64)>> = spec
                .containers
                .iter()
                .map(|c| limit_of(c, "ephemeral-storage"))
                .collect();
            if let Some(limits) = limits {
                let total: u64 = limits.iter().map(|(_, b)| b).sum();
                let used = usage.containers.values().sum::<u64>()
                    + usage
                        .volumes
                        .values()
                        .filter(|(_, memory)| !memory)
                        .map(|(b, _)| b)
                        .sum::<u64>();
                if used > total {
                    return Some((uid, format!("Pod ephemeral local storage usage exceeds the total limit of containers {}.", thresholds::binary_quantity(total))));
                }
            }
        }
        None
    }
}

/// A container's limit of `what`, as written and in units.
fn limit_of(c: &k8s_openapi::api::core::v1::Container, what: &str) -> Option<(String, u64)> {
    let q = c.resources.as_ref()?.limits.as_ref()?.get(what)?;
    Some((q.0.clone(), quantity::bytes(&q.0).ok()?))
}

#[derive(Default)]
struct StorageUsage {
    containers: HashMap<String, u64>,
    /// Bytes, and whether the volume is memory-backed (`medium: Memory`).
    volumes: HashMap<String, (u64, bool)>,
}

/// Where the pod worker materialises an emptyDir volume (see `pods::volumes`).
fn empty_dir_path(root: &Path, uid: &str, volume: &str) -> PathBuf {
    crate::pods::layout::volume_dir(
        &crate::pods::layout::pod_dir(root, uid),
        "empty-dir",
        volume,
    )
}

/// Bytes the files under `path` occupy on disk (allocated blocks, as `du`); 0 when missing.
/// A guest writes inside its emptyDir: the walk follows no symlink, crosses no mount point and
/// keeps no recursion ([`crate::pods::beneath::disk_usage`]).
pub fn disk_usage(path: &Path) -> u64 {
    crate::pods::beneath::disk_usage(path)
}

/// Static pods, mirror pods and system-critical priorities are never evicted.
pub fn is_critical(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    let static_pod = annotations
        .and_then(|a| a.get(ANNOTATION_SOURCE))
        .is_some_and(|s| s != "api");
    let mirror = annotations.is_some_and(|a| a.contains_key(ANNOTATION_MIRROR));
    let system = pod
        .spec
        .as_ref()
        .and_then(|s| s.priority)
        .is_some_and(|p| p >= SYSTEM_CRITICAL_PRIORITY);
    static_pod || mirror || system
}

fn pod_grace(pod: &Pod) -> Duration {
    Duration::from_secs(
        pod.spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64,
    )
}

fn resource_of(signal: EvictionSignal) -> Resource {
    match signal {
        EvictionSignal::MemoryAvailable | EvictionSignal::AllocatableMemoryAvailable => {
            Resource::Memory
        }
        EvictionSignal::PidAvailable => Resource::Pids,
        _ => Resource::EphemeralStorage,
    }
}

/// The kubelet acts on memory first, then on the signals that node-level reclaim can help.
fn eviction_priority(signal: EvictionSignal) -> u8 {
    match signal {
        EvictionSignal::MemoryAvailable | EvictionSignal::AllocatableMemoryAvailable => 0,
        EvictionSignal::NodefsAvailable | EvictionSignal::ImagefsAvailable => 1,
        EvictionSignal::NodefsInodesFree | EvictionSignal::ImagefsInodesFree => 2,
        EvictionSignal::PidAvailable => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)], priority: Option<i32>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
            "spec": {"containers": [{"name": "c"}], "priority": priority},
        }))
        .expect("valid pod")
    }

    #[test]
    fn static_mirror_and_system_critical_pods_are_critical() {
        assert!(!is_critical(&pod(&[], None)));
        assert!(!is_critical(&pod(
            &[(ANNOTATION_SOURCE, "api")],
            Some(1000)
        )));
        assert!(is_critical(&pod(&[(ANNOTATION_SOURCE, "file")], None)));
        assert!(is_critical(&pod(&[(ANNOTATION_MIRROR, "abc")], None)));
        assert!(is_critical(&pod(&[], Some(SYSTEM_CRITICAL_PRIORITY))));
    }

    #[test]
    fn disk_usage_counts_allocated_blocks_of_a_tree() {
        let dir = std::env::temp_dir().join(format!("wasm-kubelet-du-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).expect("dirs");
        std::fs::write(dir.join("a/b/f"), vec![1u8; 100_000]).expect("file");
        let used = disk_usage(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(used >= 100_000, "{used}");
        assert_eq!(disk_usage(&dir.join("missing")), 0);
    }

    #[test]
    fn each_hard_memory_threshold_has_an_allocatable_twin() {
        let config = Config::load([
            "wasm-kubelet",
            "--hostname-override=n",
            "--eviction-hard=memory.available<64Mi,nodefs.available<10%",
            "--eviction-soft=memory.available<200Mi",
            "--eviction-soft-grace-period=memory.available=1m",
        ])
        .expect("config");
        let all = thresholds(&config);
        let twins: Vec<&Threshold> = all
            .iter()
            .filter(|t| t.signal == EvictionSignal::AllocatableMemoryAvailable)
            .collect();
        // The hard one only, as the kubelet's addAllocatableThresholds.
        assert_eq!(twins.len(), 1, "{all:?}");
        assert!(twins[0].hard && twins[0].grace.is_zero());
        assert_eq!(twins[0].quantity(1 << 30), 64 << 20);
        assert_eq!(
            PressureCondition::of(twins[0].signal),
            PressureCondition::MemoryPressure
        );
        assert_eq!(resource_of(twins[0].signal), Resource::Memory);
    }

    #[test]
    fn memory_is_acted_on_before_disk_and_pids() {
        let mut signals = [
            EvictionSignal::PidAvailable,
            EvictionSignal::NodefsInodesFree,
            EvictionSignal::ImagefsAvailable,
            EvictionSignal::MemoryAvailable,
        ];
        signals.sort_by_key(|s| eviction_priority(*s));
        assert_eq!(signals[0], EvictionSignal::MemoryAvailable);
        assert_eq!(signals[3], EvictionSignal::PidAvailable);
    }
}
