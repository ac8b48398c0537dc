//! The pod lifecycle event generator: relists the provider every second, compares with the
//! previous listing, and tells the pod manager which pods had a container change state, so
//! their workers sync. The provider knows nothing about pods' Kubernetes state; this is how
//! the node learns that an instance exited.
//!
//! It is also the runtime cache: the one place the provider's containers and sandboxes are
//! listed. Each relist is a [`RuntimeSnapshot`] that workers, eviction, garbage collection,
//! stats and the kubelet API read through a [`RuntimeCache`]; a reader that must see its own
//! action (a container it just started or stopped) asks for a snapshot newer than that action
//! ([`RuntimeCache::newer_than`]), which relists at once, as the kubelet's `GetNewerThan`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use provider_api::{ContainerState, ContainerSummary, Provider, SandboxConfig};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the provider held at one relist.
#[derive(Debug)]
pub struct RuntimeSnapshot {
    /// The relist's number, counted when it began: every change completed before a
    /// [`RuntimeCache::mark`] that returned this number or less is in it.
    pub generation: u64,
    /// Every container, in every state; `None` while the runtime cannot be asked (readers
    /// then skip their pass rather than conclude that nothing runs).
    pub containers: Option<Vec<ContainerSummary>>,
    /// Every pod sandbox; `None` as for `containers`.
    pub sandboxes: Option<Vec<SandboxConfig>>,
    /// Where each pod's containers are in `containers` (sorted by pod UID when the snapshot is
    /// made): readers ask for one pod's without walking every container of the node.
    by_pod: HashMap<String, std::ops::Range<usize>>,
}

impl RuntimeSnapshot {
    /// A snapshot of one relist; the containers are grouped by pod for [`Self::of_pod`].
    pub fn new(
        generation: u64,
        containers: Option<Vec<ContainerSummary>>,
        sandboxes: Option<Vec<SandboxConfig>>,
    ) -> Self {
        let mut by_pod = HashMap::new();
        let containers = containers.map(|mut list| {
            // Stable: a pod's containers keep the provider's order.
            list.sort_by(|a, b| a.pod_uid.cmp(&b.pod_uid));
            let mut start = 0;
            for end in 1..=list.len() {
                if end == list.len() || list[end].pod_uid != list[start].pod_uid {
                    by_pod.insert(list[start].pod_uid.clone(), start..end);
                    start = end;
                }
            }
            list
        });
        Self {
            generation,
            containers,
            sandboxes,
            by_pod,
        }
    }

    /// The containers of the pod with this UID (every state); `None` while the runtime cannot
    /// be asked, empty when it runs none of the pod's.
    pub fn of_pod(&self, uid: &str) -> Option<&[ContainerSummary]> {
        let containers = self.containers.as_deref()?;
        Some(
            self.by_pod
                .get(uid)
                .map_or(&[][..], |range| &containers[range.clone()]),
        )
    }
}

/// The readers' side of the runtime cache (cheap to clone).
#[derive(Clone)]
pub struct RuntimeCache {
    rx: watch::Receiver<Arc<RuntimeSnapshot>>,
    relist: Arc<Notify>,
    /// Relists begun so far (the last one's generation).
    begun: Arc<AtomicU64>,
}

/// The PLEG's side: publishes snapshots, hears relist requests.
pub struct RuntimePublisher {
    tx: watch::Sender<Arc<RuntimeSnapshot>>,
    relist: Arc<Notify>,
    begun: Arc<AtomicU64>,
}

/// A point in the cache's history, taken right after an action (see [`RuntimeCache::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark(u64);

/// A cache with nothing in it yet (an empty snapshot, generation 0, from before any relist).
pub fn runtime_cache() -> (RuntimeCache, RuntimePublisher) {
    let empty = Arc::new(RuntimeSnapshot::new(0, None, None));
    let (tx, rx) = watch::channel(empty);
    let (relist, begun) = (Arc::new(Notify::new()), Arc::new(AtomicU64::new(0)));
    (
        RuntimeCache {
            rx,
            relist: relist.clone(),
            begun: begun.clone(),
        },
        RuntimePublisher { tx, relist, begun },
    )
}

impl RuntimeCache {
    /// The latest snapshot, however old (at most a relist period while the PLEG runs).
    pub fn latest(&self) -> Arc<RuntimeSnapshot> {
        self.rx.borrow().clone()
    }

    /// Now, in the cache's history: a relist that begins after this call has a generation of at
    /// least the mark (one already under way may have missed what was just done). Counted, not
    /// timed: two instants can be equal, and a coarse clock must not make a stale list fresh.
    pub fn mark(&self) -> Mark {
        Mark(self.begun.load(Ordering::SeqCst) + 1)
    }

    /// A snapshot from a relist begun after `mark` was taken: the latest if it is, else one
    /// relisted now (requests from many readers are served by one relist).
    pub async fn newer_than(&self, mark: Mark) -> Arc<RuntimeSnapshot> {
        let mut rx = self.rx.clone();
        loop {
            {
                let latest = rx.borrow_and_update();
                if latest.generation >= mark.0 {
                    return latest.clone();
                }
            }
            self.relist.notify_one();
            if rx.changed().await.is_err() {
                // The PLEG is gone (shutdown): the last snapshot is all there is.
                return self.rx.borrow().clone();
            }
        }
    }

    /// A snapshot newer than now: what the runtime holds after everything done so far.
    pub async fn fresh(&self) -> Arc<RuntimeSnapshot> {
        self.newer_than(self.mark()).await
    }
}

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

pub async fn run(
    provider: Arc<dyn Provider>,
    cache: RuntimePublisher,
    tx: mpsc::UnboundedSender<String>,
    shutdown: CancellationToken,
) {
    let mut previous: HashMap<String, (String, u8)> = HashMap::new();
    let mut last_relist: Option<Instant> = None;
    let mut tick = tokio::time::interval(RELIST_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = cache.relist.notified() => {}
        }
        let mut current = HashMap::new();
        let relist_started = Instant::now();
        if let Some(last) = last_relist.replace(relist_started) {
            crate::metrics::kubelet()
                .pleg_relist_interval
                .observe(relist_started.duration_since(last).as_secs_f64());
        }
        let generation = cache.begun.fetch_add(1, Ordering::SeqCst) + 1;
        let (listed, sandboxes) = (
            provider.list_containers().await,
            provider.list_pod_sandboxes().await,
        );
        if let Err(e) = listed.as_ref().and(sandboxes.as_ref()) {
            tracing::debug!(error = %e, "the runtime cannot be listed");
        }
        cache.tx.send_replace(Arc::new(RuntimeSnapshot::new(
            generation,
            listed.as_ref().ok().cloned(),
            sandboxes.ok(),
        )));
        // Nothing changed that anyone can know of while the runtime cannot be asked; the
        // relist after it is back reports what did.
        let Ok(listed) = listed else { continue };
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
        metrics
            .running_containers
            .get_or_create(&crate::metrics::ContainerStateLabels {
                container_state: state,
            })
            .set(i64::from(count));
    }
    metrics.running_pods.set(running_pods.len() as i64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn container(pod: &str, name: &str) -> ContainerSummary {
        ContainerSummary {
            id: format!("{pod}-{name}"),
            pod_uid: pod.into(),
            name: name.into(),
            attempt: 0,
            image_digest: String::new(),
            state: ContainerState::Running {
                started_at: SystemTime::UNIX_EPOCH,
            },
            usage: Default::default(),
            annotations: Default::default(),
        }
    }

    fn names(list: Option<&[ContainerSummary]>) -> Option<Vec<&str>> {
        list.map(|l| l.iter().map(|c| c.id.as_str()).collect())
    }

    #[test]
    fn a_snapshot_finds_each_pods_containers_in_the_providers_order() {
        let listed = ["b/x", "a/y", "b/w", "c/z", "a/v"]
            .iter()
            .map(|s| {
                let (pod, name) = s.split_once('/').unwrap();
                container(pod, name)
            })
            .collect();
        let snapshot = RuntimeSnapshot::new(1, Some(listed), None);
        assert_eq!(names(snapshot.of_pod("a")), Some(vec!["a-y", "a-v"]));
        assert_eq!(names(snapshot.of_pod("b")), Some(vec!["b-x", "b-w"]));
        assert_eq!(names(snapshot.of_pod("c")), Some(vec!["c-z"]));
        assert_eq!(names(snapshot.of_pod("d")), Some(vec![]));
        assert_eq!(snapshot.containers.as_ref().map(Vec::len), Some(5));
        // Unknown is not empty: readers skip rather than conclude that nothing runs.
        assert_eq!(names(RuntimeSnapshot::new(2, None, None).of_pod("a")), None);
        assert_eq!(
            names(RuntimeSnapshot::new(3, Some(vec![]), None).of_pod("a")),
            Some(vec![])
        );
    }
}
